"""A seeded event loop with a virtual clock, for running servekit's real asyncio code.

``SimLoop`` is an asyncio event loop in which nothing depends on the machine:

- **Order.** The callbacks ready in one turn run in an order drawn from the seed. Callbacks of
  one source keep their order (the done callbacks of one future, the calls of one object's
  methods, the deliveries of one connection), as any asyncio program may assume; callbacks
  of different sources interleave in every way the seeds reach.
- **Time.** ``time()`` is virtual. When nothing is ready, the clock jumps to the next timer,
  so timeouts, health checks, backoffs and delays of minutes take no real time.
- **Threads.** ``run_in_executor`` runs the function on the loop itself (in its own callback),
  and a ``ThreadLane``'s threads are tasks of the loop (``sim_threads``): a job starts after a
  seeded delay, runs, and is "on its thread" for as long as the simulated work says, so a
  cancellation can land while it runs, as on a real thread.
- **Network.** ``create_unix_connection`` and ``create_unix_server`` go through ``loop.net``
  (``simnet.SimNet``), a seeded network with delays, failed connects, resets and stalls.

A run that can make no progress while its main coroutine waits raises ``Stalled``; one that
runs too many callbacks without the clock moving raises ``Livelock``; one in which a task or
future ends in an error that nobody reads (asyncio's "exception was never retrieved": a
failure lost, only logged) raises ``Unretrieved``. All three are findings.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import random
from typing import (
    Any,
    Awaitable,
    Callable,
    Deque,
    Dict,
    Iterator,
    List,
    Optional,
    Tuple,
    TypeVar,
)

from servekit._private.replica import thread_lane

T = TypeVar("T")

# Callbacks one turn of the clock may run before the run is taken for a livelock.
LIVELOCK_CALLBACKS = 200_000
# The grain of simulated durations: a binary fraction of a second, so that sums of them are
# exact and events drawn apart land in the same loop turn as often as they can.
TICK = 1 / 1024


class Stalled(AssertionError):
    """Nothing is ready and no timer is set, but the main coroutine still waits: something
    waits for an event that can never come."""


class Livelock(AssertionError):
    """The loop keeps running callbacks without the clock moving."""


class Unretrieved(AssertionError):
    """A task or future ended in an error that nothing read: a failure lost (asyncio only
    logs it, when the object is collected)."""


def _source(handle: asyncio.Handle) -> int:
    """What a ready callback's order is tied to: the future whose done callback it is, else
    the object whose method it is, else the callback itself."""
    args = handle._args  # type: ignore[attr-defined]
    if args:
        return id(args[0])
    callback = handle._callback  # type: ignore[attr-defined]
    owner = getattr(callback, "__self__", None)
    return id(owner if owner is not None else callback)


class SimLoop(asyncio.BaseEventLoop):
    """An event loop whose order of ready callbacks and whose clock come from ``seed``."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self._now = 0.0
        self._same_time_callbacks = 0
        self.callbacks = 0  # run so far, for the runner's statistics
        self.net: Any = None  # a simnet.SimNet, set by whoever builds the world

    # ------------------------------------------------------------- clock and order

    def time(self) -> float:
        return self._now

    def ticks(self, low_s: float, high_s: float) -> float:
        """A duration from ``low_s`` to ``high_s`` drawn from the seed, on the ``TICK`` grid."""
        return self.rng.randint(round(low_s / TICK), round(high_s / TICK)) * TICK

    def _process_events(self, event_list: Any) -> None:
        pass

    def _write_to_self(self) -> None:
        pass

    def _run_once(self) -> None:
        scheduled = self._scheduled  # type: ignore[attr-defined]
        ready: Deque[asyncio.Handle] = self._ready  # type: ignore[attr-defined]
        while scheduled and scheduled[0]._cancelled:
            self._timer_cancelled_count -= 1  # type: ignore[attr-defined]
            heapq.heappop(scheduled)._scheduled = False
        if not ready and not self._stopping:  # type: ignore[attr-defined]
            if not scheduled:
                raise Stalled("nothing is ready and no timer is set, but the run still "
                              "waits: some wait can never end")
            if scheduled[0]._when > self._now:
                self._now = scheduled[0]._when
                self._same_time_callbacks = 0
        while scheduled and scheduled[0]._when <= self._now:
            handle = heapq.heappop(scheduled)
            handle._scheduled = False
            ready.append(handle)
        batch = list(ready)
        ready.clear()
        if len(batch) > 1:
            batch = self._interleave(batch)
        self._same_time_callbacks += len(batch)
        self.callbacks += len(batch)
        if self._same_time_callbacks > LIVELOCK_CALLBACKS:
            raise Livelock(f"{self._same_time_callbacks} callbacks ran at virtual time "
                           f"{self._now:.6f} s without the clock moving")
        for handle in batch:
            if not handle._cancelled:
                handle._run()

    def _interleave(self, batch: List[asyncio.Handle]) -> List[asyncio.Handle]:
        """A seeded interleaving of ``batch`` that keeps each source's callbacks in order."""
        rng = self.rng
        keys = [rng.random() for _ in batch]
        by_source: Dict[int, List[int]] = collections.defaultdict(list)
        for index, handle in enumerate(batch):
            by_source[_source(handle)].append(index)
        for indexes in by_source.values():
            if len(indexes) > 1:
                for index, key in zip(indexes, sorted(keys[i] for i in indexes), strict=True):
                    keys[index] = key
        return [batch[i] for i in sorted(range(len(batch)), key=keys.__getitem__)]

    # ------------------------------------------------------------- executors

    def run_in_executor(self, executor: Any, func: Callable[..., T],
                        *args: Any) -> asyncio.Future:
        future = self.create_future()

        def run() -> None:
            if future.cancelled():
                return
            try:
                result = func(*args)
            except BaseException as exc:  # handed to the awaiting task, as a thread would
                future.set_exception(exc)
            else:
                future.set_result(result)

        self.call_soon(run)
        return future

    # ------------------------------------------------------------- network

    async def create_unix_connection(self, protocol_factory: Callable[[], asyncio.Protocol],
                                     path: Optional[str] = None, **kwargs: Any) -> Any:
        assert self.net is not None and path is not None, "this world has no network"
        return await self.net.connect(protocol_factory, path)

    async def create_unix_server(self, protocol_factory: Callable[[], asyncio.Protocol],
                                 path: Optional[str] = None, *, sock: Any = None,
                                 **kwargs: Any) -> Any:
        assert self.net is not None, "this world has no network"
        return self.net.listen(protocol_factory, path if sock is None else sock.getsockname())


