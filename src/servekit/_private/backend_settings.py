"""A backend's config as plain data (``BackendSettings``): what the controller receives,
holds, saves and checks, without pydantic (its memory is paid by every instance's
controller).

The rules of the fields of ``BackendConfig`` and ``AutoscalingConfig`` (defaults, kinds,
bounds, and the checks across fields) are declared here, once: ``servekit.config`` builds
the pydantic models from them, whose errors a user sees, and ``BackendSettings.check``
applies them to what reaches the controller (a client's call, which may come from another
client's version, or a saved state), each error naming the field and its value.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional

from servekit._private import constants
from servekit._private.backend_metadata import ReplicaSettings

# Requests a router holds for a backend whose replicas are all full, unless configured.
DEFAULT_MAX_QUEUED_REQUESTS = 100
# New replicas a redeploy starts at once beyond the replica count, unless configured.
DEFAULT_MAX_SURGE = "25%"
_PERCENTAGE = re.compile(r"[0-9]{1,3}%")


def check_replica_bound(field: str, value: int) -> int:
    """``value`` if one backend may have that many replicas, else a ValueError naming both."""
    bound = constants.MAX_REPLICAS_PER_BACKEND
    if value > bound:
        raise ValueError(
            f"{field}={value} is more than the {bound} replicas one backend may have. Ask "
            f"for fewer, or raise the bound with the environment variable "
            f"SERVEKIT_MAX_REPLICAS_PER_BACKEND (set where servekit starts).")
    return value


def check_max_surge(field: str, value: Any) -> int | str:
    """A count of replicas (at least 1) or a percentage "1%".."100%", else a ValueError
    (not TypeError: pydantic turns only the former into a field error)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and _PERCENTAGE.fullmatch(value) and 1 <= int(value[:-1]) <= 100:
        return value
    raise ValueError(
        f"{field} must be a number of replicas (at least 1) or a percentage of them from "
        f"\"1%\" to \"100%\", got {value!r}. For example max_surge=2 or max_surge=\"50%\".")


def check_fixed_or_autoscaled(given: Mapping[str, Any]) -> None:
    """A backend's config sets ``num_replicas`` or ``autoscaling_config``, not both."""
    if given.get("autoscaling_config") is not None and "num_replicas" in given:
        raise ValueError(
            f"num_replicas={given['num_replicas']} and autoscaling_config are both set: "
            "autoscaling decides the number of replicas. Set only one.")


