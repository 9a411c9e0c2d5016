"""Unit tests of a request's way through the proxy (``HTTPProxy``, and its connection
protocol's fast lane) to a replica, and back: every request ends, and every replica place
comes back, whatever ends it and in whichever loop turn.

The proxy runs on a real router whose replica is a ``router_fakes.FakeReplica``: the test
feeds the frames the replica would send (a reply, a stream's chunks, "stopped") and reads
the frames the router wrote to it (the request, its cancellation). An HTTP request is
identified by its ``X-SERVE-CALL-METHOD`` (the first argument the replica gets). Requests
reach the proxy either as an ASGI call (``Client``) or as bytes fed to a connection
(``open_connection``) whose fast lane is the proxy.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import pytest
from loop_helpers import run, spin
from proxy_fakes import Client, HeldTimers, open_connection, proxy_on
from router_fakes import Cluster, slot

from servekit._private.http_wire import HTTPResponseWire

DEADLINE_S = 1000.0  # the proxy's request_timeout_s: never passes by itself (HeldTimers)
START = (200, [(b"content-type", b"text/plain")])  # a streamed reply's first item


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never: {what}")


def request(call: str = "A", method: str = "GET", path: str = "/ep",
            extra: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nX-Serve-Call-Method: {call}\r\n"
            .encode() + extra + b"\r\n")


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize("ending", ["deadline", "disconnect"])
def test_what_ends_a_request_in_the_turn_its_stream_begins_cancels_the_stream(
        ending: str) -> None:
    """The first chunk settles the reply; in the same loop turn the deadline passes or the
    client leaves. The reply cannot be cancelled any more: its stream is, so the replica
    stops and its place comes back (it was held for ever: nobody read the stream)."""

    async def main() -> None:
        cluster = Cluster()
        replica = cluster.replica("b#1")
        timers = HeldTimers(DEADLINE_S)
        proxy, router = proxy_on(cluster, replica, request_timeout_s=DEADLINE_S)
        client = Client(call="A")
        serving = asyncio.ensure_future(proxy(client.scope, client.receive, client.send))
        await until(lambda: replica.received() == ["A"], "the request reached the replica")
        replica.chunk("A", START)  # the reply settles as a stream ...
        if ending == "deadline":  # ... and, in the same turn, the request ends
            timers.fire()
        else:
            client.leave()
        await until(serving.done, "the request was answered")
        assert client.status() == (504 if ending == "deadline" else None)
        await spin()
        assert replica.cancelled() == ["A"]  # the replica is told to stop
        assert slot(router, "b#1").in_flight == 1  # (until it says it stopped)
        replica.stopped("A")
        await spin()
        assert slot(router, "b#1").in_flight == 0

    run(main)


def test_a_client_leaving_before_the_fast_lane_sends_its_stream_cancels_the_stream() -> None:
    """The fast lane starts a task to send a streamed reply; the client leaves after the
    reply settled but before that task first ran: the stream is cancelled (it was read to
    nobody, for as long as the replica produced it)."""

    async def main() -> None:
        cluster = Cluster()
        replica = cluster.replica("b#1")
        proxy, router = proxy_on(cluster, replica)
        protocol, transport = open_connection(proxy, fast_lane=proxy)
        protocol.data_received(request("A"))
        await until(lambda: replica.received() == ["A"], "the request reached the replica")
        [reply] = protocol.tasks  # the fast lane's request in progress

        def leave(_: Any) -> None:  # runs after the proxy's own callback, in its turn
            transport.closing = True
            transport.lose()  # the client is gone now, before the task's first step

        reply.add_done_callback(leave)
        replica.chunk("A", START)
        await until(lambda: transport.lost, "the client left")
        await until(lambda: replica.cancelled() == ["A"], "the replica was told to stop")
        replica.stopped("A")
        await spin()
        assert slot(router, "b#1").in_flight == 0
        assert not protocol.tasks

    run(main)


def test_a_client_leaving_cancels_the_stream_of_a_request_a_pipelined_one_waits_for() -> None:
    """Two pipelined requests: the first one streams, the second waits for it. The client
    leaves: the first one's stream is cancelled too, not only the request uvicorn marks."""

    async def main() -> None:
        cluster = Cluster()
        replica = cluster.replica("b#1")
        proxy, router = proxy_on(cluster, replica)
        protocol, transport = open_connection(proxy, fast_lane=proxy)
        protocol.data_received(request("A") + request("B"))
        await until(lambda: replica.received() == ["A"], "the first request was sent")
        replica.chunk("A", START)
        replica.chunk("A", b"part")
        await until(lambda: b"part" in transport.reply(), "the stream began")
        transport.abort()
        await until(lambda: replica.cancelled() == ["A"], "the replica was told to stop")
        replica.stopped("A")
        await spin()
        assert slot(router, "b#1").in_flight == 0
        assert replica.received() == ["A"]  # the second one was never sent

    run(main)


