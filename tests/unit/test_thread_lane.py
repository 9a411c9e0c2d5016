"""Unit tests of the thread lane (``servekit._private.replica.thread_lane``): sync user code on
threads, answered on the loop. Threads are driven with events, so each interleaving of a
caller leaving and a thread starting or returning is reached deterministically."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import List

import pytest
from loop_helpers import run

from servekit._private.replica.thread_lane import ThreadLane

DEADLINE_S = 10
request_name: contextvars.ContextVar[str] = contextvars.ContextVar("request_name")


def lane(threads: int = 1) -> ThreadLane:
    return ThreadLane(asyncio.get_running_loop(), threads, "test-lane")


def test_a_call_returns_its_result_and_runs_in_the_callers_context() -> None:
    async def main() -> None:
        request_name.set("r-1")
        job = lane().submit(lambda suffix: request_name.get() + suffix, "!")
        assert await job.result == "r-1!"

    run(main)


def test_what_a_call_raises_reaches_the_caller() -> None:
    def fails() -> None:
        raise ValueError("bad input")

    def stops() -> None:
        raise StopIteration("inside user code")

    async def main() -> None:
        threads = lane()
        with pytest.raises(ValueError, match="bad input"):
            await threads.submit(fails).result
        with pytest.raises(RuntimeError, match="StopIteration"):  # a future cannot hold one
            await threads.submit(stops).result

    run(main)


def test_a_withdrawn_call_that_had_not_started_never_runs() -> None:
    async def main() -> None:
        threads = lane()
        release, ran = threading.Event(), []
        blocker = threads.submit(release.wait, DEADLINE_S)
        queued = threads.submit(ran.append, "queued")
        assert queued.withdraw()
        await queued.finished()  # nothing to wait for: it never starts
        release.set()
        await blocker.result
        await threads.submit(ran.append, "after").result  # the lane moved past it
        assert ran == ["after"]

    run(main)


def test_a_started_call_cannot_be_withdrawn_and_is_waited_for_through_cancels() -> None:
    async def main() -> None:
        threads = lane()
        started, release = threading.Event(), threading.Event()

        def work() -> str:
            started.set()
            assert release.wait(DEADLINE_S)
            return "done"

        job = threads.submit(work)
        assert await asyncio.to_thread(started.wait, DEADLINE_S)
        assert not job.withdraw()
        waiter = asyncio.ensure_future(job.finished())
        await asyncio.sleep(0)
        waiter.cancel()  # a second cancel while waiting does not end the wait early
        await asyncio.sleep(0)
        assert not waiter.done()
        release.set()
        await asyncio.wait_for(waiter, DEADLINE_S)
        assert await job.result == "done"

    run(main)


def test_finished_returns_when_the_result_came_back_before_it_was_asked() -> None:
    async def main() -> None:
        threads = lane()
        job = threads.submit(lambda: "quick")
        waiter = asyncio.ensure_future(job.result)
        assert await waiter == "quick"
        assert not job.withdraw()
        await asyncio.wait_for(job.finished(), DEADLINE_S)

    run(main)


def test_a_cancelled_caller_leaves_the_result_unset_and_the_thread_finishes() -> None:
    async def main() -> None:
        threads = lane()
        release = threading.Event()
        job = threads.submit(release.wait, DEADLINE_S)
        caller = asyncio.ensure_future(job.result)
        await asyncio.sleep(0)
        caller.cancel()
        await asyncio.sleep(0)
        assert job.result.cancelled()
        release.set()
        await asyncio.wait_for(job.finished(), DEADLINE_S)

    run(main)


def test_results_that_come_back_together_wake_the_loop_once() -> None:
    async def main() -> None:
        threads = lane()
        collections: List[int] = []
        collect = threads._collect

        def counted() -> None:
            collections.append(len(threads._done))
            collect()

        threads._collect = counted  # type: ignore[method-assign]
        last_done = threading.Event()
        jobs = [threads.submit(int, i) for i in range(10)]
        jobs.append(threads.submit(last_done.set))
        assert last_done.wait(DEADLINE_S)  # the loop is blocked: all eleven come back
        assert [await job.result for job in jobs[:10]] == list(range(10))
        assert collections == [11]

    run(main)


def test_threads_run_calls_at_once_up_to_their_number() -> None:
    async def main() -> None:
        threads = lane(threads=2)
        both = threading.Barrier(2, timeout=DEADLINE_S)
        first, second = threads.submit(both.wait), threads.submit(both.wait)
        assert sorted([await first.result, await second.result]) == [0, 1]

    run(main)


def test_a_shut_down_lane_runs_what_it_had_and_refuses_more() -> None:
    async def main() -> None:
        threads = lane()
        job = threads.submit(lambda: "queued before shutdown")
        threads.shutdown()
        assert await job.result == "queued before shutdown"
        with pytest.raises(RuntimeError, match="shut down"):
            threads.submit(int)
        for thread in threads._workers:
            await asyncio.to_thread(thread.join, DEADLINE_S)
            assert not thread.is_alive()

    run(main)
