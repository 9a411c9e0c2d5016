"""What a backend receives for an HTTP call: a starlette ``Request`` (an ``HTTPRequest``)
rebuilt from the ``HTTPRequestWire`` the proxy sent. A module apart from ``http_wire``: the
proxy imports that one, and never loads starlette.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from starlette.requests import Request

from servekit._private.http_wire import BodyReceiver, HTTPRequestWire


def request_from_wire(wire: HTTPRequestWire) -> HTTPRequest:
    """Rebuild the starlette ``Request`` (an :class:`HTTPRequest`) of an HTTP call."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": wire.http_version,
        "method": wire.method,
        "scheme": wire.scheme,
        "path": wire.path,
        "raw_path": quote(wire.path).encode("ascii"),
        "query_string": wire.query_string,
        "root_path": wire.root_path,
        "headers": wire.headers,
        "server": wire.server,
        "client": wire.client,
    }
    return HTTPRequest(scope, wire.body)


class HTTPRequest(Request):
    """What a backend receives for an HTTP call: a starlette ``Request`` whose body the
    proxy has already read whole.

    Async code reads it as from any ``Request`` (``await request.body()``, ``await
    request.json()``: they return at once); sync code, which cannot await, reads
    ``request.data`` (the body's bytes) or ``request.json_data()``.
    """

    def __init__(self, scope: dict[str, Any], body: bytes) -> None:
        super().__init__(scope, BodyReceiver(body))
        self._body = body  # what starlette's body(), stream() and json() return

    @property
    def data(self) -> bytes:
        """The body (``b""`` if there is none)."""
        return self._body

    def json_data(self) -> Any:
        """The body parsed as JSON, as ``await request.json()`` returns it.

        Raises:
            json.JSONDecodeError: the body is not JSON (a ``ValueError``).
        """
        if not hasattr(self, "_json"):
            self._json = json.loads(self._body)
        return self._json
