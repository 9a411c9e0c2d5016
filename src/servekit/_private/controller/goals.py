"""Goals: what a client waits on after a call that starts or stops replicas."""

from __future__ import annotations

import asyncio
import uuid
from typing import Dict, Optional


class GoalManager:
    """Goal id -> future; a goal ends done or failed with the error the caller should see."""

    def __init__(self) -> None:
        self._goals: Dict[str, asyncio.Future] = {}

    def create(self) -> str:
        goal_id = uuid.uuid4().hex
        self._goals[goal_id] = asyncio.get_running_loop().create_future()
        return goal_id

    def restore(self, goal_id: str) -> None:
        """Wait again on a goal a previous controller created (it is still under way)."""
        self._goals[goal_id] = asyncio.get_running_loop().create_future()

    def complete(self, goal_id: Optional[str]) -> None:
        future = self._goals.get(goal_id) if goal_id else None
        if future is not None and not future.done():
            future.set_result(None)

    def fail(self, goal_id: Optional[str], error: BaseException) -> None:
        future = self._goals.get(goal_id) if goal_id else None
        if future is not None and not future.done():
            future.set_exception(error)

    def pending(self) -> list:
        return [goal_id for goal_id, future in self._goals.items() if not future.done()]

    async def wait(self, goal_id: str) -> None:
        """Wait for the goal; raise its error if it failed. Unknown goals are done."""
        future = self._goals.get(goal_id)
        if future is None:
            return
        try:
            await asyncio.shield(future)
        finally:
            if future.done():
                self._goals.pop(goal_id, None)
