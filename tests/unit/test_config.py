"""Unit tests for servekit.config."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from typing import Any, List

import pytest
from pydantic import ValidationError
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware

from servekit._private import constants
from servekit._private.backend_metadata import BackendMetadata
from servekit._private.config_checks import (
    check_methods,
    check_name,
    check_route,
    checked,
    parse_backend_config,
    parse_http_options,
    validate_actor_options,
    validate_backend_against_config,
)
from servekit._private.deploy.schema import DeployFileError, parse_deploy_dict
from servekit.config import AutoscalingConfig, BackendConfig, DeploymentMode, HTTPOptions


def _mark(func: Any) -> Any:
    """Stand-in for @accept_batch, which lives elsewhere."""
    func._serve_accept_batch = True
    return func


# --- DeploymentMode ---------------------------------------------------------------------------


def test_deployment_mode_members() -> None:
    assert [m.value for m in DeploymentMode] == ["HeadOnly", "EveryNode", "NoServer"]
    assert DeploymentMode("EveryNode") is DeploymentMode.EveryNode
    assert DeploymentMode.NoServer == "NoServer"


# --- HTTPOptions ------------------------------------------------------------------------------


def test_http_options_defaults() -> None:
    options = HTTPOptions()
    assert options.host == "127.0.0.1"
    assert options.port == 8000
    assert options.middlewares == []
    assert options.location is DeploymentMode.HeadOnly


def test_http_options_default_middlewares_are_not_shared() -> None:
    first = HTTPOptions()
    first.middlewares.append(Middleware(GZipMiddleware))
    assert HTTPOptions().middlewares == []


def test_http_options_bound_slow_clients_and_held_bodies_by_default() -> None:
    options = HTTPOptions()
    assert options.client_timeout_s == 10.0
    assert options.max_held_body_bytes == 512 * 1024 * 1024
    with pytest.raises(ValidationError, match="client_timeout_s"):
        HTTPOptions(client_timeout_s=0)


def test_http_options_refuse_a_held_body_budget_below_one_body() -> None:
    with pytest.raises(ValidationError, match="max_held_body_bytes=1000 is below "
                                              "max_body_bytes=2000"):
        HTTPOptions(max_body_bytes=2000, max_held_body_bytes=1000)
    assert HTTPOptions(max_body_bytes=2000, max_held_body_bytes=2000).max_held_body_bytes == 2000


def test_backend_request_timeout_is_a_positive_number_or_none() -> None:
    assert BackendConfig().request_timeout_s is None
    assert BackendConfig(request_timeout_s=2.5).request_timeout_s == 2.5
    for bad in (0, -1, math.inf, True, "5"):
        with pytest.raises(ValidationError, match="request_timeout_s"):
            BackendConfig(request_timeout_s=bad)


@pytest.mark.parametrize("port", [0, 1, 8000, 65535])
def test_http_options_accepts_ports_in_range(port: int) -> None:
    assert HTTPOptions(port=port).port == port


@pytest.mark.parametrize("port", [-1, 65536, True, 80.5, "8000"])
def test_http_options_rejects_bad_ports(port: Any) -> None:
    with pytest.raises(ValidationError, match="port"):
        HTTPOptions(port=port)


def test_http_options_checks_assignment() -> None:
    options = HTTPOptions()
    with pytest.raises(ValidationError, match="port"):
        options.port = 70000
    assert options.port == 8000


def test_http_options_rejects_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="hots"):
        HTTPOptions(hots="0.0.0.0")  # type: ignore[call-arg]


def test_http_options_accepts_middleware_objects() -> None:
    middleware = Middleware(GZipMiddleware, minimum_size=10)
    assert HTTPOptions(middlewares=[middleware]).middlewares == [middleware]


def test_http_options_rejects_a_bare_middleware_class_and_names_it() -> None:
    with pytest.raises(ValidationError) as info:
        HTTPOptions(middlewares=[Middleware(GZipMiddleware), GZipMiddleware])
    message = str(info.value)
    assert "middlewares[1]" in message
    assert "GZipMiddleware" in message
    assert "Middleware(" in message


def test_http_options_without_host_has_no_server() -> None:
    assert HTTPOptions(host=None).location is DeploymentMode.NoServer
    assert HTTPOptions(host=None, location=DeploymentMode.EveryNode).location is (
        DeploymentMode.NoServer
    )


def test_http_options_location_none_means_no_server() -> None:
    options = HTTPOptions(location=None)
    assert options.location is DeploymentMode.NoServer
    assert options.host == "127.0.0.1"


def test_http_options_assigning_host_none_switches_to_no_server() -> None:
    options = HTTPOptions()
    options.host = None
    assert options.location is DeploymentMode.NoServer


def test_http_options_location_from_string() -> None:
    assert HTTPOptions(location="EveryNode").location is DeploymentMode.EveryNode  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="location"):
        HTTPOptions(location="Everywhere")  # type: ignore[arg-type]


# --- BackendConfig ----------------------------------------------------------------------------


def test_backend_config_defaults() -> None:
    config = BackendConfig()
    assert config.num_replicas == 1
    assert config.max_batch_size is None
    assert config.batch_wait_timeout == 0.0
    assert config.max_concurrent_queries is None
    assert config.user_config is None
    assert config.experimental_graceful_shutdown_wait_loop_s == 2.0
    assert config.experimental_graceful_shutdown_timeout_s == 20.0


def test_backend_config_fields_have_one_line_descriptions() -> None:
    for name, field in BackendConfig.model_fields.items():
        assert field.description, name
        assert "\n" not in field.description, name


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_replicas", 1),
        ("num_replicas", 10),
        ("max_batch_size", 1),
        ("max_batch_size", None),
        ("batch_wait_timeout", 0),
        ("batch_wait_timeout", 0.5),
        ("max_concurrent_queries", 1),
        ("max_concurrent_queries", None),
        ("experimental_graceful_shutdown_wait_loop_s", 0.1),
        ("experimental_graceful_shutdown_timeout_s", 0),
        ("experimental_graceful_shutdown_timeout_s", 5.5),
    ],
)
def test_backend_config_accepts_valid_values(field: str, value: Any) -> None:
    assert getattr(BackendConfig.model_validate({field: value}), field) == value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_replicas", 0),
        ("num_replicas", -1),
        ("num_replicas", 1.5),
        ("num_replicas", 2.0),
        ("num_replicas", "2"),
        ("max_batch_size", 0),
        ("max_batch_size", 2.5),
        ("batch_wait_timeout", -0.1),
        ("batch_wait_timeout", math.nan),
        ("batch_wait_timeout", "1"),
        ("max_concurrent_queries", 0),
        ("experimental_graceful_shutdown_wait_loop_s", 0),
        ("experimental_graceful_shutdown_wait_loop_s", -1.0),
        ("experimental_graceful_shutdown_timeout_s", -0.5),
    ],
)
def test_backend_config_rejects_invalid_values(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=field):
        BackendConfig.model_validate({field: value})


@pytest.mark.parametrize(
    "field",
    [
        "num_replicas",
        "max_batch_size",
        "batch_wait_timeout",
        "max_concurrent_queries",
        "experimental_graceful_shutdown_wait_loop_s",
        "experimental_graceful_shutdown_timeout_s",
    ],
)
def test_backend_config_rejects_bools_for_numbers(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        BackendConfig.model_validate({field: True})


def test_backend_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="num_replica"):
        BackendConfig.model_validate({"num_replica": 2})


def test_backend_config_checks_assignment() -> None:
    config = BackendConfig()
    with pytest.raises(ValidationError, match="num_replicas"):
        config.num_replicas = 0
    assert config.num_replicas == 1


def test_backend_config_user_config_takes_anything() -> None:
    value = object()
    assert BackendConfig(user_config=value).user_config is value


# --- BackendConfig.merged ---------------------------------------------------------------------


def test_merged_applies_only_explicitly_set_fields_of_a_config() -> None:
    base = BackendConfig(num_replicas=3, max_batch_size=4)
    result = base.merged(BackendConfig(batch_wait_timeout=0.5))
    assert result.num_replicas == 3
    assert result.max_batch_size == 4
    assert result.batch_wait_timeout == 0.5


def test_merged_applies_an_explicit_value_equal_to_the_default() -> None:
    base = BackendConfig(num_replicas=3)
    assert base.merged(BackendConfig(num_replicas=1)).num_replicas == 1
    assert base.merged({"max_batch_size": None}).num_replicas == 3


def test_merged_accepts_a_dict() -> None:
    base = BackendConfig(num_replicas=3, user_config={"a": 1})
    result = base.merged({"max_concurrent_queries": 5})
    assert result.num_replicas == 3
    assert result.user_config == {"a": 1}
    assert result.max_concurrent_queries == 5


def test_merged_returns_a_new_config_and_leaves_both_inputs_alone() -> None:
    base = BackendConfig(num_replicas=3)
    update = BackendConfig(num_replicas=5)
    result = base.merged(update)
    assert result is not base and result is not update
    assert base.num_replicas == 3
    assert update.num_replicas == 5
    assert result.num_replicas == 5


def test_merged_tracks_set_fields_of_both_sides() -> None:
    result = BackendConfig(num_replicas=3).merged({"max_batch_size": 2})
    assert result.model_fields_set == {"num_replicas", "max_batch_size"}


def test_merged_validates_a_dict() -> None:
    base = BackendConfig()
    with pytest.raises(ValidationError, match="replicas"):
        base.merged({"replicas": 2})
    with pytest.raises(ValidationError, match="num_replicas"):
        base.merged({"num_replicas": 0})


@pytest.mark.parametrize("update", [None, 3, [("num_replicas", 2)], "num_replicas=2"])
def test_merged_rejects_other_types(update: Any) -> None:
    with pytest.raises(TypeError) as info:
        BackendConfig().merged(update)
    assert str(info.value) == (
        f"config_options must be a BackendConfig or a dict, got {type(update).__name__} {update!r}."
    )



# --- the bound on replicas ----------------------------------------------------------------------


@pytest.mark.parametrize("build", [
    lambda n: BackendConfig(num_replicas=n),
    lambda n: BackendConfig.model_validate({"num_replicas": n}),
    lambda n: BackendConfig().merged({"num_replicas": n}),
    lambda n: BackendConfig(autoscaling_config={"max_replicas": n}),
    lambda n: BackendConfig(autoscaling_config={"min_replicas": n, "max_replicas": n}),
], ids=["num_replicas", "dict", "merged", "max_replicas", "min_replicas"])
def test_replicas_above_the_bound_are_refused_naming_value_and_bound(build: Any) -> None:
    with pytest.raises(ValidationError) as excinfo:
        build(10**9)
    message = str(excinfo.value)
    assert "1000000000" in message and f"{constants.MAX_REPLICAS_PER_BACKEND}" in message
    assert "SERVEKIT_MAX_REPLICAS_PER_BACKEND" in message
    build(constants.MAX_REPLICAS_PER_BACKEND)  # the bound itself is allowed


@pytest.mark.parametrize("scaling", [
    {"max_replicas": 10**9},
    {"min_replicas": 10**9, "max_replicas": 10**9, "initial_replicas": 10**9},
], ids=["max_replicas", "initial_replicas"])
def test_an_unchecked_autoscaling_config_is_checked_again(scaling: dict) -> None:
    """As the controller checks a config that did not come through a Client's checks (one
    unpickled from another client's call): its autoscaling bounds are checked too (found
    by the simulator: max_replicas=10**9 was taken and started replicas without end)."""
    config = BackendConfig.model_construct(
        autoscaling_config=AutoscalingConfig.model_construct(**scaling))
    with pytest.raises(ValidationError, match="autoscaling_config"):
        config.merged({})
    with pytest.raises(ValidationError, match="autoscaling_config"):
        BackendConfig(num_replicas=2).merged(config)


def test_the_bound_on_replicas_is_read_from_the_environment() -> None:
    program = ("from servekit.config import BackendConfig\n"
               "BackendConfig(num_replicas=3)\n"
               "BackendConfig(num_replicas=4)\n")
    env = {**os.environ, "SERVEKIT_MAX_REPLICAS_PER_BACKEND": "3"}
    result = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "num_replicas=4 is more than the 3 replicas" in result.stderr
    env["SERVEKIT_MAX_REPLICAS_PER_BACKEND"] = "lots"
    result = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                            text=True, timeout=60)
    assert "SERVEKIT_MAX_REPLICAS_PER_BACKEND='lots' is not an integer" in result.stderr


# --- effective_max_concurrent_queries ---------------------------------------------------------


def test_effective_max_concurrent_queries_uses_the_explicit_value() -> None:
    config = BackendConfig(max_concurrent_queries=3, max_batch_size=10)
    assert config.effective_max_concurrent_queries(is_async=True) == 3
    assert config.effective_max_concurrent_queries(is_async=False) == 3


def test_effective_max_concurrent_queries_defaults() -> None:
    assert BackendConfig().effective_max_concurrent_queries(is_async=True) == 100
    assert BackendConfig().effective_max_concurrent_queries(is_async=False) == 8


def test_effective_max_concurrent_queries_sync_batching() -> None:
    assert BackendConfig(max_batch_size=5).effective_max_concurrent_queries(is_async=False) == 10
    assert BackendConfig(max_batch_size=1).effective_max_concurrent_queries(is_async=False) == 8
    assert BackendConfig(max_batch_size=5).effective_max_concurrent_queries(is_async=True) == 100


# --- parse_backend_config / parse_http_options ------------------------------------------------


def test_parse_backend_config_none_gives_defaults() -> None:
    assert parse_backend_config(None) == BackendConfig()


def test_parse_backend_config_validates_a_dict() -> None:
    assert parse_backend_config({"num_replicas": 2}).num_replicas == 2
    with pytest.raises(ValidationError, match="bogus"):
        parse_backend_config({"bogus": 1})
    with pytest.raises(ValidationError, match="num_replicas"):
        parse_backend_config({"num_replicas": -1})


def test_parse_backend_config_copies_a_config() -> None:
    original = BackendConfig(num_replicas=2)
    copy = parse_backend_config(original)
    assert copy == original
    assert copy is not original
    assert copy.model_fields_set == {"num_replicas"}
    copy.num_replicas = 4
    assert original.num_replicas == 2


@pytest.mark.parametrize("config", [3, "num_replicas=2", [], HTTPOptions()])
def test_parse_backend_config_rejects_other_types(config: Any) -> None:
    with pytest.raises(TypeError) as info:
        parse_backend_config(config)
    assert str(info.value) == (
        f"config must be a BackendConfig or a dict, got {type(config).__name__} {config!r}."
    )


def test_parse_http_options_none_gives_defaults() -> None:
    assert parse_http_options(None) == HTTPOptions()


def test_parse_http_options_validates_a_dict() -> None:
    options = parse_http_options({"host": None, "port": 0})
    assert options.port == 0
    assert options.location is DeploymentMode.NoServer
    with pytest.raises(ValidationError, match="prot"):
        parse_http_options({"prot": 80})


def test_parse_http_options_copies_options() -> None:
    original = HTTPOptions(port=9000, middlewares=[Middleware(GZipMiddleware)])
    copy = parse_http_options(original)
    assert copy == original
    assert copy is not original
    copy.middlewares.append(Middleware(GZipMiddleware))
    copy.port = 9001
    assert len(original.middlewares) == 1
    assert original.port == 9000


@pytest.mark.parametrize("options", [8000, "127.0.0.1:8000", BackendConfig()])
def test_parse_http_options_rejects_other_types(options: Any) -> None:
    with pytest.raises(TypeError) as info:
        parse_http_options(options)
    assert str(info.value) == (
        f"http_options must be an HTTPOptions or a dict, got {type(options).__name__} {options!r}."
    )


# --- validate_actor_options -------------------------------------------------------------------


def test_actor_options_none_gives_an_empty_dict() -> None:
    assert validate_actor_options(None) == {}


@pytest.mark.parametrize("options", [[("num_cpus", 1)], "num_cpus=1", 1])
def test_actor_options_must_be_a_dict(options: Any) -> None:
    with pytest.raises(TypeError) as info:
        validate_actor_options(options)
    assert str(info.value) == (
        f"ray_actor_options must be a dict, got {type(options).__name__} {options!r}.")


def test_actor_options_accepts_every_allowed_key() -> None:
    options = {
        "num_cpus": 0.5,
        "num_gpus": 1,
        "memory": 2**30,
        "object_store_memory": 0,
        "resources": {"custom": 2, "other": 0.5},
        "accelerator_type": "V100",
        "runtime_env": {"env_vars": {"A": "1"}},
    }
    assert validate_actor_options(options) == options


def test_actor_options_returns_a_copy() -> None:
    options: dict[str, Any] = {"num_cpus": 1, "resources": {"custom": 1}}
    result = validate_actor_options(options)
    assert result is not options
    assert result["resources"] is not options["resources"]
    result["num_gpus"] = 1
    result["resources"]["more"] = 1
    assert options == {"num_cpus": 1, "resources": {"custom": 1}}


@pytest.mark.parametrize("key", ["lifetime", "name", "max_restarts"])
def test_actor_options_rejects_options_servekit_manages(key: str) -> None:
    with pytest.raises(ValueError, match="manages") as info:
        validate_actor_options({key: "x"})
    assert repr(key) in str(info.value)


def test_actor_options_rejects_unknown_keys_and_lists_allowed_ones() -> None:
    with pytest.raises(ValueError) as info:
        validate_actor_options({"num_cpu": 1})
    message = str(info.value)
    assert "'num_cpu'" in message
    for allowed in ("num_cpus", "num_gpus", "memory", "object_store_memory", "resources"):
        assert allowed in message
    assert "accelerator_type" in message and "runtime_env" in message


@pytest.mark.parametrize("key", ["num_cpus", "num_gpus", "memory", "object_store_memory"])
@pytest.mark.parametrize("value", [True, "1", None, [1]])
def test_actor_options_numbers_must_be_int_or_float(key: str, value: Any) -> None:
    with pytest.raises(TypeError) as info:
        validate_actor_options({key: value})
    assert key in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("key", ["num_cpus", "num_gpus", "memory", "object_store_memory"])
@pytest.mark.parametrize("value", [-1, -0.5, math.nan])
def test_actor_options_numbers_must_not_be_negative(key: str, value: float) -> None:
    with pytest.raises(ValueError) as info:
        validate_actor_options({key: value})
    assert key in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("resources", [["custom"], "custom", 1])
def test_actor_options_resources_must_be_a_dict(resources: Any) -> None:
    with pytest.raises(TypeError, match="resources"):
        validate_actor_options({"resources": resources})


@pytest.mark.parametrize("amount", ["2", True, None])
def test_actor_options_resource_amounts_must_be_numbers(amount: Any) -> None:
    with pytest.raises(TypeError, match="'custom'"):
        validate_actor_options({"resources": {"custom": amount}})


def test_actor_options_resource_amounts_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match=r"'custom'.*-1"):
        validate_actor_options({"resources": {"custom": -1}})


def test_actor_options_resource_names_must_be_strings() -> None:
    with pytest.raises(TypeError, match="resource names"):
        validate_actor_options({"resources": {1: 1}})


# --- BackendMetadata --------------------------------------------------------------------------


def test_metadata_of_a_sync_function() -> None:
    def handler(request: Any) -> str:
        return "ok"

    metadata = BackendMetadata.inspect(handler)
    assert metadata.is_class is False
    assert metadata.is_async is False
    assert metadata.accepts_batches is False
    assert metadata.batch_methods == frozenset()
    assert metadata.has_reconfigure is False
    assert metadata.methods == ()
    assert metadata.name == "handler"


def test_metadata_of_an_async_function() -> None:
    async def handler(request: Any) -> str:
        return "ok"

    metadata = BackendMetadata.inspect(handler)
    assert metadata.is_class is False
    assert metadata.is_async is True
    assert metadata.accepts_batches is False


def test_metadata_of_a_marked_function() -> None:
    @_mark
    def handler(requests: list[Any]) -> list[str]:
        return ["ok"] * len(requests)

    metadata = BackendMetadata.inspect(handler)
    assert metadata.accepts_batches is True
    assert metadata.batch_methods == frozenset({"__call__"})


def test_metadata_ignores_a_marker_that_is_not_true() -> None:
    def handler(request: Any) -> None:
        return None

    handler._serve_accept_batch = False  # type: ignore[attr-defined]
    assert BackendMetadata.inspect(handler).accepts_batches is False


def test_metadata_of_a_class_with_sync_call() -> None:
    class Model:
        def __init__(self) -> None:
            self.ready = True

        def __call__(self, request: Any) -> str:
            return "ok"

        def predict(self, request: Any) -> str:
            return "ok"

        def _helper(self) -> None:
            return None

    metadata = BackendMetadata.inspect(Model)
    assert metadata.is_class is True
    assert metadata.is_async is False
    assert metadata.accepts_batches is False
    assert metadata.batch_methods == frozenset()
    assert metadata.has_reconfigure is False
    assert metadata.methods == ("__call__", "predict")
    assert metadata.name == "Model"


def test_metadata_of_a_class_with_async_call() -> None:
    class Model:
        async def __call__(self, request: Any) -> str:
            return "ok"

    metadata = BackendMetadata.inspect(Model)
    assert metadata.is_class is True
    assert metadata.is_async is True
    assert metadata.methods == ("__call__",)


def test_metadata_of_a_class_without_call() -> None:
    class Model:
        async def predict(self, request: Any) -> str:
            return "ok"

    metadata = BackendMetadata.inspect(Model)
    assert metadata.is_async is False
    assert metadata.accepts_batches is False
    assert metadata.methods == ("predict",)


def test_metadata_of_a_class_with_marked_methods() -> None:
    class Model:
        @_mark
        def __call__(self, requests: list[Any]) -> list[str]:
            return ["ok"] * len(requests)

        @_mark
        async def predict(self, requests: list[Any]) -> list[str]:
            return ["ok"] * len(requests)

        def other(self, request: Any) -> str:
            return "ok"

    metadata = BackendMetadata.inspect(Model)
    assert metadata.accepts_batches is True
    assert metadata.batch_methods == frozenset({"__call__", "predict"})


def test_metadata_of_a_class_with_only_a_marked_method() -> None:
    class Model:
        def __call__(self, request: Any) -> str:
            return "ok"

        @_mark
        def predict(self, requests: list[Any]) -> list[str]:
            return ["ok"] * len(requests)

    metadata = BackendMetadata.inspect(Model)
    assert metadata.accepts_batches is False
    assert metadata.batch_methods == frozenset({"predict"})


def test_metadata_lists_inherited_static_and_class_methods_but_not_other_attributes() -> None:
    class Base:
        def reconfigure(self, user_config: Any) -> None:
            return None

        def inherited(self) -> None:
            return None

    class Model(Base):
        limit = 3

        class Nested:
            pass

        @property
        def size(self) -> int:
            return 1

        @staticmethod
        @_mark
        def static(requests: list[Any]) -> list[Any]:
            return requests

        @classmethod
        def build(cls) -> Model:
            return cls()

    metadata = BackendMetadata.inspect(Model)
    assert metadata.has_reconfigure is True
    # reconfigure (and check_health) are servekit's hooks, not methods requests may call.
    assert metadata.methods == ("build", "inherited", "static")
    assert metadata.batch_methods == frozenset({"static"})


def test_metadata_is_frozen() -> None:
    metadata = BackendMetadata.inspect(lambda request: request)
    with pytest.raises(dataclasses.FrozenInstanceError):
        metadata.is_async = True  # type: ignore[misc]


def test_metadata_rejects_something_not_callable() -> None:
    with pytest.raises(TypeError, match="42"):
        BackendMetadata.inspect(42)


# --- validate_backend_against_config ----------------------------------------------------------


def _plain(request: Any) -> str:
    return "ok"


class _Reconfigurable:
    def __call__(self, request: Any) -> str:
        return "ok"

    def reconfigure(self, user_config: Any) -> None:
        self.user_config = user_config


class _Plain:
    def __call__(self, request: Any) -> str:
        return "ok"


def test_batching_needs_a_callable_that_accepts_batches() -> None:
    metadata = BackendMetadata.inspect(_plain)
    with pytest.raises(ValueError) as info:
        validate_backend_against_config(metadata, BackendConfig(max_batch_size=4))
    assert str(info.value) == (
        "max_batch_size is 4 but the backend's callable does not accept batches. "
        "Mark it with @serve.accept_batch, or set max_batch_size to 1."
    )


@pytest.mark.parametrize("max_batch_size", [None, 1])
def test_no_batching_needs_no_marker(max_batch_size: int | None) -> None:
    metadata = BackendMetadata.inspect(_plain)
    validate_backend_against_config(metadata, BackendConfig(max_batch_size=max_batch_size))


def test_batching_is_fine_with_a_marked_callable_or_method() -> None:
    config = BackendConfig(max_batch_size=4)
    validate_backend_against_config(
        BackendMetadata.inspect(_mark(lambda requests: requests)), config
    )

    class Model:
        def __call__(self, request: Any) -> str:
            return "ok"

        @_mark
        def predict(self, requests: list[Any]) -> list[Any]:
            return requests

    validate_backend_against_config(BackendMetadata.inspect(Model), config)


def test_user_config_needs_a_class() -> None:
    with pytest.raises(ValueError) as info:
        validate_backend_against_config(
            BackendMetadata.inspect(_plain), BackendConfig(user_config={"a": 1})
        )
    assert str(info.value) == (
        "user_config needs a class backend with a reconfigure(user_config) method; got a function."
    )


def test_user_config_needs_a_reconfigure_method() -> None:
    with pytest.raises(ValueError) as info:
        validate_backend_against_config(
            BackendMetadata.inspect(_Plain), BackendConfig(user_config={"a": 1})
        )
    assert str(info.value) == (
        "user_config is set but the backend class _Plain has no reconfigure(user_config) "
        "method. Add one, or drop user_config."
    )


def test_user_config_with_reconfigure_is_fine() -> None:
    validate_backend_against_config(
        BackendMetadata.inspect(_Reconfigurable), BackendConfig(user_config={"a": 1})
    )


def test_no_user_config_needs_no_reconfigure() -> None:
    validate_backend_against_config(BackendMetadata.inspect(_plain), BackendConfig())
    validate_backend_against_config(BackendMetadata.inspect(_Plain), BackendConfig())


@pytest.mark.parametrize("value", [0, -1, 65, "2", 1.5])
def test_num_proxies_is_an_int_from_1_to_64(value: Any) -> None:
    with pytest.raises(ValidationError, match="num_proxies"):
        HTTPOptions(num_proxies=value)
    assert HTTPOptions().num_proxies == 1 and HTTPOptions(num_proxies=4).num_proxies == 4


class LibraryModel(json.JSONEncoder):
    """A backend built on a class from another package (as models build on
    torch.nn.Module): its inherited methods are not the user's."""

    def predict(self, request: Any) -> str:
        return "predicted"


