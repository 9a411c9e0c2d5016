"""A replica process: builds the user's callable once, then runs requests against it.

Sync callables run in a thread pool, so the event loop stays free for health pings, config
updates and drain while user code blocks; async callables run on the loop itself.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Optional, Tuple

import cloudpickle
from starlette.requests import Request

from servekit._private.batching import BatchQueue
from servekit._private.context import ReplicaContext, set_replica_context
from servekit._private.import_path import import_attribute
from servekit._private.process import WorkerSpec
from servekit._private.specs import ReplicaSpec
from servekit._private.transport import Busy, RpcServer, current_peer, notify
from servekit.config import BackendConfig, BackendMetadata, validate_backend_against_config
from servekit.exceptions import ServeError
from servekit.request import (
    HTTPRequestWire,
    HTTPResponseWire,
    ServeRequest,
    error_response,
    request_from_wire,
    to_http_response,
)

logger = logging.getLogger("servekit.replica")

# A resolved method: the callable, whether it is async, and its batch queue if batched.
_Target = Tuple[Callable, bool, Optional[BatchQueue]]


class Replica:
    """The user's callable plus the bookkeeping that serving it needs.

    Admission happens here: a request that arrives while ``max_concurrent_queries`` are
    already in flight is refused with ``Busy``, and the refused router is notified when a
    slot frees, so the cap holds however many routers send to this replica.
    """

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.config: BackendConfig = spec.config
        self.metadata: Optional[BackendMetadata] = spec.metadata
        self._callable: Any = None
        self._constructed: Optional[asyncio.Future] = None
        # Constructor and reconfigure run here, so they never wait behind user requests.
        self._control_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"servekit-{spec.replica_tag}-control")
        self._pool = ThreadPoolExecutor(max_workers=1,
                                        thread_name_prefix=f"servekit-{spec.replica_tag}")
        self._pool_size = 1
        self._in_flight = 0
        self._cap = 1
        self._refused: set = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._targets: Dict[str, _Target] = {}

    # ------------------------------------------------------------- construction

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._constructed = asyncio.ensure_future(
            loop.run_in_executor(self._control_pool, self._construct))

    def _construct(self) -> BackendMetadata:
        target, init_args = cloudpickle.loads(self.spec.replica_config.serialized)
        if isinstance(target, str):
            target = import_attribute(target)
        metadata = BackendMetadata.inspect(target)
        validate_backend_against_config(metadata, self.config)
        self._callable = target(*init_args) if metadata.is_class else target
        self.metadata = metadata
        if self.config.user_config is not None:
            self._reconfigure_blocking(self.config.user_config)
        return metadata

    async def ready(self) -> BackendMetadata:
        """Return once the constructor has finished (raising what it raised)."""
        assert self._constructed is not None
        metadata = await asyncio.shield(self._constructed)
        self._apply_limits()
        return metadata

    # ------------------------------------------------------------- config

    async def update_config(self, config: BackendConfig) -> None:
        """Apply a new config in place; call ``reconfigure`` only if ``user_config`` changed."""
        old, self.config = self.config, config
        self._apply_limits()
        if config.user_config != old.user_config and config.user_config is not None:
            await asyncio.get_running_loop().run_in_executor(
                self._control_pool, self._reconfigure_blocking, config.user_config)

    def _apply_limits(self) -> None:
        assert self.metadata is not None
        self._cap = self.config.effective_max_concurrent_queries(self.metadata.is_async)
        if self._cap > self._pool_size:
            # Sync calls run in these threads; a larger cap needs more of them.
            old, self._pool = self._pool, ThreadPoolExecutor(
                max_workers=self._cap, thread_name_prefix=f"servekit-{self.spec.replica_tag}")
            self._pool_size = self._cap
            old.shutdown(wait=False)
        self._notify_refused()

    def _reconfigure_blocking(self, user_config: Any) -> None:
        reconfigure = getattr(self._callable, "reconfigure", None)
        if reconfigure is None:
            raise ValueError(f"user_config is set but backend '{self.spec.backend_tag}' has "
                             "no reconfigure(user_config) method.")
        result = reconfigure(user_config)
        if inspect.isawaitable(result):
            asyncio.run(_await(result))

    # ------------------------------------------------------------- requests

    def _resolve(self, method_name: Optional[str]) -> _Target:
        key = method_name or "__call__"
        target = self._targets.get(key)
        if target is not None:
            return target
        assert self.metadata is not None
        if self.metadata.is_class:
            public = key == "__call__" or not key.startswith("_")
            method = getattr(self._callable, key, None) if public else None
            if method is None or not callable(method):
                raise ServeError(f"Backend '{self.spec.backend_tag}' has no method '{key}'. "
                                 f"Available methods: {list(self.metadata.methods)}.")
            name = key
        else:
            method, name = self._callable, "__call__"  # a function answers every method name
        is_async = inspect.iscoroutinefunction(method)
        queue = None
        if name in self.metadata.batch_methods:
            queue = BatchQueue(functools.partial(self._call, method, is_async),
                               self._batch_limits, concurrent=is_async)
        target = self._targets[key] = (method, is_async, queue)
        return target

    def _batch_limits(self) -> Tuple[int, float]:
        return self.config.max_batch_size or 1, self.config.batch_wait_timeout

    async def _call(self, method: Callable, is_async: bool, argument: Any) -> Any:
        if is_async:
            return await method(argument)
        result = await asyncio.get_running_loop().run_in_executor(self._pool, method, argument)
        if inspect.isawaitable(result):
            result = await result
        return result

    def _admit(self) -> None:
        if self._in_flight >= self._cap:
            self._refused.add(current_peer.get())
            raise Busy()
        self._in_flight += 1
        self._idle.clear()

    def _finish(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()
        self._notify_refused()

    def _notify_refused(self) -> None:
        if self._refused and self._in_flight < self._cap:
            refused, self._refused = self._refused, set()
            for peer in refused:
                notify(peer)

    async def _run(self, method_name: Optional[str], argument: Any) -> Any:
        method, is_async, queue = self._resolve(method_name)
        if queue is not None:
            return await queue.submit(argument)
        return await self._call(method, is_async, argument)

    async def handle_http(self, method_name: Optional[str],
                          wire: HTTPRequestWire) -> HTTPResponseWire:
        self._admit()
        try:
            result = await self._run(method_name, request_from_wire(wire))
            return await to_http_response(result)
        except Exception as exc:
            logger.exception("Backend %s raised while handling %s %s", self.spec.backend_tag,
                             wire.method, wire.path)
            return error_response(exc)
        finally:
            self._finish()

    async def handle_call(self, method_name: Optional[str], args: tuple, kwargs: dict,
                          http_method: str, headers: Dict[str, str]) -> Any:
        self._admit()
        try:
            argument: Any
            if len(args) == 1 and isinstance(args[0], Request):
                argument = args[0]
            else:
                argument = ServeRequest(args[0] if args else None, kwargs, headers, http_method)
            return await self._run(method_name, argument)
        finally:
            self._finish()

    async def drain(self) -> None:
        """Wait until no request is in flight (the controller stopped new ones first)."""
        while True:
            await self._idle.wait()
            # Let requests a router wrote before it learned of the drain be read.
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
