"""The replica context: which backend and replica this process runs, set before user code."""

from __future__ import annotations

import dataclasses
from typing import Optional


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
