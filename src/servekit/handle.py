"""Handles: call an endpoint from Python, synchronously or from a running event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
from typing import Any, AsyncIterator, Dict, Generator, Iterator, Optional, Tuple

from servekit._private.context import MODEL_ID_HEADER, new_request_id
from servekit._private.event_loop import background_loop, in_background_thread, run_sync
from servekit._private.routing.routed_request import CONNECTING, QUEUED
from servekit._private.routing.router import Router
from servekit._private.wire.transport import ReplyStream, encode_call


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()


@dataclasses.dataclass(frozen=True)
class HandleOptions:
    """Per-handle request options; ``options()`` returns a handle with some of them changed."""

    method_name: Optional[str] = None
    shard_key: Optional[str] = None
    http_method: str = "GET"
    http_headers: Tuple[Tuple[str, str], ...] = ()
    stream: bool = False
    timeout_s: Optional[float] = None  # None: the backend's request_timeout_s
    missing_ok: bool = False  # made by get_handle(missing_ok=True): calls wait for it
    multiplexed_model_id: Optional[str] = None  # sent as the serve_multiplexed_model_id header


class ServeResponse:
    """The reply to one request: ``await`` it, or block on ``.result(timeout)``.

    Works from any thread and any event loop. A backend exception is re-raised with its type.
    ``cancel()``, or cancelling the task that awaits it, cancels the request: an async
    backend's coroutine is cancelled in the replica; a sync call not yet started never
    runs, one already running finishes (holding its place on the replica until then) and
    its result is dropped.
    """

    __slots__ = ("_future", "_loop", "_mirror")

    def __init__(self, future: Optional[asyncio.Future], loop: asyncio.AbstractEventLoop,
                 mirror: Optional[concurrent.futures.Future] = None) -> None:
        """``mirror``: a concurrent future settled with ``future``'s outcome; alone (no
        ``future``), the reply of a call still on its way to ``loop``."""
        self._future = future
        self._loop = loop
        self._mirror = mirror

    def cancel(self) -> None:
        """Cancel the request (a no-op once it is answered); awaiting it then raises
        ``CancelledError`` and ``result()`` raises ``concurrent.futures.CancelledError``."""
        if self._future is None:
            assert self._mirror is not None
            self._mirror.cancel()  # (which cancels the call, wherever it has got to)
        else:
            self._loop.call_soon_threadsafe(self._future.cancel)

    def _concurrent(self) -> concurrent.futures.Future:
        mirror = self._mirror
        if mirror is None:
            assert self._future is not None
            mirror = _mirror_of(self._future, self._loop)
            self._mirror = mirror
        return mirror

    def result(self, timeout: Optional[float] = None) -> Any:
        """Block until the backend answered; raise ``TimeoutError`` after ``timeout`` s."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise RuntimeError("ServeResponse.result() would block the event loop that "
                               "delivers the reply; use `await response` here instead.")
        reply = self._concurrent()
        try:
            return reply.result(timeout)
        except concurrent.futures.TimeoutError:
            if reply.done():
                raise  # the request's own error (a RequestTimeoutError, or the backend's)
            raise TimeoutError(f"No reply within {timeout}s.") from None

    def __await__(self) -> Generator[Any, None, Any]:
        if self._future is not None and asyncio.get_running_loop() is self._loop:
            return (yield from self._future.__await__())
        return (yield from asyncio.wrap_future(self._concurrent()).__await__())


def _mirror_of(future: asyncio.Future, loop: asyncio.AbstractEventLoop,
               on_loop: bool = False) -> concurrent.futures.Future:
    """A concurrent future that gets ``future``'s outcome (for threads and other loops);
    cancelling it cancels ``future``. ``on_loop``: called from ``loop``'s own thread."""
    mirror: concurrent.futures.Future = concurrent.futures.Future()
    mirror.add_done_callback(
        lambda done: loop.call_soon_threadsafe(future.cancel) if done.cancelled() else None)
    if on_loop:
        _copy_to(mirror, future)
    else:
        loop.call_soon_threadsafe(_copy_to, mirror, future)
    return mirror