class ListedModel(json.JSONEncoder):
    serve_methods = ("encode",)

    def predict(self, request: Any) -> str:
        return "predicted"


def test_methods_inherited_from_another_package_are_not_callable() -> None:
    assert BackendMetadata.inspect(LibraryModel).methods == ("predict",)


def test_inherited_methods_listed_in_serve_methods_are_callable() -> None:
    assert BackendMetadata.inspect(ListedModel).methods == ("encode", "predict")


@pytest.mark.parametrize("listed", ["encode", ("missing",), ("_private",), (3,)])
def test_serve_methods_must_name_public_methods(listed: Any) -> None:
    bad = type("Bad", (json.JSONEncoder,), {"serve_methods": listed})
    with pytest.raises(TypeError, match="Bad.serve_methods"):
        BackendMetadata.inspect(bad)


# --- names, routes and methods ------------------------------------------------------------------


@pytest.mark.parametrize("value, error, fragments", [
    ("", TypeError, ["backend_tag must be a non-empty str", "''"]),
    (7, TypeError, ["backend_tag", "7"]),
    ("a\nb", ValueError, ["backend_tag 'a\\nb'", "'\\n'", "not a printable character",
                          "use letters"]),
    ("tab\there", ValueError, ["'\\t'"]),
    ("zero\u200bwidth", ValueError, ["'\\u200b'"]),
    ("x" * 129, ValueError, ["longer than 128 characters", "(129 characters)",
                             "use a shorter name"]),
], ids=["empty", "int", "newline", "tab", "zero-width-space", "too-long"])
def test_bad_names_are_refused_naming_them(value: Any, error: type,
                                           fragments: List[str]) -> None:
    with pytest.raises(error) as excinfo:
        checked("backend_tag", check_name, value)
    for fragment in fragments:
        assert fragment in str(excinfo.value), str(excinfo.value)


