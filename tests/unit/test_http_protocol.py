"""Unit tests of the proxy's HTTP connections (``servekit._private.proxy.http_protocol``): bytes
are fed to the protocol by hand through a fake transport, and its clock is moved by hand,
so each case (a head that trickles, a body that stalls, a budget full at a given read) is
reached deterministically."""

from __future__ import annotations

from typing import Any, Dict, List

from loop_helpers import run, spin
from proxy_fakes import TIMEOUT_S, open_connection

from servekit._private.proxy.http_protocol import (
    BodyBudget,
    ProxyHttpProtocol,
)


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
