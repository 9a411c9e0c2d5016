"""Long poll: the controller publishes versioned keys; subscribers wait for changes.

A subscriber calls ``listen(subscriber_id, role, {key: version})``; the call returns at once
with every key whose version differs, otherwise when the next change happens. Because a
subscriber applies an update before it listens again, its next ``listen`` doubles as an
acknowledgement: the host knows which version each subscriber has applied, so the
controller can wait until every proxy serves a new route before returning to the user.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, Dict, Optional, Tuple

Snapshot = Tuple[int, Any]


class LongPollHost:
    """The controller's side: holds the latest value and version of every key."""

    def __init__(self) -> None:
        # A random start makes subscribers of a restarted controller resynchronise at once.
        self._epoch = random.randrange(1 << 40)
        self._values: Dict[str, Snapshot] = {}
        self._changed = asyncio.Condition()
        self._seen: Dict[str, Tuple[str, Dict[str, int]]] = {}
        self._wakers: set = set()

    async def publish(self, key: str, value: Any) -> int:
        version = self._values.get(key, (self._epoch, None))[0] + 1
        self._values[key] = (version, value)
        await self._wake()
        return version

    def version(self, key: str) -> int:
        return self._values.get(key, (self._epoch, None))[0]

    async def listen(self, subscriber_id: str, role: str,
                     known: Dict[str, int]) -> Dict[str, Snapshot]:
        """Return the keys whose version differs from ``known``, waiting if none does."""
        self._seen[subscriber_id] = (role, dict(known))
        async with self._changed:
            self._changed.notify_all()  # wake acknowledgement waiters
            while True:
                updates = {key: self._values[key] for key in known
                           if key in self._values and self._values[key][0] != known[key]}
                if updates:
                    return updates
                await self._changed.wait()

    def forget(self, subscriber_id: str) -> None:
        """Stop counting a subscriber that went away; waits for its acknowledgement end."""
        if self._seen.pop(subscriber_id, None) is not None:
            task = asyncio.ensure_future(self._wake())
            self._wakers.add(task)
            task.add_done_callback(self._wakers.discard)

    async def _wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_until_applied(self, role: str, key: str, version: int,
                                 timeout: Optional[float]) -> bool:
        """Wait until every subscriber of ``role`` has applied ``version`` of ``key``."""

        def applied() -> bool:
            return all(seen.get(key, version) >= version
                       for r, seen in self._seen.values() if r == role)

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(applied), timeout)
            except asyncio.TimeoutError:
                return False
        return True