@pytest.mark.parametrize("value", ["m", "clf:v1", "my model #2", "/weird/but/printable",
                                   "é" * 128])
def test_good_names_are_accepted(value: str) -> None:
    assert check_name(value) == value


@pytest.mark.parametrize("route, error, fragment", [
    (5, TypeError, "route must be a string starting with '/', got 5"),
    ("api", TypeError, "route 'api' must start with '/'"),
    ("/-/routes", ValueError, "route '/-/routes' is reserved"),
    ("/a/../b", ValueError, "route '/a/../b' has a '.' or '..' segment"),
    ("/a/./b", ValueError, "'.' or '..' segment"),
    ("/a/..", ValueError, "'.' or '..' segment"),
    ("/.", ValueError, "'.' or '..' segment"),
    ("/a%2Fb", ValueError, "route '/a%2Fb' contains '%'"),
    ("/search?q=1", ValueError, "contains '?'"),
    ("/page#top", ValueError, "contains '#'"),
    ("/a b", ValueError, "contains ' '"),
    ("/a\tb", ValueError, "contains '\\t'"),
    ("/a\r\nX-Injected: 1", ValueError, "contains '\\r'"),
    ("/\x00", ValueError, "contains '\\x00'"),
    ("/" + "a" * 1024, ValueError, "longer than 1024 characters"),
], ids=["int", "no-slash", "reserved", "dot-dot", "dot", "trailing-dot-dot", "root-dot",
        "percent", "query", "fragment", "space", "tab", "crlf", "nul", "too-long"])
