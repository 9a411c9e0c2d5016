"""The replica context: which backend and replica this process runs, set before user code,
and the id and multiplexed model id of the request being served (per task)."""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
import os
from typing import Optional

# The id of the request the current task (or the thread running its sync call) serves.
current_request_id: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "servekit_request_id", default=None)

# The multiplexed model id of the request the current task serves ("" when it names none):
# the HTTP header ``serve_multiplexed_model_id`` or ``handle.options(multiplexed_model_id=)``.
current_model_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "servekit_multiplexed_model_id", default="")

# The header that carries a request's multiplexed model id (Ray Serve 2.x's name).
MODEL_ID_HEADER = "serve_multiplexed_model_id"


# Request ids made here: unique to this process, then counted (cheaper than a uuid each).
_id_prefix = os.urandom(8).hex()
_ids = itertools.count(1)


def new_request_id() -> str:
    """A request id no other request of this process, or of another, has: 32 hex digits,
    as long as a uuid's."""
    return f"{_id_prefix}{next(_ids):016x}"


def _new_id_prefix() -> None:
    global _id_prefix, _ids
    _id_prefix, _ids = os.urandom(8).hex(), itertools.count(1)


os.register_at_fork(after_in_child=_new_id_prefix)  # a forked child counts on its own


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
