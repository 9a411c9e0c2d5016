"""The no-op as an RSGI app: the ceiling of granian's RSGI interface in benchmarks/suite.py."""

from typing import Any

_HEADERS = [("content-type", "text/plain; charset=utf-8")]


async def app(scope: Any, protocol: Any) -> None:
    protocol.response_bytes(200, _HEADERS, b"ok")
