"""Configuration models and checks for backends and the HTTP proxy.

``BackendConfig`` and ``HTTPOptions`` are pydantic models with ``extra="forbid"``: a misspelled
key is a ``pydantic.ValidationError`` that names it. ``ray_actor_options`` stay a plain dict
checked by ``validate_actor_options``. ``BackendMetadata`` describes what a backend's callable
can do, and ``validate_backend_against_config`` checks that a config asks only for that.
"""

from __future__ import annotations

import dataclasses
import inspect
from enum import Enum
from typing import Any, TypeGuard, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.middleware import Middleware

_ModelT = TypeVar("_ModelT", bound=BaseModel)

# Requests a router holds for a backend whose replicas are all full, unless configured.
DEFAULT_MAX_QUEUED_REQUESTS = 100
# Defaults for max_concurrent_queries when the user leaves it unset.
_ASYNC_MAX_CONCURRENT_QUERIES = 100
_SYNC_MAX_CONCURRENT_QUERIES = 8

_ALLOWED_ACTOR_OPTIONS = (
    "num_cpus",
    "num_gpus",
    "memory",
    "object_store_memory",
    "resources",
    "accelerator_type",
    "runtime_env",
)
_MANAGED_ACTOR_OPTIONS = ("lifetime", "name", "max_restarts")
_NUMERIC_ACTOR_OPTIONS = ("num_cpus", "num_gpus", "memory", "object_store_memory")

_BATCH_MARKER = "_serve_accept_batch"
# Methods servekit itself calls on a backend class; requests may not call them.
LIFECYCLE_METHODS = ("reconfigure", "check_health")


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
        max_replicas: Most replicas, default 1.
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

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(default=1, ge=0, strict=True)
    max_replicas: int = Field(default=1, ge=1, strict=True)
    initial_replicas: int | None = Field(default=None, ge=0, strict=True)
    target_ongoing_requests: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    upscale_delay_s: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    downscale_delay_s: float = Field(default=600.0, ge=0, allow_inf_nan=False)
    downscale_to_zero_delay_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    upscaling_factor: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    downscaling_factor: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    look_back_period_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    metrics_interval_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _bounds_in_order(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}.")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"initial_replicas={initial} is outside [min_replicas={self.min_replicas}, "
                f"max_replicas={self.max_replicas}].")
        return self

    @property
    def start_replicas(self) -> int:
        """Replicas a new backend starts with."""
        return self.min_replicas if self.initial_replicas is None else self.initial_replicas


