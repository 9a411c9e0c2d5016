"""The running instance as a plan and an export see it: backends (source and config),
endpoints (route, methods, traffic, shadows, mark) and the HTTP address its proxies serve."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Protocol, Union

from servekit.config import BackendConfig


class Client(Protocol):
    """What deploys ask of a ``servekit.Client`` (the public one conforms; so do fakes)."""

    def _call(self, name: str, *args: Any) -> Any: ...
    def _wait_for_goal(self, goal_id: Optional[str]) -> None: ...
    def list_backends(self) -> Dict[str, BackendConfig]: ...
    def update_backend_config(self, backend_tag: str,
                              config_options: Union[BackendConfig, Dict[str, Any]]) -> None: ...
    def delete_backend(self, backend_tag: str, force: bool = False) -> None: ...
    def delete_endpoint(self, endpoint: str) -> None: ...
    def set_traffic(self, endpoint_name: str,
                    traffic_policy_dictionary: Dict[str, float]) -> None: ...
    def shadow_traffic(self, endpoint_name: str, backend_tag: str,
                       proportion: float) -> None: ...


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
    managed: Optional[str]  # the name of the deploy file that made it; None: the Python API


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
                                       info.get("managed"))
                 for name, info in status["endpoints"].items()}
    return RunningState(backends, endpoints, _http_of(status))


def _http_of(status: dict) -> Dict[str, Any]:
    http = dict(status.get("http_options") or {})
    addresses = [p["http"] for p in status["processes"]
                 if p.get("role") == "proxy" and p.get("http")]
    if addresses:  # the port actually served (the options may say 0: any free port)
        http["host"], http["port"] = addresses[0][0], addresses[0][1]
    return http
