"""Unit tests of a request's admission in a replica (``servekit._private.replica.admission``) and of
the replica giving each place back when the user's work really stops.

The table is tested on its own; the rest runs a real ``Replica`` in-process (no sockets):
handler calls are tasks the test cancels, sync user code blocks on ``threading.Event``s the
test sets, and ``in_flight`` is what the replica counts against ``max_concurrent_queries``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Iterator, List

import cloudpickle
import pytest
from loop_helpers import run, spin, until

from servekit._private.backend_metadata import ReplicaConfig
from servekit._private.replica.admission import (
    ADMITTED,
    CANCEL,
    CANCELLING,
    CLOSING,
    ENDED,
    STREAMING,
    TRANSITIONS,
    Admission,
    IllegalTransition,
)
from servekit._private.replica.replica import Replica
from servekit._private.specs import ReplicaSpec
from servekit._private.wire.transport import Busy, Stream, current_peer
from servekit.config import BackendConfig

STATES = sorted({state for state, _ in TRANSITIONS} | set(TRANSITIONS.values()))
EVENTS = sorted({event for _, event in TRANSITIONS})
DEADLINE_S = 5.0


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("event", EVENTS)
def test_an_event_a_state_has_no_move_for_is_an_error(state: str, event: str) -> None:
    if (state, event) in TRANSITIONS:
        return
    released: List[Admission] = []
    admission = Admission(released.append)
    admission.state = state
    with pytest.raises(IllegalTransition, match=f"{state!r}.*{event!r}"):
        admission._apply(event)
    assert admission.state == state and released == []


def test_the_place_is_given_back_once_whatever_the_path() -> None:
    for path in (["finish"], ["cancel", "cancel", "finish", "cancel"],
                 ["streaming", "cancel", "closing", "cancel", "finish", "cancel"]):
        released: List[Admission] = []
        admission = Admission(released.append)
        for step in path:
            getattr(admission, step)()
        assert admission.state == ENDED and released == [admission], path


def test_only_a_late_cancel_reaches_an_ended_admission() -> None:
    assert [event for (state, event) in TRANSITIONS if state == ENDED] == [CANCEL]
    assert {state for state, _ in TRANSITIONS} == {ADMITTED, CANCELLING, STREAMING, CLOSING,
                                                   ENDED}


# --------------------------------------------------------------------------- a real replica


class FakePeer:
    """The connection a request came in on; room notices sent to it are counted."""

    def __init__(self) -> None:
        self.notices = 0

    def send(self, msg_id: int, kind: int, payload: bytes) -> bool:
        self.notices += 1
        return True


async def make_replica(target: Any, **config: Any) -> Replica:
    """A started replica of ``target`` (a class is constructed in it: ``replica._callable``
    is the instance)."""
    spec = ReplicaSpec("b", "b#1", ReplicaConfig(cloudpickle.dumps((target, ())), {}, "t"),
                       BackendConfig(**config).replica_settings(), None)
    replica = Replica(spec)
    replica.start()
    await replica.ready()
    current_peer.set(FakePeer())  # type: ignore[arg-type]
    return replica


def call(replica: Replica, data: Any = None, stream: bool = False) -> asyncio.Task:
    """A handle call to the replica, as the transport runs it: a task it may cancel."""
    return asyncio.ensure_future(
        replica.handle_call(None, (data,), {}, "GET", {}, stream, "id"))


class Blocking:
    """Sync user code: each call records its data, then waits for ``release``."""

    def __init__(self) -> None:
        self.started: List[Any] = []
        self.release = threading.Event()

    def __call__(self, request: Any) -> Any:
        self.started.append(request.data)
        assert self.release.wait(DEADLINE_S)
        return request.data


def test_a_cancelled_sync_call_keeps_its_place_until_its_thread_returns() -> None:
    """Old behaviour caught: the place was given back when the caller left, while the
    thread still ran the call, so routers sent more work in and a replica ran more calls
    at once than its cap."""
    async def main() -> None:
        replica = await make_replica(Blocking, max_concurrent_queries=1)
        blocking: Blocking = replica._callable
        running = call(replica, "A")
        await until(lambda: blocking.started == ["A"], "A to run")
        running.cancel()
        await spin()
        assert not running.done()  # the handler ends only when the work does
        assert replica._in_flight == 1
        with pytest.raises(Busy):
            await replica.handle_call(None, ("B",), {}, "GET", {}, False, "id")
        blocking.release.set()
        await until(running.done, "the cancelled call to end")
        assert running.cancelled()
        assert replica._in_flight == 0 and replica._idle.is_set()
        assert await call(replica, "C") == "C"

    run(main)


def test_a_cancelled_sync_call_that_had_not_started_never_runs() -> None:
    """With one thread and a cap of 2, the second call waits for the thread; its caller
    leaves; it must never run, and its place is free at once.

    Old behaviour caught: the call stayed queued on the thread pool and ran later."""
    async def main() -> None:
        replica = await make_replica(Blocking, max_concurrent_queries=2, sync_threads=1)
        blocking: Blocking = replica._callable
        first = call(replica, "A")
        await until(lambda: blocking.started == ["A"], "A to run")
        second = call(replica, "B")
        await spin()
        assert replica._in_flight == 2
        second.cancel()
        await until(second.done, "B to end")
        assert replica._in_flight == 1
        blocking.release.set()
        assert await first == "A"
        await spin()
        assert blocking.started == ["A"]
        assert replica._in_flight == 0

    run(main)


def test_a_second_cancel_while_the_thread_still_runs_changes_nothing() -> None:
    async def main() -> None:
        replica = await make_replica(Blocking, max_concurrent_queries=1)
        blocking: Blocking = replica._callable
        running = call(replica, "A")
        await until(lambda: blocking.started == ["A"], "A to run")
        running.cancel()
        await spin()
        running.cancel()
        await spin()
        assert not running.done() and replica._in_flight == 1
        blocking.release.set()
        await until(running.done, "A to end")
        assert replica._in_flight == 0

    run(main)


def raising_cleanup(request: Any) -> Iterator[int]:
    try:
        yield 1
        yield 2
    finally:
        raise RuntimeError("cleanup failed")


async def araising_cleanup(request: Any) -> Any:
    try:
        yield 1
        yield 2
    finally:
        raise RuntimeError("cleanup failed")


@pytest.mark.parametrize("generator", [raising_cleanup, araising_cleanup])
def test_a_stream_whose_cleanup_raises_still_gives_its_place_back(generator: Any) -> None:
    """Old behaviour caught: ``close()`` raised before the place was given back, so after
    ``max_concurrent_queries`` such streams the replica refused everything for ever."""

    async def main() -> None:
        replica = await make_replica(generator, max_concurrent_queries=2)
        for _ in range(3):  # more streams than the cap, one after another
            reply = await call(replica, stream=True)
            assert isinstance(reply, Stream)
            assert await reply.chunks.__anext__() == 1
            with pytest.raises(RuntimeError, match="cleanup failed"):
                await reply.chunks.aclose()  # the reader left after one chunk
            assert replica._in_flight == 0

    run(main)


def test_a_stream_read_to_its_end_whose_cleanup_raises_ends_with_that_error() -> None:
    async def main() -> None:
        replica = await make_replica(raising_cleanup, max_concurrent_queries=1)
        reply = await call(replica, stream=True)
        chunks = []
        with pytest.raises(RuntimeError, match="cleanup failed"):
            async for chunk in reply.chunks:
                chunks.append(chunk)
        assert chunks == [1, 2] and replica._in_flight == 0

    run(main)


class SlowClose:
    """A sync generator whose cleanup blocks until ``release``."""

    def __init__(self) -> None:
        self.closing = threading.Event()
        self.release = threading.Event()
        self.closed = False

    def __call__(self, request: Any) -> Iterator[int]:
        try:
            yield 1
            yield 2
        finally:
            self.closing.set()
            assert self.release.wait(DEADLINE_S)
            self.closed = True


def test_a_cancel_during_a_streams_close_waits_for_the_close_and_releases_once() -> None:
    async def main() -> None:
        replica = await make_replica(SlowClose, max_concurrent_queries=1)
        slow: SlowClose = replica._callable
        reply = await call(replica, stream=True)
        assert await reply.chunks.__anext__() == 1
        closing = asyncio.ensure_future(reply.chunks.aclose())  # the reader left
        await until(slow.closing.is_set, "the close to start")
        closing.cancel()  # the connection is lost during the close
        await spin()
        closing.cancel()
        await spin()
        assert not closing.done() and replica._in_flight == 1
        slow.release.set()
        await until(closing.done, "the close to end")
        assert slow.closed and replica._in_flight == 0

    run(main)


def test_a_refused_caller_is_told_when_the_cancelled_call_ends() -> None:
    """A router refused while a cancelled call still ran gets its room notice when the call's
    thread returns, not before."""
    async def main() -> None:
        replica = await make_replica(Blocking, max_concurrent_queries=1)
        blocking: Blocking = replica._callable
        peer = current_peer.get()
        running = call(replica, "A")
        await until(lambda: blocking.started == ["A"], "A to run")
        running.cancel()
        with pytest.raises(Busy):
            await replica.handle_call(None, ("B",), {}, "GET", {}, False, "id")
        await spin()
        assert peer.notices == 0  # type: ignore[attr-defined]
        blocking.release.set()
        await until(running.done, "A to end")
        assert peer.notices == 1  # type: ignore[attr-defined]

    run(main)


def stops_iteration(request: Any) -> Any:
    raise StopIteration("user code ran out of items")


def test_a_sync_call_that_raises_stop_iteration_fails_instead_of_hanging() -> None:
    """Old behaviour caught: an asyncio future cannot hold a StopIteration, so the result
    never reached the caller and the request waited for good, holding its place."""
    async def main() -> None:
        replica = await make_replica(stops_iteration)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(call(replica), DEADLINE_S)
        assert replica._in_flight == 0

    run(main)
