"""Unit tests of the proxy's HTTP connections (``servekit._private.proxy.http_protocol``): bytes
are fed to the protocol by hand through a fake transport, and its clock is moved by hand,
so each case (a head that trickles, a body that stalls, a budget full at a given read) is
reached deterministically."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Dict, List

import pytest
import uvicorn
from loop_helpers import run, spin
from proxy_fakes import TIMEOUT_S, FakeTransport, open_connection
from uvicorn.server import ServerState
from websockets.client import ClientProtocol
from websockets.uri import parse_uri

from servekit._private.proxy.http_protocol import (
    BodyBudget,
    ConnectionRoom,
    ProxyHttpProtocol,
)
from servekit._private.proxy.websocket_protocol import ProxyWebSocketProtocol


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    """Reads the whole body, then answers 200."""
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def connect(budget: BodyBudget, max_header_bytes: int = 1000, app: Any = ok_app,
            **options: Any) -> tuple:
    return open_connection(app, budget, max_header_bytes=max_header_bytes, **options)


def late(protocol: ProxyHttpProtocol, seconds: float = TIMEOUT_S) -> None:
    """Move the connection's clock ``seconds`` on and let it look."""
    protocol._since -= seconds
    protocol._check_client()


def test_a_connection_that_sends_nothing_gets_408_once_late() -> None:
    async def main() -> None:
        protocol, transport = connect(BodyBudget(10_000))
        late(protocol, TIMEOUT_S / 2)
        assert not transport.closing  # not late yet: looks again later
        late(protocol, TIMEOUT_S / 2)
        assert transport.closing and transport.reply().startswith(b"HTTP/1.1 408")
        assert b"request head" in transport.reply()

    run(main)


def test_an_idle_keep_alive_connection_is_left_to_the_keep_alive_timeout() -> None:
    async def main() -> None:
        protocol, transport = connect(BodyBudget(10_000))
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await spin()
        assert transport.reply().startswith(b"HTTP/1.1 200")
        late(protocol, 10 * TIMEOUT_S)
        assert not transport.closing

    run(main)


def test_a_head_that_trickles_is_late_from_the_connection_not_from_its_last_byte() -> None:
    async def main() -> None:
        protocol, transport = connect(BodyBudget(10_000))
        for byte in b"GET / HTTP/1.1\r\nX-Slow: aaaa":
            protocol.data_received(bytes([byte]))
        late(protocol)
        assert transport.reply().startswith(b"HTTP/1.1 408")

    run(main)


def test_a_body_that_keeps_moving_is_not_late_and_one_that_stalls_is() -> None:
    async def main() -> None:
        protocol, transport = connect(BodyBudget(10_000))
        protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        late(protocol, TIMEOUT_S - 1)
        protocol.data_received(b"c")  # moved: the clock starts again
        late(protocol, TIMEOUT_S - 1)
        assert not transport.closing
        late(protocol, 1)
        assert transport.reply().startswith(b"HTTP/1.1 408")
        assert b"request body" in transport.reply()

    run(main)


def body_under_way(protocol: ProxyHttpProtocol, seconds: float) -> None:
    """Move the body's clock ``seconds`` on (it has not stalled) and let it look."""
    protocol._body_began -= seconds
    protocol._check_client()


def test_a_body_that_trickles_below_the_minimum_rate_gets_408() -> None:
    """A byte now and then keeps a body from stalling, not from being too slow: it may take
    client_timeout_s plus a second for every min_body_rate bytes."""
    async def main() -> None:
        protocol, transport = connect(BodyBudget(100_000), min_body_rate=100)
        protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 90000\r\n\r\n")
        protocol.data_received(b"x" * 50)
        body_under_way(protocol, TIMEOUT_S + 0.4)
        assert not transport.closing  # its 50 bytes earned it half a second more
        body_under_way(protocol, 0.2)
        assert transport.closing and transport.reply().startswith(b"HTTP/1.1 408")
        assert b"SERVEKIT_MIN_BODY_RATE" in transport.reply()

    run(main)


def test_a_body_at_the_minimum_rate_or_paused_by_the_proxy_is_not_too_slow() -> None:
    async def main() -> None:
        protocol, transport = connect(BodyBudget(100_000), min_body_rate=100)
        protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 90000\r\n\r\n")
        protocol.data_received(b"x" * int(100 * TIMEOUT_S))
        body_under_way(protocol, 2 * TIMEOUT_S - 1)
        assert not transport.closing  # its bytes earned it another client_timeout_s
        protocol.flow.pause_reading()  # the proxy stopped reading: its time is not counted
        body_under_way(protocol, 10 * TIMEOUT_S)
        protocol.flow.resume_reading()
        body_under_way(protocol, TIMEOUT_S / 2)
        assert not transport.closing

    run(main)