class BackendConfig(BaseModel):
    """Options of a backend that can change without restarting its code.

    Args:
        num_replicas: Number of replica processes, default 1.
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

    Raises:
        pydantic.ValidationError: an unknown key, a bool or wrong type for a number, or a
            number out of range.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_replicas: int = Field(
        default=1, ge=1, strict=True, description="Number of replica processes."
    )
    autoscaling_config: AutoscalingConfig | None = Field(
        default=None, description="Let the number of replicas follow the load."
    )
    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        strict=True,
        description="Largest batch handed to an @accept_batch callable; None disables batching.",
    )
    batch_wait_timeout: float = Field(
        default=0.0,
        ge=0,
        strict=True,
        allow_inf_nan=False,
        description="Seconds to wait for a batch to fill before running it.",
    )
    max_concurrent_queries: int | None = Field(
        default=None,
        ge=1,
        strict=True,
        description="Queries in flight per replica; None picks a default from the callable.",
    )
    max_queued_requests: int = Field(
        default=DEFAULT_MAX_QUEUED_REQUESTS,
        ge=-1,
        strict=True,
        description="Requests a router holds while every replica is full; -1: no bound.",
    )
    user_config: Any = Field(
        default=None, description="Value passed to the backend class's reconfigure method."
    )
    sync_threads: int = Field(
        default=1,
        ge=1,
        strict=True,
        description="Sync calls one replica runs at once, each on its own thread.",
    )
    request_timeout_s: float | None = Field(
        default=None,
        gt=0,
        strict=True,
        allow_inf_nan=False,
        description="Seconds a request may take to its reply before it is cancelled.",
    )
    health_check_period_s: float = Field(
        default=1.0,
        gt=0,
        strict=True,
        allow_inf_nan=False,
        description="Seconds between the controller's health pings of each replica.",
    )
    health_check_timeout_s: float = Field(
        default=1.0,
        gt=0,
        strict=True,
        allow_inf_nan=False,
        description="Seconds a health ping may take before it counts as failed.",
    )
    health_check_failure_threshold: int = Field(
        default=3,
        ge=1,
        strict=True,
        description="Failed health pings in a row after which a replica is replaced.",
    )
    experimental_graceful_shutdown_wait_loop_s: float = Field(
        default=2.0,
        gt=0,
        strict=True,
        allow_inf_nan=False,
        description="Seconds between checks for in-flight queries while a replica stops.",
    )
    experimental_graceful_shutdown_timeout_s: float = Field(
        default=20.0,
        ge=0,
        strict=True,
        allow_inf_nan=False,
        description="Seconds a stopping replica may take to drain before it is killed.",
    )

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
        data = _set_fields(self)
        changes = _set_fields(update)
        # A fixed number of replicas and autoscaling replace each other.
        if changes.get("autoscaling_config") is not None:
            data.pop("num_replicas", None)
        if "num_replicas" in changes:
            data.pop("autoscaling_config", None)
        data.update(changes)
        return BackendConfig.model_validate(data)

    @model_validator(mode="after")
    def _fixed_or_autoscaled(self) -> BackendConfig:
        if self.autoscaling_config is not None and "num_replicas" in self.model_fields_set:
            raise ValueError(
                f"num_replicas={self.num_replicas} and autoscaling_config are both set: "
                "autoscaling decides the number of replicas. Set only one.")
        return self

    def effective_max_concurrent_queries(self, is_async: bool) -> int:
        """Queries in flight per replica: the explicit value, else a default for the callable.

        Args:
            is_async: Whether the backend's callable is a coroutine function.
        """
        if self.max_concurrent_queries is not None:
            return self.max_concurrent_queries
        if is_async:
            return _ASYNC_MAX_CONCURRENT_QUERIES
        if self.max_batch_size is not None and self.max_batch_size > 1:
            return 2 * self.max_batch_size
        return _SYNC_MAX_CONCURRENT_QUERIES


def _set_fields(model: BaseModel) -> dict[str, Any]:
    """The fields explicitly set on ``model``, by name."""
    return {name: getattr(model, name) for name in model.model_fields_set}


def _revalidated_copy(model: _ModelT) -> _ModelT:
    """A new, re-validated instance with the same explicitly-set fields (and fresh lists)."""
    return type(model).model_validate(_set_fields(model))


def _parse_model(model: type[_ModelT], value: Any, argument: str, article: str) -> _ModelT:
    """``None`` -> defaults; a dict -> validated; a ``model`` -> re-validated copy."""
    if value is None:
        return model()
    if isinstance(value, dict):
        return model.model_validate(value)
    if isinstance(value, model):
        return _revalidated_copy(value)
    raise TypeError(
        f"{argument} must be {article} {model.__name__} or a dict, got "
        f"{type(value).__name__} {value!r}."
    )


def parse_backend_config(config: BackendConfig | dict[str, Any] | None) -> BackendConfig:
    """Turn the ``config`` argument of a backend into a ``BackendConfig``.

    ``None`` gives the default config; a dict is validated; a ``BackendConfig`` is copied, so
    later changes to the caller's object do not leak in (``user_config`` itself is shared).

    Raises:
        pydantic.ValidationError: a dict with a bad or unknown key.
        TypeError: anything else.
    """
    return _parse_model(BackendConfig, config, "config", "a")


def parse_http_options(options: HTTPOptions | dict[str, Any] | None) -> HTTPOptions:
    """Turn the ``http_options`` argument into ``HTTPOptions``.

    ``None`` gives the defaults; a dict is validated; an ``HTTPOptions`` is copied.

    Raises:
        pydantic.ValidationError: a dict with a bad or unknown key.
        TypeError: anything else.
    """
    return _parse_model(HTTPOptions, options, "http_options", "an")


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_actor_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Check a backend's ``ray_actor_options`` and return a copy of them.

    Allowed keys: ``num_cpus``, ``num_gpus``, ``memory``, ``object_store_memory`` (numbers
    >= 0), ``resources`` (a dict of resource name to a number >= 0), ``accelerator_type`` and
    ``runtime_env`` (passed through unchecked). ``None`` gives ``{}``.

    Raises:
        TypeError: ``options`` is not a dict, or a value has the wrong type.
        ValueError: an option servekit manages itself, an unknown key, or a negative number.
    """
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(
            f"ray_actor_options must be a dict, got {type(options).__name__} {options!r}."
        )
    allowed = ", ".join(_ALLOWED_ACTOR_OPTIONS)
    result: dict[str, Any] = {}
    for key, value in options.items():
        if key in _MANAGED_ACTOR_OPTIONS:
            raise ValueError(
                f"ray_actor_options[{key!r}] cannot be set: servekit manages the {key!r} option "
                "of its replicas itself. Remove it."
            )
        if key not in _ALLOWED_ACTOR_OPTIONS:
            raise ValueError(f"Unknown ray_actor_options key {key!r}. Allowed keys: {allowed}.")
        if key in _NUMERIC_ACTOR_OPTIONS:
            _check_non_negative_number(f"ray_actor_options[{key!r}]", value)
        elif key == "resources":
            value = _checked_resources(value)
        result[key] = value
    return result


