"""Unit tests of ``BatchQueue``: requests to an ``@accept_batch`` method, run as batches.

The batch function is a coroutine the test controls; each test runs one event loop with
``asyncio.run`` and ``spin`` lets queued work run without letting time pass.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, List, Tuple

import pytest
from loop_helpers import run, spin

from servekit._private.context import current_model_id
from servekit._private.replica.batching import BatchQueue
from servekit.exceptions import BatchOutputError


class Recorder:
    """A batch function: records each batch, answers ``item * 10``, raises for "bad"."""

    def __init__(self) -> None:
        self.batches: List[List[Any]] = []

    async def __call__(self, items: List[Any]) -> List[Any]:
        self.batches.append(list(items))
        await asyncio.sleep(0)
        if "bad" in items:
            raise ValueError(f"cannot score {items}")
        if "wrong shape" in items:
            return [0]
        return [item * 10 for item in items]


def limits(size: int, timeout: float = 0.0) -> Callable[[], Tuple[int, float]]:
    return lambda: (size, timeout)


@pytest.mark.parametrize("concurrent", [False, True])
def test_results_come_back_in_order_in_batches_of_the_max_size(concurrent: bool) -> None:
    """Each request gets its own result, whatever batch it ran in; batches never exceed
    ``max_batch_size`` and keep arrival order."""

    async def main() -> None:
        run_batch = Recorder()
        queue = BatchQueue(run_batch, limits(2), concurrent=concurrent)
        futures = [queue.submit(i) for i in range(1, 6)]
        results = await asyncio.gather(*futures)
        assert results == [10, 20, 30, 40, 50]
        assert run_batch.batches == [[1, 2], [3, 4], [5]]
        queue.close()

    run(main)


@pytest.mark.parametrize("concurrent", [False, True])
def test_a_raising_batch_fails_only_its_own_requests(concurrent: bool) -> None:
    """A batch function that raises fails the requests of that batch with its exception;
    the next batch still runs and succeeds."""

    async def main() -> None:
        run_batch = Recorder()
        queue = BatchQueue(run_batch, limits(2), concurrent=concurrent)
        failing = [queue.submit(1), queue.submit("bad")]
        passing = [queue.submit(3), queue.submit(4)]
        for future in failing:
            with pytest.raises(ValueError, match="cannot score"):
                await future
        assert await asyncio.gather(*passing) == [30, 40]
        # The queue still serves requests submitted after the failure.
        assert await queue.submit(5) == 50
        assert run_batch.batches == [[1, "bad"], [3, 4], [5]]
        queue.close()

    run(main)


@pytest.mark.parametrize("concurrent", [False, True])
def test_a_wrong_size_output_fails_only_its_batch(concurrent: bool) -> None:
    """A batch returning the wrong number of results fails that batch with a
    BatchOutputError saying so; the next batch still runs."""

    async def main() -> None:
        queue = BatchQueue(Recorder(), limits(2), concurrent=concurrent)
        failing = [queue.submit(1), queue.submit("wrong shape")]
        passing = queue.submit(7)
        for future in failing:
            with pytest.raises(BatchOutputError, match="got 2 requests but returned 1"):
                await future
        assert await passing == 70
        queue.close()

    run(main)


def test_non_sequence_output_is_a_batch_output_error() -> None:
    """A batch returning something other than a list, tuple or array names what it got."""

    async def scalar(items: List[Any]) -> Any:
        return 42

    async def main() -> None:
        queue = BatchQueue(scalar, limits(4), concurrent=False)
        with pytest.raises(BatchOutputError, match="returned a int"):
            await queue.submit(1)
        queue.close()

    run(main)


@pytest.mark.parametrize("concurrent, overlap", [(False, 1), (True, 3)])
def test_sequential_batches_do_not_overlap_concurrent_ones_do(concurrent: bool,
                                                              overlap: int) -> None:
    """With ``concurrent=False`` a batch starts only after the previous one ended; with
    ``concurrent=True`` every queued batch starts while the first still runs."""

    async def main() -> None:
        release = asyncio.Event()
        running, most = 0, 0

        async def slow(items: List[Any]) -> List[Any]:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await release.wait()
            running -= 1
            return list(items)

        queue = BatchQueue(slow, limits(1), concurrent=concurrent)
        futures = [queue.submit(i) for i in range(3)]
        await spin()
        assert most == overlap
        release.set()
        assert await asyncio.gather(*futures) == [0, 1, 2]
        assert most == overlap
        queue.close()

    run(main)


def test_batch_waits_for_more_requests_until_full() -> None:
    """With a wait timeout, a batch that is not full waits for more requests; it starts as
    soon as it is full."""

    async def main() -> None:
        run_batch = Recorder()
        queue = BatchQueue(run_batch, limits(3, timeout=60.0), concurrent=False)
        first = [queue.submit(1), queue.submit(2)]
        await spin()
        assert run_batch.batches == []
        first.append(queue.submit(3))
        assert await asyncio.gather(*first) == [10, 20, 30]
        assert run_batch.batches == [[1, 2, 3]]
        queue.close()

    run(main)


def test_batch_that_never_fills_runs_at_its_deadline() -> None:
    """A lone request in a batch with a wait timeout runs once its wait is over."""

    async def main() -> None:
        run_batch = Recorder()
        queue = BatchQueue(run_batch, limits(8, timeout=0.02), concurrent=False)
        assert await asyncio.wait_for(queue.submit(4), 5.0) == 40
        assert run_batch.batches == [[4]]
        queue.close()

    run(main)


def test_a_cancelled_request_does_not_break_its_batch() -> None:
    """A request whose caller went away is still part of its batch; the others in that
    batch get their results."""

    async def main() -> None:
        queue = BatchQueue(Recorder(), limits(3), concurrent=False)
        gone, kept = queue.submit(1), queue.submit(2)
        gone.cancel()
        assert await kept == 20
        assert await queue.submit(3) == 30
        queue.close()

    run(main)


def test_a_request_in_a_running_batch_is_known_until_the_batch_ends() -> None:
    """``running_batch`` tells a caller that leaves whether its request is part of a batch
    that runs on (then it waits for its end) or still waits (then it is taken out)."""

    async def main() -> None:
        release = asyncio.Event()
        batches: List[List[Any]] = []

        async def held(items: List[Any]) -> List[Any]:
            batches.append(list(items))
            await release.wait()
            return list(items)

        queue = BatchQueue(held, limits(2), concurrent=False)
        first, second, waiting = queue.submit(1), queue.submit(2), queue.submit(3)
        await spin()
        batch = queue.running_batch(first)
        assert batch is not None and batch is queue.running_batch(second)
        assert queue.running_batch(waiting) is None  # still queued
        first.cancel()  # its caller left: the batch runs on
        waiting.cancel()  # it never runs
        await spin()
        assert not batch.done()
        release.set()
        assert await second == 2
        assert batch.done() and queue.running_batch(second) is None
        await spin()
        assert batches == [[1, 2]]  # the cancelled waiting request was never run
        queue.close()

    run(main)


@pytest.mark.parametrize("concurrent", [False, True])
def test_a_batch_holds_the_requests_of_one_model_and_runs_with_its_id(
        concurrent: bool) -> None:
    """Requests naming different multiplexed models never share a batch: the oldest
    request's model goes first, with its id current in the batch function."""

    async def main() -> None:
        batches: List[Tuple[str, List[Any]]] = []

        async def run_batch(items: List[Any]) -> List[Any]:
            batches.append((current_model_id.get(), list(items)))
            await asyncio.sleep(0)
            return [f"{current_model_id.get()}:{item}" for item in items]

        queue = BatchQueue(run_batch, limits(3), concurrent=concurrent)
        futures = []
        for item, model in enumerate("abaab"):
            current_model_id.set(model)
            futures.append(queue.submit(item))
        current_model_id.set("")
        futures.append(queue.submit(5))
        assert await asyncio.gather(*futures) == ["a:0", "b:1", "a:2", "a:3", "b:4", ":5"]
        assert batches == [("a", [0, 2, 3]), ("b", [1, 4]), ("", [5])]
        queue.close()

    run(main)