def test_bad_routes_are_refused_naming_them(route: Any, error: type, fragment: str) -> None:
    with pytest.raises(error) as excinfo:
        checked("route", check_route, route)
    assert fragment in str(excinfo.value), str(excinfo.value)


@pytest.mark.parametrize("route", ["/", "/api", "/api/v1/", "/a.b/c..d/.hidden",
                                   "/café", "/a:b@c!$&'()*+,;=-_~"])
def test_good_routes_are_accepted(route: str) -> None:
    assert check_route(route) == route


@pytest.mark.parametrize("methods, error, fragment", [
    ("GET", TypeError, "methods must be a non-empty list of strings, got 'GET'"),
    ([], TypeError, "got []"),
    (["GET", 1], TypeError, "but 1 is int"),
    (["GE T"], ValueError, "methods holds 'GE T', which is not an HTTP method name"),
    (["GET\r\n"], ValueError, "'GET\\r\\n'"),
    ([""], ValueError, "holds ''"),
    (["X" * 33], ValueError, "at most 32"),
], ids=["str", "empty", "int", "space", "crlf", "empty-name", "too-long"])
def test_bad_methods_are_refused_naming_them(methods: Any, error: type,
                                             fragment: str) -> None:
    with pytest.raises(error) as excinfo:
        checked("methods", check_methods, methods)
    assert fragment in str(excinfo.value), str(excinfo.value)


