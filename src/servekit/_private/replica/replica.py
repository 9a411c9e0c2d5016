"""A replica process: builds the user's callable once, then runs requests against it.

Sync callables run on worker threads, ``sync_threads`` at a time (one by default, so a sync
method never runs twice at once), so the event loop stays free for health pings, config
updates and drain while user code blocks; async callables run on the loop itself.
``reconfigure`` runs alone: it waits for the calls running to end, and holds back new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    Iterator,
    Optional,
    Tuple,
    Union,
)

import cloudpickle
from starlette.requests import Request

from servekit._private import constants, metrics
from servekit._private.backend_metadata import BackendMetadata
from servekit._private.config_checks import validate_backend_against_config
from servekit._private.context import (
    MODEL_ID_HEADER,
    ReplicaContext,
    current_model_id,
    current_request_id,
    set_replica_context,
)
from servekit._private.http_request import request_from_wire
from servekit._private.http_wire import (
    HTTPRequestWire,
    HTTPResponseWire,
    error_response,
    http_stream,
    loggable,
    plain,
    to_http_response,
)
from servekit._private.import_path import import_attribute
from servekit._private.memory import release_freed_memory
from servekit._private.replica.admission import STREAMING, Admission, current_admission, outlast
from servekit._private.replica.thread_lane import ThreadLane
from servekit._private.specs import ReplicaSettings, ReplicaSpec, WorkerSpec
from servekit._private.user_errors import FailureLog
from servekit._private.wire.transport import (
    Busy,
    ReplyStream,
    RpcServer,
    Stream,
    current_peer,
    notify,
)
from servekit.exceptions import MethodNotFoundError, ServeError
from servekit.request import ServeRequest

# (imported where a backend uses them: an ASGI app, batching, multiplexed models; a plain
# function's replica does without them)
if TYPE_CHECKING:
    from servekit._private.replica.asgi_runner import AppCall, Lifespan
    from servekit._private.replica.batching import BatchQueue

logger = logging.getLogger("servekit.replica")

_DONE = object()  # what next() returns for a generator that is exhausted
# A resolved method: the callable, whether it is async, and its batch queue if batched.
_Target = Tuple[Callable, bool, Optional["BatchQueue"]]


def _cancelled_by_servekit() -> bool:
    """Whether the running task is being cancelled (its caller went away), as opposed to
    user code raising ``CancelledError`` of its own."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return False  # a worker thread (constructor, reconfigure): no task to cancel
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return task is not None and cancelling is not None and cancelling() > 0


def contained(backend_tag: str, exc: BaseException) -> BaseException:
    """What to raise for ``exc``, raised by user code beyond ``Exception``
    (``SystemExit``, ``KeyboardInterrupt``, its own ``CancelledError``): a ``ServeError``
    naming it, so that request fails and the replica keeps serving. A real cancellation of
    the task (its caller went away) stays itself."""
    if isinstance(exc, asyncio.CancelledError) and _cancelled_by_servekit():
        return exc
    error = ServeError(f"Backend '{backend_tag}' raised {type(exc).__name__}({exc}) while "
                       "handling this request; servekit failed the request and the replica "
                       "keeps serving. Raise an Exception subclass instead.")
    error.__cause__ = exc
    return error


@contextlib.contextmanager
def user_code(backend_tag: str) -> Iterator[None]:
    """Run user code with ``contained`` applied to what it raises."""
    try:
        yield
    except Exception:
        raise
    except BaseException as exc:
        raise contained(backend_tag, exc) from exc


