"""Unit tests of a request's lifecycle in a router (``servekit._private.routing.routed_request``).

Each test drives one ``RoutedRequest`` through its states with a router whose replicas are
played by ``FakeReplica`` (frames fed in the order the test picks, see ``router_fakes``),
and checks what a caller sees and what the replica is sent, and that the request's place on
the replica is given back exactly once, on the event that really ends it.
"""

from __future__ import annotations

import asyncio
from typing import Any, List

import pytest
from loop_helpers import run, spin
from router_fakes import Cluster, endpoint, make_router, sent, slot, start_send

from servekit._private import constants, metrics
from servekit._private.routing.routed_request import (
    CANCEL,
    CANCELLING,
    ENDED,
    SENT,
    STREAMING,
    TRANSITIONS,
    IllegalTransition,
    RoutedRequest,
)
from servekit._private.routing.router import Router
from servekit._private.specs import BackendLimits
from servekit._private.wire.transport import _CANCEL, _CREDIT, ConnectionClosed, ReplyStream
from servekit.exceptions import BackendUnavailableError, RequestTimeoutError

STATES = sorted({state for state, _ in TRANSITIONS} | set(TRANSITIONS.values()))
EVENTS = sorted({event for _, event in TRANSITIONS})


def in_flight(router: Router, tag: str = "b#1") -> int:
    return slot(router, tag).in_flight


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("event", EVENTS)
def test_an_event_a_state_has_no_move_for_is_an_error(state: str, event: str) -> None:
    """Every (state, event) pair outside the table raises, naming both; none is ignored."""
    if (state, event) in TRANSITIONS:
        return

    async def main() -> None:
        router = Router("/run/servekit/controller.sock", "router")
        request = RoutedRequest(router._replica_set("b"), b"payload")
        request.state = state
        with pytest.raises(IllegalTransition, match=f"{state!r}.*{event!r}"):
            request._apply(event)
        assert request.state == state

    run(main)


def test_the_table_ends_every_state_and_ended_only_takes_a_late_cancel() -> None:
    """From every state some event leads to ENDED, and ENDED moves nowhere but itself."""
    for state in STATES:
        seen, frontier = {state}, [state]
        while frontier:
            current = frontier.pop()
            for (source, _), target in TRANSITIONS.items():
                if source == current and target not in seen:
                    seen.add(target)
                    frontier.append(target)
        assert ENDED in seen, state
    assert [event for (source, event) in TRANSITIONS if source == ENDED] == [CANCEL]


# --------------------------------------------------------------------------- cancellation


def test_a_request_cancelled_while_queued_leaves_the_queue_and_is_never_sent() -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        first = await sent(router, "A")
        waiting = start_send(router, "B")
        await spin()
        assert router._replica_sets["b"].queued == 1
        waiting.cancel()
        await spin()
        assert router._replica_sets["b"].queued == 0
        r1.answer("A", "a")
        await spin()
        assert first.result() == "a"
        assert r1.received() == ["A"] and in_flight(router) == 0

    run(main)


def test_a_request_cancelled_while_connecting_gives_its_place_back_and_is_never_written(
        ) -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        sending = start_send(router, "A")
        await asyncio.sleep(0)  # placed; its connection is being opened
        assert in_flight(router) == 1
        sending.cancel()
        await spin()
        assert in_flight(router) == 0
        assert r1.received() == []  # connected since, but A was not written
        assert (await sent(router, "B")) is not None and r1.received() == ["B"]

    run(main)


def test_a_cancelled_request_holds_its_place_until_the_replica_stops_it_and_a_second_cancel_changes_nothing(  # noqa: E501
        ) -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        request: RoutedRequest = reply.request  # type: ignore[attr-defined]
        reply.cancel()
        assert request.state == CANCELLING
        request.cancel()  # a second cancel while it is being stopped
        reply.cancel()
        await spin()
        assert r1.kinds("A").count(_CANCEL) == 1
        waiting = start_send(router, "B")
        await spin()
        assert not waiting.done() and in_flight(router) == 1
        r1.stopped("A")
        await spin()
        assert request.state == ENDED and waiting.done()
        assert in_flight(router) == 1  # B's place, A's given back once
        assert r1.received() == ["A", "B"]

    run(main)


