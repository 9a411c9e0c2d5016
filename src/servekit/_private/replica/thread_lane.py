"""A thread lane: sync user code on a fixed number of threads, answered on the event loop.

The replica's hot path for sync backends. Compared with ``loop.run_in_executor`` it makes
one future per call instead of three (no ``concurrent.futures.Future``, no wrapping, no
shield), and threads that finish while the loop is already due to collect results do not
wake it again: under load, many calls come back to the loop in one wakeup.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import queue
import threading
from typing import Any, Callable, Deque, List, Optional, Tuple


class Job:
    """One call on a lane: ``result`` is its outcome, on the loop.

    ``withdraw()`` takes a job that no thread has started off the lane (True; it never
    runs); a started job runs to its end, and ``finished()`` waits for that end whether or
    not anybody still wants the result.
    """

    __slots__ = ("_call", "_ticket", "result", "_settled", "_finished")

    def __init__(self, call: Optional[Callable[[], Any]], result: asyncio.Future) -> None:
        self._call = call
        self._ticket = [None]  # popped once: by the thread that runs it, or by withdraw()
        self.result = result
        self._settled = False  # withdrawn, or its outcome reached the loop
        self._finished: Optional[asyncio.Future] = None

    def withdraw(self) -> bool:
        try:
            self._ticket.pop()
        except IndexError:
            return False
        self._settled = True  # nothing will run
        return True

    async def finished(self) -> None:
        """Return once the job's thread has returned (through any cancellation)."""
        if self._finished is None:
            self._finished = self.result.get_loop().create_future()
            if self._settled:  # withdrawn, or already back
                self._finished.set_result(None)
        while not self._finished.done():
            try:
                await asyncio.shield(self._finished)
            except asyncio.CancelledError:
                continue

    def _run(self) -> Optional[Tuple[bool, Any]]:
        """On a thread: the call's outcome, or None if the job was withdrawn. The call is
        dropped once run, so its arguments are not kept alive by the job."""
        try:
            self._ticket.pop()
        except IndexError:
            return None
        call, self._call = self._call, None
        assert call is not None  # the ticket lets one thread here, once
        try:
            return True, call()
        except BaseException as exc:  # handed to the awaiting task, which decides
            return False, exc

    def _settle(self, outcome: Tuple[bool, Any]) -> None:
        """On the loop: hand the outcome to whoever still waits."""
        ok, value = outcome
        self._settled = True
        if isinstance(value, StopIteration):  # a future cannot carry one (PEP 479)
            ok, value = False, RuntimeError(f"user code raised StopIteration: {value!r}")
        if not self.result.done():
            if ok:
                self.result.set_result(value)
            else:
                self.result.set_exception(value)
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)


class ThreadLane:
    """Runs ``submit``-ted calls on ``threads`` threads, started by the first call (so a
    backend that never makes a sync call starts none)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int, name: str) -> None:
        self._loop = loop
        self.threads = threads
        self._name = name
        self._jobs: "queue.SimpleQueue[Optional[Job]]" = queue.SimpleQueue()
        self._workers: List[threading.Thread] = []
        self._done: Deque[Tuple[Job, Tuple[bool, Any]]] = collections.deque()
        self._collect_due = False
        self._closed = False

    def submit(self, function: Callable, *args: Any) -> Job:
        """Run ``function(*args)`` on a thread, in a copy of the caller's context."""
        if self._closed:
            raise RuntimeError(f"thread lane {self._name} is shut down")
        context = contextvars.copy_context()
        job = Job(lambda: context.run(function, *args), self._loop.create_future())
        self._jobs.put(job)
        if not self._workers:
            for index in range(self.threads):
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"{self._name}_{index}")
                self._workers.append(thread)
                thread.start()
        return job

    def shutdown(self) -> None:
        """Let each thread end once the jobs already submitted have run."""
        self._closed = True
        for _ in self._workers:
            self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            outcome = job._run()
            if outcome is None:
                continue
            self._done.append((job, outcome))
            del job, outcome
            if not self._collect_due:
                self._collect_due = True
                try:
                    self._loop.call_soon_threadsafe(self._collect)
                except RuntimeError:  # the loop is closed: nobody is left to answer
                    return

    def _collect(self) -> None:
        # Cleared before draining: a result appended after this line either is drained
        # below or finds the flag cleared and schedules another collection.
        self._collect_due = False
        done = self._done
        while done:
            job, outcome = done.popleft()
            job._settle(outcome)
