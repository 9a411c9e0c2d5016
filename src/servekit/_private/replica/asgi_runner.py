"""An ASGI application (FastAPI, Starlette) served in a replica.

The proxy passes each HTTP request and WebSocket connection through as it comes: the scope,
the first message, then the rest of the request's messages as the request's own stream
(body chunks as bytes, WebSocket messages as they are). What the app sends goes back as
the reply: a complete HTTP response in one ``HTTPResponseWire`` when the app sends its body
in one message (the common case, as fast as any other backend), else a stream of
``(status, headers, route)`` then body chunks; a WebSocket connection's reply is the stream
of the app's messages. ``route`` is the template of the route the app matched
(``route_template``), for the proxy's metrics. The app's lifespan starts with the replica
and shuts down when it drains.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import weakref
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional, Union

from servekit._private.http_wire import HTTPResponseWire, text_response
from servekit._private.replica.admission import outlast
from servekit._private.wire.transport import ReplyStream

logger = logging.getLogger("servekit.replica")

ASGIApp = Callable[[dict, Any, Any], Awaitable[None]]
# Runs one call of the app (the replica's gate around user code).
RunApp = Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}
_END = object()  # the last item of what the app sent

# The async generators each call of the app starts, in the order they start (in the
# context of the call's task and of the tasks it starts).
_STARTED_BY_CALL: contextvars.ContextVar[Optional[List[weakref.ref]]] = \
    contextvars.ContextVar("servekit_generators_started_by_call", default=None)


class _NoteGenerators:
    """The loop thread's first-iteration hook for async generators, noting each generator
    a call of the app starts before the loop's own hook runs."""

    def __init__(self, then: Optional[Callable[[Any], None]]) -> None:
        self.then = then

    def __call__(self, generator: Any) -> None:
        started = _STARTED_BY_CALL.get()
        if started is not None:
            started.append(weakref.ref(generator))
        if self.then is not None:
            self.then(generator)


def _note_generators() -> None:
    firstiter, finalizer = sys.get_asyncgen_hooks()
    if not isinstance(firstiter, _NoteGenerators):
        sys.set_asyncgen_hooks(firstiter=_NoteGenerators(firstiter), finalizer=finalizer)


def route_template(scope: Dict[str, Any]) -> Optional[str]:
    """The route an app matched for the request of ``scope``, as a template below its
    ``root_path`` (``/api/items/{item_id}``): what Starlette and FastAPI put in
    ``scope["route"]`` (a mount that is not a router of its own: its path). None if the app
    matched no route, or does not say."""
    from starlette.routing import Mount  # (an ASGI app's replica has it already)

    route = scope.get("route")
    if isinstance(route, Mount):
        return scope.get("root_path") or "/"
    path_format = getattr(route, "path_format", None)
    if not isinstance(path_format, str):
        return None
    return scope.get("root_path", "").rstrip("/") + path_format or "/"


class LifespanFailed(RuntimeError):
    """The app's lifespan startup failed: the replica cannot serve."""