def test_a_head_counts_raw_bytes_while_a_header_field_is_incomplete() -> None:
    async def main() -> None:
        protocol, transport = connect(BodyBudget(10_000), max_header_bytes=1000)
        protocol.data_received(b"GET / HTTP/1.1\r\nX-Huge: ")
        for _ in range(9):
            protocol.data_received(b"a" * 100)  # httptools holds this partial value
        assert not transport.closing
        protocol.data_received(b"a" * 200)
        assert transport.reply().startswith(b"HTTP/1.1 431")

    run(main)


def test_the_body_budget_refuses_past_its_limit_and_is_given_back_once() -> None:
    async def main() -> None:
        budget = BodyBudget(100)
        first, first_transport = connect(budget)
        first.data_received(b"POST / HTTP/1.1\r\nContent-Length: 200\r\n\r\n" + b"a" * 60)
        assert budget.held == 60
        second, second_transport = connect(budget)
        second.data_received(b"POST / HTTP/1.1\r\nContent-Length: 50\r\n\r\n" + b"b" * 50)
        assert second_transport.reply().startswith(b"HTTP/1.1 503")
        assert b"retry-after: 1" in second_transport.reply()
        assert budget.held == 60
        first.data_received(b"a" * 40)
        assert budget.held == 100
        first_transport.close()  # the client left: what its requests held is given back
        await spin()
        assert budget.held == 0
        third, third_transport = connect(budget)
        third.data_received(b"POST / HTTP/1.1\r\nContent-Length: 50\r\n\r\n" + b"c" * 50)
        await spin()
        assert third_transport.reply().startswith(b"HTTP/1.1 200")
        assert budget.held == 0  # given back when the response completed

    run(main)


# --------------------------------------------------------------------------- refused bodies


class Recorder:
    """An app that records what it receives (until the body's end or a disconnect), then
    answers 200."""

    def __init__(self) -> None:
        self.received: List[Dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            self.received.append(message)
            if message["type"] == "http.disconnect":
                return
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def whole_bodies(self) -> List[bytes]:
        return [m["body"] for m in self.received
                if m["type"] == "http.request" and not m.get("more_body", False)]


class FastLaneRecorder:
    """A fast lane (the proxy's part) that records the requests it is asked to serve."""

    max_body_bytes = 100_000
    request_timeout_s = None

    def __init__(self) -> None:
        self.served: List[bytes] = []

    def serve_now(self, protocol: Any, cycle: Any) -> bool:
        self.served.append(bytes(cycle.body))
        return False  # (uvicorn's ASGI task takes it from here)


REFUSED = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n" + b"b" * 50


def test_a_body_refused_for_the_budget_is_never_served_truncated() -> None:
    """The whole body came in the read that passed the budget: the client gets 503 and the
    request goes nowhere (the rest of that read was dropped, and the request's end used to
    hand the app what was left of it, as if whole)."""

    async def main() -> None:
        budget = BodyBudget(100)
        first, _ = connect(budget)
        first.data_received(b"POST / HTTP/1.1\r\nContent-Length: 200\r\n\r\n" + b"a" * 60)
        app = Recorder()
        refused, transport = connect(budget, app=app)
        refused.data_received(REFUSED)
        await spin()
        assert transport.reply().startswith(b"HTTP/1.1 503") and transport.lost
        assert app.whole_bodies() == []
        assert budget.held == 60

    run(main)


def test_a_body_refused_for_the_budget_never_reaches_the_fast_lane() -> None:
    async def main() -> None:
        budget = BodyBudget(100)
        first, _ = connect(budget)
        first.data_received(b"POST / HTTP/1.1\r\nContent-Length: 200\r\n\r\n" + b"a" * 60)
        lane, app = FastLaneRecorder(), Recorder()
        refused, transport = connect(budget, app=app, fast_lane=lane)
        refused.data_received(REFUSED)
        await spin()
        assert transport.reply().startswith(b"HTTP/1.1 503")
        assert lane.served == [] and app.whole_bodies() == []

    run(main)


# --------------------------------------------------------------------------- 100-continue


async def not_found(scope: Any, receive: Any, send: Any) -> None:
    """Answers 404 without reading the body."""
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


EXPECTING = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
             b"Expect: 100-continue\r\n\r\n")


