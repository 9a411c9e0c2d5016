"""The proxy on granian: ``HTTPProxy`` served through granian's RSGI interface.

granian (Rust, hyper) parses HTTP and does the socket work in compiled code, embedded in
the proxy's own event loop (``granian.server.embed``), on the listening socket the proxy
was given (shared with ``SO_REUSEPORT`` by several proxies as on uvicorn). Routing and the
wire stay ``HTTPProxy``'s: each request reaches it as an ASGI request (``RSGIRequest``
adapts granian's protocol), or, for a plain request without a body, straight through
``HTTPProxy.serve_now``'s routing without the ASGI messages.

Bounds as on uvicorn, where granian has the setting: the request head's time
(``client_timeout_s``, hyper's header read timeout: the connection is closed, without a
408) and size (``max_header_bytes``, at least hyper's 8 KiB; hyper's own limit of 100
headers, lower ``max_header_count`` checked here): 431. The rest is kept here: a body
stalled for ``client_timeout_s``, or slower in all than ``SERVEKIT_MIN_BODY_RATE`` allows
(408; the time the app did not ask for the body does not count), ``max_body_bytes`` (413
without reading the body whole), the held-body budget (503), a client that reads nothing
of a streamed response for ``SEND_TIMEOUT_S`` (the response ends), a WebSocket message
past ``max_body_bytes`` (1009).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Dict, List, Optional, Tuple

from granian._granian import SocketHolder
from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings
from granian.log import LogLevels
from granian.rsgi import ProtocolClosed
from granian.server.embed import Server

from servekit._private import constants
from servekit._private.http_wire import loggable
from servekit._private.proxy.http_protocol import (
    HELD_BODY,
    ON_DISCONNECT,
    BodyBudget,
    HeldBody,
    body_time_left,
    slow_body_text,
)
from servekit._private.specs import ProxySettings

logger = logging.getLogger("servekit.proxy")

# hyper's smallest read buffer: a request head up to it is always accepted.
_MIN_HEAD_BUFFER = 8192
# granian's logging setup, made incremental: it keeps the process's handlers (a full
# dictConfig would close them); its own logger says errors only.
_LOGGING = {"incremental": True, "handlers": {}, "formatters": {}, "loggers": {}}
# Seconds a request runs before its client's leaving is watched (``_Disconnects``).
_WATCH_AFTER_S = 0.02
_AT_LIMIT = b"The proxy is at its limit of requests in progress (HTTPOptions.limit_concurrency)."
_NO_BODY = {"type": "http.request", "body": b"", "more_body": False}
_DISCONNECT = {"type": "http.disconnect"}


class _Server(Server):
    """granian's embedded server on a listening socket it is given (not one it binds)."""

    def __init__(self, target: Any, sock: socket.socket, **kwargs: Any) -> None:
        self._sock = sock
        super().__init__(target, **kwargs)

    def _init_shared_socket(self) -> None:
        self._ssp = None
        # (granian's stubs name one argument: it takes the descriptor, is_uds, backlog)
        self._shd = SocketHolder(self._sock.fileno(), False,  # type: ignore[call-arg, assignment]
                                 self.backlog)
        self._sfd = self._sock.fileno()  # type: ignore[assignment]


class GranianFrontEnd:
    """Serves ``app`` (the proxy, or the user's middlewares around it) on granian. Without
    middlewares ``proxy`` serves body-less requests to its routes directly."""

    def __init__(self, proxy: Any, app: Any, options: ProxySettings,
                 budget: BodyBudget) -> None:
        self.proxy = proxy
        self.app = app
        self.options = options
        self.budget = budget
        self.fast = app is proxy
        self.requests = 0  # requests (and WebSockets) in progress
        self.started = False
        self._server: Optional[_Server] = None

    def in_progress(self) -> int:
        return self.requests

    async def serve(self, sock: socket.socket) -> None:
        options = self.options
        self._server = _Server(
            self, sock, interface=Interfaces.RSGI, http=HTTPModes.http1, websockets=True,
            backpressure=options.limit_concurrency, log_dictconfig=_LOGGING,
            log_level=LogLevels.error,
            http1_settings=HTTP1Settings(
                header_read_timeout=int(options.client_timeout_s * 1000),
                max_buffer_size=max(_MIN_HEAD_BUFFER, options.max_header_bytes)))
        # what is still in flight after the drain is cancelled then
        self._server.workers_kill_timeout = max(1, int(constants.PROCESS_STOP_TIMEOUT_S * 0.2))
        self.started = True
        await self._server.serve()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        self.requests += 1
        try:
            if self.requests >= self.options.limit_concurrency:
                # (as uvicorn's limit, which counts the connection of this request too)
                if scope.proto == "http":
                    protocol.response_bytes(503, [("retry-after", "1")], _AT_LIMIT)
                else:
                    protocol.close(503)
            elif scope.proto == "http":
                if not (self.fast and await self._serve_now(scope, protocol)):
                    await RSGIRequest(self, scope, protocol).run()
            else:
                await RSGIWebSocket(self, scope, protocol).run()
        finally:
            self.requests -= 1

    async def _serve_now(self, scope: Any, protocol: Any) -> bool:
        """Serve a request without a body to one of the proxy's routes in this task, its
        reply written in one call; False for anything else (the ASGI path serves it)."""
        return False