# --------------------------------------------------------------------------- framing


def answer(replica: Any, call: str, response: HTTPResponseWire) -> None:
    replica.answer(call, response)


def exchange(response: HTTPResponseWire, method: str = "GET") -> tuple:
    """A request answered by ``response`` in the fast lane, then a second one on the same
    connection answered "next": (what the client got, and whether the connection
    closed)."""
    got: list = []

    async def main() -> None:
        cluster = Cluster()
        replica = cluster.replica("b#1")
        proxy, _ = proxy_on(cluster, replica, cap=2)
        protocol, transport = open_connection(proxy, fast_lane=proxy)
        protocol.data_received(request("A", method))
        await until(lambda: replica.received() == ["A"], "the request reached the replica")
        answer(replica, "A", response)
        await until(lambda: bool(transport.written), "the answer")
        if not transport.closing:
            protocol.data_received(request("B"))
            await until(lambda: "B" in replica.received(), "the next request")
            answer(replica, "B", HTTPResponseWire(200, [(b"content-length", b"4")], b"next"))
            await until(lambda: len(transport.written) == 2, "the next answer")
        got.append((transport.reply(), transport.closing))

    run(main)
    return got[0]


def test_a_one_message_response_without_content_length_is_framed_by_its_body() -> None:
    """An ASGI app's response in one message may carry no Content-Length: sent as it was,
    its client waited for the connection to close to know where it ends."""
    reply, closed = exchange(HTTPResponseWire(200, [(b"content-type", b"text/plain")],
                                              b"hello"))
    first, _, rest = reply.partition(b"hello")
    assert b"content-length: 5\r\n" in first and rest.startswith(b"HTTP/1.1 200")
    assert rest.endswith(b"next") and not closed


def test_a_transfer_encoding_the_one_body_is_not_encoded_in_is_replaced_by_its_length() -> None:
    reply, _ = exchange(HTTPResponseWire(200, [(b"transfer-encoding", b"chunked")], b"hello"))
    assert b"transfer-encoding" not in reply and b"content-length: 5\r\n" in reply
    assert reply.endswith(b"next")


@pytest.mark.parametrize("length", [b"10", b"3", b"five"])
def test_a_content_length_that_disagrees_with_the_body_is_a_502_and_the_connection_goes_on(
        length: bytes) -> None:
    """Sent as it was, the client would wait for bytes that never come, or read the rest of
    the body as the start of the next response."""
    reply, closed = exchange(HTTPResponseWire(200, [(b"content-length", length)], b"hello"))
    assert reply.startswith(b"HTTP/1.1 502") and b"malformed" in reply
    assert b"hello" not in reply
    assert reply.endswith(b"next") and not closed  # the connection is still in step


def test_head_and_304_keep_the_length_of_the_body_they_do_not_carry() -> None:
    reply, _ = exchange(HTTPResponseWire(200, [(b"content-length", b"10")], b""), "HEAD")
    assert reply.startswith(b"HTTP/1.1 200") and b"content-length: 10\r\n" in reply
    reply, _ = exchange(HTTPResponseWire(304, [(b"content-length", b"10")], b""))
    assert reply.startswith(b"HTTP/1.1 304") and b"content-length: 10\r\n" in reply
    reply, _ = exchange(HTTPResponseWire(204, [], b""))
    assert reply.startswith(b"HTTP/1.1 204") and b"content-length" not in reply.split(
        b"HTTP/1.1 200")[0]


# --------------------------------------------------------------------------- slow readers

SEND_TIMEOUT_S = 5.0


def stalled_for(protocol: Any, seconds: float) -> None:
    """Move the connection's write clock ``seconds`` on and let it look."""
    if protocol._stalled_since is not None:
        protocol._stalled_since -= seconds
    protocol._check_client()