def test_methods_are_upper_cased_sorted_and_once_each() -> None:
    assert check_methods(["post", "GET", "get", "M-SEARCH"]) == ["GET", "M-SEARCH", "POST"]


def test_deploy_files_are_held_to_the_same_checks(tmp_path: Any) -> None:
    with pytest.raises(DeployFileError) as excinfo:
        parse_deploy_dict({
            "backends": [{"name": "bad\nname", "import_path": "m:X"}],
            "endpoints": [
                {"name": "e", "route": "/a/../b", "traffic": {"x": 1}},
                {"name": "f", "route": "/f", "methods": ["GE T"], "traffic": {"x": 1}},
                {"name": "g\x00", "route": "/g", "traffic": {"x": 1}},
                {"name": "h", "route": "/h?x", "traffic": {"x": 1}},
            ]}, str(tmp_path))
    errors = excinfo.value.errors
    assert errors == [
        "backends[0].name: 'bad\\nname' contains '\\n', which is not a printable character; "
        "use letters, digits, spaces and punctuation",
        "endpoints[0].route: '/a/../b' has a '.' or '..' segment, which clients resolve away "
        "before they send a request; give the path without it",
        "endpoints[1].methods: holds 'GE T', which is not an HTTP method name; use names such "
        "as 'GET' or 'POST' (letters, digits and !#$%&'*+-.^_`|~, at most 32)",
        "endpoints[2].name: 'g\\x00' contains '\\x00', which is not a printable character; "
        "use letters, digits, spaces and punctuation",
        "endpoints[3].route: '/h?x' contains '?', which a route cannot hold: a route is a "
        "plain path (no query '?', fragment '#', percent-escape '%', whitespace or control "
        "character); give it decoded, without them",
    ]


@pytest.mark.parametrize("value", [1, 5, "1%", "25%", "100%"])
def test_max_surge_is_a_count_or_a_percentage(value: Any) -> None:
    assert BackendConfig(max_surge=value).max_surge == value
    assert BackendConfig().max_surge == "25%"


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "0%", "101%", "25", "x%", None])
def test_max_surge_refuses_anything_else_naming_the_value_and_the_forms(value: Any) -> None:
    with pytest.raises(ValidationError, match=r"max_surge must be a number of replicas .*"
                                              r"got .*max_surge=\"50%\""):
        BackendConfig(max_surge=value)
