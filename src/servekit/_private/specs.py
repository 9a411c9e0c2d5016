"""What the control plane tells the data plane: endpoint records and process specs.

The router, replica and proxy read these; the controller writes them. They live apart from
the controller package so that the data plane never imports the control plane.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from servekit.config import BackendConfig, BackendMetadata, HTTPOptions, ReplicaConfig


@dataclasses.dataclass
class EndpointInfo:
    """An endpoint: its route (None when headless), methods, traffic split and shadows."""

    name: str
    route: Optional[str]
    methods: List[str]
    traffic: Dict[str, float]
    shadows: Dict[str, float] = dataclasses.field(default_factory=dict)
    managed: bool = False  # made from a deploy file (``servekit deploy --prune`` may delete it)
    asgi: bool = False  # its backends are ASGI apps: its route is a prefix

    def uses(self, backend: str) -> bool:
        return backend in self.traffic or backend in self.shadows

    def describe(self) -> dict:
        return {"route": self.route, "methods": list(self.methods),
                "traffic": dict(self.traffic), "shadows": dict(self.shadows)}


@dataclasses.dataclass(frozen=True)
class BackendLimits:
    """What routers enforce for a backend: requests in flight per replica, requests held
    while every replica is full (-1: no bound), and seconds to a reply (None: no bound);
    for an autoscaled backend, how often routers report its load to the controller."""

    cap: int
    max_queued: int
    request_timeout_s: Optional[float] = None
    load_report_interval_s: Optional[float] = None


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
    """What the HTTP proxy process is told when it starts: the instance's HTTP options."""

    http_options: HTTPOptions


@dataclasses.dataclass
class ControllerSpec:
    """What the controller process is told when it starts."""

    http_options: HTTPOptions
    detached: bool
    custom_resources: Dict[str, float]