@pytest.mark.parametrize("last", ["answer", "refuse", "fail"])
def test_a_cancelled_request_also_ends_on_a_reply_that_crossed_the_cancel(last: str) -> None:
    """The replica answered (or refused, or failed) before the cancel reached it: that reply
    ends the request; a refused one is not sent again."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        reply.cancel()
        if last == "answer":
            r1.answer("A", "late")
        elif last == "refuse":
            r1.refuse("A")
            r1.notice()
        else:
            r1.fail("A", ValueError("late"))
        await spin()
        assert reply.cancelled() and in_flight(router) == 0
        assert r1.received() == ["A"]
        await sent(router, "B")

    run(main)


def test_a_cancel_in_the_same_loop_turn_as_the_first_stream_chunk_stops_the_stream() -> None:
    """The caller cancels, and the stream's first chunk is read before anything else runs:
    the replica is told to stop, once, and the place is held until it says it stopped.

    Old behaviour caught: the chunk's frame found the cancelled future first and dropped the
    request without sending a cancel, so the replica's generator waited on its window for
    the life of the connection."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        reply.cancel()
        r1.chunk("A", "first")
        await spin()
        assert r1.kinds("A").count(_CANCEL) == 1
        assert in_flight(router) == 1
        r1.stopped("A")
        await spin()
        assert in_flight(router) == 0

    run(main)


def test_a_stream_dropped_by_its_reader_stops_the_replica_and_holds_the_place_until_then(
        ) -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        r1.chunk("A", 1)
        await spin()
        stream = reply.result()
        assert isinstance(stream, ReplyStream)
        assert await stream.__anext__() == 1
        await spin()
        assert r1.kinds("A").count(_CREDIT) == 1  # taking a chunk lets one more come
        stream.cancel()
        stream.cancel()
        r1.chunk("A", 2)  # sent before the cancel arrived: dropped
        await spin()
        assert r1.kinds("A").count(_CANCEL) == 1 and in_flight(router) == 1
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        r1.stopped("A")
        await spin()
        assert in_flight(router) == 0

    run(main)


# --------------------------------------------------------------------------- streams


def test_a_stream_gives_its_place_back_when_it_ends_even_with_chunks_unread() -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        r1.chunk("A", 1)
        r1.chunk("A", 2)
        r1.end_stream("A")
        await spin()
        assert in_flight(router) == 0
        stream = reply.result()
        assert [chunk async for chunk in stream] == [1, 2]
        assert r1.kinds("A").count(_CREDIT) == 0  # nothing more can come: no credit sent

    run(main)


def test_a_stream_that_ends_with_no_chunk_is_an_empty_stream() -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        r1.end_stream("A")
        await spin()
        assert [chunk async for chunk in reply.result()] == []
        assert in_flight(router) == 0

    run(main)


def test_an_error_ending_a_stream_reaches_its_reader_after_the_chunks() -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        r1.chunk("A", 1)
        r1.fail("A", ValueError("generator broke"))
        await spin()
        assert in_flight(router) == 0
        stream = reply.result()
        assert await stream.__anext__() == 1
        with pytest.raises(ValueError, match="generator broke"):
            await stream.__anext__()

    run(main)


# --------------------------------------------------------------------------- connection loss


@pytest.mark.parametrize("state", [SENT, STREAMING, CANCELLING])
def test_a_lost_connection_ends_the_request_in_every_state_that_holds_a_place(
        state: str) -> None:
    """SENT: the caller gets BackendUnavailableError (never sent again: it may have run);
    STREAMING: the reader does, after the chunks that arrived; CANCELLING: nothing more to
    tell. In each the place is given back once and the replica is not picked again."""

    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1"), cluster.replica("b#2")
        router, feed = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        request: RoutedRequest = reply.request  # type: ignore[attr-defined]
        if state == STREAMING:
            r1.chunk("A", 1)
        elif state == CANCELLING:
            reply.cancel()
        await spin()
        assert request.state == state
        r1.drop()
        await spin()
        assert request.state == ENDED and slot(router, "b#1").in_flight == 0
        if state == SENT:
            assert isinstance(reply.exception(), BackendUnavailableError)
            assert "replica b#1" in str(reply.exception())
        elif state == STREAMING:
            stream = reply.result()
            assert await stream.__anext__() == 1
            with pytest.raises(BackendUnavailableError, match="streamed reply"):
                await stream.__anext__()
        feed.replicas(b=[r1, r2])
        await sent(router, "B")
        assert r1.received() == ["A"] and r2.received() == ["B"]

    run(main)


