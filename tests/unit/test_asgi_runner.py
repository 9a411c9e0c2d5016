"""Unit tests of an ASGI app run in a replica (``servekit._private.replica.asgi_runner``).

``AppCall`` runs one HTTP request or WebSocket connection through an app and turns what the
app sends into the reply that goes back to the proxy; ``Lifespan`` runs the app's lifespan
protocol. The apps are small hand-written ASGI callables; most tests use a ``Puppet``, an
app that hands its ``receive`` and ``send`` to the test, which calls them in the order it
wants. The request's own stream (body chunks, WebSocket messages) is a ``ReplyStream`` the
test pushes items into, as the replica's connection does.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from typing import Any, AsyncIterator, Awaitable, Callable, List, Optional

import pytest
from loop_helpers import run, spin

from servekit._private.http_wire import HTTPResponseWire
from servekit._private.replica.asgi_runner import AppCall, Lifespan, LifespanFailed
from servekit._private.wire.transport import ReplyStream, dumps

HEADERS = [(b"content-type", b"text/plain")]
START = {"type": "http.response.start", "status": 200, "headers": HEADERS}
FIRST = {"type": "http.request", "body": b"", "more_body": False}


def is_server_error(reply: Any) -> bool:
    """Whether ``reply`` is uvicorn's answer to an app that did not respond: a plain 500."""
    return isinstance(reply, HTTPResponseWire) and \
        (reply.status, reply.body) == (500, b"Internal Server Error")


def body(data: bytes, more: bool = False) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


def http_scope() -> dict:
    return {"type": "http", "method": "POST", "path": "/items", "headers": []}


class Inbound:
    """The request's own stream as the replica's connection fills it."""

    def __init__(self) -> None:
        self.granted = 0
        self.stream = ReplyStream(self._grant, lambda: None)

    def _grant(self) -> None:
        self.granted += 1

    def push(self, *items: Any) -> None:
        for item in items:
            self.stream.push(dumps(item))

    def end(self) -> None:
        self.stream.finish(None)


class Puppet:
    """An app the test plays: it hands out its ``receive`` and ``send`` and runs until the
    test ``finish``es it (raising ``error``, if given), or it is cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self._end: asyncio.Future = asyncio.get_running_loop().create_future()
        self.cancelled = False
        self.receive: Callable[[], Awaitable[dict]]
        self.send: Callable[[dict], Awaitable[None]]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.receive, self.send = receive, send
        self.started.set()
        try:
            await self._end
        except asyncio.CancelledError:
            for _ in range(3):  # its cleanup takes a few loop iterations
                await asyncio.sleep(0)
            self.cancelled = True
            raise

    def finish(self, error: Optional[BaseException] = None) -> None:
        if error is None:
            self._end.set_result(None)
        else:
            self._end.set_exception(error)


async def direct(call: Callable[[], Awaitable[None]]) -> None:
    """The replica's gate around user code, here letting every call run at once."""
    await call()


class Run:
    """One ``AppCall`` of ``app`` and what it reported."""

    def __init__(self, app: Any, scope: Optional[dict] = None,
                 first: Optional[dict] = None) -> None:
        self.inbound = Inbound()
        self.errors: List[BaseException] = []
        self.call = AppCall(app, direct, scope or http_scope(), first or FIRST,
                            self.inbound.stream, self.errors.append)

    async def reply(self) -> Any:
        return await asyncio.wait_for(self.call.reply(), 5)


async def started(app: Any, scope: Optional[dict] = None,
                  first: Optional[dict] = None) -> Run:
    running = Run(app, scope, first)
    await asyncio.wait_for(app.started.wait(), 5)
    return running


async def collect(items: Any) -> List[Any]:
    return [item async for item in items]


# --------------------------------------------------------------------------- responses


def test_a_response_in_one_message_comes_back_whole_while_the_app_goes_on() -> None:
    """The common case is as fast as any backend: one ``HTTPResponseWire``, sent back while
    the app's background work (which still holds the request's place) goes on."""

    async def main() -> None:
        app = Puppet()
        running = await started(app)
        await app.send(START)
        await app.send(body(b"done"))
        assert await running.reply() == HTTPResponseWire(200, HEADERS, b"done")
        await spin()
        assert not running.call.task.done()
        app.finish()
        await spin()
        assert running.call.task.done() and running.errors == []

    run(main)


