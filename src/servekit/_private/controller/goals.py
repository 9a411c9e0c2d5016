"""Goals: what a client waits on after a call that starts or stops replicas."""

from __future__ import annotations

import asyncio
import uuid
from typing import Dict, Optional

from servekit._private import constants


class GoalManager:
    """Goal id -> future; a goal ends done or failed with the error the caller should see.

    A finished goal is kept ``GOAL_RETENTION_S`` for its client to wait on, then forgotten,
    so goals whose client never came (it died, or did not wait) do not pile up.
    """

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
            self._expire_later(goal_id, future)

    def discard(self, goal_id: Optional[str]) -> None:
        """Forget a goal nobody was told of (the call that made it failed)."""
        future = self._goals.pop(goal_id, None) if goal_id else None
        if future is not None:
            future.cancel()

    def fail(self, goal_id: Optional[str], error: BaseException) -> None:
        future = self._goals.get(goal_id) if goal_id else None
        if future is not None and not future.done():
            future.set_exception(error)
            self._expire_later(goal_id, future)

    def _expire_later(self, goal_id: Optional[str], future: asyncio.Future) -> None:
        if goal_id is not None:
            asyncio.get_running_loop().call_later(constants.GOAL_RETENTION_S, self._expire,
                                                  goal_id, future)

    def _expire(self, goal_id: str, future: asyncio.Future) -> None:
        if self._goals.get(goal_id) is future:
            del self._goals[goal_id]
            if not future.cancelled():
                future.exception()  # retrieved: nobody waited, and nobody will

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
