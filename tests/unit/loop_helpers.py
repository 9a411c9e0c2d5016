"""Driving coroutines in unit tests: run a test's ``main`` and let ready work happen."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine

# Seconds ``until`` polls before the test fails.
UNTIL_TIMEOUT_S = 5.0


async def spin(times: int = 30) -> None:
    """Run every ready callback and task, a few rounds deep (no time passes)."""
    for _ in range(times):
        await asyncio.sleep(0)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``test()`` on a new event loop."""
    asyncio.run(test())


async def until(condition: Callable[[], object], what: str = "condition",
                timeout: float = UNTIL_TIMEOUT_S) -> None:
    """Poll ``condition`` on the running loop until it is truthy; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.002)
