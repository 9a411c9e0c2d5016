"""Configuration models for backends and the HTTP proxy.

``BackendConfig``, ``AutoscalingConfig`` and ``HTTPOptions`` are pydantic models with
``extra="forbid"``: a misspelled key is a ``pydantic.ValidationError`` that names it. The
checks of the other arguments (``ray_actor_options``, a backend's callable against its
config) live in ``servekit._private.config_checks``; ``BackendMetadata`` and
``ReplicaConfig`` (what a backend's callable can do; how its replicas are built) in
``servekit._private.backend_metadata``, and are importable from here as in Ray Serve 1.x.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.middleware import Middleware

from servekit._private import constants
from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig
from servekit._private.backend_settings import AUTOSCALING_RULES as _AUTOSCALING
from servekit._private.backend_settings import BACKEND_RULES as _BACKEND
from servekit._private.backend_settings import (
    ReplicaFields,
    check_autoscaling_bounds,
    check_fixed_or_autoscaled,
    check_max_surge,
    check_replica_bound,
    merged_fields,
)

__all__ = [
    "AutoscalingConfig",
    "BackendConfig",
    "BackendMetadata",
    "DeploymentMode",
    "HTTPOptions",
    "ReplicaConfig",
]

def _default_server() -> Literal["uvicorn", "granian"]:
    """The HTTP server of ``HTTPOptions`` left unset (``SERVEKIT_HTTP_SERVER``)."""
    return "granian" if constants.HTTP_SERVER == "granian" else "uvicorn"


class DeploymentMode(str, Enum):
    """Where HTTP proxies run."""

    HeadOnly = "HeadOnly"
    """One proxy, on the head node."""
    EveryNode = "EveryNode"
    """One proxy on every node."""
    NoServer = "NoServer"
    """No HTTP proxy; backends are reachable only through handles."""


class HTTPOptions(BaseModel):
    """Options of the HTTP proxy.

    Args:
        host: Interface to bind, default ``"127.0.0.1"``; use ``"0.0.0.0"`` to listen on
            every interface. ``None`` disables HTTP (``location`` becomes ``NoServer``).
        port: TCP port, default 8000; 0 picks a free port.
        middlewares: ``starlette.middleware.Middleware`` objects wrapped around the proxy app,
            outermost first. Default none.
        location: Where proxies run, default ``DeploymentMode.HeadOnly``. ``None`` means
            ``NoServer``.
        num_proxies: HTTP proxy processes per node, default 1. They share the port and the
            kernel spreads connections over them: more than one helps when the proxy's core
            is the bottleneck (each takes about a core at full load). Limits such as
            ``max_concurrent_queries`` hold across all of them.
        max_body_bytes: Largest request body a proxy accepts, default 100 MiB. A larger one
            gets 413 without being read whole (a Content-Length over it, at once).
        max_header_bytes: Largest request line plus headers, default 32 KiB; beyond it 431
            and the connection is closed.
        max_header_count: Most headers in a request, default 100; beyond it 431.
        limit_concurrency: Connections plus requests in progress a proxy holds at once,
            default 4096 (uvicorn's ``limit_concurrency``); beyond it 503.
        keep_alive_timeout_s: Seconds an idle keep-alive connection stays open, default 5.
        client_timeout_s: Seconds a client may take to send a request head (from its
            connection, or from the request's first byte), and may leave a request body
            without sending a byte, default 10. Past it the client gets 408 and the
            connection is closed, so slow clients (slowloris) hold a connection only that
            long.
        max_held_body_bytes: Bytes of request bodies a proxy holds at once, across all
            requests, default 512 MiB (at least ``max_body_bytes``). A request whose body
            would pass it gets 503 with ``Retry-After`` and its connection is closed.
        request_timeout_s: Seconds a request may take from its arrival to its response,
            default ``None`` (no limit). Past it the client gets 504 (408 if its body had
            not arrived yet) and the request is cancelled: taken out of the queue if it
            still waits, its coroutine cancelled in the replica if the backend is async (a
            sync call already running finishes, and its result is dropped).
        server: The HTTP server each proxy runs on: ``"uvicorn"`` (httptools, uvloop) or
            ``"granian"`` (Rust, hyper; ``pip install "servekit[granian]"``). Default the
            environment variable ``SERVEKIT_HTTP_SERVER``, else ``"uvicorn"``. Both keep the
            limits above; where granian differs (a head timeout closes the connection
            without a 408, the keep-alive timeout is ``client_timeout_s``), the README's
            HTTP section says so.

    Raises:
        pydantic.ValidationError: an unknown key, a port outside 0..65535, a limit below 1,
            or a middleware that is not a ``Middleware`` instance.
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, arbitrary_types_allowed=True
    )

    host: str | None = Field(
        default="127.0.0.1", description="Interface to bind; None disables HTTP."
    )
    port: int = Field(
        default=8000, ge=0, le=65535, strict=True, description="TCP port; 0 picks a free port."
    )
    middlewares: list[Any] = Field(
        default_factory=list,
        description="starlette Middleware objects wrapped around the proxy app, outermost first.",
    )
    location: DeploymentMode | None = Field(
        default=DeploymentMode.HeadOnly, description="Where HTTP proxies run."
    )
    num_proxies: int = Field(
        default=1, ge=1, le=64, strict=True,
        description="HTTP proxy processes per node; they share the port.",
    )
    max_body_bytes: int = Field(
        default=100 * 1024 * 1024, ge=1, strict=True,
        description="Largest request body accepted; larger ones get 413.",
    )
    max_header_bytes: int = Field(
        default=32 * 1024, ge=1, strict=True,
        description="Largest request line plus headers; beyond it 431.",
    )
    max_header_count: int = Field(
        default=100, ge=1, strict=True, description="Most headers in a request; beyond it 431."
    )
    limit_concurrency: int = Field(
        default=4096, ge=1, strict=True,
        description="Connections plus requests in progress a proxy holds; beyond it 503.",
    )
    keep_alive_timeout_s: float = Field(
        default=5.0, gt=0, strict=True, allow_inf_nan=False,
        description="Seconds an idle keep-alive connection stays open.",
    )
    client_timeout_s: float = Field(
        default=10.0, gt=0, strict=True, allow_inf_nan=False,
        description="Seconds a client may take to send a request head, or stall a body.",
    )
    max_held_body_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1, strict=True,
        description="Bytes of request bodies a proxy holds at once; beyond them 503.",
    )
    request_timeout_s: float | None = Field(
        default=None, gt=0, strict=True, allow_inf_nan=False,
        description="Seconds from a request's arrival to its response; None: no limit.",
    )
    server: Literal["uvicorn", "granian"] = Field(
        default_factory=_default_server,
        description="The HTTP server each proxy runs on: uvicorn or granian.",
    )

    @field_validator("middlewares")
    @classmethod
    def _check_middlewares(cls, value: list[Any]) -> list[Any]:
        for index, item in enumerate(value):
            if not isinstance(item, Middleware):
                # ValueError, not TypeError: pydantic turns only the former into a field error.
                raise ValueError(
                    f"middlewares[{index}] is {item!r} ({type(item).__name__}), not a "
                    "starlette.middleware.Middleware. Wrap it: Middleware(MyMiddleware, ...)."
                )
        return value

    @model_validator(mode="after")
    def _held_bodies_fit_one(self) -> HTTPOptions:
        if self.max_held_body_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_held_body_bytes={self.max_held_body_bytes} is below max_body_bytes="
                f"{self.max_body_bytes}: a body the proxy accepts must fit in what it holds. "
                "Raise max_held_body_bytes or lower max_body_bytes.")
        return self

    @model_validator(mode="after")
    def _no_server_without_host(self) -> HTTPOptions:
        if self.host is None or self.location is None:
            # Written through __dict__: a plain assignment would re-run this validator.
            self.__dict__["location"] = DeploymentMode.NoServer
        return self


