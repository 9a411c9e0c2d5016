"""The replica context: which backend and replica this process runs, set before user code,
and the id of the request being served (per task)."""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Optional

# The id of the request the current task (or the thread running its sync call) serves.
current_request_id: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "servekit_request_id", default=None)


@dataclasses.dataclass(frozen=True)
class ReplicaContext:
    backend_tag: str
    replica_tag: str
    controller_address: str


_current: Optional[ReplicaContext] = None


def set_replica_context(context: ReplicaContext) -> None:
    global _current
    _current = context


def current_replica_context() -> Optional[ReplicaContext]:
    return _current