# ----------------------------------------------------------------- the thread lane's threads

class _SimJobs:
    """Stands in for a lane's queue of jobs: its threads are tasks that wait on it."""

    def __init__(self, items: List[Any]) -> None:
        self.items: Deque[Any] = collections.deque(items)
        self.changed = asyncio.Event()
        if items:
            self.changed.set()

    def put(self, job: Any) -> None:
        self.items.append(job)
        self.changed.set()

    async def get(self) -> Any:
        while not self.items:
            self.changed.clear()
            await self.changed.wait()
        return self.items.popleft()


class SimThreads:
    """Runs every ``ThreadLane``'s threads as tasks of the ``SimLoop``.

    A job starts after a seeded delay (a thread's wake-up). The function it runs may say how
    long it keeps its thread busy by calling ``busy(seconds)``; its outcome reaches the loop
    that much later, through the lane's own ``_collect``. ``on_return`` is called when a job's
    thread returns (the simulated work really ended).
    """

    def __init__(self, loop: "SimLoop", max_start_delay_s: float = 0.002) -> None:
        self._loop = loop
        self._max_start_delay_s = max_start_delay_s
        self._busy_s = 0.0
        self._then: Optional[Callable[[], None]] = None
        self.on_thread = False  # a job's function is running now (as on a lane's thread)
        self.tasks: List[asyncio.Task] = []

    def busy(self, seconds: float, then: Optional[Callable[[], None]] = None) -> None:
        """Called by simulated sync code: it keeps its thread for ``seconds``, and ``then``
        is called when the thread returns."""
        self._busy_s = seconds
        self._then = then

    def thread(self, target: Callable[[], None], daemon: bool = True,
               name: str = "") -> "SimThreads._Thread":
        return SimThreads._Thread(self, target.__self__)  # type: ignore[attr-defined]

    class _Thread:
        def __init__(self, threads: "SimThreads", lane: Any) -> None:
            self._threads = threads
            self._lane = lane

        def start(self) -> None:
            lane = self._lane
            if not isinstance(lane._jobs, _SimJobs):
                items = []
                while not lane._jobs.empty():
                    items.append(lane._jobs.get_nowait())
                lane._jobs = _SimJobs(items)
            self._threads.tasks.append(asyncio.ensure_future(self._threads._work(lane)))

    async def _work(self, lane: Any) -> None:
        while True:
            job = await lane._jobs.get()
            if job is None:
                return
            await asyncio.sleep(self._loop.ticks(0, self._max_start_delay_s))
            self._busy_s, self._then = 0.0, None
            self.on_thread = True
            try:
                outcome = job._run()
            finally:
                self.on_thread = False
            if outcome is None:
                continue  # withdrawn before this thread took it
            busy_s, then = self._busy_s, self._then
            if busy_s:
                await asyncio.sleep(busy_s)
            if then is not None:
                then()
            lane._done.append((job, outcome))
            if not lane._collect_due:
                lane._collect_due = True
                self._loop.call_soon(lane._collect)