def test_response_header_names_come_back_lowercased_as_a_server_makes_them() -> None:
    """The proxy frames a one-message response by its "content-length" (and drops a
    "transfer-encoding" its one body is not encoded in): a name the app wrote in capitals
    must be found too, or the response would carry two lengths."""

    async def main() -> None:
        async def app(scope: dict, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"Content-Length", b"2"), (b"X-Trace", b"Ab")]})
            await send(body(b"ok"))

        reply = await Run(app).reply()
        assert reply == HTTPResponseWire(200, [(b"content-length", b"2"),
                                               (b"x-trace", b"Ab")], b"ok")

    run(main)


def test_a_response_in_parts_comes_back_as_its_head_then_its_parts() -> None:
    async def main() -> None:
        async def app(scope: dict, receive: Any, send: Any) -> None:
            await send(START)
            await send(body(b"a", more=True))
            await send(body(b"", more=True))  # an empty part is not sent on
            await send(body(b"b", more=True))
            await send(body(b"c"))

        running = Run(app)
        reply = await running.reply()
        assert not isinstance(reply, HTTPResponseWire)
        assert await collect(reply) == [(200, HEADERS, None), b"a", b"b", b"c"]

    run(main)


def test_the_apps_send_waits_while_the_reader_is_two_parts_behind() -> None:
    """A slow client slows the app, as a socket would: the app is at most two parts ahead
    of what was read."""

    async def main() -> None:
        app = Puppet()
        running = await started(app)
        await app.send(START)
        await asyncio.wait_for(app.send(body(b"1", more=True)), 5)
        second = asyncio.ensure_future(app.send(body(b"2", more=True)))
        await spin()
        assert not second.done()
        items = await running.reply()
        assert await items.__anext__() == (200, HEADERS, None)
        await spin()
        assert not second.done()
        assert await items.__anext__() == b"1"
        await spin()
        assert second.done()
        third = asyncio.ensure_future(app.send(body(b"3", more=True)))
        await spin()
        assert not third.done()
        assert await items.__anext__() == b"2"
        await spin()
        assert third.done()
        app.finish()

    run(main)


@pytest.mark.parametrize("started_response", [False, True])
def test_an_app_raising_before_it_responds_gets_a_500_and_its_error_reported(
        started_response: bool) -> None:
    async def main() -> None:
        error = ValueError("model not loaded")

        async def app(scope: dict, receive: Any, send: Any) -> None:
            if started_response:
                await send(START)
            raise error

        running = Run(app)
        assert is_server_error(await running.reply())
        assert running.errors == [error]

    run(main)


def test_an_app_raising_in_the_middle_of_a_response_ends_its_stream_with_the_error() -> None:
    async def main() -> None:
        error = ValueError("generator broke")

        async def app(scope: dict, receive: Any, send: Any) -> None:
            await send(START)
            await send(body(b"a", more=True))
            raise error

        running = Run(app)
        items = await running.reply()
        assert await items.__anext__() == (200, HEADERS, None)
        assert await items.__anext__() == b"a"
        with pytest.raises(ValueError, match="generator broke"):
            await items.__anext__()
        assert running.errors == [error]

    run(main)


