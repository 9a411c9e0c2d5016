"""What a backend receives: ``HTTPRequest`` for an HTTP call, ``ServeRequest`` for a call
through a Python handle.

An HTTP call gives the backend an ``HTTPRequest``: a starlette ``Request`` whose body is
already read, so sync code can read it too (``request.data``, ``request.json_data()``). A
call through a handle gives it a ``ServeRequest``, which offers the parts of the
``Request`` API that make sense without HTTP. The conversions between HTTP and what a
backend sees live in ``servekit._private.http_wire`` and ``http_request``; their names stay
importable from here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from servekit._private.http_request import HTTPRequest, request_from_wire
from servekit._private.http_wire import (
    HTTPRequestWire,
    HTTPResponseWire,
    error_response,
    json_dumps,
    json_response,
    text_response,
    to_http_response,
    wire_from_scope,
)
from servekit.exceptions import ServeError

__all__ = [
    "HTTPRequest",
    "HTTPRequestWire",
    "HTTPResponseWire",
    "KwargParams",
    "ServeRequest",
    "error_response",
    "json_dumps",
    "json_response",
    "request_from_wire",
    "text_response",
    "to_http_response",
    "wire_from_scope",
]


class KwargParams(dict):  # type: ignore[type-arg]
    """The keyword arguments of a handle call, shown as ``ServeRequest.query_params``.

    Values keep their Python types (they are not stringified).
    """

    def getlist(self, key: str) -> list[Any]:
        """Return ``[value]`` if ``key`` is present, else ``[]``."""
        return [self[key]] if key in self else []


class _CaseInsensitiveHeaders(Mapping[str, str]):
    """A read-only ``str -> str`` mapping whose keys compare case-insensitively."""

    __slots__ = ("_items",)

    def __init__(self, headers: Mapping[str, str] | None = None) -> None:
        self._items: dict[str, str] = (
            {key.lower(): value for key, value in headers.items()} if headers else {}
        )

    def __getitem__(self, key: str) -> str:
        return self._items[key.lower()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._items!r})"


class ServeRequest:
    """What a backend receives for a call through a Python handle.

    Args:
        data: the positional argument of the call, or ``None`` (default).
        kwargs: the keyword arguments; exposed as ``query_params`` (default: none).
        headers: ``str -> str`` headers, looked up case-insensitively (default: none).
        method: an HTTP-like method name (default ``"GET"``).
    """

    __slots__ = ("data", "headers", "method", "query_params")

    def __init__(
        self,
        data: Any = None,
        kwargs: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        method: str = "GET",
    ) -> None:
        self.data = data
        self.query_params = KwargParams(kwargs or ())
        self.headers: Mapping[str, str] = _CaseInsensitiveHeaders(headers)
        self.method = method

    async def body(self) -> Any:
        """Return the positional argument as is."""
        return self.data

    async def json(self) -> dict[str, Any]:
        """Return the positional argument.

        Raises:
            ServeError: it is not a dict.
        """
        return self.json_data()

    def json_data(self) -> dict[str, Any]:
        """Return the positional argument, from sync code too (as ``HTTPRequest``'s).

        Raises:
            ServeError: it is not a dict.
        """
        if not isinstance(self.data, dict):
            raise ServeError(
                f"Request data is not a dictionary. It is {type(self.data).__name__}. "
                "Pass a dict as the positional argument to use .json()."
            )
        return self.data

    async def form(self) -> dict[str, Any]:
        """Same as :meth:`json`."""
        return await self.json()

    def __repr__(self) -> str:
        return f"ServeRequest(method={self.method!r}, data=<{type(self.data).__name__}>)"
