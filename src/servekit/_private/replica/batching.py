"""Batching: group calls to one batched function of a replica and run them as one call.

One ``BatchQueue`` serves both kinds: a backend's ``@accept_batch`` method (the 1.x
backend-wide ``max_batch_size``) and each ``@serve.batch`` function or method (``batched``).
A batch holds the requests of one multiplexed model (``serve.get_multiplexed_model_id()``),
and runs with that model id current.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
from typing import Any, Awaitable, Callable, Deque, Dict, List, Optional, Tuple

from servekit._private.context import current_model_id
from servekit._private.replica.admission import current_admission, outlast
from servekit.exceptions import BatchOutputError, ServeError

RunBatch = Callable[[List[Any]], Awaitable[Any]]


def check_batch_output(output: Any, size: int, what: str = "An @accept_batch callable",
                       verbs: Tuple[str, str] = ("return", "returned")) -> List[Any]:
    """The batch's results as a list, or BatchOutputError saying what was wrong; ``what``
    names the batched function, ``verbs`` how it gave them (a generator: yield)."""
    verb, past = verbs
    if isinstance(output, (list, tuple)) or type(output).__name__ == "ndarray":
        results = list(output)
    else:
        raise BatchOutputError(
            f"{what} must {verb} an ordered sequence (list, tuple or numpy array) with one "
            f"result per request; it {past} a {type(output).__name__}.")
    if len(results) != size:
        raise BatchOutputError(
            f"{what} must {verb} one result per request: it got {size} requests but "
            f"{past} {len(results)} results.")
    return results


class _Waiting:
    """A request in the queue: when it came, its item, the future of its result, the
    model it names ("" for none)."""

    __slots__ = ("arrived", "item", "future", "model_id")

    def __init__(self, arrived: float, item: Any, future: asyncio.Future,
                 model_id: str) -> None:
        self.arrived = arrived
        self.item = item
        self.future = future
        self.model_id = model_id


class BatchQueue:
    """Requests for one batched function, run ``max_batch_size`` at a time.

    With ``batch_wait_timeout`` 0 a batch is whatever is queued when the function is free;
    with a timeout, a batch starts when it is full or its oldest request has waited that
    long. A batch takes the oldest request and the ones after it that name the same
    multiplexed model; the others wait for a batch of their own model. ``limits()`` gives
    both, read as each batch is formed (so a change applies from the next batch). The
    queue wakes on arrivals and on the deadline, never on a timer of its own. A batch runs
    in a context of its own, not in any one caller's (it serves them all), with its model
    id current. ``what`` names the function in errors.
    """

    def __init__(self, run_batch: RunBatch, limits: Callable[[], Tuple[int, float]],
                 concurrent: bool, on_batch: Callable[[int], None] = lambda size: None,
                 what: str = "An @accept_batch callable") -> None:
        """``on_batch(size)`` is told the size of each batch as it starts."""
        self._run_batch = run_batch
        self._on_batch = on_batch
        self._limits = limits
        self._concurrent = concurrent
        self._what = what
        self._queue: Deque[_Waiting] = collections.deque()
        self._per_model: Dict[str, int] = {}  # the queued requests of each model
        self._arrived = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self._task = self.loop.create_task(self._loop(), context=contextvars.Context())
        self._running: set = set()
        # The result future of each request in a running batch -> the end of that batch.
        self._batch_of: Dict[asyncio.Future, asyncio.Future] = {}

    def submit(self, item: Any) -> asyncio.Future:
        """Queue one request; the future of its result. Cancelling the future while the
        request waits takes it out of the queue; once its batch runs, the batch runs on."""
        future = self.loop.create_future()
        model_id = current_model_id.get()
        waiting = _Waiting(self.loop.time(), item, future, model_id)
        self._queue.append(waiting)
        self._per_model[model_id] = self._per_model.get(model_id, 0) + 1
        future.add_done_callback(lambda _: self._withdraw(waiting))
        self._arrived.set()
        return future

    def _withdraw(self, waiting: _Waiting) -> None:
        """A request whose caller left before its batch started leaves the queue (so it
        neither runs nor counts toward a full batch)."""
        if waiting.future.cancelled():
            try:
                self._queue.remove(waiting)
            except ValueError:
                return  # its batch had taken it
            self._left_queue(waiting.model_id, 1)

    def _left_queue(self, model_id: str, count: int) -> None:
        left = self._per_model[model_id] - count
        if left:
            self._per_model[model_id] = left
        else:
            del self._per_model[model_id]

    async def call(self, item: Any) -> Any:
        """Submit ``item`` and return its result. A caller that leaves while the item
        waits takes it out of the queue; one that leaves once its batch runs keeps its
        request's place on the replica until the batch ends, however often it is
        cancelled meanwhile (its connection lost after it left), then stops."""
        result = self.submit(item)
        try:
            return await result
        except asyncio.CancelledError:
            await self.left(result, cancelled=True)
            raise

    async def left(self, result: asyncio.Future, cancelled: bool) -> None:
        """The caller of the request with the result ``result`` left (``cancelled``: its
        task is being cancelled): a request still queued is taken out; one whose batch
        runs keeps its place on the replica until the batch ends (marked cancelled if its
        caller was), however often it is cancelled meanwhile."""
        batch = self._batch_of.get(result)
        if batch is None:
            result.cancel()
            return
        admission = current_admission.get()
        if cancelled and admission is not None:
            admission.cancel()
        await outlast(batch)

    def running_batch(self, future: asyncio.Future) -> Optional[asyncio.Future]:
        """The end of the running batch whose request has the result ``future``; None if
        that request is not in a running batch (it still waited, or its batch ended)."""
        return self._batch_of.get(future)

    def close(self) -> None:
        self._task.cancel()

    async def _loop(self) -> None:
        loop = self.loop
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            max_size, timeout = self._limits()
            if timeout > 0:
                deadline = self._queue[0].arrived + timeout
                while self._per_model[self._queue[0].model_id] < max_size and \
                        loop.time() < deadline:
                    self._arrived.clear()
                    try:
                        # (3.11's wait_for can drop a cancel that lands as one arrives)
                        async with asyncio.timeout_at(deadline):
                            await self._arrived.wait()
                    except TimeoutError:
                        break
                    if not self._queue:  # all its callers left
                        break
                if not self._queue:
                    continue
            model_id = self._queue[0].model_id
            batch = self._take(model_id, max_size)
            batch = [entry for entry in batch if not entry.future.done()]  # callers gone
            if not batch:
                continue
            self._on_batch(len(batch))
            current_model_id.set(model_id)  # (this task's own context; a task copies it)
            ended = loop.create_future()
            for entry in batch:
                self._batch_of[entry.future] = ended
            if self._concurrent:
                task = asyncio.ensure_future(self._execute(batch, ended))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            else:
                await self._execute(batch, ended)

    def _take(self, model_id: str, max_size: int) -> List[_Waiting]:
        """Take the oldest ``max_size`` queued requests of ``model_id`` off the queue."""
        queue = self._queue
        count = min(max_size, self._per_model[model_id])
        self._left_queue(model_id, count)
        if len(queue) == count or all(entry.model_id == model_id
                                      for entry in itertools.islice(queue, count)):
            return [queue.popleft() for _ in range(count)]
        batch: List[_Waiting] = []
        rest: Deque[_Waiting] = collections.deque()
        for entry in queue:
            if len(batch) < count and entry.model_id == model_id:
                batch.append(entry)
            else:
                rest.append(entry)
        self._queue = rest
        return batch

    async def _execute(self, batch: List[_Waiting], ended: asyncio.Future) -> None:
        futures = [entry.future for entry in batch]
        try:
            output = await self._run_batch([entry.item for entry in batch])
            results = check_batch_output(output, len(batch), self._what)
        except BaseException as exc:
            if _closing(exc):  # the queue itself is cancelled (``close``)
                for future in futures:
                    future.cancel()
                raise
            error = exc if isinstance(exc, Exception) else self._contained(exc)
            for future in futures:
                if not future.done():
                    future.set_exception(error)
            return
        finally:
            for future in futures:
                del self._batch_of[future]
            ended.set_result(None)
        for future, result in zip(futures, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _contained(self, exc: BaseException) -> ServeError:
        """What the batch's requests fail with for ``exc``, raised beyond ``Exception``
        (``SystemExit``, the function's own ``CancelledError``): a ``ServeError`` naming
        it, so batching goes on."""
        error = ServeError(f"{self._what} raised {type(exc).__name__}({exc}); servekit "
                           "failed the requests of its batch and goes on batching. Raise an "
                           "Exception subclass instead.")
        error.__cause__ = exc
        return error


def _closing(exc: BaseException) -> bool:
    """Whether ``exc`` is the running task's own cancellation (not user code's)."""
    task = asyncio.current_task()
    return isinstance(exc, asyncio.CancelledError) and task is not None and \
        task.cancelling() > 0