def test_a_request_answered_before_the_body_its_client_holds_back_closes_the_connection() -> None:
    """The client waits for 100 Continue before it sends its body; the answer comes first.
    Whether it then sends the body or its next request, the proxy cannot tell: it closes
    the connection rather than read the next request from a body (or the reverse)."""

    async def main() -> None:
        protocol, transport = connect(BodyBudget(10_000), app=not_found)
        protocol.data_received(EXPECTING)
        await spin()
        reply = transport.reply()
        assert reply.startswith(b"HTTP/1.1 404") and b"100 Continue" not in reply
        assert b"connection: close" in reply and transport.closing

    run(main)


def test_a_request_whose_body_came_after_100_continue_keeps_its_connection() -> None:
    async def main() -> None:
        protocol, transport = connect(BodyBudget(10_000))
        protocol.data_received(EXPECTING)
        await spin()
        assert transport.reply() == b"HTTP/1.1 100 Continue\r\n\r\n"
        protocol.data_received(b"b" * 10)
        await spin()
        reply = transport.reply()
        assert b"HTTP/1.1 200" in reply and b"connection: close" not in reply
        assert not transport.closing

    run(main)


# --------------------------------------------------------------------------- room


def test_a_new_connection_at_the_limit_closes_the_one_idle_the_longest() -> None:
    """Connections that wait for a request hold nothing a request needs: at uvicorn's
    limit_concurrency, a new one makes the oldest idle one close, and its request is
    served (it got 503 while idle connections filled the limit)."""

    async def main() -> None:
        budget, state = BodyBudget(10_000), ServerState()
        kept, kept_transport = connect(budget, state=state, limit_concurrency=3)
        kept.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # answered, kept alive
        await spin()
        new, new_transport = connect(budget, state=state, limit_concurrency=3)
        new._since -= 100  # (idle longer than the kept-alive one)
        newer, newer_transport = connect(budget, state=state, limit_concurrency=3)
        assert new_transport.closing and not kept_transport.closing
        newer.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await spin()
        assert newer_transport.reply().startswith(b"HTTP/1.1 200")
        assert len(state.connections) == 2

    run(main)


def test_a_connection_with_a_request_under_way_is_never_closed_for_room() -> None:
    async def main() -> None:
        budget, state = BodyBudget(10_000), ServerState()
        busy, busy_transport = connect(budget, state=state, limit_concurrency=2)
        busy.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
        second, second_transport = connect(budget, state=state, limit_concurrency=2)
        assert not busy_transport.closing
        second.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await spin()  # every connection is busy: uvicorn's limit answers
        assert second_transport.reply().startswith(b"HTTP/1.1 503")
        busy.data_received(b"cde")
        await spin()
        assert busy_transport.reply().startswith(b"HTTP/1.1 200")

    run(main)


def test_a_request_at_the_limit_closes_a_connection_idle_since_the_last_one_came() -> None:
    """Every connection was busy when the last one came (nothing to close then); they went
    idle since: a request at the limit closes one of them, and is served."""

    async def main() -> None:
        budget, state = BodyBudget(10_000), ServerState()
        first, first_transport = connect(budget, state=state, limit_concurrency=3)
        second, second_transport = connect(budget, state=state, limit_concurrency=3)
        for busy in (first, second):
            busy.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\na")
        third, third_transport = connect(budget, state=state, limit_concurrency=3)
        assert len(state.connections) == 3
        for busy in (first, second):
            busy.data_received(b"b")
        await spin()
        first_transport.written.clear()
        first.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await spin()
        assert first_transport.reply().startswith(b"HTTP/1.1 200")
        assert second_transport.closing != third_transport.closing  # (one of them went)

    run(main)


def test_running_short_of_descriptors_is_logged_and_makes_room(
        caplog: pytest.LogCaptureFixture) -> None:
    """uvloop drops a connection it cannot accept (EMFILE) without a word: a new connection
    whose descriptor is near the open-file limit is logged (once in a while), and the
    connections are kept within what the limit leaves."""

    async def main() -> None:
        budget, state, room = BodyBudget(10_000), ServerState(), ConnectionRoom(100)
        connections = [connect(budget, state=state, room=room, fileno=10 + i)
                       for i in range(room.descriptors + 5)]
        assert len(state.connections) < room.descriptors
        assert not any(t.closing for _, t in connections[-5:])  # the oldest went first
        with caplog.at_level(logging.WARNING, logger="servekit.proxy"):
            connect(budget, state=state, room=room, fileno=99)
            connect(budget, state=state, room=room, fileno=99)
        lines = [r.getMessage() for r in caplog.records
                 if "running out of file descriptors" in r.getMessage()]
        assert len(lines) == 1 and "descriptor 99" in lines[0] and "100" in lines[0]

    run(main)


