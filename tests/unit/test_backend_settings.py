"""BackendSettings: the controller's check of a config refuses what BackendConfig refuses (a
client's check), built from the same rules; it takes back what a client sends and shows it
as the model does."""

from __future__ import annotations

import math
from typing import Any, Dict

import pytest
from pydantic import ValidationError

from servekit._private.backend_settings import (
    AUTOSCALING_RULES,
    BACKEND_RULES,
    BackendSettings,
    given_fields,
)
from servekit.config import AutoscalingConfig, BackendConfig

PROBES = [None, True, False, -1, 0, 1, 2, 10**9, 0.0, 0.5, -0.5, 2.5, math.inf, math.nan,
          "2", "25%", "0%", "100%", "101%", [1], {"a": 1}]


def model_takes(config: Dict[str, Any]) -> Any:
    try:
        return BackendConfig(**config)
    except ValidationError:
        return None


def settings_take(config: Dict[str, Any]) -> Any:
    try:
        return BackendSettings.check(config)
    except (TypeError, ValueError):
        return None


def same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a)
                      and math.isnan(b))


@pytest.mark.parametrize("name", [n for n in BACKEND_RULES
                                  if n not in ("autoscaling_config", "user_config")])
def test_a_backend_field_is_refused_by_the_controller_as_by_the_model(name: str) -> None:
    for value in PROBES:
        model, settings = model_takes({name: value}), settings_take({name: value})
        assert (model is None) == (settings is None), (name, value, model, settings)
        if model is not None:
            assert same(getattr(model, name), getattr(settings, name)), (name, value)


@pytest.mark.parametrize("name", list(AUTOSCALING_RULES))
def test_an_autoscaling_field_is_refused_by_the_controller_as_by_the_model(name: str) -> None:
    """But for what pydantic converts in its lax mode (a bool or a numeric string for a
    float): a client sends the number it made of it; the controller takes only numbers."""
    for value in PROBES:
        fields = {name: value}
        model = model_takes({"autoscaling_config": fields})
        settings = settings_take({"autoscaling_config": fields})
        converted = AUTOSCALING_RULES[name].kind is float and isinstance(value, (bool, str))
        if converted:
            assert settings is None, (name, value)
            continue
        assert (model is None) == (settings is None), (name, value, model, settings)
        if model is not None:
            assert same(getattr(model.autoscaling_config, name),
                        getattr(settings.autoscaling_config, name)), (name, value)


@pytest.mark.parametrize("config, fragment", [
    ({"num_replicas": 2, "autoscaling_config": {}}, "are both set"),
    ({"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}, "above max_replicas"),
    ({"autoscaling_config": {"max_replicas": 4, "initial_replicas": 5}}, "outside"),
    ({"autoscaling_config": {"max_replicas": 10**9}}, "max_replicas=1000000000 is more than"),
    ({"num_replicas": 10**9}, "num_replicas=1000000000 is more than"),
    ({"autoscaling_config": {"max_replica": 2}}, "no field 'max_replica'"),
    ({"num_replica": 2}, "no field 'num_replica'"),
    ({"autoscaling_config": 3}, "must be a dict"),
    ({"max_surge": "0%"}, "max_surge must be a number of replicas"),
])
def test_a_config_is_refused_by_both_naming_what_is_wrong(config: Dict[str, Any],
                                                         fragment: str) -> None:
    assert model_takes(config) is None
    with pytest.raises((TypeError, ValueError), match=fragment):
        BackendSettings.check(config)


CONFIGS = [
    BackendConfig(),
    BackendConfig(num_replicas=3, max_batch_size=4, batch_wait_timeout=1,
                  user_config={"v": (1, 2)}, max_surge="50%", request_timeout_s=2),
    BackendConfig(autoscaling_config=AutoscalingConfig(min_replicas=0, max_replicas=5,
                                                       target_ongoing_requests=3)),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_what_a_client_sends_is_the_config_it_made(config: BackendConfig) -> None:
    settings = BackendSettings.check(given_fields(config))
    assert set(settings.given) == config.model_fields_set
    assert BackendConfig.model_validate(settings.fields()) == config
    assert settings.describe() == config.model_dump(mode="json", exclude={"user_config"})
    assert settings.replica_settings() == config.replica_settings()
    assert settings.effective_max_concurrent_queries(True) == \
        config.effective_max_concurrent_queries(True)
    assert BackendSettings.check(config) == settings  # (sent as a model, by older clients)


@pytest.mark.parametrize("update", [
    {"num_replicas": 2}, {"autoscaling_config": {"max_replicas": 3}}, {"user_config": 1},
    {"max_surge": 1}])
@pytest.mark.parametrize("config", CONFIGS)
def test_a_merge_is_the_models(config: BackendConfig, update: Dict[str, Any]) -> None:
    merged = BackendSettings.check(given_fields(config)).merged(BackendSettings.check(update))
    assert BackendConfig.model_validate(merged.fields()) == config.merged(update)