def test_a_connection_that_fails_while_the_request_connects_sends_it_elsewhere() -> None:
    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1"), cluster.replica("b#2")
        r1.refuse_connections = True
        router, feed = make_router(cluster, cap=1, b=[r1])
        sending = start_send(router, "A")
        await spin()
        assert not sending.done()  # put back, first in line: no replica left to take it
        feed.replicas(b=[r1, r2])
        await spin()
        assert sending.done() and r2.received() == ["A"]

    run(main)


def test_a_queued_request_fails_once_no_replica_comes_back_in_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "NO_REPLICA_TIMEOUT_S", 0.05)

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, feed = make_router(cluster, cap=1, b=[r1])
        feed.replicas(b=[])
        with pytest.raises(BackendUnavailableError, match="No replica of backend 'b'"):
            await asyncio.wait_for(router.send("ep", "call", None, ("A",)), 5)
        assert router._replica_sets["b"].queued == 0

    run(main)


# --------------------------------------------------------------------------- small leaks


def metric_lines(backend: str) -> List[str]:
    return [line for line in metrics.exposition().splitlines()
            if f'backend="{backend}"' in line and not line.startswith("#")]


def test_a_router_forgets_a_deleted_backend_and_its_metric_series() -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("gone#1")
        router, feed = make_router(cluster, cap=1, gone=[r1])
        feed.endpoints(endpoint(traffic={"gone": 1.0}))
        reply = await sent(router, "A")
        r1.answer("A", "a")
        await spin()
        assert reply.result() == "a" and metric_lines("gone")
        feed.endpoints()
        feed.caps()
        feed.replicas()
        await spin()
        assert "gone" not in router._replica_sets
        assert metric_lines("gone") == []
        assert r1.transport.closing  # its connection is closed

    run(main)


def test_a_deleted_backend_with_a_request_in_flight_is_forgotten_after_it_ends() -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("old#1")
        router, feed = make_router(cluster, cap=1, old=[r1])
        feed.endpoints(endpoint(traffic={"old": 1.0}))
        reply = await sent(router, "A")
        feed.caps()
        feed.replicas()
        await spin()
        r1.answer("A", "a")  # the replica drains: it answers before it stops
        await spin()
        assert reply.result() == "a"
        feed.replicas()  # the next update finds it idle
        assert "old" not in router._replica_sets

    run(main)


def test_a_closed_controller_connection_is_reconnected_not_read_as_the_instance_gone(
        ) -> None:
    """A long-poll call on a connection that is already closed fails unsent
    (``ConnectionClosed``); the router connects again instead of giving up for good.

    Old behaviour caught: the closed connection raised ``ConnectFailed``, read as "nothing
    serves the controller's socket", so the router stopped long-polling for ever."""

    async def main() -> None:
        router = Router("/run/servekit/controller.sock", "router")
        closed: Any = type("Closed", (), {})()
        calls: List[str] = []

        async def call(*args: Any) -> Any:
            calls.append("closed")
            raise ConnectionClosed("The connection to servekit controller is closed.")

        closed.call = call
        closed.close = lambda: None
        router._controller = closed
        reconnected = asyncio.Event()

        async def connect() -> Any:
            reconnected.set()
            raise asyncio.CancelledError()  # end the loop here

        router._connect_controller = connect  # type: ignore[method-assign]
        task = asyncio.ensure_future(router._poll_forever())
        await asyncio.wait_for(reconnected.wait(), 5)
        assert calls == ["closed"]
        await asyncio.gather(task, return_exceptions=True)

    run(main)



# --------------------------------------------------------------------------- deadlines


def timed_router(cluster: Cluster, timeout_s: float) -> Any:
    r1 = cluster.replica("b#1")
    router, feed = make_router(cluster, cap=1, b=[r1])
    feed.push(constants.KEY_BACKENDS, {"b": BackendLimits(1, -1, timeout_s)})
    return router, r1


def test_a_request_past_its_backends_timeout_while_queued_fails_and_is_never_sent() -> None:
    async def main() -> None:
        router, r1 = timed_router(Cluster(), 0.05)
        first = await sent(router, "A")
        waiting = start_send(router, "B")
        with pytest.raises(RequestTimeoutError, match="backend 'b'.*0.05"):
            await asyncio.wait_for(waiting, 5)
        assert router._replica_sets["b"].queued == 0
        assert isinstance(first.exception(), RequestTimeoutError)  # A, written, also ended
        assert r1.received() == ["A"] and r1.kinds("A").count(_CANCEL) == 1

    run(main)