def test_a_client_that_stops_reading_a_stream_is_closed_and_the_stream_cancelled() -> None:
    """Its response cannot be written any further: past the send timeout the connection
    is closed and the stream cancelled, so the replica's place comes back (it was held
    for as long as the client stayed connected)."""

    async def main() -> None:
        cluster = Cluster()
        replica = cluster.replica("b#1")
        proxy, router = proxy_on(cluster, replica)
        protocol, transport = open_connection(proxy, fast_lane=proxy,
                                              send_timeout_s=SEND_TIMEOUT_S)
        protocol.data_received(request("A"))
        await until(lambda: replica.received() == ["A"], "the request reached the replica")
        replica.chunk("A", START)
        await until(lambda: bool(transport.written), "the stream began")
        protocol.pause_writing()  # the client's buffers are full: it reads nothing
        replica.chunk("A", b"more")
        await spin()
        stalled_for(protocol, SEND_TIMEOUT_S - 1)
        assert not transport.closing
        stalled_for(protocol, 1)
        assert transport.closing
        await until(lambda: replica.cancelled() == ["A"], "the replica was told to stop")
        replica.stopped("A")
        await spin()
        assert slot(router, "b#1").in_flight == 0

    run(main)


def test_a_client_that_reads_slowly_is_not_closed() -> None:
    """The deadline is for reading nothing: any progress opens a new window."""

    async def main() -> None:
        cluster = Cluster()
        replica = cluster.replica("b#1")
        proxy, _ = proxy_on(cluster, replica)
        protocol, transport = open_connection(proxy, fast_lane=proxy,
                                              send_timeout_s=SEND_TIMEOUT_S)
        transport.buffered = 100_000
        protocol.pause_writing()
        stalled_for(protocol, SEND_TIMEOUT_S - 1)
        protocol.resume_writing()  # it read enough for the proxy to write again
        protocol.pause_writing()
        stalled_for(protocol, SEND_TIMEOUT_S - 1)
        transport.buffered = 90_000  # it read some, not enough to resume the writing
        stalled_for(protocol, 1)
        assert not transport.closing
        stalled_for(protocol, SEND_TIMEOUT_S)  # and then nothing more
        assert transport.closing

    run(main)


def test_a_closed_connection_whose_client_reads_nothing_goes_after_the_send_timeout() -> None:
    """Closed after its response (Connection: close), a connection stays open until its
    client has read what is left to write: for the send timeout at most."""

    async def main() -> None:
        cluster = Cluster()
        replica = cluster.replica("b#1")
        proxy, _ = proxy_on(cluster, replica)
        protocol, transport = open_connection(proxy, fast_lane=proxy,
                                              send_timeout_s=SEND_TIMEOUT_S)
        transport.buffered = 1000  # what the client has not read
        protocol.data_received(request("A", extra=b"Connection: close\r\n"))
        await until(lambda: replica.received() == ["A"], "the request reached the replica")
        replica.answer("A", HTTPResponseWire(200, [], b"x" * 1000))
        await until(lambda: transport.closing, "the response was written")
        stalled_for(protocol, 0)
        assert not transport.lost
        stalled_for(protocol, SEND_TIMEOUT_S)
        await spin()
        assert transport.lost

    run(main)


@pytest.mark.parametrize("headers, status, length", [
    ([(b"content-length", b"10")], 502, None),  # disagrees with the body: never sent
    ([(b"content-length", b"5"), (b"content-length", b"6")], 502, None),  # two that differ
    ([(b"transfer-encoding", b"chunked")], 200, b"5"),  # not encoded so: framed by length
    ([], 200, b"5"),
])
def test_the_asgi_path_frames_a_one_message_response_as_the_fast_lane_does(
        headers: list, status: int, length: Any) -> None:
    """A request the fast lane does not take (user middleware, a large body) is answered
    through uvicorn's ASGI side: a response whose headers disagree with its body is a 502
    there too (uvicorn would have sent the head, then closed the connection mid-body)."""

    async def main() -> None:
        cluster = Cluster()
        replica = cluster.replica("b#1")
        proxy, _ = proxy_on(cluster, replica)
        client = Client(call="A")
        serving = asyncio.ensure_future(proxy(client.scope, client.receive, client.send))
        await until(lambda: replica.received() == ["A"], "the request reached the replica")
        answer(replica, "A", HTTPResponseWire(200, headers, b"hello"))
        await until(serving.done, "the request was answered")
        assert client.status() == status
        sent = dict(client.sent[0]["headers"])
        assert b"transfer-encoding" not in sent
        assert sent.get(b"content-length") == (length or str(len(client.sent[1]["body"])).encode())
        if status == 502:
            assert b"malformed" in client.sent[1]["body"] and b"hello" not in client.sent[1]["body"]

    run(main)