class AutoscalingConfig(BaseModel):
    """How an autoscaled backend follows its load (Ray Serve 2.x's field names and meanings).

    The load of a backend is the requests waiting in routers for one of its replicas plus
    those its replicas run, averaged over ``look_back_period_s``; the backend wants
    ``load / target_ongoing_requests`` replicas, between ``min_replicas`` and
    ``max_replicas``. A change is made only once it was wanted all through its delay.

    Args:
        min_replicas: Fewest replicas, default 1; 0 lets the backend scale to zero (requests
            then wait in the router while the first replica starts).
        max_replicas: Most replicas, default 1; at most ``SERVEKIT_MAX_REPLICAS_PER_BACKEND``
            (1000).
        initial_replicas: Replicas to start with, default ``min_replicas``.
        target_ongoing_requests: Requests each replica should have in flight, default 2.
        upscale_delay_s: Seconds more replicas must be wanted before they start, default 30.
        downscale_delay_s: Seconds fewer replicas must be wanted before some stop, default
            600.
        downscale_to_zero_delay_s: Seconds no load must last before the last replica stops,
            default ``downscale_delay_s``.
        upscaling_factor: Fraction of the wanted increase made at once, default 1.
        downscaling_factor: Fraction of the wanted decrease made at once, default 1.
        look_back_period_s: Seconds the load is averaged over, default 30.
        metrics_interval_s: Seconds between load reports of each router, default 10.

    Raises:
        pydantic.ValidationError: an unknown key, a bad number, or bounds out of order.
    """

    # An instance handed to a BackendConfig is checked again: it may come unchecked (a
    # config unpickled from another client's call), and the controller's check of a config
    # is a BackendConfig's.
    model_config = ConfigDict(extra="forbid", frozen=True, revalidate_instances="always")

    # (Defaults and bounds: _private/backend_settings.py, which the controller checks by.)
    min_replicas: int = _AUTOSCALING["min_replicas"].field("Fewest replicas; 0: scale to zero.")
    max_replicas: int = _AUTOSCALING["max_replicas"].field("Most replicas.")
    initial_replicas: int | None = _AUTOSCALING["initial_replicas"].field(
        "Replicas to start with; None: min_replicas.")
    target_ongoing_requests: float = _AUTOSCALING["target_ongoing_requests"].field(
        "Requests each replica should have in flight.")
    upscale_delay_s: float = _AUTOSCALING["upscale_delay_s"].field(
        "Seconds more replicas must be wanted before they start.")
    downscale_delay_s: float = _AUTOSCALING["downscale_delay_s"].field(
        "Seconds fewer replicas must be wanted before some stop.")
    downscale_to_zero_delay_s: float | None = _AUTOSCALING["downscale_to_zero_delay_s"].field(
        "Seconds no load must last before the last replica stops; None: downscale_delay_s.")
    upscaling_factor: float | None = _AUTOSCALING["upscaling_factor"].field(
        "Fraction of the wanted increase made at once; None: 1.")
    downscaling_factor: float | None = _AUTOSCALING["downscaling_factor"].field(
        "Fraction of the wanted decrease made at once; None: 1.")
    look_back_period_s: float = _AUTOSCALING["look_back_period_s"].field(
        "Seconds the load is averaged over.")
    metrics_interval_s: float = _AUTOSCALING["metrics_interval_s"].field(
        "Seconds between load reports of each router.")

    @field_validator("max_replicas")
    @classmethod
    def _max_replicas_bounded(cls, value: int) -> int:
        return check_replica_bound("max_replicas", value)

    @model_validator(mode="after")
    def _bounds_in_order(self) -> AutoscalingConfig:
        check_autoscaling_bounds(self.min_replicas, self.max_replicas, self.initial_replicas)
        return self

    @property
    def start_replicas(self) -> int:
        """Replicas a new backend starts with."""
        return self.min_replicas if self.initial_replicas is None else self.initial_replicas


