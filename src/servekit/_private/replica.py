"""A replica process: builds the user's callable once, then runs requests against it.

Sync callables run in a thread pool, so the event loop stays free for health pings, config
updates and drain while user code blocks; async callables run on the loop itself.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Optional, Tuple

import cloudpickle
from starlette.requests import Request

from servekit._private.context import ReplicaContext, set_replica_context
from servekit._private.controller.state import ReplicaSpec
from servekit._private.import_path import import_attribute
from servekit._private.process import WorkerSpec
from servekit._private.transport import RpcServer
from servekit.config import BackendConfig, BackendMetadata
from servekit.exceptions import ServeError
from servekit.request import (
    HTTPRequestWire, HTTPResponseWire, ServeRequest, error_response, request_from_wire,
    to_http_response,
)

logger = logging.getLogger("servekit.replica")


class Replica:
    """The user's callable plus the bookkeeping that serving it needs."""

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.config: BackendConfig = spec.config
        self.metadata: Optional[BackendMetadata] = spec.metadata
        self._callable: Any = None
        self._constructed: Optional[asyncio.Future] = None
        self._pool = ThreadPoolExecutor(max_workers=64,
                                        thread_name_prefix=f"servekit-{spec.replica_tag}")
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False
        self._methods: Dict[str, Tuple[Callable, bool]] = {}

    # ------------------------------------------------------------- construction

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._constructed = asyncio.ensure_future(
            loop.run_in_executor(self._pool, self._construct))

    def _construct(self) -> BackendMetadata:
        target, init_args = cloudpickle.loads(self.spec.replica_config.serialized)
        if isinstance(target, str):
            target = import_attribute(target)
        metadata = BackendMetadata.inspect(target)
        if inspect.isclass(target):
            self._callable = target(*init_args)
        else:
            self._callable = target
        self.metadata = metadata
        if self.config.user_config is not None:
            self._reconfigure_blocking(self.config.user_config)
        return metadata

    async def ready(self) -> BackendMetadata:
        """Return once the constructor has finished (raising what it raised)."""
        assert self._constructed is not None
        return await asyncio.shield(self._constructed)

    # ------------------------------------------------------------- config

    async def update_config(self, config: BackendConfig) -> None:
        """Apply a new config in place; call ``reconfigure`` only if ``user_config`` changed."""
        old, self.config = self.config, config
        if config.user_config != old.user_config and config.user_config is not None:
            await asyncio.get_running_loop().run_in_executor(
                self._pool, self._reconfigure_blocking, config.user_config)

    def _reconfigure_blocking(self, user_config: Any) -> None:
        reconfigure = getattr(self._callable, "reconfigure", None)
        if reconfigure is None:
            raise ValueError(f"user_config is set but backend '{self.spec.backend_tag}' has "
                             "no reconfigure(user_config) method.")
        result = reconfigure(user_config)
        if inspect.isawaitable(result):
            asyncio.run(_await(result))

    # ------------------------------------------------------------- requests

    def _resolve(self, method_name: Optional[str]) -> Tuple[Callable, bool]:
        name = method_name or "__call__"
        cached = self._methods.get(name)
        if cached is not None:
            return cached
        assert self.metadata is not None
        if self.metadata.is_class:
            public = name == "__call__" or not name.startswith("_")
            method = getattr(self._callable, name, None) if public else None
            if method is None or not callable(method):
                raise ServeError(f"Backend '{self.spec.backend_tag}' has no method '{name}'. "
                                 f"Available methods: {list(self.metadata.methods)}.")
        else:
            method = self._callable  # a function backend answers every method name
        resolved = (method, inspect.iscoroutinefunction(method))
        self._methods[name] = resolved
        return resolved

    async def _run(self, method_name: Optional[str], argument: Any) -> Any:
        self._in_flight += 1
        self._idle.clear()
        try:
            method, is_async = self._resolve(method_name)
            if is_async:
                return await method(argument)
            result = await asyncio.get_running_loop().run_in_executor(
                self._pool, method, argument)
            if inspect.isawaitable(result):
                result = await result
            return result
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def handle_http(self, method_name: Optional[str],
                          wire: HTTPRequestWire) -> HTTPResponseWire:
        try:
            result = await self._run(method_name, request_from_wire(wire))
            return await to_http_response(result)
        except Exception as exc:
            logger.exception("Backend %s raised while handling %s %s", self.spec.backend_tag,
                             wire.method, wire.path)
            return error_response(exc)

    async def handle_call(self, method_name: Optional[str], args: tuple, kwargs: dict,
                          http_method: str, headers: Dict[str, str]) -> Any:
        if len(args) == 1 and isinstance(args[0], Request):
            argument = args[0]
        else:
            argument = ServeRequest(args[0] if args else None, kwargs, headers, http_method)
        return await self._run(method_name, argument)

    async def drain(self) -> None:
        """Wait until no request is in flight (the controller stopped new ones first)."""
        self._draining = True
        while True:
            await self._idle.wait()
            # Let requests already written to the socket by a router be read.
            await asyncio.sleep(0.05)
            if self._in_flight == 0:
                return

    async def ping(self) -> str:
        return self.spec.replica_tag


async def _await(awaitable: Any) -> Any:
    return await awaitable


async def run_replica(worker: WorkerSpec, sock: socket.socket, stop: asyncio.Event) -> None:
    spec: ReplicaSpec = worker.load_payload()
    assert worker.controller_address is not None
    set_replica_context(ReplicaContext(spec.backend_tag, spec.replica_tag,
                                       worker.controller_address))
    replica = Replica(spec)
    server = RpcServer({
        "ready": replica.ready, "http": replica.handle_http, "call": replica.handle_call,
        "update_config": replica.update_config, "drain": replica.drain, "ping": replica.ping,
    })
    replica.start()
    await server.start(sock)
    await stop.wait()
