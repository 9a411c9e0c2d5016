"""Driving coroutines in unit tests: run a test's ``main`` and let ready work happen."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine


async def spin(times: int = 30) -> None:
    """Run every ready callback and task, a few rounds deep (no time passes)."""
    for _ in range(times):
        await asyncio.sleep(0)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``test()`` on a new event loop."""
    asyncio.run(test())
