"""HTTP requests and responses as they travel between the proxy and a replica.

The proxy reads a whole request, turns it into an ``HTTPRequestWire`` (a plain picklable
tuple) and sends it to a replica. The replica rebuilds a starlette ``Request`` with
``http_request.request_from_wire``, calls user code, and turns the return value into an
``HTTPResponseWire`` with ``to_http_response`` (or a stream, ``http_stream``); the proxy
writes that out. Both travel as plain tuples of their fields (``request_fields``,
``plain``; rebuilt with ``_make`` and ``response_from_wire``): a named tuple's pickle names
its class, and looking the class up costs each side about 3 us a request, more than the
rest of the pickle. This module does not import starlette (the proxy never loads it): a
starlette ``Response`` is recognised only where its module is loaded already.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

if TYPE_CHECKING:
    from starlette.responses import Response
    from starlette.types import Message

Header = tuple[bytes, bytes]

_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
_TEXT_TYPE: Header = (b"content-type", b"text/plain; charset=utf-8")
_BINARY_TYPE: Header = (b"content-type", b"application/octet-stream")
_JSON_TYPE: Header = (b"content-type", b"application/json")


# --------------------------------------------------------------------------- requests


class HTTPRequestWire(NamedTuple):
    """A fully read HTTP request, as sent from the proxy to a replica."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]  # lower-cased names, as in ASGI
    body: bytes
    scheme: str
    server: tuple[str, int] | None
    client: tuple[str, int] | None
    root_path: str
    http_version: str


def _address(value: Any) -> tuple[str, int] | None:
    """Return an ASGI ``server``/``client`` entry as a tuple (servers may send a list)."""
    if value is None or type(value) is tuple:
        return value
    host, port = value
    return (host, port)


def wire_from_scope(scope: Mapping[str, Any], body: bytes) -> HTTPRequestWire:
    """Build an :class:`HTTPRequestWire` from an ASGI http ``scope`` and its already-read ``body``.

    Raises:
        KeyError: ``scope`` has no ``method`` or ``path`` (it is not an http scope).
    """
    return HTTPRequestWire._make(request_fields(scope, body))


def request_fields(scope: Mapping[str, Any], body: bytes) -> tuple:
    """The fields of ``wire_from_scope(scope, body)`` as a plain tuple, as the proxy sends
    them (``HTTPRequestWire._make`` rebuilds the named tuple)."""
    return (scope["method"], scope["path"], scope.get("query_string", b""),
            [(name, value) for name, value in scope.get("headers", ())], body,
            scope.get("scheme", "http"), _address(scope.get("server")),
            _address(scope.get("client")), scope.get("root_path", ""),
            scope.get("http_version", "1.1"))


class BodyReceiver:
    """An ASGI ``receive`` that yields one complete body, then ``http.disconnect``."""

    __slots__ = ("_body",)

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body

    async def __call__(self) -> Message:
        body = self._body
        if body is None:
            return {"type": "http.disconnect"}
        self._body = None
        return {"type": "http.request", "body": body, "more_body": False}


# --------------------------------------------------------------------------- responses