class BackendConfig(BaseModel, ReplicaFields):
    """Options of a backend that can change without restarting its code.

    Args:
        num_replicas: Number of replica processes, default 1; at most
            ``SERVEKIT_MAX_REPLICAS_PER_BACKEND`` (1000).
        autoscaling_config: An ``AutoscalingConfig`` (or a dict of its fields): the number
            of replicas follows the load instead. Exclusive with ``num_replicas``.
        max_batch_size: Largest batch handed to an ``@accept_batch`` callable, default
            ``None`` (no batching).
        batch_wait_timeout: Seconds to wait for a batch to fill, default 0.0.
        max_concurrent_queries: Queries in flight per replica, default ``None``: 100 for
            async callables, 8 for sync ones (``2 * max_batch_size`` when batching).
        user_config: Any value passed to the backend class's ``reconfigure`` method.
        max_queued_requests: Requests each router (the HTTP proxy, each process with
            handles) holds while every replica is at ``max_concurrent_queries``, default
            100; -1 for no bound. A request beyond it fails at once with
            ``BackendOverloadedError`` (HTTP 503 with ``Retry-After``), so overload sheds
            load instead of growing a queue and its latency without bound.
        sync_threads: Sync calls one replica runs at once, each on its own thread; default
            1, so a sync method never runs twice at once (as in Ray Serve 1.x). Raise it
            only for thread-safe code that releases the GIL (numpy, torch). Requests beyond
            it wait in the replica, up to ``max_concurrent_queries``.
        request_timeout_s: Seconds a request may take from the moment a router takes it
            to its reply (a streamed reply: to its first chunk), default ``None`` (no
            bound). A request past it is cancelled as if its caller had left and fails with
            ``RequestTimeoutError`` (a ``TimeoutError``; HTTP 504). The bound for code that
            may never return: deaths and freezes are bounded without it.
        health_check_period_s: Seconds between the controller's pings of each replica,
            default 1.0. A ping also calls the class's ``check_health()`` if it has one.
        health_check_timeout_s: Seconds a ping may take before it counts as failed,
            default 1.0. With the defaults a frozen replica is replaced within about 4 s.
        health_check_failure_threshold: Failed pings in a row after which a replica is
            taken out of routing and replaced, default 3. A ``check_health()`` that raises
            replaces it at once.
        experimental_graceful_shutdown_wait_loop_s: Seconds between checks for in-flight
            queries while a replica shuts down, default 2.0.
        experimental_graceful_shutdown_timeout_s: Seconds a stopping replica may take to finish
            in-flight queries before it is killed, default 20.0.
        max_surge: New replicas a redeploy (a new definition) starts at once beyond the
            replica count: a number (at least 1), or a percentage of the replicas as a
            string such as ``"50%"`` (rounded up, at least 1), default ``"25%"``. An old
            replica stops only as a new one runs, so as many serve as before throughout;
            raise it for faster rollouts when the machine has room for the extra replicas.

    Raises:
        pydantic.ValidationError: an unknown key, a bool or wrong type for a number, or a
            number out of range.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # (Defaults and bounds: _private/backend_settings.py, which the controller checks by.)
    num_replicas: int = _BACKEND["num_replicas"].field("Number of replica processes.")
    autoscaling_config: AutoscalingConfig | None = _BACKEND["autoscaling_config"].field(
        "Let the number of replicas follow the load.")
    max_batch_size: int | None = _BACKEND["max_batch_size"].field(
        "Largest batch handed to an @accept_batch callable; None disables batching.")
    batch_wait_timeout: float = _BACKEND["batch_wait_timeout"].field(
        "Seconds to wait for a batch to fill before running it.")
    max_concurrent_queries: int | None = _BACKEND["max_concurrent_queries"].field(
        "Queries in flight per replica; None picks a default from the callable.")
    max_queued_requests: int = _BACKEND["max_queued_requests"].field(
        "Requests a router holds while every replica is full; -1: no bound.")
    user_config: Any = _BACKEND["user_config"].field(
        "Value passed to the backend class's reconfigure method.")
    sync_threads: int = _BACKEND["sync_threads"].field(
        "Sync calls one replica runs at once, each on its own thread.")
    request_timeout_s: float | None = _BACKEND["request_timeout_s"].field(
        "Seconds a request may take to its reply before it is cancelled.")
    health_check_period_s: float = _BACKEND["health_check_period_s"].field(
        "Seconds between the controller's health pings of each replica.")
    health_check_timeout_s: float = _BACKEND["health_check_timeout_s"].field(
        "Seconds a health ping may take before it counts as failed.")
    health_check_failure_threshold: int = _BACKEND["health_check_failure_threshold"].field(
        "Failed health pings in a row after which a replica is replaced.")
    experimental_graceful_shutdown_wait_loop_s: float = \
        _BACKEND["experimental_graceful_shutdown_wait_loop_s"].field(
            "Seconds between checks for in-flight queries while a replica stops.")
    experimental_graceful_shutdown_timeout_s: float = \
        _BACKEND["experimental_graceful_shutdown_timeout_s"].field(
            "Seconds a stopping replica may take to drain before it is killed.")
    max_surge: int | str = _BACKEND["max_surge"].field(
        "New replicas a redeploy starts at once: a number, or a percentage \"25%\".")

    def merged(self, update: BackendConfig | dict[str, Any]) -> BackendConfig:
        """Return a new config: this one with the fields explicitly set in ``update`` applied.

        Fields of ``update`` left at their defaults are ignored, so
        ``config.merged({"num_replicas": 3})`` changes only ``num_replicas``.

        Raises:
            pydantic.ValidationError: ``update`` is a dict with a bad or unknown key.
            TypeError: ``update`` is neither a ``BackendConfig`` nor a dict.
        """
        if isinstance(update, dict):
            update = BackendConfig.model_validate(update)
        elif not isinstance(update, BackendConfig):
            raise TypeError(
                "config_options must be a BackendConfig or a dict, got "
                f"{type(update).__name__} {update!r}."
            )
        return BackendConfig.model_validate(merged_fields(_set_fields(self),
                                                          _set_fields(update)))

    @field_validator("num_replicas")
    @classmethod
    def _num_replicas_bounded(cls, value: int) -> int:
        return check_replica_bound("num_replicas", value)

    @field_validator("max_surge", mode="before")
    @classmethod
    def _max_surge_count_or_percentage(cls, value: Any) -> int | str:
        return check_max_surge("max_surge", value)

    @model_validator(mode="after")
    def _fixed_or_autoscaled(self) -> BackendConfig:
        check_fixed_or_autoscaled(_set_fields(self))
        return self


def _set_fields(model: BaseModel) -> dict[str, Any]:
    """The fields explicitly set on ``model``, by name."""
    return {name: getattr(model, name) for name in model.model_fields_set}