class Lifespan:
    """The app's lifespan protocol: ``startup`` when the replica starts, ``shutdown`` when
    it drains. ``state`` is what the app put in the lifespan scope's state, which each
    request's scope gets a copy of. An app that does not speak the protocol (it raises
    before reading the startup event) is served without it, as uvicorn does."""

    def __init__(self, app: ASGIApp, tag: str) -> None:
        self.app = app
        self.tag = tag
        self.state: Dict[str, Any] = {}
        self._to_app: asyncio.Queue = asyncio.Queue()
        self._from_app: asyncio.Queue = asyncio.Queue()
        self._task: Optional[asyncio.Task] = None
        self._listening = False  # the app read its first lifespan event

    async def startup(self) -> None:
        """Run the startup; raise ``LifespanFailed`` with the app's message if it fails."""
        scope = {"type": "lifespan", "asgi": ASGI_VERSION, "state": self.state}
        self._task = asyncio.ensure_future(self._run(scope))
        self._to_app.put_nowait({"type": "lifespan.startup"})
        outcome = await self._from_app.get()
        if outcome is None:  # the app returned or raised
            self._task = None
            return
        if outcome["type"] == "lifespan.startup.failed":
            raise LifespanFailed(f"The lifespan startup of backend '{self.tag}' failed: "
                                 f"{outcome.get('message') or '(no message)'}")

    async def _run(self, scope: dict) -> None:
        try:
            await self.app(scope, self._receive, self._from_app.put)
        except BaseException as exc:
            if not self._listening:
                logger.info("Backend '%s' does not support the ASGI lifespan protocol (%r); "
                            "serving it without.", self.tag, exc)
            elif not isinstance(exc, asyncio.CancelledError):
                logger.error("The lifespan of backend '%s' raised", self.tag, exc_info=exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._from_app.put_nowait(None)

    async def _receive(self) -> dict:
        self._listening = True
        return await self._to_app.get()

    async def shutdown(self, timeout_s: float) -> None:
        """Run the shutdown, for at most ``timeout_s``; a failure is logged."""
        task, self._task = self._task, None
        if task is None or task.done():
            return
        self._to_app.put_nowait({"type": "lifespan.shutdown"})
        try:
            outcome = await asyncio.wait_for(self._from_app.get(), timeout_s)
        except asyncio.TimeoutError:
            logger.error("The lifespan shutdown of backend '%s' did not finish within %s s.",
                         self.tag, timeout_s)
            task.cancel()
            return
        if outcome is not None and outcome["type"] == "lifespan.shutdown.failed":
            logger.error("The lifespan shutdown of backend '%s' failed: %s", self.tag,
                         outcome.get("message"))


class _Outbox:
    """What the app sends, for the reader, at most two items ahead of it (the app's
    ``send`` waits beyond that, so a slow client slows the app, as a socket would)."""

    def __init__(self) -> None:
        self._items: asyncio.Queue = asyncio.Queue()
        self._room = asyncio.Event()

    async def put(self, item: Any) -> None:
        self._items.put_nowait(item)
        while self._items.qsize() >= 2:
            self._room.clear()
            await self._room.wait()

    def close(self, error: Optional[BaseException]) -> None:
        """No more items: the reader gets ``error`` (if any) after the last one."""
        self._items.put_nowait(_END if error is None else error)

    async def get(self) -> Any:
        item = await self._items.get()
        self._room.set()
        return item


class AppCall:
    """One HTTP request or WebSocket connection run through the app.

    ``reply()`` is what goes back to the proxy; ``task`` runs the app (done: the app's
    work for this request has stopped, however it ended); ``stop()`` cancels it (its
    caller left) and waits for it to end. An async generator the call started and left
    suspended (a cancelled ``StreamingResponse`` stops reading its generator but leaves
    closing it to the garbage collector) is closed before the call ends, so its
    ``finally`` runs while the request still holds its place.
    """

    def __init__(self, app: ASGIApp, run: RunApp, scope: dict, first: dict,
                 inbound: ReplyStream, on_error: Callable[[BaseException], None]) -> None:
        self.scope = scope
        self._first: Optional[dict] = first
        self._inbound = inbound
        self._on_error = on_error
        self._websocket = scope["type"] == "websocket"
        self._body_more = first.get("more_body", False)  # HTTP: more body to receive
        self._answered = asyncio.Event()  # HTTP: the whole response was sent
        self._start: Optional[tuple] = None  # HTTP: (status, headers, route template)
        self._streaming = False
        self._outbox = _Outbox()
        loop = asyncio.get_running_loop()
        self._whole: asyncio.Future = loop.create_future()  # a one-message response
        _note_generators()
        self.task = asyncio.ensure_future(run(lambda: self._run_app(app)))
        self.task.add_done_callback(self._app_ended)

    # ------------------------------------------------------------- the app's side

    async def _run_app(self, app: ASGIApp) -> None:
        started: List[weakref.ref] = []
        _STARTED_BY_CALL.set(started)  # (this task's context, and its tasks')
        try:
            await app(self.scope, self._receive, self._send)
        finally:
            for noted in started:
                generator = noted()
                if generator is not None and generator.ag_frame is not None and \
                        not generator.ag_running:
                    try:
                        await generator.aclose()
                    except Exception:  # (the app's own error, if any, is what it raised)
                        logger.exception("Closing a generator the app left suspended "
                                         "raised.")

    async def _receive(self) -> dict:
        first, self._first = self._first, None
        if first is not None:
            return first
        if self._websocket:
            try:
                return await self._inbound.__anext__()
            except StopAsyncIteration:
                return {"type": "websocket.disconnect", "code": 1006}
        if self._body_more and not self._answered.is_set():
            try:
                chunk = await self._inbound.__anext__()
            except StopAsyncIteration:
                self._body_more = False
                if self._answered.is_set():  # (the proxy stops sending a body once answered)
                    return {"type": "http.disconnect"}
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.request", "body": chunk, "more_body": True}
        await self._answered.wait()  # (the caller leaving cancels the app instead)
        return {"type": "http.disconnect"}

    def _answer(self) -> None:
        """The whole response was sent: from now on ``receive`` says the client is gone,
        as a server does (and a read of the body waiting in vain ends)."""
        self._answered.set()
        self._inbound.finish(None)

    async def _send(self, message: dict) -> None:
        if self._websocket:
            await self._outbox.put(message)
            return
        kind = message["type"]
        if kind == "http.response.start":
            # Names lowercased, as a server makes them: the proxy frames a one-message
            # response by its "content-length" (set from the body when the app gave none).
            self._start = (message["status"],
                           [(bytes(name).lower(), bytes(value)) for name, value in
                            message.get("headers", ())],
                           route_template(self.scope))
        elif kind == "http.response.body" and self._start is not None and \
                not self._answered.is_set():
            body, more = message.get("body", b""), message.get("more_body", False)
            if not self._streaming and not more:
                self._answer()
                status, headers, route = self._start
                self._whole.set_result(HTTPResponseWire(status, headers, bytes(body), route))
                return
            if not self._streaming:
                self._streaming = True
                self._whole.set_result(None)
            if body:
                await self._outbox.put(bytes(body))
            if not more:
                self._answer()
                self._outbox.close(None)

    def _app_ended(self, task: asyncio.Future) -> None:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self._on_error(error)
        self._outbox.close(error)
        if not self._whole.done():
            self._whole.set_result(None)

    # ------------------------------------------------------------- the reply

    async def reply(self) -> Union[HTTPResponseWire, AsyncIterator[Any]]:
        """A complete response, or the stream of items to send back (module docstring)."""
        if self._websocket:
            return self._items()
        await asyncio.shield(self._whole)
        whole = self._whole.result()
        if whole is not None:
            return whole
        if self._streaming:
            assert self._start is not None
            return self._items(self._start)
        # The app ended without a response (it raised: logged): uvicorn's answer, 500.
        if self.task.cancelled() or self.task.exception() is None:
            logger.error("The app returned without sending a response to %s.",
                         self.scope.get("path"))
        return text_response(500, "Internal Server Error")

    async def _items(self, head: Optional[tuple] = None) -> AsyncIterator[Any]:
        if head is not None:
            yield head
        while True:
            item = await self._outbox.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def stop(self) -> None:
        """Cancel the app's work for this request (its caller left); return once it ended,
        however often this wait is cancelled meanwhile (the request holds its place until
        then)."""
        self.task.cancel()
        await outlast(self.task)
