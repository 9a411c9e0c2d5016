"""What the controller knows: backends, their replicas, and endpoints."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Dict, List, Optional

from servekit._private.runtime.base import Connection
from servekit.config import BackendConfig, BackendMetadata, HTTPOptions, ReplicaConfig

STARTING, RUNNING, STOPPING = "STARTING", "RUNNING", "STOPPING"


@dataclasses.dataclass
class ReplicaRecord:
    """One replica process as the controller tracks it."""

    tag: str
    backend: str
    state: str = STARTING
    address: Optional[str] = None
    connection: Optional[Connection] = None
    task: Optional[asyncio.Task] = None


@dataclasses.dataclass
class BackendState:
    """A backend: its definition, config and replicas; ``goal`` is what a client waits on."""

    tag: str
    replica_config: ReplicaConfig
    config: BackendConfig
    metadata: Optional[BackendMetadata]
    replicas: Dict[str, ReplicaRecord] = dataclasses.field(default_factory=dict)
    goal: Optional[str] = None
    created: bool = False  # all replicas once ran; failures no longer undo the backend
    deleting: bool = False
    force_delete: bool = False
    config_before_update: Optional[BackendConfig] = None
    start_failures: int = 0  # consecutive replica starts that failed
    retry_at: float = 0.0  # monotonic time before which failed replacements are not retried

    @property
    def target_replicas(self) -> int:
        return 0 if self.deleting else self.config.num_replicas

    def in_state(self, *states: str) -> List[ReplicaRecord]:
        return [r for r in self.replicas.values() if r.state in states]


@dataclasses.dataclass
class EndpointInfo:
    """An endpoint: its route (None when headless), methods, traffic split and shadows."""

    name: str
    route: Optional[str]
    methods: List[str]
    traffic: Dict[str, float]
    shadows: Dict[str, float] = dataclasses.field(default_factory=dict)

    def uses(self, backend: str) -> bool:
        return backend in self.traffic or backend in self.shadows

    def describe(self) -> dict:
        return {"route": self.route, "methods": list(self.methods),
                "traffic": dict(self.traffic), "shadows": dict(self.shadows)}


@dataclasses.dataclass
class ReplicaSpec:
    """What a replica process is told when it starts."""

    backend_tag: str
    replica_tag: str
    replica_config: ReplicaConfig
    config: BackendConfig
    metadata: Optional[BackendMetadata]


@dataclasses.dataclass
class ProxySpec:
    """What the HTTP proxy process is told when it starts."""

    middlewares: list


@dataclasses.dataclass
class ControllerSpec:
    """What the controller process is told when it starts."""

    http_options: HTTPOptions
    detached: bool
    custom_resources: Dict[str, float]
