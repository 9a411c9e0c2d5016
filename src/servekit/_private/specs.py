"""What the control plane tells the data plane: endpoint records and process specs.

The router, replica and proxy read these; the controller writes them. They live apart from
the controller package so that the data plane never imports the control plane. They are
plain data: a worker unpickles its spec without importing pydantic (a replica's spec carries
``ReplicaSettings``, not the ``BackendConfig`` model; the controller's ``HTTPSettings``, not
``HTTPOptions``).
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig, ReplicaSettings

if TYPE_CHECKING:
    from servekit.config import HTTPOptions



@dataclasses.dataclass
class EndpointInfo:
    """An endpoint: its route (None when headless), methods, traffic split and shadows."""

    name: str
    route: Optional[str]
    methods: List[str]
    traffic: Dict[str, float]
    shadows: Dict[str, float] = dataclasses.field(default_factory=dict)
    # The name of the deploy file that made it (``servekit deploy --prune`` of that name may
    # delete it); None: made through the Python API.
    managed: Optional[str] = None
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
    for an autoscaled backend, how often routers report its load to the controller, and
    whether it scales to zero (with no replica it still serves: a request starts one)."""

    cap: int
    max_queued: int
    request_timeout_s: Optional[float] = None
    load_report_interval_s: Optional[float] = None
    scales_to_zero: bool = False


@dataclasses.dataclass
class ReplicaSpec:
    """What a replica process is told when it starts."""

    backend_tag: str
    replica_tag: str
    replica_config: ReplicaConfig
    config: ReplicaSettings
    metadata: Optional[BackendMetadata]


@dataclasses.dataclass(frozen=True)
class ProxySettings:
    """The fields of ``HTTPOptions`` an HTTP proxy serves by (where proxies run is the
    controller's), as plain data."""

    server: str
    middlewares: List[Any]
    max_body_bytes: int
    max_header_bytes: int
    max_header_count: int
    limit_concurrency: int
    keep_alive_timeout_s: float
    client_timeout_s: float
    max_held_body_bytes: int
    request_timeout_s: Optional[float]

    @classmethod
    def of(cls, options: HTTPOptions) -> ProxySettings:
        return cls(**{field.name: getattr(options, field.name)
                      for field in dataclasses.fields(cls)})


@dataclasses.dataclass
class ProxySpec:
    """What the HTTP proxy process is told when it starts: the instance's HTTP options."""

    http_options: ProxySettings


class Pickled:
    """An object kept pickled (``data``): pickled, it unpickles as the object itself, so a
    process that only passes it on never imports what it holds."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> Any:
        return pickle.loads, (self.data,)


@dataclasses.dataclass(frozen=True)
class HTTPSettings:
    """What the controller needs of ``HTTPOptions``, as plain data: where it serves HTTP,
    where proxies run (a ``DeploymentMode`` value) and how many per place, the options as
    ``status()`` shows them, and the spec each proxy starts with, pickled (its middlewares
    are the user's classes, which the controller never loads: it sends ``Pickled(it)``)."""

    host: Optional[str]
    port: int
    location: str
    num_proxies: int
    shown: Dict[str, Any]
    proxy_spec: bytes

    @classmethod
    def of(cls, options: HTTPOptions) -> HTTPSettings:
        import cloudpickle

        assert options.location is not None  # HTTPOptions sets NoServer for None
        return cls(options.host, options.port, options.location.value, options.num_proxies,
                   options.model_dump(mode="json", exclude={"middlewares"}),
                   cloudpickle.dumps(ProxySpec(ProxySettings.of(options))))


@dataclasses.dataclass
class ControllerSpec:
    """What the controller process is told when it starts."""

    http_options: HTTPSettings
    detached: bool
    custom_resources: Dict[str, float]


@dataclasses.dataclass
class EarlyWorker:
    """A worker the supervisor started beside the first controller, which adopts it: where
    it serves and its process's identity. A replica's has no spec yet: it imports its
    role's modules meanwhile, then reads its ``WorkerSpec`` (on the listening socket
    ``rpc_fd``) from the pipe ``spec_fd``."""

    address: str
    identity: Dict[str, Any]
    rpc_fd: Optional[int] = None
    spec_fd: Optional[int] = None


@dataclasses.dataclass
class WorkerSpec:
    """What a worker process is and how it reaches the rest of its instance."""

    role: str  # "controller", "proxy" or "replica"
    name: str
    instance_dir: str
    rpc_fd: int  # a listening Unix socket the parent bound for this worker
    controller_address: Optional[str]
    payload: bytes  # cloudpickled role-specific spec, loaded after sys_path is in place
    sys_path: Sequence[str] = ()
    watch_parent: bool = True  # exit when stdin (the pipe from the parent) closes
    lifeline_fd: Optional[int] = None  # else: exit when this inherited pipe closes
    daemonize: bool = False  # fork once more so the parent does not keep it as its child
    extra_fds: Dict[str, int] = dataclasses.field(default_factory=dict)
    log_dir: Optional[str] = None  # where its log file goes (none: stderr only, as on Ray)
    # False for a detached instance: its stderr is detached.log, which keeps what is not
    # logged (a crash's traceback) and is not rotated.
    log_to_stderr: bool = True
    # The supervisor's: the first HTTP proxy's payload (a ProxySpec), started at once beside
    # the controller, so the two start in parallel (None: no HTTP).
    proxy_payload: Optional[bytes] = None
    # The first controller's: the workers the supervisor started beside it, which it adopts
    # as its first proxy and its first replica.
    early_proxy: Optional[EarlyWorker] = None
    early_replica: Optional[EarlyWorker] = None

    def load_payload(self) -> Any:
        # (cloudpickle's loads is pickle's: cloudpickle is imported only for a payload that
        # holds what it pickled by value, such as a middleware defined in the user's script)
        return pickle.loads(self.payload)
