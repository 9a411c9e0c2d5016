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