class CallGate:
    """User calls run together; an exclusive section (``reconfigure``) runs alone.

    The exclusive section waits for running calls to end and holds back new ones until it
    is done; it is served before calls that arrive after it, so load cannot starve it.
    """

    def __init__(self) -> None:
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()  # cleared while an exclusive section waits or runs
        self._open.set()
        self._exclusive_waiting = 0
        self._exclusive = asyncio.Lock()

    def enter(self) -> bool:
        """Start a user call if no exclusive section waits or runs (then ``leave`` after)."""
        if not self._open.is_set():
            return False
        self._running += 1
        if self._running == 1:
            self._idle.clear()
        return True

    async def enter_when_open(self) -> None:
        """Start a user call once the gate is open (then ``leave`` after)."""
        while not self.enter():
            await self._open.wait()

    async def pass_through(self) -> None:
        """Return once the gate is open, holding nothing: for work that may last as long as
        a connection (an ASGI app's WebSocket), which starts between exclusive sections but
        must not make one wait for its end."""
        while not self._open.is_set():
            await self._open.wait()

    def leave(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        self._exclusive_waiting += 1
        self._open.clear()
        try:
            async with self._exclusive:
                await self._idle.wait()
                yield
        finally:
            self._exclusive_waiting -= 1
            if self._exclusive_waiting == 0:
                self._open.set()


class Replica:
    """The user's callable plus the bookkeeping that serving it needs.

    Admission happens here: a request that arrives while ``max_concurrent_queries`` are
    already in flight is refused with ``Busy``, and the refused router is notified when a
    slot frees, so the cap holds however many routers send to this replica.
    """

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.tag = spec.backend_tag
        self.config: ReplicaSettings = spec.config
        self.metadata: Optional[BackendMetadata] = spec.metadata
        self._callable: Any = None
        self._constructed: Optional[asyncio.Future] = None
        self._app: Any = None  # an ASGI backend's app
        self._lifespan: Optional[Lifespan] = None
        self._started: Optional[asyncio.Future] = None  # the app's lifespan startup
        # Constructor and reconfigure run here, never behind user requests; check_health
        # has a thread of its own, so a long reconfigure does not fail health pings.
        self._control_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"servekit-{spec.replica_tag}-control")
        self._health_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"servekit-{spec.replica_tag}-health")
        self._lane = self._new_lane(self.config.sync_threads)
        self._gate = CallGate()
        self._in_flight = 0
        self._cap = 1
        self._refused: Dict[Any, None] = {}  # peers refused meanwhile, in order
        self._idle = asyncio.Event()
        self._idle.set()
        self._targets: Dict[str, _Target] = {}
        labels = (spec.backend_tag, spec.replica_tag)
        self._running = metrics.RUNNING.labels(*labels)
        self._processing = metrics.PROCESSING.labels(*labels)
        self._requests = metrics.REPLICA_REQUESTS.labels(*labels)
        self._errors = metrics.REPLICA_ERRORS.labels(*labels)
        self._batch_sizes = metrics.BATCH_SIZE.labels(*labels)
        self._failures = FailureLog(logger, spec.backend_tag)

    def _new_lane(self, threads: int) -> ThreadLane:
        return ThreadLane(asyncio.get_running_loop(), threads, f"servekit-{self.spec.replica_tag}")

    # ------------------------------------------------------------- construction

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._constructed = asyncio.ensure_future(
            loop.run_in_executor(self._control_pool, self._construct))
        # What the constructor raised is reported by ``ready``; a replica stopped before
        # anyone asked does not log it again as never retrieved.
        self._constructed.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _construct(self) -> BackendMetadata:
        target, init_args = cloudpickle.loads(self.spec.replica_config.serialized)
        if isinstance(target, str):
            target = import_attribute(target)
        metadata = BackendMetadata.inspect(target)
        validate_backend_against_config(metadata, self.config)
        with user_code(self.tag):
            if metadata.asgi:
                from servekit._private.asgi_app import load_app

                loaded = load_app(target, init_args)
                self._app, self._callable = loaded.app, loaded.instance
            else:
                self._callable = target(*init_args) if metadata.is_class else target
        self.metadata = metadata
        if self.config.user_config is not None:
            self._reconfigure_blocking(self.config.user_config)
        release_freed_memory()  # what the constructor no longer holds
        return metadata

    async def ready(self) -> BackendMetadata:
        """Return once the constructor, and an ASGI app's lifespan startup, have finished
        (raising what they raised)."""
        assert self._constructed is not None
        metadata = await asyncio.shield(self._constructed)
        if self._app is not None:
            if self._started is None:
                from servekit._private.replica.asgi_runner import Lifespan

                self._lifespan = Lifespan(self._app, self.tag)
                self._started = asyncio.ensure_future(self._lifespan.startup())
                self._started.add_done_callback(lambda f: f.cancelled() or f.exception())
            await asyncio.shield(self._started)
        self._apply_limits()
        return metadata

    # ------------------------------------------------------------- config

    async def update_config(self, config: ReplicaSettings) -> None:
        """Apply a new config in place; call ``reconfigure`` only if ``user_config`` changed.

        A new ``user_config`` or ``sync_threads`` is applied while no user call runs.
        """
        old, self.config = self.config, config
        self._apply_limits()
        reconfigure = config.user_config != old.user_config and config.user_config is not None
        if not reconfigure and config.sync_threads == self._lane.threads:
            return
        async with self._gate.exclusive():
            if config.sync_threads != self._lane.threads:
                old_lane, self._lane = self._lane, self._new_lane(config.sync_threads)
                old_lane.shutdown()
            if reconfigure:
                try:
                    await asyncio.get_running_loop().run_in_executor(
                        self._control_pool, self._reconfigure_blocking, config.user_config)
                except BaseException:
                    # It did not take: the replica keeps the user_config it runs with, so
                    # pushing the same config again calls reconfigure again.
                    if self.config is config:
                        self.config = dataclasses.replace(config,
                                                          user_config=old.user_config)
                    raise

    def _apply_limits(self) -> None:
        assert self.metadata is not None
        self._cap = self.config.effective_max_concurrent_queries(self.metadata.is_async)
        self._notify_refused()

    def _reconfigure_blocking(self, user_config: Any) -> None:
        reconfigure = getattr(self._callable, "reconfigure", None)
        if reconfigure is None:
            raise ValueError(f"user_config is set but backend '{self.tag}' has no "
                             "reconfigure(user_config) method.")
        with user_code(self.tag):
            result = reconfigure(user_config)
            if inspect.isawaitable(result):
                asyncio.run(_await(result))

    # ------------------------------------------------------------- requests

    def _resolve(self, method_name: Optional[str]) -> _Target:
        """The method a request names; ``MethodNotFoundError`` listing the callable ones.

        A function backend answers every method name with the function itself.
        """
        assert self.metadata is not None
        key = (method_name or "__call__") if self.metadata.is_class else "__call__"
        target = self._targets.get(key)
        if target is not None:
            return target
        if self.metadata.asgi and not self.metadata.is_class:
            raise MethodNotFoundError(
                f"Backend '{self.tag}' is an ASGI app: it serves HTTP requests at its "
                "endpoint's route, not calls from a handle. Bind the app to a class with "
                "@serve.ingress to call the class's methods from handles.")
        if self.metadata.is_class:
            if key not in self.metadata.methods:
                raise MethodNotFoundError(
                    f"Backend '{self.tag}' has no method {key!r} that requests may call. "
                    f"Methods it serves: {list(self.metadata.methods)}.")
            method = getattr(self._callable, key)
        else:
            method = self._callable
        is_async = inspect.iscoroutinefunction(method)
        queue = None
        if key in self.metadata.batch_methods:
            from servekit._private.replica.batching import BatchQueue

            queue = BatchQueue(functools.partial(self._call, method, is_async),
                               self._batch_limits, concurrent=is_async,
                               on_batch=self._batch_sizes.observe)
        target = self._targets[key] = (method, is_async, queue)
        return target

    def _batch_limits(self) -> Tuple[int, float]:
        return self.config.max_batch_size or 1, self.config.batch_wait_timeout

    async def _call(self, method: Callable, is_async: bool, argument: Any) -> Any:
        """Run user code once, behind the gate that lets ``reconfigure`` run alone."""
        if is_async:
            return await self._on_loop(functools.partial(method, argument))
        result = await self._on_pool(method, argument)
        if inspect.isawaitable(result):
            result = await self._on_loop(functools.partial(_await, result))
        return result

    async def _on_loop(self, step: Callable[[], Awaitable[Any]]) -> Any:
        """``await step()``: user code on the event loop, behind the gate; what it raises
        beyond ``Exception`` is ``contained``. (The hot path of every async request: the
        gate and ``contained`` are inlined.)"""
        gate = self._gate
        if not gate.enter():
            await gate.enter_when_open()
        try:
            return await step()
        except Exception:
            raise
        except BaseException as exc:
            raise contained(self.tag, exc) from exc
        finally:
            gate.leave()

    async def _on_loop_ungated(self, step: Callable[[], Awaitable[Any]]) -> Any:
        """``await step()`` for an ASGI app's request or connection: it starts once no
        ``reconfigure`` waits or runs, but does not hold the gate while it lasts (a
        WebSocket may stay open for hours: a config change must not wait for it, nor new
        requests behind that change)."""
        await self._gate.pass_through()
        with user_code(self.tag):
            return await step()

    async def _on_pool(self, function: Callable, *args: Any) -> Any:
        """``function(*args)``: user code on the replica's threads, behind the gate, in the
        request's context (so ``serve.get_request_id()`` and logs know the request); what
        it raises beyond ``Exception`` is ``contained``.

        If the caller leaves, a call that has not started on a thread is withdrawn and never
        runs; one that runs is waited for (a thread cannot be stopped), so the request keeps
        its place on the replica, and the gate, until its thread returns."""
        gate = self._gate
        if not gate.enter():
            await gate.enter_when_open()
        try:
            job = self._lane.submit(function, *args)
            try:
                return await job.result
            except asyncio.CancelledError:
                if not job.withdraw():  # already on its thread
                    admission = current_admission.get()
                    if admission is not None:
                        admission.cancel()
                    await job.finished()
                raise
        except Exception:
            raise
        except BaseException as exc:
            raise contained(self.tag, exc) from exc
        finally:
            gate.leave()

    def _admit(self) -> Admission:
        """Take the request in (``Busy`` at the cap); its admission, current from now on."""
        if self._in_flight >= self._cap:
            self._refused[current_peer.get()] = None
            raise Busy()
        self._in_flight += 1
        self._idle.clear()
        self._running.inc()
        admission = Admission(self._released)
        current_admission.set(admission)
        return admission

    def _released(self, admission: Admission) -> None:
        """An admission ended: its place is free (the one place that frees one)."""
        self._running.dec()
        self._processing.observe((time.perf_counter() - admission.admitted_at) * 1e3)
        self._requests.inc()
        if admission.failed:
            self._errors.inc()
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()
        self._notify_refused()

    def _notify_refused(self) -> None:
        if self._refused and self._in_flight < self._cap:
            refused, self._refused = self._refused, {}
            for peer in refused:
                notify(peer)

    async def _run(self, target: _Target, argument: Any) -> Any:
        method, is_async, queue = target
        if queue is None:
            return await self._call(method, is_async, argument)
        return await queue.call(argument)

    async def handle_http(self, method_name: Optional[str],
                          fields: tuple) -> Union[tuple, Stream]:
        """The response to the ``HTTPRequestWire`` of ``fields``, as a plain tuple
        (``http_wire.plain``); a generator, async generator or ``StreamingResponse`` becomes
        a ``Stream``: ``(status, headers)``, then the body's chunks as they are produced."""
        wire = HTTPRequestWire._make(fields)
        try:
            target = self._resolve(method_name)
        except MethodNotFoundError as exc:
            return plain(error_response(exc, status=404))
        admission = self._admit()
        _from_headers(wire.headers)
        try:
            result = await self._run(target, request_from_wire(wire))
            streamed = http_stream(result, self._chunks_of)
            if streamed is not None:
                admission.streaming()  # in flight until its stream is closed
                return Stream(self._finishing(streamed, admission))
            return plain(await to_http_response(result))  # may run user code (bodies)
        except BaseException as raised:
            error = raised if isinstance(raised, Exception) else contained(self.tag, raised)
            if not isinstance(error, Exception):
                raise error from None  # a real cancellation
            admission.failed = True
            self._failures.failed(f"{wire.method} {loggable(wire.path)}",
                                  self._noted(error))
            return plain(error_response(error))
        finally:
            if admission.state != STREAMING:
                admission.finish()

    async def handle_asgi(self, inbound: ReplyStream, scope: Dict[str, Any],
                          first: Dict[str, Any]) -> Union[tuple, Stream]:
        """Run an ASGI backend's app for one HTTP request or WebSocket connection passed
        through by the proxy (``asgi_runner``): the request keeps its place until the
        app's work for it ends, also when that outlasts the response (background tasks).
        A whole response comes back as a plain tuple (``http_wire.plain``)."""
        if self._app is None or self._lifespan is None:
            raise ServeError(
                f"Backend '{self.tag}' is not an ASGI app, but its endpoint passed it an "
                "app's request: an endpoint's backends must all be ASGI apps or none. Give "
                "this backend an endpoint of its own.")
        admission = self._admit()
        _from_headers(scope["headers"])
        scope["state"] = dict(self._lifespan.state)
        from servekit._private.replica.asgi_runner import AppCall  # (loaded with Lifespan)

        call = AppCall(self._app, self._on_loop_ungated, scope, first, inbound,
                       functools.partial(self._app_failed, scope, admission))
        try:
            reply = await call.reply()
        except BaseException:  # the caller left: stop the app's work for it
            admission.cancel()
            try:
                await call.stop()
            finally:
                admission.finish()
            raise
        if isinstance(reply, HTTPResponseWire) and call.task.done():
            admission.finish()
            return plain(reply)
        admission.streaming()  # in flight until the app's work for it ends
        if isinstance(reply, HTTPResponseWire):
            call.task.add_done_callback(functools.partial(_release, admission))
            return plain(reply)
        return Stream(self._app_stream(reply, call, admission))

    def _app_failed(self, scope: Dict[str, Any], admission: Admission,
                    error: BaseException) -> None:
        admission.failed = True
        if isinstance(error, Exception):
            self._failures.failed(f"{scope.get('method', 'WEBSOCKET')} "
                                  f"{loggable(scope['path'])}", self._noted(error))

    async def _app_stream(self, items: AsyncIterator[Any], call: AppCall,
                          admission: Admission) -> AsyncIterator[Any]:
        """What the app sends, streamed; a reader that leaves stops the app's work."""
        ended = False
        try:
            async for item in items:
                yield item
            ended = True
        finally:
            if ended:
                _release(admission, call.task)
            else:
                try:
                    await call.stop()
                finally:
                    _release(admission, call.task)

    async def handle_call(self, method_name: Optional[str], args: tuple, kwargs: dict,
                          http_method: str, headers: Dict[str, str],
                          stream: bool = False, request_id: Optional[str] = None) -> Any:
        """The result; with ``stream``, a ``Stream`` of what the method's generator yields.
        ``request_id``: what ``serve.get_request_id()`` gives the backend."""
        target = self._resolve(method_name)
        admission = self._admit()
        admission.failed = True  # until it returns what was asked for
        current_request_id.set(request_id)
        # (set even when it names none: the task may have inherited another request's)
        current_model_id.set(headers.get(MODEL_ID_HEADER, ""))
        try:
            argument: Any
            if len(args) == 1 and isinstance(args[0], Request):
                argument = args[0]
            else:
                argument = ServeRequest(args[0] if args else None, kwargs, headers, http_method)
            result = await self._run(target, argument)
            generated = inspect.isgenerator(result) or inspect.isasyncgen(result)
            if stream and not generated:
                raise TypeError(f"options(stream=True) needs a method that returns a "
                                f"generator; backend '{self.tag}' returned a "
                                f"{type(result).__name__}.")
            if generated and not stream:
                raise TypeError(f"Backend '{self.tag}' returned a generator: call it with "
                                "handle.options(stream=True) to iterate what it yields.")
            admission.failed = False
            if stream:
                admission.streaming()  # in flight until its stream is closed
                return Stream(self._finishing(self._chunks_of(result), admission))
            return result
        except Exception as error:
            self._failures.failed(f"a call to {method_name or '__call__'}",
                                  self._noted(error))
            raise
        finally:
            if admission.state != STREAMING:
                admission.finish()

    def _noted(self, error: Exception) -> Exception:
        """``error`` with a note saying which backend, replica and request it failed (the
        caller of a handle sees it too)."""
        error.add_note(f"(raised in backend '{self.tag}', replica {self.spec.replica_tag}, "
                       f"request {current_request_id.get() or '-'})")
        return error

    async def _chunks_of(self, chunks: Any) -> AsyncIterator[Any]:
        """Iterate chunks user code produces: an async iterator on the loop, a sync one on
        the replica's threads. Each step is user code behind the gate, so ``reconfigure``
        runs between two chunks, never during one. Closed when the reader goes away."""
        if hasattr(chunks, "__aiter__"):
            steps = chunks.__aiter__()
            try:
                while True:
                    try:
                        chunk = await self._on_loop(steps.__anext__)
                    except StopAsyncIteration:
                        return
                    yield chunk
            finally:
                aclose = getattr(steps, "aclose", None)
                if aclose is not None:  # (closed even if the stream is cancelled again)
                    closing = asyncio.ensure_future(self._on_loop(aclose))
                    await outlast(closing)
                    closing.result()
        else:
            iterator = iter(chunks)
            try:
                while True:
                    chunk = await self._on_pool(next, iterator, _DONE)
                    if chunk is _DONE:
                        return
                    yield chunk
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:  # (on its thread, even if the stream is cancelled again)
                    closing = asyncio.ensure_future(self._on_pool(close))
                    await outlast(closing)
                    closing.result()

    async def _finishing(self, chunks: AsyncIterator[Any],
                         admission: Admission) -> AsyncIterator[Any]:
        """The chunks; the request keeps its place until the generator is closed, however
        that ends (its close raising included)."""
        failed = True
        try:
            async for chunk in chunks:
                yield chunk
            failed = False
        finally:
            admission.failed = failed
            admission.closing()
            try:
                close = getattr(chunks, "aclose", None)
                if close is not None:
                    await close()
            finally:
                admission.finish()

    async def drain(self) -> None:
        """Wait until no request is in flight (the controller stopped new ones first),
        then run an ASGI app's lifespan shutdown."""
        while True:
            await self._idle.wait()
            # Let requests a router wrote before it learned of the drain be read.
            await asyncio.sleep(0.05)
            if self._in_flight == 0:
                break
        await self.shut_down_app()

    async def shut_down_app(self) -> None:
        """Run an ASGI app's lifespan shutdown, once (a drain cut short by its timeout
        leaves it to the replica's stop)."""
        if self._lifespan is not None:
            await self._lifespan.shutdown(constants.PROCESS_STOP_TIMEOUT_S * 0.8)

    def close(self) -> None:
        """Let its threads end once what they run returns (the replica is stopping)."""
        self._lane.shutdown()
        self._control_pool.shutdown(wait=False)
        self._health_pool.shutdown(wait=False)

    async def ping(self) -> Tuple[str, ...]:
        """Answer from the event loop, after the class's ``check_health()`` if it has one,
        with the ids of the multiplexed models the replica holds (what ``servekit status``
        shows, and routers prefer the replica for)."""
        check = getattr(self._callable, "check_health", None)
        if self.metadata is not None and self.metadata.is_class and callable(check):
            with user_code(self.tag):
                if inspect.iscoroutinefunction(check):
                    await check()
                else:
                    await asyncio.get_running_loop().run_in_executor(self._health_pool, check)
        multiplexed = sys.modules.get("servekit._private.replica.multiplexed")
        return multiplexed.held_model_ids() if multiplexed is not None else ()