# --------------------------------------------------------------------------- WebSockets


class Listener:
    """A WebSocket app that accepts, then reads a message each time the test lets it."""

    def __init__(self) -> None:
        self.received: List[Dict[str, Any]] = []
        self.reads = asyncio.Semaphore(0)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            await self.reads.acquire()
            message = await receive()
            self.received.append(message)
            if message["type"] == "websocket.disconnect":
                return


def open_websocket(app: Any, budget: BodyBudget, **options: Any) -> tuple:
    """A WebSocket of the proxy's protocol, open (handshake done), and its client."""
    config = uvicorn.Config(app, loop="none", lifespan="off", log_level="warning")
    config.load()
    protocol = ProxyWebSocketProtocol(config=config, server_state=ServerState(),
                                      app_state={}, body_budget=budget, **options)
    transport = FakeTransport()
    transport.protocol = protocol
    protocol.connection_made(transport)
    client = ClientProtocol(parse_uri("ws://x/ws"))
    client.send_request(client.connect())
    protocol.data_received(b"".join(client.data_to_send()))
    return protocol, transport, client


def test_websocket_messages_held_count_in_the_body_budget() -> None:
    """A client's messages wait in the proxy until it passed them on: they count in
    max_held_body_bytes as request bodies do, and past it the socket is closed with
    1013 (try again later). The close goes out before the proxy's end of the stream, and
    what the client sends until it closes is read and dropped (closing with its bytes
    unread would reset the connection, and a reset can overtake the close frame)."""

    async def main() -> None:
        budget, app = BodyBudget(2500), Listener()
        protocol, transport, client = open_websocket(app, budget)
        await spin()
        client.receive_data(transport.reply())  # the handshake's answer
        transport.written.clear()
        client.send_binary(b"a" * 1000)
        protocol.data_received(b"".join(client.data_to_send()))
        assert budget.held == 1000  # queued for the proxy
        app.reads.release()
        await spin()
        assert budget.held == 1000  # in the proxy's hands
        app.reads.release()
        await spin()
        assert budget.held == 0  # passed on: the proxy asked for the next one
        for _ in range(2):
            client.send_binary(b"b" * 1000)
            protocol.data_received(b"".join(client.data_to_send()))
        assert budget.held == 2000 and not transport.closing
        client.send_binary(b"c" * 1000)
        protocol.data_received(b"".join(client.data_to_send()))
        assert transport.eof_written and not transport.closing and budget.held == 0
        client.send_binary(b"d" * 1000)  # sent before the client saw the close: dropped
        protocol.data_received(b"".join(client.data_to_send()))
        assert budget.held == 0 and not transport.closing
        client.receive_data(transport.reply())
        assert client.close_rcvd is not None and client.close_rcvd.code == 1013
        for _ in range(3):
            app.reads.release()
        await spin()
        assert [m["type"] for m in app.received][-1] == "websocket.disconnect"
        assert app.received[-1]["code"] == 1013
        transport.close()  # the client closed its end
        await spin()
        assert budget.held == 0

    run(main)


def test_a_websocket_message_being_received_counts_in_the_body_budget() -> None:
    async def main() -> None:
        budget = BodyBudget(10_000)
        protocol, transport, client = open_websocket(Listener(), budget)
        await spin()
        client.receive_data(transport.reply())
        client.send_binary(b"a" * 5000)
        frame = b"".join(client.data_to_send())
        protocol.data_received(frame[:3000])  # the frame is not whole yet
        assert 2900 <= budget.held <= 3000
        protocol.data_received(frame[3000:])
        assert budget.held == 5000
        transport.close()
        await spin()
        assert budget.held == 0

    run(main)


def test_a_websocket_whose_client_reads_nothing_is_closed_after_the_send_timeout() -> None:
    """What the app sends cannot be written any further: past the send timeout the socket
    is closed (the app's send waited for ever, and so did its replica's place)."""

    async def main() -> None:
        protocol, transport, _ = open_websocket(Listener(), BodyBudget(10_000),
                                                send_timeout_s=5.0)
        await spin()
        protocol.pause_writing()
        protocol._stalled_since -= 4
        protocol._check_send()
        assert not transport.closing  # (it looks again when it could be late)
        protocol.resume_writing()  # the client read some
        transport.buffered = 100_000
        protocol.pause_writing()
        protocol._stalled_since -= 5
        transport.buffered = 90_000  # it read some, not enough to resume the writing
        protocol._check_send()
        assert not transport.closing
        protocol._stalled_since -= 5
        protocol._check_send()
        assert transport.closing
        await spin()
        assert transport.lost

    run(main)