class _Threading:
    """What ``thread_lane`` sees as the ``threading`` module while a simulation runs."""

    def __init__(self, threads: SimThreads) -> None:
        self.Thread = threads.thread


@contextlib.contextmanager
def sim_threads(loop: SimLoop) -> Iterator[SimThreads]:
    """Make every ``ThreadLane`` created meanwhile run its threads as tasks of ``loop``."""
    threads = SimThreads(loop)
    real = thread_lane.threading
    thread_lane.threading = _Threading(threads)  # type: ignore[assignment]
    try:
        yield threads
    finally:
        thread_lane.threading = real


# (callbacks run, virtual seconds) of the last run: its history's fingerprint.
last_run: Tuple[int, float] = (0, 0.0)


def run(main: Callable[[SimLoop], Awaitable[T]], seed: int,
        loop: Optional[SimLoop] = None) -> T:
    """Run ``main(loop)`` on ``loop`` (default: a new ``SimLoop`` seeded with ``seed``); its
    result.

    Whatever ``main`` leaves running is cancelled and run to its end before the loop closes.
    """
    global last_run
    loop = SimLoop(seed) if loop is None else loop

    def on_exception(loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
        message = context.get("message", "")
        if "never retrieved" in message:
            unretrieved.setdefault(seed, []).append(
                f"{message}: {context.get('exception')!r} "
                f"({context.get('future') or context.get('task')!r})")
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(on_exception)
    asyncio.set_event_loop(loop)
    try:
        result = loop.run_until_complete(main(loop))
    finally:
        last_run = (loop.callbacks, loop.time())
        try:
            _cancel_all(loop)
        finally:
            asyncio.set_event_loop(None)
            loop.close()
    check_unretrieved(seed)
    return result


# Errors that nothing read, by the seed of the run they belong to: asyncio reports one when
# its task or future is collected, which may be after that run ended (in a reference cycle,
# at the next collection).
unretrieved: Dict[int, List[str]] = {}


def check_unretrieved(seed: int) -> None:
    """Raise ``Unretrieved`` if the run of ``seed`` left an error nobody read."""
    errors = unretrieved.pop(seed, None)
    if errors:
        raise Unretrieved("; ".join(errors))


def _cancel_all(loop: SimLoop) -> None:
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        with contextlib.suppress(Stalled, Livelock):
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