def _check_non_negative_number(label: str, value: object) -> None:
    if not _is_number(value):
        raise TypeError(
            f"{label} must be an int or a float, got {value!r} ({type(value).__name__})."
        )
    if not value >= 0:  # written this way to also reject NaN
        raise ValueError(f"{label} must be >= 0, got {value!r}.")


def _checked_resources(resources: object) -> dict[str, Any]:
    if not isinstance(resources, dict):
        raise TypeError(
            "ray_actor_options['resources'] must be a dict of resource name to amount, "
            f"got {resources!r} ({type(resources).__name__})."
        )
    for name, amount in resources.items():
        if not isinstance(name, str):
            raise TypeError(
                "ray_actor_options['resources'] keys must be resource names (str), "
                f"got {name!r} ({type(name).__name__})."
            )
        _check_non_negative_number(f"ray_actor_options['resources'][{name!r}]", amount)
    return dict(resources)


_MISSING = object()


def _class_attribute(cls: type, name: str) -> Any:
    """``name`` as defined in ``cls`` or a base, unwrapped from static/classmethod.

    Looks only at the class's MRO, never its metaclass: every class has a ``__call__``
    through ``type``, which must not count as the class defining one.
    """
    return _defined(cls, name)[1]


def _defined(cls: type, name: str) -> tuple[type | None, Any]:
    """(the class of ``cls``'s MRO that defines ``name``, its value as ``_class_attribute``
    gives it); (None, ``_MISSING``) if none does."""
    for klass in cls.__mro__:
        if name in vars(klass):
            value = vars(klass)[name]
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            return klass, value
    return None, _MISSING


def _package(cls: type) -> str:
    return cls.__module__.split(".")[0]


def _is_marked_for_batches(func: object) -> bool:
    return getattr(func, _BATCH_MARKER, False) is True


@dataclasses.dataclass(frozen=True)
class BackendMetadata:
    """What a backend's function or class can do, as far as its config is concerned.

    Attributes:
        is_class: The backend is a class.
        is_async: The default callable (the function, or the class's ``__call__``) is a
            coroutine function.
        accepts_batches: The default callable is marked with ``@accept_batch``.
        batch_methods: Names of public methods (and ``__call__``) marked with
            ``@accept_batch``; for a function, ``{"__call__"}`` when it is marked.
        has_reconfigure: The class has a ``reconfigure`` method.
        methods: Sorted names of the methods requests may call: the class's public methods
            other than ``reconfigure`` and ``check_health``, plus ``__call__`` if it has one;
            empty for a function. Methods a class inherits from another package (a library
            base class such as ``torch.nn.Module``) count only if listed in the class's
            ``serve_methods`` attribute.
        name: The function's or class's name, for error messages.
        asgi: The backend serves HTTP as an ASGI app (FastAPI, Starlette): its endpoint's
            route is a prefix. An ASGI app or ``serve.asgi_factory`` is not a class, is
            async (the app's call is a coroutine) and has no methods; an ``@serve.ingress``
            class is inspected as any class, and is async too (its app serves requests
            concurrently: the async default of ``max_concurrent_queries``).
    """

    is_class: bool
    is_async: bool
    accepts_batches: bool
    batch_methods: frozenset[str]
    has_reconfigure: bool
    methods: tuple[str, ...]
    name: str = ""
    asgi: bool = False

    @classmethod
    def inspect(cls, func_or_class: Any) -> BackendMetadata:
        """Compute the metadata of a backend function or class (or ASGI app or factory).

        Raises:
            TypeError: ``func_or_class`` is not callable.
        """
        # Imported here: config is imported by every process, most never inspect a backend.
        from servekit._private.asgi_app import ASGIFactory, is_asgi_backend

        asgi = is_asgi_backend(func_or_class)
        if inspect.isclass(func_or_class):
            inspected = cls._inspect_class(func_or_class)
            # An @serve.ingress class serves its app's requests concurrently, as an app does.
            return dataclasses.replace(inspected, asgi=True, is_async=True) if asgi else inspected
        if asgi:
            name = func_or_class.name if isinstance(func_or_class, ASGIFactory) else \
                getattr(func_or_class, "__name__", type(func_or_class).__name__)
            return cls(is_class=False, is_async=True, accepts_batches=False,
                       batch_methods=frozenset(), has_reconfigure=False, methods=(), name=name,
                       asgi=True)
        if not callable(func_or_class):
            raise TypeError(
                "A backend must be a function or a class, "
                f"got {func_or_class!r} ({type(func_or_class).__name__})."
            )
        marked = _is_marked_for_batches(func_or_class)
        return cls(
            is_class=False,
            is_async=inspect.iscoroutinefunction(func_or_class),
            accepts_batches=marked,
            batch_methods=frozenset({"__call__"}) if marked else frozenset(),
            has_reconfigure=False,
            methods=(),
            name=getattr(func_or_class, "__name__", type(func_or_class).__name__),
        )

    @classmethod
    def _inspect_class(cls, klass: type) -> BackendMetadata:
        listed = _listed_methods(klass)
        routines: dict[str, Any] = {}
        for attr in dir(klass):
            if attr.startswith("_") and attr != "__call__":
                continue
            owner, value = _defined(klass, attr)
            if owner is None or not inspect.isroutine(value):
                continue
            # Only the user's own methods: those of classes from the backend class's
            # package, not those it inherits from a library (torch.nn.Module.train).
            if _package(owner) == _package(klass) or attr in listed:
                routines[attr] = value
        call = routines.get("__call__")
        return cls(
            is_class=True,
            is_async=call is not None and inspect.iscoroutinefunction(call),
            accepts_batches=call is not None and _is_marked_for_batches(call),
            batch_methods=frozenset(n for n, f in routines.items() if _is_marked_for_batches(f)),
            has_reconfigure=inspect.isroutine(_class_attribute(klass, "reconfigure")),
            methods=tuple(sorted(n for n in routines if n not in LIFECYCLE_METHODS)),
            name=klass.__name__,
        )