def check_autoscaling_bounds(min_replicas: int, max_replicas: int,
                             initial_replicas: Optional[int]) -> None:
    """The replica bounds of an autoscaling config are in order."""
    if min_replicas > max_replicas:
        raise ValueError(f"min_replicas={min_replicas} is above max_replicas={max_replicas}.")
    initial = initial_replicas
    if initial is not None and not min_replicas <= initial <= max_replicas:
        raise ValueError(
            f"initial_replicas={initial} is outside [min_replicas={min_replicas}, "
            f"max_replicas={max_replicas}].")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One field: its default (None: the field may be None); its kind (``int`` or
    ``float``, never a bool; ``None``: any value); its lower bound (``above``: the value must
    be above it, else at least it); whether pydantic takes only its kind (``strict``: no "2"
    for 2); and a check of its own (given the field's name and the value; the value it
    returns is kept)."""

    default: Any
    kind: Optional[type] = None
    minimum: Optional[float] = None
    above: bool = False
    strict: bool = True
    check: Optional[Callable[[str, Any], Any]] = None

    def field(self, description: str) -> Any:
        """The pydantic field of the rule (its own check is the model's validator)."""
        from pydantic import Field

        bounds: Dict[str, Any] = {}
        if self.minimum is not None:
            bounds["gt" if self.above else "ge"] = self.minimum
        if self.kind is not None and self.strict:
            bounds["strict"] = True
        if self.kind is float:
            bounds["allow_inf_nan"] = False
        return Field(default=self.default, description=description, **bounds)

    def checked(self, name: str, value: Any) -> Any:
        """``value`` if it keeps the rule (a float field's int as a float), else a TypeError
        or ValueError naming ``name`` and the value."""
        if value is None and self.default is None:
            return None
        if self.kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if self.kind is float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            value = float(value)
        if self.minimum is not None and not (
                value > self.minimum if self.above else value >= self.minimum):
            relation = "above" if self.above else "at least"
            raise ValueError(f"{name} must be {relation} {self.minimum:g}, got {value!r}")
        return value if self.check is None else self.check(name, value)


AUTOSCALING_RULES: Dict[str, Rule] = {
    "min_replicas": Rule(1, int, minimum=0),
    "max_replicas": Rule(1, int, minimum=1, check=check_replica_bound),
    "initial_replicas": Rule(None, int, minimum=0),
    "target_ongoing_requests": Rule(2.0, float, minimum=0, above=True, strict=False),
    "upscale_delay_s": Rule(30.0, float, minimum=0, strict=False),
    "downscale_delay_s": Rule(600.0, float, minimum=0, strict=False),
    "downscale_to_zero_delay_s": Rule(None, float, minimum=0, strict=False),
    "upscaling_factor": Rule(None, float, minimum=0, above=True, strict=False),
    "downscaling_factor": Rule(None, float, minimum=0, above=True, strict=False),
    "look_back_period_s": Rule(30.0, float, minimum=0, above=True, strict=False),
    "metrics_interval_s": Rule(10.0, float, minimum=0, above=True, strict=False),
}


def merged_fields(fields: Dict[str, Any], changes: Dict[str, Any]) -> Dict[str, Any]:
    """The fields set in a backend's config with those set in an update (``changes``)
    applied: a fixed number of replicas and autoscaling replace each other."""
    merged = dict(fields)
    if changes.get("autoscaling_config") is not None:
        merged.pop("num_replicas", None)
    if "num_replicas" in changes:
        merged.pop("autoscaling_config", None)
    merged.update(changes)
    return merged


class _Settings:
    """Field values as plain data: those given (checked), the rules' defaults for the
    others. Two are equal when the same fields are given the same values."""

    RULES: ClassVar[Dict[str, Rule]]

    def __init__(self, given: Dict[str, Any]) -> None:
        self.given = given  # (checked: ``check`` makes them)

    def __getattr__(self, name: str) -> Any:
        rule = type(self).RULES.get(name)
        if rule is None:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        return self.given.get(name, rule.default)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Settings) and type(other) is type(self) and \
            other.given == self.given

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.given!r})"

    def fields(self) -> Dict[str, Any]:
        """The fields set, as plain data (what ``check`` takes back)."""
        return dict(self.given)

    @classmethod
    def _checked_fields(cls, fields: Any, where: str) -> Dict[str, Any]:
        if not isinstance(fields, dict):
            raise TypeError(f"{where} must be a dict of its fields, got {fields!r}")
        given = {}
        for name, value in fields.items():
            rule = cls.RULES.get(name)
            if rule is None:
                raise ValueError(f"{where} has no field {name!r}; its fields are "
                                 f"{', '.join(cls.RULES)}")
            given[name] = rule.checked(f"{where}.{name}", value)
        return given


class AutoscalingSettings(_Settings):
    """An ``AutoscalingConfig`` as plain data."""

    RULES = AUTOSCALING_RULES

    @classmethod
    def check(cls, fields: Any, where: str) -> AutoscalingSettings:
        """The settings of ``fields`` (a dict of the fields set), each checked.

        Raises:
            TypeError, ValueError: a field of the wrong kind, out of its bounds, unknown, or
                bounds out of order; the message names it (after ``where``).
        """
        settings = cls(cls._checked_fields(given_fields(fields), where))
        try:
            check_autoscaling_bounds(settings.min_replicas, settings.max_replicas,
                                     settings.initial_replicas)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        return settings

    @property
    def start_replicas(self) -> int:
        """Replicas a new backend starts with."""
        return self.min_replicas if self.initial_replicas is None else self.initial_replicas

    def describe(self) -> Dict[str, Any]:
        """Every field's value, by name (as ``status()`` shows it)."""
        return {name: getattr(self, name) for name in self.RULES}


def _autoscaling(name: str, value: Any) -> AutoscalingSettings:
    return AutoscalingSettings.check(value, name)