def test_a_written_request_past_its_timeout_is_stopped_and_holds_its_place_until_then(
        ) -> None:
    async def main() -> None:
        router, r1 = timed_router(Cluster(), 0.05)
        reply = await sent(router, "A")
        request: RoutedRequest = reply.request  # type: ignore[attr-defined]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reply, 5)
        assert request.state == CANCELLING and r1.kinds("A").count(_CANCEL) == 1
        assert in_flight(router) == 1  # the replica has not said the work stopped
        r1.stopped("A")
        await spin()
        assert request.state == ENDED and in_flight(router) == 0

    run(main)


def test_a_reply_in_time_disarms_the_timeout() -> None:
    async def main() -> None:
        router, r1 = timed_router(Cluster(), 0.05)
        reply = await sent(router, "A")
        request: RoutedRequest = reply.request  # type: ignore[attr-defined]
        r1.answer("A", "a")
        await spin()
        assert reply.result() == "a"
        await asyncio.sleep(0.1)  # past the timeout: nothing happens to an ended request
        assert request.state == ENDED and r1.kinds("A").count(_CANCEL) == 0

    run(main)


def test_a_stream_that_started_in_time_is_not_cut_by_the_timeout() -> None:
    async def main() -> None:
        router, r1 = timed_router(Cluster(), 0.05)
        reply = await sent(router, "A")
        r1.chunk("A", "first")
        await spin()
        stream = reply.result()
        assert isinstance(stream, ReplyStream)
        await asyncio.sleep(0.1)
        r1.end_stream("A")
        await spin()
        assert r1.kinds("A").count(_CANCEL) == 0 and in_flight(router) == 0

    run(main)


def test_a_per_call_timeout_overrides_the_backends() -> None:
    async def main() -> None:
        router, r1 = timed_router(Cluster(), 60)
        reply = await router.send("ep", "call", None, ("A",), timeout_s=0.05)
        with pytest.raises(RequestTimeoutError, match="timeout_s=0.05"):
            await asyncio.wait_for(reply, 5)

    run(main)


# --------------------------------------------------------------------------- what it holds


@pytest.mark.parametrize("ending", ["answer", "fail", "cancel_queued", "stream"])
def test_an_ended_request_holds_no_payload_and_is_freed_without_the_cyclic_collector(
        ending: str) -> None:
    """Once it ends a request drops its bytes, and dropping its reply frees it by reference
    counting alone: a cycle between request and reply would keep a large body alive until
    the cyclic collector happens to run."""
    import gc
    import weakref

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        first = await sent(router, "A")
        if ending == "cancel_queued":
            waiting = start_send(router, "B")
            await spin()
            request = router._replica_sets["b"]._waiting[0]
            waiting.cancel()
            await spin()
        else:
            request = first.request  # type: ignore[attr-defined]
            if ending == "answer":
                r1.answer("A", "a")
            elif ending == "fail":
                r1.fail("A", ValueError("boom"))
            else:
                r1.chunk("A", 1)
                r1.end_stream("A")
            await spin()
            assert first.done()
            if ending == "stream":
                assert [chunk async for chunk in first.result()] == [1]
            elif ending == "fail":
                assert isinstance(first.exception(), ValueError)
        assert request.state == ENDED and request.payload is None
        gone = weakref.ref(request)
        del request, first
        if ending == "cancel_queued":
            del waiting
        await spin()
        assert gone() is None

    gc.disable()
    try:
        run(main)
    finally:
        gc.enable()


def test_requests_that_give_up_in_line_leave_it_while_the_backend_takes_nothing() -> None:
    """Under a stuck backend, callers that give up while queued do not pile up in the line:
    it holds at most twice the requests still waiting, and none once all have left."""
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        await sent(router, "stuck")  # never answered
        line = router._replica_sets["b"]
        keep = [start_send(router, f"keep{i}") for i in range(3)]
        leaving = [start_send(router, f"leave{i}") for i in range(200)]
        await spin()
        for waiting in leaving:
            waiting.cancel()
        await spin()
        assert line.queued == 3 and len(line._waiting) <= 6
        for waiting in keep:
            waiting.cancel()
        await spin()
        assert line.queued == 0 and len(line._waiting) == 0
        assert r1.received() == ["stuck"]

    run(main)
