"""Steady HTTP load for integration tests: threads that send requests to one URL until
stopped, recording each request's outcome so a test can assert that none failed."""

from __future__ import annotations

import collections
import threading
import time
from typing import List, Optional, Tuple

import httpx

from conftest import wait_for

TIMEOUT = 10.0


class RequestStream:
    """Threads sending GET requests to one URL at a steady pace until stopped.

    Every request is recorded as (start, end, status or None, body or exception repr).
    """

    def __init__(self, url: str, threads: int = 8, pause: float = 0.005) -> None:
        self.url = url
        self.pause = pause
        self.records: List[Tuple[float, float, Optional[int], str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(threads)]

    def __enter__(self) -> "RequestStream":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT + 5)
        assert not any(t.is_alive() for t in self._threads), "a stream thread is stuck"

    def _run(self) -> None:
        with httpx.Client(timeout=TIMEOUT) as http:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    response = http.get(self.url)
                    record = (start, time.monotonic(), response.status_code, response.text)
                except Exception as exc:  # recorded and asserted on by the test
                    record = (start, time.monotonic(), None, repr(exc))
                with self._lock:
                    self.records.append(record)
                self._stop.wait(self.pause)  # pacing of the load, not synchronisation

    def snapshot(self) -> list:
        with self._lock:
            return list(self.records)

    def completed_since(self, since: float) -> int:
        return sum(1 for start, *_ in self.snapshot() if start >= since)

    def wait_for_requests_since(self, since: float, count: int) -> None:
        wait_for(lambda: self.completed_since(since) >= count, timeout=TIMEOUT,
                 message=f"{count} requests to {self.url} started after the change")


def answers_between(records: list, start: float, end: float) -> collections.Counter:
    """Bodies of requests that started at or after ``start`` and finished before ``end``."""
    return collections.Counter(body for s, e, status, body in records
                               if s >= start and e <= end)


def bad_records(records: list) -> list:
    return [r for r in records if r[2] != 200]
