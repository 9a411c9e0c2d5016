"""The checks behind the arguments of the public API and of deploy files: backend tags,
endpoint names, routes and HTTP methods; ``config`` and ``http_options`` parsed into their
models, ``ray_actor_options`` checked, and a backend's callable checked against its config.
Each error names the bad value and how to fix it.

The checks of names, routes and methods are shared by the Python API, deploy files, the
controller and the loading of saved state. Their messages complete a sentence about the
value (``"'a b' contains ' '..."``): the API puts the argument's name before them, a deploy
file its place.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, List, TypeGuard, TypeVar

from servekit._private.backend_metadata import BackendMetadata, ReplicaSettings

if TYPE_CHECKING:  # (a replica checks its callable without importing pydantic)
    from pydantic import BaseModel

    from servekit.config import BackendConfig, HTTPOptions

_ModelT = TypeVar("_ModelT", bound="BaseModel")
_T = TypeVar("_T")

# Longest backend tag or endpoint name, in characters.
MAX_NAME_LENGTH = 128
# Longest route, in characters.
MAX_ROUTE_LENGTH = 1024
# An HTTP method is a token (RFC 9110): these characters, at most 32 of them.
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}")
# Characters a route may not hold, beyond whitespace and what is not printable: a route is
# matched against the decoded path, which never holds them as such.
_NOT_IN_ROUTES = "%?#"


def _shown(value: str) -> str:
    """``repr(value)``, cut short when long."""
    return repr(value) if len(value) <= 60 else f"{value[:60]!r}... ({len(value)} characters)"


def check_name(value: object) -> str:
    """Check a backend tag or an endpoint name: 1 to 128 printable characters.

    Raises:
        TypeError: not a str, or empty.
        ValueError: too long, or holding a character that is not printable (a control
            character, a line break, a tab).
    """
    if not isinstance(value, str) or not value:
        raise TypeError(f"must be a non-empty str, got {value!r}")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{_shown(value)} is longer than {MAX_NAME_LENGTH} characters; use a "
                         "shorter name")
    bad = next((c for c in value if not c.isprintable()), None)
    if bad is not None:
        raise ValueError(f"{value!r} contains {bad!r}, which is not a printable character; "
                         "use letters, digits, spaces and punctuation")
    return value


def check_route(route: object) -> str:
    """Check an endpoint's route: a path starting with "/", not under "/-/" (servekit's),
    of at most 1024 printable characters, with no whitespace, no ``%``, ``?`` or ``#``
    and no "." or ".." segment.

    Raises:
        TypeError: not a str starting with "/".
        ValueError: anything else above.
    """
    if not isinstance(route, str):
        raise TypeError(f"must be a string starting with '/', got {route!r}")
    if not route.startswith("/"):
        raise TypeError(f"{_shown(route)} must start with '/'")
    if route.startswith("/-/"):
        raise ValueError(f"{_shown(route)} is reserved: paths under /-/ are servekit's")
    if len(route) > MAX_ROUTE_LENGTH:
        raise ValueError(f"{_shown(route)} is longer than {MAX_ROUTE_LENGTH} characters; use "
                         "a shorter route")
    bad = next((c for c in route if c in _NOT_IN_ROUTES or c.isspace()
                or not c.isprintable()), None)
    if bad is not None:
        raise ValueError(f"{route!r} contains {bad!r}, which a route cannot hold: a route is "
                         "a plain path (no query '?', fragment '#', percent-escape '%', "
                         "whitespace or control character); give it decoded, without them")
    if any(segment in (".", "..") for segment in route.split("/")):
        raise ValueError(f"{route!r} has a '.' or '..' segment, which clients resolve away "
                         "before they send a request; give the path without it")
    return route


def check_methods(methods: object) -> List[str]:
    """Check the HTTP methods of an endpoint; return them upper-cased, sorted, once each.

    Raises:
        TypeError: not a non-empty list of str.
        ValueError: a method that is not a method name (RFC 9110 token characters, at most
            32).
    """
    if not isinstance(methods, list) or not methods:
        raise TypeError(f"must be a non-empty list of strings, got {methods!r}")
    for method in methods:
        if not isinstance(method, str):
            raise TypeError(f"must be a list of strings, but {method!r} is "
                            f"{type(method).__name__}")
        if not _METHOD.fullmatch(method):
            raise ValueError(f"holds {_shown(method)}, which is not an HTTP method name; use "
                             "names such as 'GET' or 'POST' (letters, digits and "
                             "!#$%&'*+-.^_`|~, at most 32)")
    return sorted({method.upper() for method in methods})


def checked(label: str, check: Callable[[object], _T], value: object) -> _T:
    """``check(value)``, its error prefixed with ``label`` (an argument's name)."""
    try:
        return check(value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{label} {exc}.") from None

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


def _revalidated_copy(model: _ModelT) -> _ModelT:
    """A new, re-validated instance with the same explicitly-set fields (and fresh lists)."""
    from servekit.config import _set_fields

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
    from servekit.config import BackendConfig

    return _parse_model(BackendConfig, config, "config", "a")


def parse_http_options(options: HTTPOptions | dict[str, Any] | None) -> HTTPOptions:
    """Turn the ``http_options`` argument into ``HTTPOptions``.

    ``None`` gives the defaults; a dict is validated; an ``HTTPOptions`` is copied.

    Raises:
        pydantic.ValidationError: a dict with a bad or unknown key.
        TypeError: anything else.
    """
    from servekit.config import HTTPOptions

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


def validate_backend_against_config(metadata: BackendMetadata,
                                    config: BackendConfig | ReplicaSettings) -> None:
    """Check that ``config`` asks only for what the backend can do.

    Raises:
        ValueError: batching is configured for a callable that does not accept batches (or
            for an ASGI app), a ``@serve.batch`` function waits as long as
            ``request_timeout_s`` or longer, or ``user_config`` is set for a backend
            without a ``reconfigure`` method (or for an ASGI app).
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
    timeout = config.request_timeout_s
    if timeout is not None and metadata.batch_wait_timeout_s >= timeout:
        raise ValueError(
            f"request_timeout_s is {timeout} but a @serve.batch function of the backend "
            f"{metadata.name} waits up to batch_wait_timeout_s={metadata.batch_wait_timeout_s} "
            "for its batch to fill: its requests could time out waiting. Make "
            "batch_wait_timeout_s smaller than request_timeout_s."
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


def _validate_asgi_app_against_config(metadata: BackendMetadata,
                                      config: BackendConfig | ReplicaSettings) -> None:
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
