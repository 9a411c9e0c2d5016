"""Batching: group requests to one method of a replica and run them as one call."""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Awaitable, Callable, Deque, Dict, List, Optional, Tuple

from servekit.exceptions import BatchOutputError

RunBatch = Callable[[List[Any]], Awaitable[Any]]


def check_batch_output(output: Any, size: int) -> List[Any]:
    """The batch's results as a list, or BatchOutputError saying what was wrong."""
    if isinstance(output, (list, tuple)) or type(output).__name__ == "ndarray":
        results = list(output)
    else:
        raise BatchOutputError(
            f"An @accept_batch callable must return an ordered sequence (list, tuple or numpy "
            f"array) with one result per request; it returned a {type(output).__name__}.")
    if len(results) != size:
        raise BatchOutputError(
            f"An @accept_batch callable must return one result per request: it got {size} "
            f"requests but returned {len(results)} results.")
    return results


class BatchQueue:
    """Requests for one batched method, run ``max_batch_size`` at a time.

    With ``batch_wait_timeout`` 0 a batch is whatever is queued when the method is free; with
    a timeout, a batch starts when it is full or its oldest request has waited that long.
    The queue wakes on arrivals and on the deadline, never on a timer of its own.
    """

    def __init__(self, run_batch: RunBatch, limits: Callable[[], Tuple[int, float]],
                 concurrent: bool, on_batch: Callable[[int], None] = lambda size: None) -> None:
        """``on_batch(size)`` is told the size of each batch as it starts."""
        self._run_batch = run_batch
        self._on_batch = on_batch
        self._limits = limits
        self._concurrent = concurrent
        self._queue: Deque[Tuple[float, Any, asyncio.Future]] = collections.deque()
        self._arrived = asyncio.Event()
        self._task = asyncio.ensure_future(self._loop())
        self._running: set = set()
        # The result future of each request in a running batch -> the end of that batch.
        self._batch_of: Dict[asyncio.Future, asyncio.Future] = {}

    def submit(self, item: Any) -> asyncio.Future:
        """Queue one request; the future of its result. Cancelling the future while the
        request waits takes it out of the queue; once its batch runs, the batch runs on."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((loop.time(), item, future))
        self._arrived.set()
        return future

    def running_batch(self, future: asyncio.Future) -> Optional[asyncio.Future]:
        """The end of the running batch whose request has the result ``future``; None if
        that request is not in a running batch (it still waited, or its batch ended)."""
        return self._batch_of.get(future)

    def close(self) -> None:
        self._task.cancel()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            max_size, timeout = self._limits()
            if timeout > 0:
                deadline = self._queue[0][0] + timeout
                while len(self._queue) < max_size and loop.time() < deadline:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                    except asyncio.TimeoutError:
                        break
            batch = [self._queue.popleft() for _ in range(min(max_size, len(self._queue)))]
            batch = [entry for entry in batch if not entry[2].done()]  # callers gone: skip
            if not batch:
                continue
            self._on_batch(len(batch))
            ended = loop.create_future()
            for _, _, future in batch:
                self._batch_of[future] = ended
            if self._concurrent:
                task = asyncio.ensure_future(self._execute(batch, ended))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            else:
                await self._execute(batch, ended)

    async def _execute(self, batch: List[Tuple[float, Any, asyncio.Future]],
                       ended: asyncio.Future) -> None:
        futures = [future for _, _, future in batch]
        try:
            output = await self._run_batch([item for _, item, _ in batch])
            results = check_batch_output(output, len(batch))
        except Exception as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            for future in futures:
                del self._batch_of[future]
            ended.set_result(None)
        for future, result in zip(futures, results, strict=True):
            if not future.done():
                future.set_result(result)
