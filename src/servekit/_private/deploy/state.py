"""The running instance as a plan and an export see it: backends (source and config),
endpoints (route, methods, traffic, shadows, mark) and the HTTP address its proxies serve."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from servekit.config import BackendConfig

if TYPE_CHECKING:
    from servekit.api import Client


@dataclasses.dataclass(frozen=True)
class RunningBackend:
    name: str
    source: Optional[Dict[str, Any]]  # None: made through the Python API
    config: BackendConfig


@dataclasses.dataclass(frozen=True)
class RunningEndpoint:
    name: str
    route: Optional[str]
    methods: List[str]
    traffic: Dict[str, float]
    shadows: Dict[str, float]
    managed: bool  # made (or last changed) by a deploy file


@dataclasses.dataclass(frozen=True)
class RunningState:
    """What runs. ``http`` holds the HTTP options the instance started with, ``host`` and
    ``port`` as its proxies serve them (``{}`` for an empty instance)."""

    backends: Dict[str, RunningBackend]
    endpoints: Dict[str, RunningEndpoint]
    http: Dict[str, Any]

    @classmethod
    def empty(cls) -> RunningState:
        return cls({}, {}, {})


def read_state(client: Client) -> RunningState:
    """Read the running state of ``client``'s instance."""
    status = client._call("status")
    configs = client.list_backends()
    backends = {tag: RunningBackend(tag, status["backends"].get(tag, {}).get("source"), config)
                for tag, config in configs.items()}
    endpoints = {name: RunningEndpoint(name, info["route"], list(info["methods"]),
                                       dict(info["traffic"]), dict(info["shadows"]),
                                       bool(info.get("managed", False)))
                 for name, info in status["endpoints"].items()}
    return RunningState(backends, endpoints, _http_of(status))


def _http_of(status: dict) -> Dict[str, Any]:
    http = dict(status.get("http_options") or {})
    addresses = [p["http"] for p in status["processes"]
                 if p.get("role") == "proxy" and p.get("http")]
    if addresses:  # the port actually served (the options may say 0: any free port)
        http["host"], http["port"] = addresses[0][0], addresses[0][1]
    return http
