"""The HTTP proxy process: an ASGI app on uvicorn that forwards requests to replicas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import uvicorn

from servekit._private import constants
from servekit._private.process import WorkerSpec
from servekit._private.router import Router
from servekit._private.specs import ProxySpec
from servekit._private.transport import RpcServer
from servekit.exceptions import BackendUnavailableError
from servekit.request import (
    HTTPResponseWire,
    error_response,
    json_response,
    text_response,
    wire_from_scope,
)

logger = logging.getLogger("servekit.proxy")

RouteTable = Dict[str, Tuple[str, List[str]]]


class HTTPProxy:
    """Routes by exact path to an endpoint, checks the method, forwards over the data plane."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.routes: RouteTable = {}
        self._routes_changed = asyncio.Event()
        self._removed_at: Dict[str, float] = {}
        router.on_update.append(self._update_routes)
        self._update_routes(router)

    def _update_routes(self, router: Router) -> None:
        old = self.routes
        self.routes = {info.route: (name, info.methods)
                       for name, info in router.endpoints.items() if info.route is not None}
        now = time.monotonic()
        for route in old.keys() - self.routes.keys():
            self._removed_at[route] = now
        self._removed_at = {route: at for route, at in self._removed_at.items()
                            if now - at < constants.ROUTE_GRACE_S and route not in self.routes}
        self._routes_changed.set()
        self._routes_changed = asyncio.Event()

    async def _match(self, path: str) -> Optional[Tuple[str, List[str]]]:
        """The endpoint of ``path``. A route removed moments ago (an endpoint being
        re-created) gets a short grace: the request waits for it to come back."""
        match = self.routes.get(path)
        removed_at = self._removed_at.get(path)
        while match is None and removed_at is not None:
            remaining = removed_at + constants.ROUTE_GRACE_S - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._routes_changed.wait(), remaining)
            except asyncio.TimeoutError:
                break
            match = self.routes.get(path)
        return match

    def route_table(self) -> Dict[str, list]:
        """Route -> [endpoint, methods], headless endpoints under their name."""
        table: Dict[str, list] = {}
        for name, info in self.router.endpoints.items():
            table[info.route if info.route is not None else name] = [name, list(info.methods)]
        return table

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        try:
            response = await self._respond(scope, receive)
        except ClientDisconnected:
            return  # nobody to answer; the truncated request was never sent on
        await send({"type": "http.response.start", "status": response.status,
                    "headers": response.headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _respond(self, scope: Dict[str, Any], receive: Any) -> HTTPResponseWire:
        path: str = scope["path"]
        if path.startswith("/-/"):
            return self._system_path(path)
        match = self.routes.get(path) or await self._match(path)
        if match is None:
            return text_response(404, f"Path '{path}' not found. The route table is at "
                                      "/-/routes.")
        endpoint, methods = match
        method = scope["method"]
        if method not in methods:
            return text_response(405, f"Method {method} is not allowed for {path}. Allowed "
                                      f"methods: {', '.join(methods)}.")
        body = await _read_body(receive)
        method_name: Optional[str] = None
        shard_key: Optional[str] = None
        for name, value in scope["headers"]:
            if name == b"x-serve-call-method":
                method_name = value.decode("latin-1")
            elif name == b"x-serve-shard-key":
                shard_key = value.decode("latin-1")
        wire = wire_from_scope(scope, body)
        try:
            reply = await self.router.send(endpoint, "http", shard_key, (method_name, wire))
            return await reply
        except Exception as exc:
            logger.warning("Request to %s failed: %r", path, exc)
            status = 503 if isinstance(exc, BackendUnavailableError) else 500
            return error_response(exc, status=status)

    def _system_path(self, path: str) -> HTTPResponseWire:
        if path == "/-/routes":
            return json_response(200, self.route_table())
        if path == "/-/healthz":
            return text_response(200, "success")
        if path == "/-/shadows":
            return json_response(200, self.shadow_table())
        return text_response(404, f"System path '{path}' not found. System paths: /-/routes, "
                                  "/-/healthz, /-/shadows.")

    def shadow_table(self) -> Dict[str, Dict[str, Dict[str, int]]]:
        """Shadow copies of HTTP requests: {endpoint: {backend: {sent, dropped, failed}}}."""
        table: Dict[str, Dict[str, Dict[str, int]]] = {}
        for (endpoint, backend), counts in self.router.shadow_stats.counts.items():
            table.setdefault(endpoint, {})[backend] = dict(counts)
        return table


class ClientDisconnected(Exception):
    """The HTTP client went away before its request body was complete."""


async def _read_body(receive: Any) -> bytes:
    """The whole request body; ``ClientDisconnected`` if the client left before its end."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def build_app(proxy: HTTPProxy, middlewares: list) -> Any:
    """Wrap the proxy in the user's starlette middlewares, the first one outermost."""
    app: Any = proxy
    for middleware in reversed(middlewares):
        cls, args, kwargs = middleware
        app = cls(app, *args, **kwargs)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server minus its signal handlers: the worker process owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run_proxy(worker: WorkerSpec, sock: socket.socket, stop: asyncio.Event) -> None:
    spec: ProxySpec = worker.load_payload()
    assert worker.controller_address is not None
    router = await Router.start(worker.controller_address, role="proxy")
    proxy = HTTPProxy(router)
    http_socket = socket.socket(fileno=worker.extra_fds["http"])
    config = uvicorn.Config(build_app(proxy, spec.middlewares), loop="none", http="httptools",
                            lifespan="off", log_level="warning", access_log=False,
                            server_header=False, date_header=False)
    server = _Server(config)
    serving = asyncio.ensure_future(server.serve(sockets=[http_socket]))

    async def ready() -> bool:
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
        return True

    rpc = RpcServer({"ready": ready, "ping": ready, "routes": _async(proxy.route_table)})
    await rpc.start(sock)
    await stop.wait()
    server.should_exit = True
    await serving
    router.close()


def _async(function: Any) -> Any:
    async def call() -> Any:
        return function()
    return call