def _headers(scope: Any) -> List[Tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1"))
            for name, value in scope.headers.items()]


def _address(text: str) -> Optional[Tuple[str, int]]:
    host, _, port = text.rpartition(":")
    return (host, int(port)) if port.isdigit() else None


def _base_scope(kind: str, scope: Any, headers: List[Tuple[bytes, bytes]]) -> Dict[str, Any]:
    path = scope.path
    return {"type": kind, "asgi": {"version": "3.0"}, "http_version": scope.http_version,
            "scheme": scope.scheme if kind == "http" else
            ("wss" if scope.scheme == "https" else "ws"),
            "path": path, "raw_path": path.encode("utf-8"), "root_path": "",
            "query_string": scope.query_string.encode("latin-1"), "headers": headers,
            "client": _address(scope.client), "server": _address(scope.server)}


def _too_large(scope: Any, headers: List[Tuple[bytes, bytes]],
               options: ProxySettings) -> bool:
    """Whether a request head passes ``max_header_count``, or ``max_header_bytes`` where
    that is below what hyper holds to (its headers, path and query counted)."""
    if len(headers) > options.max_header_count:
        return True
    limit = options.max_header_bytes
    return limit < _MIN_HEAD_BUFFER and sum(len(name) + len(value) for name, value in headers) \
        + len(scope.path) + len(scope.query_string) > limit