@pytest.mark.parametrize("started_response", [False, True])
def test_an_app_returning_without_a_response_gets_a_500(started_response: bool,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    async def main() -> None:
        async def app(scope: dict, receive: Any, send: Any) -> None:
            if started_response:
                await send(START)

        running = Run(app)
        assert is_server_error(await running.reply())
        assert running.errors == []

    with caplog.at_level(logging.ERROR, "servekit.replica"):
        run(main)
    assert "returned without sending a response to /items" in caplog.text


def test_stop_cancels_the_app_and_returns_once_its_work_ended() -> None:
    async def main() -> None:
        app = Puppet()
        running = await started(app)
        await asyncio.wait_for(running.call.stop(), 5)
        assert app.cancelled and running.call.task.cancelled()
        assert running.errors == []

    run(main)


def test_stop_outlasts_a_second_cancellation_while_the_app_winds_down() -> None:
    """The caller leaves (stop cancels the app), then its connection drops (the task
    waiting in stop is cancelled again): stop still returns only once the app's work has
    ended, so the request's place is not given back while the app runs."""
    async def main() -> None:
        began, finishing = asyncio.Event(), asyncio.Event()
        ended = []

        async def slow_to_stop(scope: dict, receive: Any, send: Any) -> None:
            began.set()
            try:
                await asyncio.Event().wait()
            finally:
                await finishing.wait()  # cleanup that takes a while
                ended.append(True)

        running = Run(slow_to_stop)
        await asyncio.wait_for(began.wait(), 5)
        stopping = asyncio.ensure_future(running.call.stop())
        await spin()
        stopping.cancel()
        await spin()
        assert not stopping.done() and not ended
        finishing.set()
        await asyncio.wait_for(asyncio.wait([stopping]), 5)
        assert ended == [True] and running.call.task.done()

    run(main)


# --------------------------------------------------------------------------- receive


def test_receive_gives_the_first_message_the_body_its_end_then_a_disconnect_once_answered(
        ) -> None:
    async def main() -> None:
        app = Puppet()
        first = {"type": "http.request", "body": b"a", "more_body": True}
        running = await started(app, first=first)
        running.inbound.push(b"b", b"c")
        assert await app.receive() == first
        assert await app.receive() == {"type": "http.request", "body": b"b", "more_body": True}
        assert await app.receive() == {"type": "http.request", "body": b"c", "more_body": True}
        assert running.inbound.granted == 2  # each part read makes room for one more
        end = asyncio.ensure_future(app.receive())
        await spin()
        assert not end.done()  # the body may go on
        running.inbound.end()
        assert await asyncio.wait_for(end, 5) == {"type": "http.request", "body": b"",
                                                  "more_body": False}
        disconnect = asyncio.ensure_future(app.receive())
        await spin()
        assert not disconnect.done()  # the client is still there, waiting for its answer
        await app.send(START)
        await app.send(body(b"ok"))
        assert await asyncio.wait_for(disconnect, 5) == {"type": "http.disconnect"}
        app.finish()

    run(main)


def test_an_app_that_reads_the_body_after_answering_gets_a_disconnect() -> None:
    """Once a response is sent, the proxy sends no more body: a read of the rest (one
    waiting already, or a later one) gets ``http.disconnect``, so the app ends and its
    request's place is given back, instead of waiting for a body that never comes."""

    async def main() -> None:
        app = Puppet()
        running = await started(app, first={"type": "http.request", "body": b"a",
                                            "more_body": True})
        assert await app.receive() == {"type": "http.request", "body": b"a",
                                       "more_body": True}
        waiting = asyncio.ensure_future(app.receive())  # the rest of the body, never sent
        await spin()
        assert not waiting.done()
        await app.send(START)
        await app.send(body(b"early answer"))
        assert await asyncio.wait_for(waiting, 5) == {"type": "http.disconnect"}
        assert await asyncio.wait_for(app.receive(), 5) == {"type": "http.disconnect"}
        assert isinstance(await running.reply(), HTTPResponseWire)

    run(main)


def test_a_body_whole_in_the_first_message_reads_nothing_from_the_stream() -> None:
    async def main() -> None:
        app = Puppet()
        first = {"type": "http.request", "body": b"all of it", "more_body": False}
        running = await started(app, first=first)
        running.inbound.push(b"not a body part")
        assert await app.receive() == first
        after = asyncio.ensure_future(app.receive())
        await spin()
        assert not after.done()
        await app.send(START)
        await app.send(body(b"ok"))
        assert await asyncio.wait_for(after, 5) == {"type": "http.disconnect"}
        assert running.inbound.granted == 0
        app.finish()

    run(main)


def test_a_websocket_receives_its_connect_then_the_clients_messages_then_a_disconnect(
        ) -> None:
    async def main() -> None:
        app = Puppet()
        connect = {"type": "websocket.connect"}
        running = await started(app, {"type": "websocket", "path": "/ws", "headers": []},
                                connect)
        hello = {"type": "websocket.receive", "text": "hello"}
        running.inbound.push(hello)
        assert await app.receive() == connect
        assert await app.receive() == hello
        waiting = asyncio.ensure_future(app.receive())
        await spin()
        assert not waiting.done()
        running.inbound.end()  # the proxy's side ended without a close from the client
        assert await asyncio.wait_for(waiting, 5) == {"type": "websocket.disconnect",
                                                      "code": 1006}
        app.finish()

    run(main)


def test_a_websockets_reply_is_the_stream_of_the_apps_messages() -> None:
    async def main() -> None:
        sent = [{"type": "websocket.accept"},
                {"type": "websocket.send", "text": "hi"},
                {"type": "websocket.close", "code": 1000}]

        async def app(scope: dict, receive: Any, send: Any) -> None:
            await receive()
            for message in sent:
                await send(message)

        running = Run(app, {"type": "websocket", "path": "/ws", "headers": []},
                      {"type": "websocket.connect"})
        assert await collect(await running.reply()) == sent

    run(main)


# --------------------------------------------------------------------------- lifespan


class LifespanApp:
    """An app that speaks the lifespan protocol: it answers startup with ``startup`` and
    shutdown with ``shutdown`` ("complete", "failed", or "hang": no answer)."""

    def __init__(self, startup: str = "complete", shutdown: str = "complete",
                 message: Optional[str] = None) -> None:
        self.startup, self.shutdown, self.message = startup, shutdown, message
        self.events: List[str] = []
        self.cancelled = False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        self.events.append((await receive())["type"])
        scope["state"]["model"] = "loaded"
        await send({"type": f"lifespan.startup.{self.startup}", "message": self.message})
        if self.startup == "failed":
            return
        self.events.append((await receive())["type"])
        if self.shutdown == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        await send({"type": f"lifespan.shutdown.{self.shutdown}", "message": self.message})
        self.events.append("returned")


def test_lifespan_starts_the_app_shares_its_state_and_shuts_it_down() -> None:
    async def main() -> None:
        app = LifespanApp()
        lifespan = Lifespan(app, "clf")
        await asyncio.wait_for(lifespan.startup(), 5)
        assert app.events == ["lifespan.startup"]
        assert lifespan.state == {"model": "loaded"}
        await asyncio.wait_for(lifespan.shutdown(5), 5)
        await spin()
        assert app.events == ["lifespan.startup", "lifespan.shutdown", "returned"]

    run(main)


@pytest.mark.parametrize("message, shown", [
    ("no model file at /models/clf", "no model file at /models/clf"),
    (None, "(no message)"),
])
def test_a_failed_startup_raises_with_the_apps_message(message: Optional[str],
                                                       shown: str) -> None:
    async def main() -> None:
        lifespan = Lifespan(LifespanApp(startup="failed", message=message), "clf")
        with pytest.raises(LifespanFailed,
                           match=re.escape(f"backend 'clf' failed: {shown}")):
            await asyncio.wait_for(lifespan.startup(), 5)

    run(main)


async def http_only(scope: dict, receive: Any, send: Any) -> None:
    assert scope["type"] == "http", f"cannot serve {scope['type']}"


async def ignores_lifespan(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return


@pytest.mark.parametrize("app", [http_only, ignores_lifespan])
def test_an_app_without_lifespan_support_is_served_without_it(app: Any) -> None:
    """An app that raises (or returns) before it reads the startup event: no error, as
    uvicorn serves it; the shutdown has nothing to do."""

    async def main() -> None:
        calls: List[str] = []

        async def counted(scope: dict, receive: Any, send: Any) -> None:
            calls.append(scope["type"])
            await app(scope, receive, send)

        lifespan = Lifespan(counted, "clf")
        await asyncio.wait_for(lifespan.startup(), 5)
        await asyncio.wait_for(lifespan.shutdown(5), 5)
        assert calls == ["lifespan"] and lifespan.state == {}

    run(main)


def test_a_shutdown_that_never_completes_is_cut_after_its_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        app = LifespanApp(shutdown="hang")
        lifespan = Lifespan(app, "clf")
        await asyncio.wait_for(lifespan.startup(), 5)
        await asyncio.wait_for(lifespan.shutdown(0.05), 5)
        await spin()
        assert app.events == ["lifespan.startup", "lifespan.shutdown"] and app.cancelled

    with caplog.at_level(logging.ERROR, "servekit.replica"):
        run(main)
    assert "lifespan shutdown of backend 'clf' did not finish within 0.05 s" in caplog.text


def test_a_failed_shutdown_is_logged_with_the_apps_message(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        lifespan = Lifespan(LifespanApp(shutdown="failed", message="flush failed"), "clf")
        await asyncio.wait_for(lifespan.startup(), 5)
        await asyncio.wait_for(lifespan.shutdown(5), 5)

    with caplog.at_level(logging.ERROR, "servekit.replica"):
        run(main)
    assert "lifespan shutdown of backend 'clf' failed: flush failed" in caplog.text


def test_stop_closes_the_generator_a_streaming_response_was_reading() -> None:
    """Starlette's ``StreamingResponse`` stops iterating its generator when it is cancelled
    but leaves closing it to the garbage collector: the replica closes what the app's call
    left suspended before ``stop()`` returns, so a generator's ``finally`` (a model's
    cleanup, a metric of aborted generations) runs while the request still holds its
    place, not whenever a collection happens."""
    from starlette.responses import StreamingResponse

    closed = []

    async def tokens() -> AsyncIterator[bytes]:
        try:
            for number in range(1_000_000):
                yield b"token %d\n" % number
        finally:
            closed.append(True)

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await StreamingResponse(tokens())(scope, receive, send)

    async def main() -> None:
        running = Run(app)
        items = (await running.reply()).__aiter__()
        await asyncio.wait_for(items.__anext__(), 5)  # the head
        await asyncio.wait_for(items.__anext__(), 5)  # a first chunk
        await asyncio.wait_for(running.call.stop(), 5)
        assert closed == [True]

    gc.disable()  # (what the test is about must not depend on a collection)
    try:
        run(main)
    finally:
        gc.enable()
