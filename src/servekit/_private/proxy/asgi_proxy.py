"""The proxy's side of an ASGI backend: requests passed through to the app as they come.

An HTTP request goes out with its first body message; the rest of its body follows as the
request's own stream, as the client sends it and the replica takes it (the proxy holds a
few chunks of it at most, never the whole body). A WebSocket connection goes out with its
connect message and stays on the replica it reached: the client's messages flow to the
app, the app's to the client, each way as fast as the other side takes them. Shadow copies
of such a request get its stream too, as far as their replicas keep up (``ShadowCopies``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Dict, Optional, Sequence

from servekit._private.http_wire import HTTPResponseWire, loggable
from servekit._private.routing.routed_request import ENDED, RoutedRequest
from servekit._private.wire.transport import ReplyStream

logger = logging.getLogger("servekit.proxy")

# The keys of an ASGI scope the app gets (the rest is the server's own business).
_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path",
               "query_string", "headers", "client", "server", "subprotocols", "extensions")
# Seconds an app has to end its side of a WebSocket its client closed before it is cancelled.
WEBSOCKET_CLOSE_GRACE_S = 5.0


class ShadowCopies:
    """The shadow copies of a request whose own stream follows it: each gets the items the
    request gets while its replica has room for them; one that falls behind is dropped
    (counted so), never holding the request back."""

    def __init__(self, copies: Sequence[RoutedRequest] = ()) -> None:
        self.copies = list(copies)

    def offer(self, item: Any) -> None:
        for copy in list(self.copies):
            if not copy.offer_chunk(item):
                self._drop(copy)

    def end(self, grace_s: Optional[float] = None) -> None:
        """The stream ended: so does each copy's; with ``grace_s``, copies still running
        that long after are cancelled (their request has ended)."""
        for copy in self.copies:
            copy.end_chunks()
        if grace_s is not None and self.copies:
            asyncio.get_running_loop().call_later(grace_s, self.cancel)

    def cancel(self) -> None:
        for copy in self.copies:
            copy.cancel()
        self.copies = []

    def drop(self) -> None:
        """The stream will not be whole: no copy can be served."""
        for copy in list(self.copies):
            self._drop(copy)

    def _drop(self, copy: RoutedRequest) -> None:
        self.copies.remove(copy)
        if copy.state != ENDED:  # (one that ended was answered, and counted then)
            copy.dropped = True
            copy.cancel()


def app_scope(scope: Dict[str, Any], route: str) -> Dict[str, Any]:
    """The scope an app mounted at ``route`` gets: the path whole, ``root_path`` the
    route (below the proxy's own root path), as behind any reverse proxy that mounts it."""
    forwarded = {key: scope[key] for key in _SCOPE_KEYS if key in scope}
    forwarded["root_path"] = scope.get("root_path", "") + ("" if route == "/" else route)
    return forwarded


async def forward_body(request: RoutedRequest, receive: Any, room: int,
                       taken: Callable[[int], None],
                       shadows: Optional[ShadowCopies] = None) -> bool:
    """Send the rest of a request body to the replica as it arrives, each chunk once the
    replica has room for it (and to the request's ``shadows``); False if it grew past
    ``room`` bytes (the rest is left unread). Ends early if the client leaves (the
    protocol cancels the request) or the request ends first (the app answered without
    reading it all). ``taken`` is told the size of each chunk sent on (the proxy no
    longer holds it)."""
    shadows = shadows if shadows is not None else ShadowCopies()
    whole = False
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return True
            chunk = message.get("body", b"")
            room -= len(chunk)
            if room < 0:
                return False
            if chunk:
                if not await request.send_chunk(chunk):
                    return True
                shadows.offer(chunk)
            taken(len(chunk))
            if not message.get("more_body", False):
                request.end_chunks()
                shadows.end()
                whole = True
                return True
    finally:
        if not whole:
            shadows.drop()


async def deny_websocket(scope: Dict[str, Any], send: Any,
                         response: HTTPResponseWire) -> str:
    """Refuse a WebSocket handshake with ``response`` where the server can send an HTTP
    response (the ``websocket.http.response`` extension), else with a close (403); the
    status sent."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": response.status,
                    "headers": response.headers})
        await send({"type": "websocket.http.response.body", "body": response.body})
        return str(response.status)
    await send({"type": "websocket.close", "code": 1008,
                "reason": response.body[:120].decode("utf-8", "replace")})
    return "403"


class WebSocketSession:
    """One WebSocket connection passed through to an app, from its first reply to its end.

    The status it reports, for the access log: 101 once the app accepted, the status of
    a refusal otherwise (403 for a close before accepting, as uvicorn answers it).
    ``failure`` is the proxy's response to a request that failed before its backend
    answered (sent as the refusal of the handshake).
    """

    def __init__(self, scope: Dict[str, Any], receive: Any, send: Any,
                 failure: Callable[[BaseException], HTTPResponseWire],
                 shadows: Optional[ShadowCopies] = None) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.failure = failure
        self.shadows = shadows if shadows is not None else ShadowCopies()
        self.status = "-"

    async def run(self, reply: asyncio.Future) -> str:
        """Pump messages both ways until either side ends the connection. The client's
        side flows from the start, so a client that leaves before the app accepted ends
        the request too."""
        request: Optional[RoutedRequest] = getattr(reply, "request", None)
        upstream = None if request is None else \
            asyncio.ensure_future(self._client_to_app(request))
        try:
            try:
                stream: ReplyStream = await reply
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the server is stopping
                return self.status  # the client left before the app answered
            except Exception as exc:
                return await deny_websocket(self.scope, self.send, self.failure(exc))
            await self._app_to_client(stream)
        finally:
            if upstream is not None:
                upstream.cancel()
            if request is not None:
                request.cancel()  # (a request that ended already is left as it is)
            self.shadows.end(WEBSOCKET_CLOSE_GRACE_S)
        return self.status

    async def _app_to_client(self, stream: ReplyStream) -> None:
        try:
            async for message in stream:
                kind = message["type"]
                if kind == "websocket.accept":
                    self.status = "101"
                elif self.status == "-" and kind == "websocket.close":
                    self.status = "403"
                elif self.status == "-" and kind == "websocket.http.response.start":
                    self.status = str(message.get("status", "-"))
                await self.send(message)
        except OSError:  # the client is gone (uvicorn's ClientDisconnected)
            pass
        except Exception as exc:  # the replica died, or the app raised
            await self._fail(exc)

    async def _client_to_app(self, request: RoutedRequest) -> None:
        """Send the client's messages on; once it disconnected, give the app a grace
        period to end its side, then cancel the request."""
        while True:
            message = await self.receive()
            if not await request.send_chunk(message):
                return  # the app's side ended
            self.shadows.offer(message)
            if message["type"] == "websocket.disconnect":
                request.end_chunks()
                break
        await asyncio.sleep(WEBSOCKET_CLOSE_GRACE_S)
        request.cancel()

    async def _fail(self, exc: BaseException) -> None:
        try:
            if self.status == "101":
                logger.warning("WebSocket to %s ended: %r", loggable(self.scope["path"]),
                               exc)
                await self.send({"type": "websocket.close", "code": 1011,
                                 "reason": "the backend failed"})
            elif self.status == "-":
                self.status = await deny_websocket(self.scope, self.send, self.failure(exc))
        except (OSError, RuntimeError):
            pass  # the client is gone, or the connection already closed