class HTTPResponseWire(NamedTuple):
    """A complete HTTP response, as sent from a replica to the proxy; ``route``: the route
    template an ASGI app matched (``/api/items/{item_id}``), which the proxy's metrics
    label the request with, if the app says (None: the endpoint's route)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    route: Optional[str] = None


def plain(reply: Any) -> Any:
    """What a replica sends for ``reply``: an ``HTTPResponseWire`` as a plain tuple of its
    fields, anything else (a stream) as it is."""
    return tuple(reply) if type(reply) is HTTPResponseWire else reply


def response_from_wire(reply: Any) -> Any:
    """The proxy's side of ``plain``: a plain tuple is an ``HTTPResponseWire`` again;
    anything else (a stream, or a response that came as one) is returned as it is."""
    return HTTPResponseWire._make(reply) if type(reply) is tuple else reply


def _json_default(obj: Any) -> Any:
    """Turn a value the json module does not know into one it does."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(obj, numpy.ndarray):
            return obj.tolist()
        if isinstance(obj, numpy.generic):
            return obj.item()
    pydantic = sys.modules.get("pydantic")  # (a model is there only if pydantic is)
    if pydantic is not None and isinstance(obj, pydantic.BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # Shallow on purpose: nested values come back through this hook, so the output equals
        # dataclasses.asdict() without its deep copy of every field.
        return {field.name: getattr(obj, field.name) for field in dataclasses.fields(obj)}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", errors="replace")
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if isinstance(obj, Exception):
        return str(obj)
    raise TypeError(
        f"Object of type {type(obj).__name__} is not JSON serializable. Return a str, bytes, "
        "a starlette Response, or a JSON-encodable value."
    )


# One encoder for all calls: json.dumps() with options builds a new one every time.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_json_default)


def json_dumps(value: Any) -> bytes:
    """Encode ``value`` as compact UTF-8 JSON.

    Beyond the json module's types this accepts numpy arrays and scalars, pydantic models,
    dataclasses, bytes (decoded as UTF-8, bad bytes replaced), sets and exceptions (their
    message).

    Raises:
        TypeError: ``value`` holds an object of another type.
    """
    return _ENCODER.encode(value).encode("utf-8")


def _length_header(length: int) -> Header:
    return (_CONTENT_LENGTH, str(length).encode("ascii"))


def _plain(status: int, content_type: Header, body: bytes) -> HTTPResponseWire:
    return HTTPResponseWire(status, [content_type, _length_header(len(body))], body)


def _may_have_length(status: int) -> bool:
    """Whether servekit sets content-length for ``status``.

    Not for 1xx and 204 (a server must not send it) nor 304 (it describes a representation
    the response does not carry, so the user's value is kept).
    """
    return status >= 200 and status != 204 and status != 304


def _with_length(status: int, headers: list[Header], length: int) -> list[Header]:
    """Return ``headers`` with one accurate content-length (the same list if it already has)."""
    if not _may_have_length(status):
        return headers
    expected = str(length).encode("ascii")
    found = [value for name, value in headers if name == _CONTENT_LENGTH]
    if found == [expected]:
        return headers
    kept = [(name, value) for name, value in headers if name != _CONTENT_LENGTH]
    kept.append((_CONTENT_LENGTH, expected))
    return kept


def _is_response(value: Any) -> bool:
    """Whether ``value`` is a starlette ``Response`` (none is before its module is loaded:
    a plain function's replica does not load it)."""
    responses = sys.modules.get("starlette.responses")
    return responses is not None and isinstance(value, responses.Response)


def http_stream(value: Any,
                chunks_of: Callable[[Any], AsyncIterator[Any]]) -> AsyncIterator[Any] | None:
    """A streamed response for what a backend returned, or None if it is not one.

    A ``StreamingResponse`` keeps its status and headers; a generator or async generator
    (iterated by ``chunks_of``) is 200 ``text/plain; charset=utf-8``. The iterator yields
    ``(status, headers)`` first, then each chunk as bytes: ``str`` encoded with the charset,
    bytes as they are, anything else as a line of JSON. No content-length: the proxy sends
    it with chunked transfer encoding.
    """
    if _is_response(value) and hasattr(value, "body_iterator"):
        headers = [(name, header) for name, header in value.raw_headers
                   if name != _CONTENT_LENGTH and name != _TRANSFER_ENCODING]
        return _http_chunks(value.status_code, headers,
                            chunks_of(value.body_iterator),  # type: ignore[attr-defined]
                            value.charset)
    if inspect.isgenerator(value) or inspect.isasyncgen(value):
        return _http_chunks(200, [_TEXT_TYPE], chunks_of(value), "utf-8")
    return None


async def _http_chunks(status: int, headers: list[Header], chunks: AsyncIterator[Any],
                       charset: str) -> AsyncIterator[Any]:
    yield status, headers
    try:
        async for chunk in chunks:
            if isinstance(chunk, str):
                yield chunk.encode(charset)
            elif isinstance(chunk, (bytes, bytearray, memoryview)):
                yield bytes(chunk)
            else:
                yield json_dumps(chunk) + b"\n"
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


async def _run_response(response: Response) -> HTTPResponseWire:
    """Run a body-less response (e.g. ``FileResponse``) as an ASGI app and collect its output."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "server": None,
        "client": None,
    }
    start: Message = {}
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await response(scope, BodyReceiver(b""), send)
    status = start.get("status", response.status_code)
    body = b"".join(chunks)
    headers = [(name, value) for name, value in start.get("headers", ())]
    return HTTPResponseWire(status, _with_length(status, headers, len(body)), body)


async def to_http_response(value: Any) -> HTTPResponseWire:
    """Convert what a backend returned into an :class:`HTTPResponseWire`.

    - a starlette ``Response`` keeps its status, headers and body (a ``StreamingResponse``
      is streamed instead, see ``http_stream``). Background tasks attached to a response
      are not run.
    - ``str`` -> ``text/plain; charset=utf-8``; ``bytes``/``bytearray``/``memoryview`` ->
      ``application/octet-stream``; ``None`` -> an empty body; anything else -> JSON through
      :func:`json_dumps`. These get status 200.

    The result always carries an accurate ``content-length`` (except for 1xx, 204 and 304).

    Raises:
        TypeError: ``value`` cannot be encoded as JSON.
    """
    if _is_response(value):
        body = getattr(value, "body", None)
        if body is None:
            return await _run_response(value)
        if type(body) is not bytes:
            body = bytes(body)  # a memoryview does not pickle
        status = value.status_code
        return HTTPResponseWire(status, _with_length(status, value.raw_headers, len(body)), body)
    if isinstance(value, str):
        return _plain(200, _TEXT_TYPE, value.encode("utf-8"))
    if isinstance(value, bytes):
        return _plain(200, _BINARY_TYPE, value)
    if isinstance(value, (bytearray, memoryview)):
        return _plain(200, _BINARY_TYPE, bytes(value))
    if value is None:
        return HTTPResponseWire(200, [(_CONTENT_LENGTH, b"0")], b"")
    return _plain(200, _JSON_TYPE, json_dumps(value))


def loggable(text: str) -> str:
    """``text`` (a request path) safe to write in a log line: control characters such as a
    newline a client sent percent-encoded (``%0A``) are written as escapes, so a request
    cannot forge a log line."""
    if text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")


def error_response(exc: BaseException, status: int = 500) -> HTTPResponseWire:
    """Return ``"<ExcTypeName>: <message>"`` as a plain-text response with ``status``."""
    message = str(exc)
    name = type(exc).__name__
    return text_response(status, f"{name}: {message}" if message else name)


def text_response(status: int, text: str) -> HTTPResponseWire:
    """Return ``text`` as a ``text/plain; charset=utf-8`` response with ``status``."""
    return _plain(status, _TEXT_TYPE, text.encode("utf-8"))


def json_response(status: int, value: Any) -> HTTPResponseWire:
    """Return ``value`` encoded by :func:`json_dumps` as an ``application/json`` response.

    Raises:
        TypeError: ``value`` cannot be encoded as JSON.
    """
    return _plain(status, _JSON_TYPE, json_dumps(value))
