"""Goals: what a client waits on after a call that starts or stops replicas."""

from __future__ import annotations

import asyncio
import uuid
from typing import Dict, Optional

from servekit._private import constants


class GoalManager:
    """Goal id -> future; a goal ends done or failed with the error the caller should see.

    A finished goal is kept ``GOAL_RETENTION_S`` for its client to wait on, then forgotten,
    so goals whose client never came (it died, or did not wait) do not pile up. A goal
    nobody knows is done, so the failures are kept in ``failures`` too, which the
    controller saves with its state: a client that waits again on a restarted controller
    (or whose answer was lost) is told its call failed.
    """

    def __init__(self) -> None:
        self._goals: Dict[str, asyncio.Future] = {}
        self.failures: Dict[str, BaseException] = {}  # goal id -> its error, until expiry

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

    def will_fail(self, goal_id: Optional[str], error: BaseException) -> None:
        """Note that ``goal_id`` fails with ``error`` (in ``failures``, to be saved) before
        ``fail`` tells its client."""
        if goal_id and goal_id in self._goals and not self._goals[goal_id].done():
            self.failures[goal_id] = error

    def fail(self, goal_id: Optional[str], error: BaseException) -> None:
        future = self._goals.get(goal_id) if goal_id else None
        if future is not None and not future.done():
            future.set_exception(error)
            future.exception()  # (kept for whoever waits; not an error nobody saw)
            self.failures[goal_id] = error  # type: ignore[index]
            self._expire_later(goal_id, future)

    def restore_failed(self, goal_id: str, error: BaseException) -> None:
        """A goal a previous controller failed (and saved as failed): its client may still
        come to wait on it."""
        future = asyncio.get_running_loop().create_future()
        future.set_exception(error)
        future.exception()  # (kept for whoever waits; not an error nobody saw)
        self._goals[goal_id] = future
        self.failures[goal_id] = error
        self._expire_later(goal_id, future)

    def _expire_later(self, goal_id: Optional[str], future: asyncio.Future) -> None:
        if goal_id is not None:
            asyncio.get_running_loop().call_later(constants.GOAL_RETENTION_S, self._expire,
                                                  goal_id, future)

    def _expire(self, goal_id: str, future: asyncio.Future) -> None:
        if self._goals.get(goal_id) is future:
            del self._goals[goal_id]
            self.failures.pop(goal_id, None)
            if not future.cancelled():
                future.exception()  # retrieved: nobody waited, and nobody will

    def pending(self) -> list:
        return [goal_id for goal_id, future in self._goals.items() if not future.done()]

    async def wait(self, goal_id: str) -> None:
        """Wait for the goal; raise its error if it failed (as often as it is asked, until
        the goal expires: the answer may not reach the client). Unknown goals are done."""
        future = self._goals.get(goal_id)
        if future is None:
            return
        try:
            await asyncio.shield(future)
        finally:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._goals.pop(goal_id, None)
