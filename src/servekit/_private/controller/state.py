"""What the controller knows about backends and their replicas."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Dict, List, Optional, Tuple

from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig
from servekit._private.backend_settings import BackendSettings
from servekit._private.runtime.base import Connection

STARTING, RUNNING, STOPPING = "STARTING", "RUNNING", "STOPPING"


@dataclasses.dataclass
class ReplicaRecord:
    """One replica process as the controller tracks it."""

    tag: str
    backend: str
    state: str = STARTING
    address: Optional[str] = None
    process: Optional[dict] = None  # the runtime's identity of its process, for adoption
    connection: Optional[Connection] = None
    config: Optional[BackendSettings] = None  # the config the replica process runs
    version: int = 0  # the backend definition it runs (``BackendState.version``)
    task: Optional[asyncio.Task] = None  # its start
    health_task: Optional[asyncio.Task] = None  # its health pings, while it runs
    unhealthy: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    models: Tuple[str, ...] = ()  # the multiplexed models it holds (its last health ping)
    created_at: float = dataclasses.field(default_factory=time.monotonic)  # by this controller

    @property
    def revision(self) -> int:
        """Its definition's number as users see it (from 1)."""
        return self.version + 1

    def cancel_tasks(self) -> None:
        """Cancel its start and health tasks, except the one calling this."""
        for task in (self.task, self.health_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()


@dataclasses.dataclass
class BackendState:
    """A backend: its definition, config and replicas; ``goal`` is what a client waits on."""

    tag: str
    replica_config: ReplicaConfig
    config: BackendSettings
    metadata: Optional[BackendMetadata]
    replicas: Dict[str, ReplicaRecord] = dataclasses.field(default_factory=dict)
    goal: Optional[str] = None
    created_by: Optional[str] = None  # the id of the create_backend call (retries repeat it)
    # The id of the last update or redeploy call and its goal: the same call made again
    # (after a controller crash) is answered with that goal, not made twice.
    changed_by: Optional[List[str]] = None
    created: bool = False  # all replicas once ran; failures no longer undo the backend
    deleting: bool = False
    force_delete: bool = False
    config_before_update: Optional[BackendSettings] = None
    # An earlier controller died while the replicas applied ``config``: until they are
    # known to run it, the goal does not complete (not saved).
    config_unconfirmed: bool = False
    # The definition replicas run: bumped by each redeploy; the one before a redeploy (and
    # its metadata) is kept until it completes, to go back to if a new replica fails.
    version: int = 0
    definition_before: Optional[ReplicaConfig] = None
    metadata_before: Optional[BackendMetadata] = None
    previous_version: int = 0

    def redefine(self, replica_config: ReplicaConfig,
                 metadata: Optional[BackendMetadata]) -> None:
        """Make ``replica_config`` the definition replicas run, under a version no replica
        has run yet; the one before stays at hand until the redeploy completes."""
        self.definition_before, self.metadata_before = self.replica_config, self.metadata
        self.previous_version = self.version
        self.replica_config = replica_config
        if metadata is not None:
            self.metadata = metadata
        self.version = max([self.version, *(r.version for r in self.replicas.values())]) + 1

    def undefine(self) -> None:
        """Go back to the definition before the redeploy under way."""
        assert self.definition_before is not None
        self.replica_config, self.metadata = self.definition_before, self.metadata_before
        self.version = self.previous_version
        self.definition_before = self.metadata_before = None

    # Replicas the autoscaler wants (None: the backend has a fixed num_replicas), and why.
    autoscaled_replicas: Optional[int] = None
    scaling_reason: str = ""
    start_failures: int = 0  # consecutive replica starts that failed
    retry_at: float = 0.0  # monotonic time before which failed replacements are not retried
    last_start_error: Optional[str] = None  # why the last replica start failed, until one starts
    replacing: Optional[str] = None  # why replicas were last replaced, until all run again
    # Held while config updates reach the replicas: one at a time per backend.
    updating: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    @property
    def target_replicas(self) -> int:
        if self.deleting:
            return 0
        if self.config.autoscaling_config is not None and self.autoscaled_replicas is not None:
            return self.autoscaled_replicas
        return self.config.num_replicas

    @property
    def revision(self) -> int:
        """The current definition's number as users see it: 1, then one more per
        redeploy."""
        return self.version + 1

    def in_state(self, *states: str) -> List[ReplicaRecord]:
        return [r for r in self.replicas.values() if r.state in states]

    def current(self, *states: str) -> List[ReplicaRecord]:
        """Its replicas in ``states`` that run the current definition."""
        return [r for r in self.in_state(*states) if r.version == self.version]