def test_a_batch_waits_to_fill_with_its_own_model_only() -> None:
    """With a wait timeout, requests of other models do not make the oldest request's
    batch full: it starts at its deadline, then theirs."""

    async def main() -> None:
        batches: List[Tuple[str, List[Any]]] = []

        async def run_batch(items: List[Any]) -> List[Any]:
            batches.append((current_model_id.get(), list(items)))
            return list(items)

        queue = BatchQueue(run_batch, limits(2, timeout=0.05), concurrent=False)
        current_model_id.set("a")
        first = queue.submit(0)
        current_model_id.set("b")
        others = [queue.submit(1), queue.submit(2)]
        await spin()
        assert batches == []  # "a" is alone, and not yet due
        assert await first == 0 and await asyncio.gather(*others) == [1, 2]
        assert batches == [("a", [0]), ("b", [1, 2])]
        queue.close()

    run(main)


def test_a_request_that_left_the_queue_leaves_its_models_count() -> None:
    """A caller that leaves while queued takes its request out of its model's count: the
    rest of that model still forms a batch when it is full."""

    async def main() -> None:
        batches: List[List[Any]] = []

        async def run_batch(items: List[Any]) -> List[Any]:
            batches.append(list(items))
            return list(items)

        queue = BatchQueue(run_batch, limits(2, timeout=30.0), concurrent=False)
        current_model_id.set("a")
        leaving = queue.submit(0)
        leaving.cancel()
        await spin()
        kept = [queue.submit(1), queue.submit(2)]
        assert await asyncio.gather(*kept) == [1, 2]  # full at two: no 30 s wait
        assert batches == [[1, 2]]
        queue.close()

    run(main)