BACKEND_RULES: Dict[str, Rule] = {
    "num_replicas": Rule(1, int, minimum=1, check=check_replica_bound),
    "autoscaling_config": Rule(None, check=_autoscaling),
    "max_batch_size": Rule(None, int, minimum=1),
    "batch_wait_timeout": Rule(0.0, float, minimum=0),
    "max_concurrent_queries": Rule(None, int, minimum=1),
    "max_queued_requests": Rule(DEFAULT_MAX_QUEUED_REQUESTS, int, minimum=-1),
    "user_config": Rule(None),
    "sync_threads": Rule(1, int, minimum=1),
    "request_timeout_s": Rule(None, float, minimum=0, above=True),
    "health_check_period_s": Rule(1.0, float, minimum=0, above=True),
    "health_check_timeout_s": Rule(1.0, float, minimum=0, above=True),
    "health_check_failure_threshold": Rule(3, int, minimum=1),
    "experimental_graceful_shutdown_wait_loop_s": Rule(2.0, float, minimum=0, above=True),
    "experimental_graceful_shutdown_timeout_s": Rule(20.0, float, minimum=0),
    "max_surge": Rule(DEFAULT_MAX_SURGE, check=check_max_surge),
}


class ReplicaFields:
    """What a backend's config gives its replicas: mixed into the public ``BackendConfig``
    and into ``BackendSettings``, its plain data."""

    def replica_settings(self) -> ReplicaSettings:
        """The fields its replicas apply themselves, as the plain data they are sent."""
        return ReplicaSettings.of(self)

    def effective_max_concurrent_queries(self, is_async: bool) -> int:
        """Queries in flight per replica: the explicit value, else a default for the callable.

        Args:
            is_async: Whether the backend's callable is a coroutine function.
        """
        return self.replica_settings().effective_max_concurrent_queries(is_async)


class BackendSettings(_Settings, ReplicaFields):
    """A ``BackendConfig`` as plain data: what a client sends the controller (the fields
    set, as ``fields()`` gives them), and what the controller holds and saves."""

    RULES = BACKEND_RULES

    @classmethod
    def check(cls, fields: Any, where: str = "config") -> BackendSettings:
        """The settings of ``fields``: a dict of the fields set (an autoscaling config as a
        dict of its own), or a ``BackendConfig`` (as a client of an earlier version sends
        it), each field checked as ``BackendConfig`` checks it.

        Raises:
            TypeError, ValueError: a field of the wrong kind, out of its bounds or
                unknown, or both ``num_replicas`` and ``autoscaling_config``; the message
                names the field (after ``where``) and its value.
        """
        given = cls._checked_fields(given_fields(fields), where)
        try:
            check_fixed_or_autoscaled(given)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        return cls(given)

    def fields(self) -> Dict[str, Any]:
        """The fields set, an autoscaling config as a dict of its own (what ``check``
        takes back)."""
        fields = super().fields()
        if fields.get("autoscaling_config") is not None:
            fields["autoscaling_config"] = fields["autoscaling_config"].fields()
        return fields

    def merged(self, update: BackendSettings) -> BackendSettings:
        """These settings with the fields set in ``update`` applied (as
        ``BackendConfig.merged``), checked again.

        Raises:
            TypeError, ValueError: the result breaks a rule (as ``check``).
        """
        return BackendSettings.check(merged_fields(self.fields(), update.fields()))

    def describe(self) -> Dict[str, Any]:
        """Every field's value but ``user_config``, by name (as ``status()`` shows it)."""
        described = {name: getattr(self, name) for name in self.RULES if name != "user_config"}
        if described["autoscaling_config"] is not None:
            described["autoscaling_config"] = described["autoscaling_config"].describe()
        return described


def given_fields(config: Any) -> Any:
    """The fields set in ``config`` as plain data: those of settings, or of a pydantic
    model (a client's, or a config as clients of earlier versions sent it; an autoscaling
    config's too); anything else as it is (for ``check`` to refuse, or take)."""
    if isinstance(config, _Settings):
        return config.fields()
    names = getattr(config, "model_fields_set", None)
    if names is None:
        return config
    fields = {name: getattr(config, name) for name in names}
    if "autoscaling_config" in fields:
        fields["autoscaling_config"] = given_fields(fields["autoscaling_config"])
    return fields
