"""Fakes for the proxy's unit tests: a transport the connection protocol writes to, fed by
hand, and the proxy built on a real router whose replicas are ``router_fakes`` replicas."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Dict, List, Optional, Tuple

import uvicorn
from router_fakes import Cluster, FakeReplica, make_router
from uvicorn.server import ServerState

from servekit._private.proxy.http_protocol import (
    HELD_BODY,
    ON_DISCONNECT,
    BodyBudget,
    HeldBody,
    ProxyHttpProtocol,
)
from servekit._private.proxy.proxy import HTTPProxy
from servekit._private.specs import EndpointInfo

TIMEOUT_S = 10.0


class FakeSocket:
    def __init__(self, fileno: int) -> None:
        self._fileno = fileno

    def fileno(self) -> int:
        return self._fileno

    def getsockname(self) -> tuple:
        return ("127.0.0.1", 8000)

    def getpeername(self) -> tuple:
        return ("127.0.0.1", 5000)


class FakeTransport(asyncio.Transport):
    """Records what the protocol writes; ``close`` ends the connection as asyncio would
    (once what is left to write is written: ``buffered`` bytes the client has not read
    keep it open); ``abort`` ends it at once."""

    def __init__(self, fileno: Optional[int] = None) -> None:
        super().__init__()
        self.written: List[bytes] = []
        self.closing = False
        self.lost = False
        self.buffered = 0
        self.eof_written = False
        self.protocol: Any = None
        self.socket = None if fileno is None else FakeSocket(fileno)

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if not self.buffered:
                asyncio.get_running_loop().call_soon(self.lose)

    def abort(self) -> None:
        self.closing = True
        asyncio.get_running_loop().call_soon(self.lose)

    def lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self.socket
        return ("127.0.0.1", 1234) if name in ("peername", "sockname") else default

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def reply(self) -> bytes:
        return b"".join(self.written)


def open_connection(app: Any, budget: Optional[BodyBudget] = None,
                    state: Optional[ServerState] = None, fileno: Optional[int] = None,
                    **options: Any) -> Tuple[ProxyHttpProtocol, FakeTransport]:
    """A new connection of the proxy's protocol serving ``app`` (``fast_lane=`` the proxy
    to serve it as the proxy does), its transport connected. ``limit_concurrency`` goes to
    uvicorn's config; other ``options`` to the protocol."""
    config = uvicorn.Config(app, loop="none", lifespan="off", log_level="warning",
                            proxy_headers=False,
                            limit_concurrency=options.pop("limit_concurrency", None))
    options.setdefault("max_header_bytes", 1000)
    options.setdefault("max_header_count", 50)
    options.setdefault("client_timeout_s", TIMEOUT_S)
    protocol = ProxyHttpProtocol(config, state or ServerState(), {},
                                 body_budget=budget or BodyBudget(1 << 30), **options)
    transport = FakeTransport(fileno)
    transport.protocol = protocol
    protocol.connection_made(transport)
    return protocol, transport


def proxy_on(cluster: Cluster, replica: FakeReplica, request_timeout_s: Optional[float] = None,
             asgi: bool = False, cap: int = 1) -> Tuple[HTTPProxy, Any]:
    """An ``HTTPProxy`` whose route ``/ep`` (an app's prefix with ``asgi``) leads to
    backend ``b``, served by ``replica``; and its router."""
    router, feed = make_router(cluster, cap=cap, b=[replica])
    feed.endpoints(EndpointInfo("ep", "/ep", ["GET", "POST", "HEAD"], {"b": 1.0}, asgi=asgi))
    return HTTPProxy(router, request_timeout_s=request_timeout_s), router


class Client:
    """One request as the proxy's ASGI side sees it: its scope, what the client sends
    (``messages``; then it waits), and what is sent to it."""

    def __init__(self, path: str = "/ep", method: str = "GET", call: str = "A",
                 *messages: Dict[str, Any]) -> None:
        self.scope: Dict[str, Any] = {
            "type": "http", "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"x"), (b"x-serve-call-method", call.encode())],
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
            ON_DISCONNECT: [], HELD_BODY: HeldBody(BodyBudget(1 << 30))}
        self.messages = list(messages) or [{"type": "http.request", "body": b""}]
        self.sent: List[Dict[str, Any]] = []
        self._forever: asyncio.Future = asyncio.get_running_loop().create_future()

    async def receive(self) -> Dict[str, Any]:
        if self.messages:
            return self.messages.pop(0)
        await self._forever
        raise AssertionError("unreachable")

    async def send(self, message: Dict[str, Any]) -> None:
        self.sent.append(message)

    def leave(self) -> None:
        """The client disconnects (the protocol calls what waits for that)."""
        for callback in self.scope[ON_DISCONNECT]:
            callback()

    def status(self) -> Optional[int]:
        starts = [m["status"] for m in self.sent if m["type"] == "http.response.start"]
        return starts[0] if starts else None


class HeldTimers:
    """Timers of one delay are kept instead of scheduled (the others go to the loop):
    ``fire()`` runs them when the test wants, in the loop turn it chooses."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.held: List[Tuple[Any, Callable[..., Any], tuple]] = []
        loop = asyncio.get_running_loop()
        self._call_later = loop.call_later
        loop.call_later = self._intercept  # type: ignore[method-assign]

    def _intercept(self, delay: float, callback: Callable[..., Any], *args: Any,
                   **kwargs: Any) -> Any:
        if delay != self.delay:
            return self._call_later(delay, callback, *args, **kwargs)
        handle = self._call_later(1e9, lambda: None)  # (for its cancel)
        self.held.append((handle, callback, args))
        return handle

    def fire(self) -> None:
        """Run the kept timers that were not cancelled."""
        held, self.held = self.held, []
        for handle, callback, args in held:
            if not handle.cancelled():
                handle.cancel()
                callback(*args)