async def _await(awaitable: Any) -> Any:
    return await awaitable


_MODEL_ID_HEADER = MODEL_ID_HEADER.encode()


def _from_headers(headers: Any) -> None:
    """Make an HTTP request's ``X-Request-ID`` and multiplexed model id (its
    ``serve_multiplexed_model_id`` header; "" without one) current."""
    model_id = ""
    for name, value in headers:
        if name == b"x-request-id":
            current_request_id.set(value.decode("latin-1"))
        elif name == _MODEL_ID_HEADER:
            model_id = value.decode("latin-1")
    current_model_id.set(model_id)


def _release(admission: Admission, task: asyncio.Future) -> None:
    """Give a streamed (or early-answered) request's place back once ``task``, the app's
    work for it, has ended."""
    if admission.state == STREAMING:
        admission.closing()
    if task.done():
        admission.finish()
    else:
        task.add_done_callback(lambda _: admission.finish())


async def _metrics() -> str:
    return metrics.exposition()


async def run_replica(worker: WorkerSpec, sock: socket.socket, stop: asyncio.Event) -> None:
    spec: ReplicaSpec = worker.load_payload()
    assert worker.controller_address is not None
    set_replica_context(ReplicaContext(spec.backend_tag, spec.replica_tag,
                                       worker.controller_address))
    replica = Replica(spec)
    server = RpcServer({
        "ready": replica.ready, "http": replica.handle_http, "call": replica.handle_call,
        "asgi": replica.handle_asgi, "update_config": replica.update_config,
        "drain": replica.drain, "ping": replica.ping, "metrics": _metrics,
    }, streaming=("asgi",))
    replica.start()
    await server.start(sock)
    await stop.wait()
    await replica.shut_down_app()
    replica.close()
