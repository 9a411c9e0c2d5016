"""What a backend is: what its function or class can do (``BackendMetadata``), how its
replicas are built (``ReplicaConfig``), and the part of its config they apply themselves
(``ReplicaSettings``).

All are plain data, importable without pydantic (a replica reads them); ``servekit.config``
re-exports the first two.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

BATCH_MARKER = "_serve_accept_batch"
# The attribute of a @serve.batch function holding its settings (replica/batched.py).
BATCH_SETTINGS = "_serve_batch"
# Methods servekit itself calls on a backend class; requests may not call them.
LIFECYCLE_METHODS = ("reconfigure", "check_health")

# Defaults for max_concurrent_queries when the user leaves it unset.
_ASYNC_MAX_CONCURRENT_QUERIES = 100
_SYNC_MAX_CONCURRENT_QUERIES = 8

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
    return getattr(func, BATCH_MARKER, False) is True


def _batch_wait_timeout_s(functions: Any) -> float:
    """The longest ``batch_wait_timeout_s`` of the ``@serve.batch`` functions among
    ``functions``; 0 if none is one."""
    settings = (getattr(f, BATCH_SETTINGS, None) for f in functions)
    return max((s.batch_wait_timeout_s for s in settings if s is not None), default=0.0)


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
        batch_wait_timeout_s: The longest ``batch_wait_timeout_s`` of the function's, or
            the class's methods', ``@serve.batch`` (0 without any): a request must be
            allowed to wait that long (``request_timeout_s``).
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
    batch_wait_timeout_s: float = 0.0

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
            batch_wait_timeout_s=_batch_wait_timeout_s([func_or_class]),
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
            batch_wait_timeout_s=_batch_wait_timeout_s(
                _class_attribute(klass, attr) for attr in dir(klass)),
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


@dataclasses.dataclass(frozen=True)
class ReplicaSettings:
    """The fields of a backend's config that its replicas apply themselves, without a
    restart (``BackendConfig.replica_settings()``): a change of any is pushed to them."""

    max_batch_size: int | None
    batch_wait_timeout: float
    max_concurrent_queries: int | None
    user_config: Any
    sync_threads: int
    # Only checked against the callable when a replica starts (routers enforce it).
    request_timeout_s: float | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def of(cls, config: Any) -> ReplicaSettings:
        """The settings of a backend's config (a ``BackendConfig`` or its plain data)."""
        return cls(**{field.name: getattr(config, field.name)
                      for field in dataclasses.fields(cls)})

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
