"""Backends of the fault-injection test (test_faults.py); replicas import them from here.

Both answer ``[pid, replica tag, x, running]`` after sleeping ``sleep`` seconds, so the test
learns which process served each request (to signal it) and can check the answer is its own;
``running`` is how many requests were inside the callable of this replica at once, this one
included (never more than the backend's max_concurrent_queries). A handle call passes
``{"x": ..., "sleep": ...}`` as its data; an HTTP call passes both as query parameters.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any, Tuple

import servekit as serve


def _arguments(request: Any) -> Tuple[str, float]:
    if isinstance(request, serve.ServeRequest):
        data = request.data
        return data["x"], float(data["sleep"])
    params = request.query_params
    return params["x"], float(params["sleep"])


_lock = threading.Lock()
_running = 0


def _enter() -> int:
    global _running
    with _lock:
        _running += 1
        return _running


def _leave() -> None:
    global _running
    with _lock:
        _running -= 1


def sync_echo(request: Any) -> list:
    x, sleep = _arguments(request)
    running = _enter()
    try:
        time.sleep(sleep)
    finally:
        _leave()
    return [os.getpid(), serve.get_current_replica_tag(), x, running]


async def async_echo(request: Any) -> list:
    x, sleep = _arguments(request)
    running = _enter()
    try:
        await asyncio.sleep(sleep)
    finally:
        _leave()
    return [os.getpid(), serve.get_current_replica_tag(), x, running]