def _str_headers(headers: Any) -> List[Tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


class _Disconnects(list):
    """A request's ``ON_DISCONNECT`` callbacks. The wait for its client to leave (granian's
    future of it) starts once the request has run ``_WATCH_AFTER_S``: asking granian costs
    more than a no-op request, and a client that leaves a request that quick finds it
    cancelled that much later."""

    def __init__(self, protocol: Any) -> None:
        super().__init__()
        self._protocol = protocol
        self._watch: Any = None  # the timer, then granian's future
        self.left = False

    def append(self, callback: Any) -> None:
        super().append(callback)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().call_later(_WATCH_AFTER_S, self._start)

    def _start(self) -> None:
        self._watch = self._protocol.client_disconnect()
        self._watch.add_done_callback(self._call)

    def _call(self, left: Any) -> None:
        if not left.cancelled():
            self.client_left()

    def client_left(self) -> None:
        """The client is gone (granian said so, or a write to it failed): call the
        callbacks, once."""
        if self.left:
            return
        self.left = True
        for callback in list(self):
            callback()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()


class RSGIRequest:
    """One HTTP request, passed to the ASGI app as uvicorn would pass it: its body as
    ``http.request`` messages (bounded as the module docstring says), its response from
    the app's ``http.response.*`` messages."""

    def __init__(self, front: GranianFrontEnd, scope: Any, protocol: Any) -> None:
        self.front = front
        self.protocol = protocol
        headers = _headers(scope)
        self.scope = _base_scope("http", scope, headers)
        self.scope["method"] = scope.method
        self.held = HeldBody(front.budget)
        self.disconnects = _Disconnects(protocol)
        self.scope[ON_DISCONNECT] = self.disconnects
        self.scope[HELD_BODY] = self.held
        self.length: Optional[int] = None  # the body's announced length
        self.chunked = False
        self.too_large_head = _too_large(scope, headers, front.options)
        for name, value in headers:
            if name == b"content-length" and value.isdigit():
                self.length = int(value)
            elif name == b"transfer-encoding":
                self.chunked = True
        self.received = 0
        self.waited = 0.0  # seconds spent waiting for the body's chunks
        self.body_done = not self.chunked and not self.length
        self._chunks: Any = None
        self.answered = False  # a response has begun (or the request was refused)
        self._status = 200
        self._headers: List[Tuple[str, str]] = []
        self._stream: Any = None

    async def run(self) -> None:
        try:
            if self.too_large_head:
                options = self.front.options
                self._refuse(431, f"The request head is larger than this server accepts "
                                  f"(at most {options.max_header_count} headers and "
                                  f"{options.max_header_bytes} bytes; HTTPOptions."
                                  "max_header_count / max_header_bytes).")
                return
            await self.front.app(self.scope, self.receive, self.send)
            if not self.answered:
                self.protocol.response_empty(500, [])
        finally:
            self.disconnects.close()
            self.held.release()

    def _refuse(self, status: int, text: str, *headers: Tuple[str, str]) -> None:
        """Answer ``status`` with ``text``; the connection closes (the rest of the body,
        if any, is never read)."""
        if self.answered:
            return
        self.answered = True
        self.protocol.response_bytes(status, [
            ("content-type", "text/plain; charset=utf-8"), ("connection", "close"),
            *headers], text.encode())

    async def receive(self) -> Dict[str, Any]:
        if self.body_done:
            if self.received == 0 and self._chunks is None:
                self._chunks = False  # (the one empty body message is given once)
                return _NO_BODY
            if not self.disconnects.left:
                await self.protocol.client_disconnect()
            return _DISCONNECT
        if self._chunks is None:
            self._chunks = self.protocol.__aiter__()
        timeout, rate = self.front.options.client_timeout_s, constants.MIN_BODY_RATE
        # A chunk may take client_timeout_s, and the body no longer than its bytes allow.
        left = body_time_left(self.waited, self.received, timeout, rate)
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            chunk = await asyncio.wait_for(self._chunks.__anext__(), max(0.0, min(timeout, left)))
        except StopAsyncIteration:
            self.body_done = True
            if self.length is not None and self.received < self.length:
                return _DISCONNECT  # (the client left mid-body)
            return _NO_BODY
        except asyncio.TimeoutError:
            self.body_done = True
            self.waited += loop.time() - began
            if left < timeout:
                self._refuse(408, slow_body_text(self.waited, self.received, timeout, rate))
            else:
                self._refuse(408, f"The request body did not arrive within {timeout} s "
                                  "(HTTPOptions.client_timeout_s).")
            return _DISCONNECT
        except (ProtocolClosed, OSError):
            self.body_done = True
            return _DISCONNECT
        if not self.front.budget.take(len(chunk)):
            self.body_done = True
            budget = self.front.budget
            self._refuse(503, f"The proxy already holds {budget.held} bytes of request "
                              f"bodies, its limit (HTTPOptions.max_held_body_bytes="
                              f"{budget.limit}). Retry later.", ("retry-after", "1"))
            return _DISCONNECT
        self.waited += loop.time() - began
        self.held.size += len(chunk)
        self.received += len(chunk)
        more = self.chunked or self.received < (self.length or 0)
        if not more:
            self.body_done = True
            self._chunks = False
        return {"type": "http.request", "body": chunk, "more_body": more}

    async def send(self, message: Dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._status = message["status"]
            self._headers = _str_headers(message.get("headers", ()))
            for name, value in self._headers:
                if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                    logger.error("Backend response header %r has a line break; answering "
                                 "500.", name)
                    self._refuse(500, "Internal Server Error")
                    break
            return
        if kind != "http.response.body":
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self._stream is None:
            if self.answered:
                return  # (refused already, or the client left)
            self.answered = True
            if not more:
                self._respond(bytes(body))
                return
            self._stream = self.protocol.response_stream(self._status, self._headers)
        if body:
            try:
                await asyncio.wait_for(self._stream.send_bytes(bytes(body)),
                                       constants.SEND_TIMEOUT_S)
            except asyncio.TimeoutError:
                logger.info("Ended a response whose client read nothing of it for %s s "
                            "(SERVEKIT_SEND_TIMEOUT_S).", constants.SEND_TIMEOUT_S)
                raise OSError("the client stopped reading") from None
            except ProtocolClosed:
                # The client left: its ON_DISCONNECT callbacks stop the request, and this
                # task ends here (the cancellation they make is lost when granian's word
                # of the disconnect and the failed write land in one turn: wait_for then
                # returns the write's failure instead, and the stream ran on for good).
                self.disconnects.client_left()
                raise asyncio.CancelledError() from None


    def _respond(self, body: bytes) -> None:
        """Answer in one call, framed by the body's length (an ASGI app's one-message
        response may give no Content-Length, or a Transfer-Encoding its body is not encoded
        in); one whose Content-Length disagrees with its body gets 502, as on uvicorn."""
        status, headers, length = self._status, [], None
        for name, value in self._headers:
            if name == "content-length":
                length = value if length is None or value == length else "?"
            elif name != "transfer-encoding":
                headers.append((name, value))
        if length is not None and (self.scope["method"] == "HEAD" or status == 304):
            headers.append(("content-length", length))  # (of the body not sent)
        elif length is not None and (not length.isdigit() or int(length) != len(body)):
            what = f"Content-Length {length!r} and a body of {len(body)} bytes"
            logger.error("The backend's response to %s is malformed: %s. Answering 502.",
                         loggable(self.scope["path"]), what)
            self.answered = False
            self._refuse(502, f"The backend sent a malformed response ({what}).")
            return
        self.protocol.response_bytes(status, headers, body)


class RSGIWebSocket:
    """One WebSocket, passed to the ASGI app as uvicorn would pass it. The client's
    messages count in the body budget while the proxy holds them."""

    def __init__(self, front: GranianFrontEnd, scope: Any, protocol: Any) -> None:
        self.front = front
        self.protocol = protocol
        headers = _headers(scope)
        self.scope = _base_scope("websocket", scope, headers)
        self.scope["subprotocols"] = [
            part.strip() for name, value in headers if name == b"sec-websocket-protocol"
            for part in value.decode("latin-1").split(",") if part.strip()]
        # (a refusal's status is sent, its headers and body are not: RSGI has no way)
        self.scope["extensions"] = {"websocket.http.response": {}}
        self._connected = False
        self._transport: Any = None
        self._accepted = asyncio.Event()  # or ended before it was accepted
        self._closed = False
        self._held = 0

    async def run(self) -> None:
        try:
            await self.front.app(self.scope, self.receive, self.send)
        finally:
            self._give_back()
            if not self._closed:
                self._closed = True
                self._accepted.set()
                self.protocol.close(None if self._transport is not None else 500)

    def _give_back(self) -> None:
        self.front.budget.give_back(self._held)
        self._held = 0

    async def receive(self) -> Dict[str, Any]:
        if not self._connected:
            self._connected = True
            return {"type": "websocket.connect"}
        await self._accepted.wait()
        self._give_back()  # (the app passed the last message on)
        if self._transport is None or self._closed:
            return {"type": "websocket.disconnect", "code": 1006}
        try:
            message = await self._transport.receive()
        except (ProtocolClosed, OSError):
            message = None
        if message is None or message.kind == 0:
            self._closed = True
            return {"type": "websocket.disconnect", "code": 1005}
        data = message.data
        size = len(data)
        limit = self.front.options.max_body_bytes
        if size > limit or not self.front.budget.take(size):
            self._closed = True
            self.protocol.close(1009 if size > limit else 1013)
            return {"type": "websocket.disconnect", "code": 1009 if size > limit else 1013}
        self._held = size
        if message.kind == 1:
            return {"type": "websocket.receive", "bytes": data}
        return {"type": "websocket.receive", "text": data}

    async def send(self, message: Dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.http.response.body":
            return  # (its status was sent)
        if self._closed:
            raise OSError("the WebSocket is closed")
        if kind == "websocket.accept":
            self._transport = await self.protocol.accept()
            self._accepted.set()
        elif kind == "websocket.send":
            if self._transport is None:
                raise RuntimeError("a WebSocket message sent before the connection was "
                                   "accepted")
            try:
                text = message.get("text")
                if text is not None:
                    await self._transport.send_str(text)
                else:
                    await self._transport.send_bytes(message.get("bytes") or b"")
            except ProtocolClosed:
                raise OSError("the client is gone") from None
        elif kind == "websocket.http.response.start" and self._transport is None:
            self._closed = True
            self._accepted.set()
            self.protocol.close(message["status"])
        elif kind == "websocket.close":
            self._closed = True
            self._accepted.set()
            self.protocol.close(message.get("code", 1000) if self._transport is not None
                                else 403)