def _listed_methods(klass: type) -> frozenset[str]:
    """The inherited methods a class exposes on purpose: its ``serve_methods`` attribute.

    Raises:
        TypeError: ``serve_methods`` is not a list of names of public methods of the class.
    """
    listed = getattr(klass, "serve_methods", ())
    if isinstance(listed, str) or not isinstance(listed, (list, tuple, set, frozenset)):
        raise TypeError(f"{klass.__name__}.serve_methods must be a list of method names, "
                        f"got {listed!r}.")
    for name in listed:
        if not isinstance(name, str) or name.startswith("_") or \
                not inspect.isroutine(_class_attribute(klass, name)):
            raise TypeError(f"{klass.__name__}.serve_methods lists {name!r}, which is not a "
                            f"public method of the class. List only methods requests may "
                            f"call, by name.")
    return frozenset(listed)


def validate_backend_against_config(metadata: BackendMetadata, config: BackendConfig) -> None:
    """Check that ``config`` asks only for what the backend can do.

    Raises:
        ValueError: batching is configured for a callable that does not accept batches (or
            for an ASGI app), or ``user_config`` is set for a backend without a
            ``reconfigure`` method (or for an ASGI app).
    """
    if metadata.asgi and not metadata.is_class:
        _validate_asgi_app_against_config(metadata, config)
    if (
        config.max_batch_size is not None
        and config.max_batch_size > 1
        and not metadata.accepts_batches
        and not metadata.batch_methods
    ):
        raise ValueError(
            f"max_batch_size is {config.max_batch_size} but the backend's callable does not "
            "accept batches. Mark it with @serve.accept_batch, or set max_batch_size to 1."
        )
    if config.user_config is not None:
        if not metadata.is_class:
            raise ValueError(
                "user_config needs a class backend with a reconfigure(user_config) method; "
                "got a function."
            )
        if not metadata.has_reconfigure:
            name = f" {metadata.name}" if metadata.name else ""
            raise ValueError(
                f"user_config is set but the backend class{name} has no "
                "reconfigure(user_config) method. Add one, or drop user_config."
            )


def _validate_asgi_app_against_config(metadata: BackendMetadata, config: BackendConfig) -> None:
    """An ASGI app or factory takes HTTP requests one by one and has no ``reconfigure``."""
    if config.max_batch_size is not None and config.max_batch_size > 1:
        raise ValueError(
            f"max_batch_size is {config.max_batch_size} but the backend {metadata.name} is an "
            "ASGI app, which takes HTTP requests one by one. Set max_batch_size to 1 or leave "
            "it unset.")
    if config.user_config is not None:
        raise ValueError(
            f"user_config is set but the backend {metadata.name} is an ASGI app, which has no "
            "reconfigure(user_config) method. Drop user_config, or serve the app from an "
            "@serve.ingress class with a reconfigure method.")


@dataclasses.dataclass(frozen=True)
class ReplicaConfig:
    """How a backend's replicas are built: what to run, with which resources and interpreter.

    ``serialized`` is the cloudpickled ``(func_or_class_or_import_path, init_args)``; it is
    only loaded inside replicas, so the controller never imports user code.
    """

    serialized: bytes
    actor_options: dict
    description: str
    python: str | None = None
    # How a deploy file defined it (JSON; the controller stores it, never reads it): its
    # mark as made from a file. None for a backend made through the Python API.
    source: dict | None = None