def _copy_to(mirror: concurrent.futures.Future, future: asyncio.Future) -> None:
    """On ``future``'s loop: settle ``mirror`` as ``future`` settles."""
    def copy(source: asyncio.Future) -> None:
        if source.cancelled():
            mirror.cancel()
        elif source.exception() is not None:
            _fail(mirror, source.exception())  # type: ignore[arg-type]
        elif mirror.set_running_or_notify_cancel():
            mirror.set_result(source.result())

    future.add_done_callback(copy)


def _fail(mirror: concurrent.futures.Future, error: BaseException) -> None:
    if mirror.set_running_or_notify_cancel():  # (False: it was cancelled)
        mirror.set_exception(error)


class ServeStream:
    """What a streaming method yields, chunk by chunk as it yields them, from
    ``handle.options(stream=True).remote()``: ``for chunk in stream`` (sync handles) or
    ``async for chunk in stream`` (async handles, in their loop).

    The backend produces at most a few chunks ahead of the reader (a slow reader slows
    it); ``cancel()``, or stopping early and dropping the iterator, stops it.
    """

    __slots__ = ("_future", "_loop", "_stream")

    def __init__(self, future: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        self._future = future  # of the ReplyStream
        self._loop = loop
        self._stream: Optional[ReplyStream] = None

    async def _next(self) -> Any:
        if self._stream is None:
            self._stream = await self._future
        return await self._stream.__anext__()

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                try:
                    yield asyncio.run_coroutine_threadsafe(self._next(), self._loop).result()
                except StopAsyncIteration:
                    return
        finally:
            self.cancel()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiterate()

    async def _aiterate(self) -> AsyncIterator[Any]:
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("Iterate a ServeStream with async for in the event loop of "
                               "the handle that made it.")
        try:
            while True:
                try:
                    yield await self._next()
                except StopAsyncIteration:
                    return
        finally:
            self.cancel()

    def __del__(self) -> None:
        # A stream nobody reads any more must not hold its replica's place for good.
        try:
            self.cancel()
        except RuntimeError:
            pass  # its event loop is closed: so is the connection

    def cancel(self) -> None:
        """Stop the stream (a no-op once it has ended)."""
        def stop() -> None:
            if self._stream is not None:
                self._stream.cancel()
            elif not self._future.done():
                self._future.cancel()
            elif not self._future.cancelled() and self._future.exception() is None:
                self._future.result().cancel()
        self._loop.call_soon_threadsafe(stop)


async def _resolved(call: tuple) -> tuple:
    """The call with every ``ServeResponse`` among its arguments replaced by its value.

    This is what lets one handle call feed another (a pipeline): the upstream reply is
    awaited here, and its error, if any, fails the downstream call.
    """
    method_name, args, kwargs, http_method, headers, stream, request_id = call
    if _has_responses(call):
        args = tuple([await value if isinstance(value, ServeResponse) else value
                      for value in args])
        kwargs = {key: await value if isinstance(value, ServeResponse) else value
                  for key, value in kwargs.items()}
    return (method_name, args, kwargs, http_method, headers, stream, request_id)


class _Routers:
    """One started Router per (controller, event loop) in this process, shared by handles."""

    def __init__(self) -> None:
        self._routers: Dict[Tuple[str, int], "asyncio.Future[Router]"] = {}
        self._lock = threading.Lock()

    def ready(self, controller_address: str,
              loop: asyncio.AbstractEventLoop) -> Optional[Router]:
        """The started router of ``loop``, if there is one (from that loop's thread)."""
        future = self._routers.get((controller_address, id(loop)))
        if future is None or not future.done() or future.cancelled() or \
                future.exception() is not None or future.get_loop() is not loop:
            return None
        return future.result()

    async def get(self, controller_address: str) -> Router:
        loop = asyncio.get_running_loop()
        router = self.ready(controller_address, loop)
        if router is not None:
            return router
        key = (controller_address, id(loop))
        with self._lock:
            for stale in [k for k, f in self._routers.items() if f.get_loop().is_closed()]:
                del self._routers[stale]
            future = self._routers.get(key)
            if future is None or future.get_loop() is not loop or (
                    future.done() and future.exception() is not None):
                future = asyncio.ensure_future(Router.start(controller_address))
                self._routers[key] = future
        return await asyncio.shield(future)

    def close(self, controller_address: str) -> None:
        with self._lock:
            keys = [key for key in self._routers if key[0] == controller_address]
            futures = [self._routers.pop(key) for key in keys]
        for future in futures:
            if future.done() and future.exception() is None:
                try:
                    future.get_loop().call_soon_threadsafe(future.result().close)
                except RuntimeError:
                    pass  # that loop is already closed


routers = _Routers()


class _HandleBase:
    def __init__(self, controller_address: str, endpoint: str,
                 options: HandleOptions = HandleOptions()) -> None:
        self._controller_address = controller_address
        self.endpoint_name = endpoint
        self._options = options

    def options(self, *, method_name: Any = DEFAULT, shard_key: Any = DEFAULT,
                http_method: Any = DEFAULT, http_headers: Any = DEFAULT,
                stream: Any = DEFAULT, timeout_s: Any = DEFAULT,
                multiplexed_model_id: Any = DEFAULT) -> Any:
        """A new handle with the given options changed; the others carry over.

        Args:
            method_name: the method of a class backend to call (default ``__call__``).
            shard_key: requests with the same key go to the same backend of a split.
            http_method: what ``request.method`` says in the backend (default "GET").
            http_headers: a dict of headers the backend sees in ``request.headers``.
            stream: the method returns a generator (sync or async); ``remote()`` then gives
                a ``ServeStream`` of what it yields, as it yields it (default False).
            timeout_s: seconds each call may wait for its reply (a stream: its first
                item), instead of the backend's ``request_timeout_s``; past it the call is
                cancelled and fails with ``RequestTimeoutError``, a ``TimeoutError``
                (default None: the backend's).
            multiplexed_model_id: the model the calls are for (Ray Serve 2.x's name): the
                backend reads it from ``serve.get_multiplexed_model_id()``, and calls go to
                replicas that hold that model while one has room (default None: no model;
                "" is the same).
        """
        changes: Dict[str, Any] = {}
        if multiplexed_model_id is not DEFAULT:
            if multiplexed_model_id is not None and not isinstance(multiplexed_model_id, str):
                raise TypeError(f"multiplexed_model_id must be a str, got "
                                f"{multiplexed_model_id!r}.")
            changes["multiplexed_model_id"] = multiplexed_model_id or None
        if timeout_s is not DEFAULT:
            if timeout_s is not None and (
                    isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                    or not 0 < timeout_s < float("inf")):
                raise ValueError(f"timeout_s must be a positive number of seconds or None, "
                                 f"got {timeout_s!r}.")
            changes["timeout_s"] = timeout_s
        if stream is not DEFAULT:
            if not isinstance(stream, bool):
                raise TypeError(f"stream must be a bool, got {stream!r}.")
            changes["stream"] = stream
        if method_name is not DEFAULT:
            if method_name is not None and not isinstance(method_name, str):
                raise TypeError(f"method_name must be a str, got {method_name!r}.")
            changes["method_name"] = method_name
        if shard_key is not DEFAULT:
            if shard_key is not None and not isinstance(shard_key, (str, bytes, int)):
                raise TypeError(f"shard_key must be a str, bytes or int, got {shard_key!r}.")
            changes["shard_key"] = None if shard_key is None else str(shard_key)
        if http_method is not DEFAULT:
            if not isinstance(http_method, str):
                raise TypeError(f"http_method must be a str, got {http_method!r}.")
            changes["http_method"] = http_method.upper()
        if http_headers is not DEFAULT:
            if not isinstance(http_headers, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in http_headers.items()):
                raise TypeError(f"http_headers must be a dict of str to str, got "
                                f"{http_headers!r}.")
            changes["http_headers"] = tuple(http_headers.items())
        return type(self)(self._controller_address, self.endpoint_name,
                          dataclasses.replace(self._options, **changes))

    def _request_args(self, args: tuple, kwargs: dict) -> tuple:
        if len(args) > 1:
            raise TypeError(f"remote() takes at most one positional argument (the request "
                            f"data), got {len(args)}. Pass the rest as keyword arguments.")
        options = self._options
        headers = dict(options.http_headers)
        request_id = next((value for name, value in headers.items()
                           if name.lower() == "x-request-id"), None) or new_request_id()
        if options.multiplexed_model_id is not None:
            headers[MODEL_ID_HEADER] = options.multiplexed_model_id
        return (options.method_name, args, kwargs, options.http_method, headers,
                options.stream, request_id)

    def __reduce__(self) -> Any:
        return (type(self), (self._controller_address, self.endpoint_name, self._options))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(endpoint={self.endpoint_name!r})"


# Calls a sync handle's caller may send on before the loop has placed the earlier ones,
# while the last one placed found a replica with room: one hand-over between the caller's
# thread and the loop serves this many calls, where each call used to wait for its own.
_AHEAD_LIMIT = 32


class ServeSyncHandle(_HandleBase):
    """A handle for ordinary (non-async) code: ``remote`` returns at once while replicas
    have room, and blocks until a replica is chosen once they are full."""

    def __init__(self, controller_address: str, endpoint: str,
                 options: HandleOptions = HandleOptions()) -> None:
        super().__init__(controller_address, endpoint, options)
        self._pacing = _Pacing()

    def remote(self, *args: Any, **kwargs: Any) -> ServeResponse:
        """Send a request; the single positional argument is the request data.

        Keyword arguments reach the backend as ``request.query_params``. An argument that is
        a ``ServeResponse`` is replaced by its value first (so calls can be chained).

        While the endpoint's replicas have room, the call returns as soon as the request is
        on its way (a few dozen calls ahead at most); once they are full, or before the
        first call found room, it blocks until a replica is chosen, and an error choosing
        one (the endpoint deleted, or not created in time) is raised here. An error met on
        the way by a call that did not wait is raised by its ``result()``.

        Raises:
            TypeError: an argument cannot be pickled (nothing was sent).
            EndpointNotFoundError: the endpoint was deleted, or not created in time.
        """
        call = self._request_args(args, kwargs)
        loop = background_loop()
        if self._options.stream or _has_responses(call) or in_background_thread():
            reply = run_sync(self._send(call))  # (run_sync refuses the loop's own thread)
            if self._options.stream:
                return ServeStream(reply, loop)  # type: ignore[return-value]
            return ServeResponse(reply, loop)
        # The common case: encoded here, placed on the loop in one hop.
        placing = _SyncCall(self, encode_call("call", call), loop,
                            waits=not self._pacing.go_ahead())
        try:
            loop.call_soon_threadsafe(placing.start)
        except BaseException:
            self._pacing.placed(room=None)
            raise
        if placing.waits:
            return placing.wait()
        return ServeResponse(None, loop, placing.mirror)

    async def _send(self, call: tuple, payload: Optional[bytes] = None) -> asyncio.Future:
        if payload is None:
            call = await _resolved(call)
        router = await routers.get(self._controller_address)
        return await router.send(self.endpoint_name, "call", self._options.shard_key, call,
                                 self._options.missing_ok, payload=payload,
                                 timeout_s=self._options.timeout_s,
                                 model_id=self._options.multiplexed_model_id)


class _Pacing:
    """How far a sync handle's callers run ahead of the loop that places their calls:
    ``ahead`` calls handed over and not yet placed, and whether the last one placed found
    room (a replica under its ``max_concurrent_queries``, at once)."""

    __slots__ = ("_lock", "_ahead", "_room")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ahead = 0
        self._room = False  # the first call waits: an error choosing a replica is raised

    def go_ahead(self) -> bool:
        """From the caller's thread, for a call about to be handed over: whether it may
        go without waiting for its placement."""
        with self._lock:
            self._ahead += 1
            return self._room and self._ahead <= _AHEAD_LIMIT

    def placed(self, room: Optional[bool]) -> None:
        """A call handed over was placed (or failed): ``room`` if it found room at once
        (None: it was not placed, and says nothing of the room)."""
        with self._lock:
            self._ahead -= 1
            if room is not None:
                self._room = room


class _SyncCall:
    """One call of a sync handle, placed on the background loop. A call that ``waits``
    holds its caller (``wait``) until it is written to a replica or has failed; the others
    answer through ``mirror`` alone."""

    __slots__ = ("handle", "payload", "loop", "waits", "placed", "request", "reply", "mirror",
                 "error", "cancelled")

    def __init__(self, handle: ServeSyncHandle, payload: bytes,
                 loop: asyncio.AbstractEventLoop, waits: bool) -> None:
        self.handle = handle
        self.payload = payload
        self.loop = loop
        self.waits = waits
        self.placed: Optional[threading.Lock] = None
        if waits:
            self.placed = threading.Lock()
            self.placed.acquire()
        self.request: Any = None  # while it waits for room (a ``RoutedRequest``)
        self.reply: Optional[asyncio.Future] = None
        self.error: Optional[BaseException] = None
        self.cancelled = False
        self.mirror: concurrent.futures.Future = concurrent.futures.Future()
        self.mirror.add_done_callback(self._mirror_done)

    def start(self) -> None:
        """On the loop: place the request now if its router and endpoint are known, else
        (or while it waits for room) finish in a task."""
        handle = self.handle
        if self.mirror.cancelled():  # its caller cancelled it before it got here
            handle._pacing.placed(room=None)
            return
        router = routers.ready(handle._controller_address, self.loop)
        try:
            request = None if router is None else router.place(
                handle.endpoint_name, "call", handle._options.shard_key, self.payload,
                timeout_s=handle._options.timeout_s,
                model_id=handle._options.multiplexed_model_id)
        except BaseException as exc:
            handle._pacing.placed(room=False)
            self._done(None, exc)
            return
        if request is None or request.state in (QUEUED, CONNECTING):
            handle._pacing.placed(room=False)
            self.request = request
            asyncio.ensure_future(self._finish(request))
        else:
            handle._pacing.placed(room=True)
            self._done(request.reply, None)

    async def _finish(self, request: Any) -> None:
        try:
            if request is None:
                reply = await self.handle._send((), self.payload)
            else:
                await request.written()
                reply = request.reply
        except BaseException as exc:
            self._done(None, exc)
        else:
            self._done(reply, None)

    def _done(self, reply: Optional[asyncio.Future], error: Optional[BaseException]) -> None:
        self.request = None
        if reply is not None:
            self.reply = reply
            if self.cancelled:
                reply.cancel()
            else:
                _copy_to(self.mirror, reply)
        elif error is not None:
            _fail(self.mirror, error)
        self.error = error
        if self.placed is not None:
            self.placed.release()

    def _mirror_done(self, mirror: concurrent.futures.Future) -> None:
        if mirror.cancelled():
            try:
                self.loop.call_soon_threadsafe(self._cancel)
            except RuntimeError:
                pass  # the loop is closed: nothing of the call is left to cancel

    def _cancel(self) -> None:
        """On the loop: the caller cancelled the call; one still waiting for room is
        cancelled there, before anything of it is written."""
        self.cancelled = True
        if self.reply is not None:
            self.reply.cancel()
        elif self.request is not None:
            self.request.reply.cancel()

    def wait(self) -> ServeResponse:
        assert self.placed is not None
        self.placed.acquire()
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return ServeResponse(self.reply, self.loop, self.mirror)


def _has_responses(call: tuple) -> bool:
    """Whether a call's arguments hold replies of other calls (they are awaited first)."""
    _, args, kwargs = call[:3]
    return any(isinstance(value, ServeResponse) for value in (*args, *kwargs.values()))


class ServeHandle(_HandleBase):
    """A handle for async code: ``await handle.remote(...)`` gives a ``ServeResponse``."""

    async def remote(self, *args: Any, **kwargs: Any) -> ServeResponse:
        """Send a request from the running loop; await the result for the reply.

        Arguments are as for ``ServeSyncHandle.remote``.
        """
        call = await _resolved(self._request_args(args, kwargs))
        router = await routers.get(self._controller_address)
        reply = await router.send(self.endpoint_name, "call", self._options.shard_key, call,
                                  self._options.missing_ok, timeout_s=self._options.timeout_s,
                                  model_id=self._options.multiplexed_model_id)
        if self._options.stream:
            return ServeStream(reply, asyncio.get_running_loop())  # type: ignore[return-value]
        return ServeResponse(reply, asyncio.get_running_loop())
