"""The Client API against a real instance: backends, endpoints, handles, replica context.

Every test uses the module's instance (``serve_instance``), emptied after each test. Checks
that a failed call left nothing behind compare the instance's processes (descendants of the
controller pid) before and after.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import warnings
from typing import Any, Callable, Dict, List, Sequence, Tuple

import httpx
import pytest
from backends_for_tests import (
    ConstructorError,
    ContextReporter,
    Echo,
    FailingConstructor,
    ReplicaRecorder,
    call_other_endpoint,
    call_other_endpoint_async,
    connect_and_describe,
    echo_function,
)
from processes import descendants, start_time
from pydantic import ValidationError

import servekit as serve
from conftest import BOTH_RUNTIMES, free_port, wait_for
from servekit.exceptions import RemoteTraceback

pytestmark = pytest.mark.integration
RUNTIMES = BOTH_RUNTIMES


# ---------------------------------------------------------------- helpers


def instance_processes(client: serve.Client) -> List[int]:
    """The pids of the instance's live workers other than the controller (proxy and
    replicas): the supervisor's descendants when embedded; on Ray, whose raylets are their
    parents, those the status lists."""
    supervisor = getattr(client._instance, "pid", None)
    if supervisor is not None:
        return sorted(descendants(supervisor))
    pids = [p["pid"] for p in client._call("status")["processes"]
            if p["role"] in ("proxy", "replica")]
    return sorted(pid for pid in pids if start_time(pid) is not None)


def assert_names(error: BaseException, fragments: Sequence[str]) -> None:
    message = str(error)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} is not named in the error: {message!r}"


def get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, timeout=10, **kwargs)


def serve_echo(client: serve.Client, name: str = "echo", prefix: str = "echo",
               route: Any = "_default") -> None:
    client.create_backend(name, Echo, prefix)
    client.create_endpoint(name, backend=name, route=f"/{name}" if route == "_default" else route)


def recorded_replicas(directory: str) -> Dict[str, int]:
    """replica tag -> pid of every ReplicaRecorder constructed with ``directory``."""
    result = {}
    for name in os.listdir(directory):
        if not name.endswith(".tmp"):
            with open(os.path.join(directory, name)) as f:
                result[name] = int(f.read())
    return result


# ---------------------------------------------------------------- create_backend


def test_create_backend_from_function(serve_instance: tuple) -> None:
    client, url = serve_instance
    client.create_backend("fn", echo_function)
    client.create_endpoint("fn", backend="fn", route="/fn")

    backends = client.list_backends()
    assert list(backends) == ["fn"]
    assert isinstance(backends["fn"], serve.BackendConfig)
    assert client.get_handle("fn").remote("a").result(timeout=10) == "function:a"
    assert get(f"{url}/fn", params={"x": "b"}).text == "function:b"


def test_create_backend_from_class_with_init_args(serve_instance: tuple) -> None:
    client, url = serve_instance
    client.create_backend("cls", Echo, "greeting")
    client.create_endpoint("cls", backend="cls", route="/cls")

    assert client.get_handle("cls").remote("a").result(timeout=10) == "greeting:a"
    assert get(f"{url}/cls", params={"x": "b"}).text == "greeting:b"


@pytest.mark.parametrize("import_path, init_args, expected", [
    ("backends_for_tests:Echo", ("colon",), "colon:a"),
    ("backends_for_tests.Echo", ("dot",), "dot:a"),
    ("backends_for_tests:echo_function", (), "function:a"),
    ("backends_for_tests.echo_function", (), "function:a"),
])
def test_create_backend_from_import_path(serve_instance: tuple, import_path: str,
                                         init_args: tuple, expected: str) -> None:
    client, url = serve_instance
    client.create_backend("imported", import_path, *init_args)
    client.create_endpoint("imported", backend="imported", route="/imported")

    assert client.get_handle("imported").remote("a").result(timeout=10) == expected
    assert get(f"{url}/imported", params={"x": "a"}).text == expected


@pytest.mark.parametrize("import_path, error", [
    ("backends_for_tests:NoSuchBackend", ImportError),
    ("backends_for_tests.NoSuchBackend", ImportError),
    ("no_such_module_for_servekit_tests:Echo", ImportError),
    ("nodotsnocolon", ValueError),
])
def test_import_path_that_does_not_resolve_is_an_error_and_frees_the_tag(
        serve_instance: tuple, import_path: str, error: type) -> None:
    client, _ = serve_instance
    before = instance_processes(client)

    with pytest.raises(error) as excinfo:
        client.create_backend("imported", import_path)

    assert_names(excinfo.value, [import_path])
    assert "imported" not in client.list_backends()
    assert instance_processes(client) == before
    client.create_backend("imported", "backends_for_tests:Echo", "again")
    client.create_endpoint("imported", backend="imported")
    assert client.get_handle("imported").remote("a").result(timeout=10) == "again:a"


def test_create_backend_returns_once_every_constructor_finished(serve_instance: tuple,
                                                                tmp_path: Any) -> None:
    client, _ = serve_instance
    client.create_backend("slow", ReplicaRecorder, str(tmp_path), 0.5,
                          config={"num_replicas": 2})

    # No waiting: both (slow) constructors ran to their end before the call returned.
    replicas = recorded_replicas(str(tmp_path))
    assert len(replicas) == 2
    assert all(tag.startswith("slow#") for tag in replicas)
    assert all(start_time(pid) is not None for pid in replicas.values())
    assert set(replicas.values()) <= set(instance_processes(client))


def test_constructor_error_is_raised_with_its_type_message_and_remote_traceback(
        serve_instance: tuple) -> None:
    client, _ = serve_instance
    before = instance_processes(client)

    with pytest.raises(ConstructorError, match="weights file missing: model-42.bin") \
            as excinfo:
        client.create_backend("broken", FailingConstructor, "weights file missing: model-42.bin")

    cause = excinfo.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "FailingConstructor" in str(cause) or "raise ConstructorError" in str(cause)
    assert "broken" not in client.list_backends()
    assert instance_processes(client) == before
    # The tag is free again.
    client.create_backend("broken", Echo, "fixed")
    client.create_endpoint("broken", backend="broken")
    assert client.get_handle("broken").remote("a").result(timeout=10) == "fixed:a"


def test_duplicate_backend_tag_is_a_value_error(serve_instance: tuple) -> None:
    client, _ = serve_instance
    serve_echo(client, "dup", prefix="first")
    before = instance_processes(client)

    with pytest.raises(ValueError) as excinfo:
        client.create_backend("dup", Echo, "second")

    assert_names(excinfo.value, ["'dup'"])
    assert instance_processes(client) == before
    assert client.get_handle("dup").remote("a").result(timeout=10) == "first:a"


class NotABackend:
    def __repr__(self) -> str:
        return "<NotABackend instance>"


@pytest.mark.parametrize("args, kwargs, error, fragments", [
    (("", echo_function), {}, TypeError, ["backend_tag", "''"]),
    ((7, echo_function), {}, TypeError, ["backend_tag", "7"]),
    (("bad", 42), {}, TypeError, ["42"]),
    (("bad", NotABackend()), {}, TypeError, ["<NotABackend instance>"]),
    (("bad", echo_function, "unexpected-init-arg"), {}, ValueError, ["'unexpected-init-arg'"]),
    (("bad", echo_function), {"env": "python3.11"}, TypeError, ["env", "'python3.11'"]),
    (("bad\ttag", echo_function), {}, ValueError,
     ["backend_tag 'bad\\ttag'", "'\\t'", "not a printable character"]),
    (("m" * 300, echo_function), {}, ValueError,
     ["backend_tag", "(300 characters)", "longer than 128"]),
], ids=["empty-tag", "int-tag", "int-backend", "instance-backend", "function-with-init-args",
        "env-not-an-environment", "control-character-in-tag", "overlong-tag"])
def test_create_backend_rejects_bad_arguments(serve_instance: tuple, args: tuple, kwargs: dict,
                                              error: type, fragments: List[str]) -> None:
    client, _ = serve_instance
    before = instance_processes(client)

    with pytest.raises(error) as excinfo:
        client.create_backend(*args, **kwargs)

    assert_names(excinfo.value, fragments)
    assert client.list_backends() == {}
    assert instance_processes(client) == before


@pytest.mark.parametrize("options, error, fragments", [
    ({"num_cpus": "2"}, TypeError, ["num_cpus", "'2'"]),
    ({"num_cpus": True}, TypeError, ["num_cpus", "True"]),
    ({"num_cpus": -1}, ValueError, ["num_cpus", "-1"]),
    ({"num_cpus": float("nan")}, ValueError, ["num_cpus", "nan"]),
    ({"num_gpus": None}, TypeError, ["num_gpus", "None"]),
    ({"num_gpus": -0.5}, ValueError, ["num_gpus", "-0.5"]),
    ({"memory": "1GB"}, TypeError, ["memory", "'1GB'"]),
    ({"memory": -1024}, ValueError, ["memory", "-1024"]),
    ({"resources": ["custom"]}, TypeError, ["resources", "['custom']"]),
    ({"resources": {"custom": "one"}}, TypeError, ["custom", "'one'"]),
    ({"resources": {"custom": -1}}, ValueError, ["custom", "-1"]),
    ({"resources": {3: 1}}, TypeError, ["resources", "3"]),
    ({"num_cpu": 1}, ValueError, ["num_cpu"]),
    ({"max_restarts": 3}, ValueError, ["max_restarts"]),
    ("num_cpus=1", TypeError, ["ray_actor_options", "'num_cpus=1'"]),
    ([("num_cpus", 1)], TypeError, ["ray_actor_options", "[('num_cpus', 1)]"]),
], ids=["str-num_cpus", "bool-num_cpus", "negative-num_cpus", "nan-num_cpus", "none-num_gpus",
        "negative-num_gpus", "str-memory", "negative-memory", "list-resources",
        "str-resource-amount", "negative-resource-amount", "int-resource-name",
        "unknown-key", "managed-key", "str-options", "list-options"])
def test_ray_actor_options_are_validated(serve_instance: tuple, options: Any, error: type,
                                         fragments: List[str]) -> None:
    client, _ = serve_instance
    before = instance_processes(client)

    with pytest.raises(error) as excinfo:
        client.create_backend("res", echo_function, ray_actor_options=options)

    assert_names(excinfo.value, fragments)
    assert client.list_backends() == {}
    assert instance_processes(client) == before


def test_valid_ray_actor_options_are_accepted(serve_instance: tuple) -> None:
    client, _ = serve_instance
    client.create_backend("res", echo_function, ray_actor_options={
        "num_cpus": 0.5, "num_gpus": 0, "memory": 10 * 1024 * 1024, "resources": {"custom": 0}})
    client.create_endpoint("res", backend="res")

    assert client.get_handle("res").remote("a").result(timeout=10) == "function:a"


@pytest.mark.parametrize("config", [
    {"num_replicas": 2, "max_concurrent_queries": 3},
    serve.BackendConfig(num_replicas=2, max_concurrent_queries=3),
], ids=["dict", "BackendConfig"])
def test_config_as_dict_or_backend_config(serve_instance: tuple, tmp_path: Any,
                                          config: Any) -> None:
    client, _ = serve_instance
    client.create_backend("configured", ReplicaRecorder, str(tmp_path), config=config)

    stored = client.get_backend_config("configured")
    assert isinstance(stored, serve.BackendConfig)
    assert (stored.num_replicas, stored.max_concurrent_queries) == (2, 3)
    assert client.list_backends()["configured"] == stored
    assert len(recorded_replicas(str(tmp_path))) == 2


@pytest.mark.parametrize("config, error, fragments", [
    ({"num_replicas": 0}, ValidationError, ["num_replicas"]),
    ({"num_replicas": "2"}, ValidationError, ["num_replicas", "'2'"]),
    ({"no_such_option": 1}, ValidationError, ["no_such_option"]),
    ({"max_batch_size": 4}, ValueError, ["max_batch_size", "4"]),
    ({"user_config": {"threshold": 1}}, ValueError, ["user_config"]),
    ([("num_replicas", 2)], TypeError, ["config", "[('num_replicas', 2)]"]),
    ({"num_replicas": 10**9}, ValidationError,
     ["num_replicas=1000000000", "1000 replicas", "SERVEKIT_MAX_REPLICAS_PER_BACKEND"]),
    ({"autoscaling_config": {"max_replicas": 10**9}}, ValidationError,
     ["max_replicas=1000000000", "1000 replicas", "SERVEKIT_MAX_REPLICAS_PER_BACKEND"]),
], ids=["zero-replicas", "str-replicas", "unknown-key", "batching-without-accept-batch",
        "user-config-on-function", "list", "a-billion-replicas",
        "a-billion-max-replicas"])
def test_bad_config_is_rejected(serve_instance: tuple, config: Any, error: type,
                                fragments: List[str]) -> None:
    client, _ = serve_instance
    before = instance_processes(client)

    with pytest.raises(error) as excinfo:
        client.create_backend("configured", echo_function, config=config)

    assert_names(excinfo.value, fragments)
    assert client.list_backends() == {}
    assert instance_processes(client) == before


# ---------------------------------------------------------------- backend config


def test_get_backend_config_of_unknown_backend_is_a_value_error(serve_instance: tuple) -> None:
    client, _ = serve_instance
    with pytest.raises(ValueError) as excinfo:
        client.get_backend_config("never-created")
    assert_names(excinfo.value, ["never-created"])


def test_update_backend_config_merges_only_the_given_fields(serve_instance: tuple) -> None:
    client, _ = serve_instance
    client.create_backend("tuned", Echo, "tuned", config={
        "max_concurrent_queries": 5, "batch_wait_timeout": 0.5})
    client.create_endpoint("tuned", backend="tuned")

    client.update_backend_config("tuned", {"max_concurrent_queries": 7})
    config = client.get_backend_config("tuned")
    assert (config.num_replicas, config.max_concurrent_queries, config.batch_wait_timeout) \
        == (1, 7, 0.5)

    client.update_backend_config("tuned", serve.BackendConfig(batch_wait_timeout=0.25))
    config = client.get_backend_config("tuned")
    assert (config.num_replicas, config.max_concurrent_queries, config.batch_wait_timeout) \
        == (1, 7, 0.25)
    assert client.list_backends()["tuned"] == config
    assert client.get_handle("tuned").remote("a").result(timeout=10) == "tuned:a"


def test_update_backend_config_scales_replicas_up_and_down(serve_instance: tuple,
                                                           tmp_path: Any) -> None:
    client, _ = serve_instance
    directory = str(tmp_path)
    client.create_backend("scaled", ReplicaRecorder, directory, 0.2)
    client.create_endpoint("scaled", backend="scaled")
    handle = client.get_handle("scaled")
    assert len(recorded_replicas(directory)) == 1

    client.update_backend_config("scaled", {"num_replicas": 3})
    replicas = recorded_replicas(directory)
    assert len(replicas) == 3  # the new replicas' constructors finished before the return
    assert all(start_time(pid) is not None for pid in replicas.values())
    assert client.get_backend_config("scaled").num_replicas == 3

    client.update_backend_config("scaled", {"num_replicas": 1})
    assert client.get_backend_config("scaled").num_replicas == 1
    survivors = [tag for tag, pid in replicas.items() if start_time(pid) is not None]
    assert len(survivors) == 1, f"replicas still running after scaling to 1: {survivors}"
    answers = {tuple(handle.remote(i).result(timeout=10)) for i in range(10)}
    assert answers == {(survivors[0], replicas[survivors[0]])}


@pytest.mark.parametrize("tag, update, error, fragments", [
    ("never-created", {"num_replicas": 2}, ValueError, ["never-created"]),
    ("upd", {"num_replicas": 0}, ValidationError, ["num_replicas"]),
    ("upd", {"no_such_option": 1}, ValidationError, ["no_such_option"]),
    ("upd", {"max_batch_size": 4}, ValueError, ["max_batch_size", "4"]),
    ("upd", "num_replicas=2", TypeError, ["config_options", "'num_replicas=2'"]),
    ("upd", {"num_replicas": 10**9}, ValidationError,
     ["num_replicas=1000000000", "1000 replicas", "SERVEKIT_MAX_REPLICAS_PER_BACKEND"]),
], ids=["unknown-backend", "zero-replicas", "unknown-key", "batching-without-accept-batch",
        "str", "a-billion-replicas"])
def test_update_backend_config_rejects_bad_updates(serve_instance: tuple, tag: str,
                                                   update: Any, error: type,
                                                   fragments: List[str]) -> None:
    client, _ = serve_instance
    client.create_backend("upd", echo_function, config={"max_concurrent_queries": 4})
    before = client.get_backend_config("upd")

    with pytest.raises(error) as excinfo:
        client.update_backend_config(tag, update)

    assert_names(excinfo.value, fragments)
    assert client.get_backend_config("upd") == before
    assert list(client.list_backends()) == ["upd"]


# ---------------------------------------------------------------- delete_backend


def test_delete_backend_is_refused_while_an_endpoint_sends_it_traffic(
        serve_instance: tuple) -> None:
    client, _ = serve_instance
    serve_echo(client, "in-use")

    with pytest.raises(ValueError) as excinfo:
        client.delete_backend("in-use")

    assert_names(excinfo.value, ["'in-use'"])
    assert "in-use" in client.list_backends()
    assert client.get_handle("in-use").remote("a").result(timeout=10) == "echo:a"


def test_delete_backend_is_refused_while_an_endpoint_shadows_to_it(
        serve_instance: tuple) -> None:
    client, _ = serve_instance
    serve_echo(client, "primary")
    client.create_backend("shadow", Echo, "shadow")
    client.shadow_traffic("primary", "shadow", 0.5)

    with pytest.raises(ValueError) as excinfo:
        client.delete_backend("shadow")
    assert_names(excinfo.value, ["'shadow'", "'primary'"])
    assert "shadow" in client.list_backends()

    client.shadow_traffic("primary", "shadow", 0)
    client.delete_backend("shadow")
    assert sorted(client.list_backends()) == ["primary"]


def test_delete_backend_of_unknown_tag_is_a_no_op(serve_instance: tuple) -> None:
    client, _ = serve_instance
    client.create_backend("kept", echo_function)

    client.delete_backend("never-created")

    assert list(client.list_backends()) == ["kept"]


def test_delete_backend_stops_its_replicas_and_frees_the_tag(serve_instance: tuple,
                                                             tmp_path: Any) -> None:
    client, _ = serve_instance
    client.create_backend("doomed", ReplicaRecorder, str(tmp_path),
                          config={"num_replicas": 2})
    client.create_endpoint("doomed", backend="doomed")
    pids = list(recorded_replicas(str(tmp_path)).values())
    client.delete_endpoint("doomed")

    client.delete_backend("doomed")

    assert client.list_backends() == {}
    assert [pid for pid in pids if start_time(pid) is not None] == []
    client.create_backend("doomed", Echo, "reborn")
    client.create_endpoint("doomed", backend="doomed")
    assert client.get_handle("doomed").remote("a").result(timeout=10) == "reborn:a"


def test_delete_backend_rejects_non_bool_force(serve_instance: tuple) -> None:
    client, _ = serve_instance
    client.create_backend("kept", echo_function)
    with pytest.raises(TypeError) as excinfo:
        client.delete_backend("kept", force="yes")
    assert_names(excinfo.value, ["force", "'yes'"])
    assert list(client.list_backends()) == ["kept"]


# ---------------------------------------------------------------- endpoints


def test_create_endpoint_returns_once_the_proxy_serves_the_route(serve_instance: tuple) -> None:
    client, url = serve_instance
    client.create_backend("live", Echo, "live")

    client.create_endpoint("live", backend="live", route="/live")

    # No waiting: the route is served when create_endpoint returns.
    response = get(f"{url}/live", params={"x": "now"})
    assert (response.status_code, response.text) == (200, "live:now")
    assert get(f"{url}/-/routes").json()["/live"] == ["live", ["GET"]]


def test_create_endpoint_upper_cases_methods(serve_instance: tuple) -> None:
    client, url = serve_instance
    client.create_backend("methods", Echo, "m")

    client.create_endpoint("methods", backend="methods", route="/methods",
                           methods=["post", "Get"])

    assert client.list_endpoints()["methods"]["methods"] == ["GET", "POST"]
    assert httpx.post(f"{url}/methods", params={"x": "p"}, timeout=10).text == "m:p"
    assert get(f"{url}/methods", params={"x": "g"}).text == "m:g"
    assert httpx.put(f"{url}/methods", timeout=10).status_code == 405


def test_list_endpoints_has_exactly_route_methods_traffic_and_shadows(
        serve_instance: tuple) -> None:
    client, _ = serve_instance
    client.create_backend("a", Echo, "a")
    client.create_backend("b", Echo, "b")
    client.create_endpoint("routed", backend="a", route="/routed", methods=["GET", "POST"])
    client.create_endpoint("headless", backend="b")
    client.shadow_traffic("routed", "b", 0.25)

    assert client.list_endpoints() == {
        "routed": {"route": "/routed", "methods": ["GET", "POST"], "traffic": {"a": 1.0},
                   "shadows": {"b": 0.25}},
        "headless": {"route": None, "methods": ["GET"], "traffic": {"b": 1.0},
                     "shadows": {}},
    }


def test_headless_endpoint_is_reachable_by_handle_only(serve_instance: tuple) -> None:
    client, url = serve_instance
    client.create_backend("quiet", Echo, "quiet")

    client.create_endpoint("quiet", backend="quiet", route=None)

    assert client.list_endpoints()["quiet"]["route"] is None
    assert client.get_handle("quiet").remote("a").result(timeout=10) == "quiet:a"
    assert get(f"{url}/quiet").status_code == 404


@pytest.mark.parametrize("name, kwargs, error, fragments", [
    ("ep", {"backend": "target", "route": "no-slash"}, TypeError, ["'no-slash'"]),
    ("ep", {"backend": "target", "route": 5}, TypeError, ["route", "5"]),
    ("ep", {"backend": "target", "route": "/-/routes"}, ValueError, ["'/-/routes'"]),
    ("ep", {"backend": "target", "methods": "GET"}, TypeError, ["methods", "'GET'"]),
    ("ep", {"backend": "target", "methods": ["GET", 1]}, TypeError, ["methods", "1"]),
    ("ep", {"backend": "target", "methods": []}, TypeError, ["methods", "[]"]),
    ("ep", {}, TypeError, ["backend"]),
    ("ep", {"backend": 3}, TypeError, ["backend", "3"]),
    ("ep", {"backend": "no-such-backend"}, ValueError, ["'no-such-backend'"]),
    ("", {"backend": "target"}, TypeError, ["endpoint_name", "''"]),
    (None, {"backend": "target"}, TypeError, ["endpoint_name", "None"]),
    ("ep", {"backend": "target", "route": "/ep/../admin"}, ValueError,
     ["route '/ep/../admin'", "'.' or '..' segment"]),
    ("ep", {"backend": "target", "route": "/ep?x=1"}, ValueError,
     ["route '/ep?x=1'", "'?'"]),
    ("ep", {"backend": "target", "route": "/ep%2F"}, ValueError, ["route '/ep%2F'", "'%'"]),
    ("ep", {"backend": "target", "route": "/my ep"}, ValueError, ["route '/my ep'", "' '"]),
    ("ep", {"backend": "target", "route": "/ep\r\nX: 1"}, ValueError, ["'\\r'"]),
    ("ep", {"backend": "target", "methods": ["GET /x"]}, ValueError,
     ["methods", "'GET /x'", "not an HTTP method name"]),
    ("ep\n", {"backend": "target"}, ValueError, ["endpoint_name 'ep\\n'", "'\\n'"]),
], ids=["route-without-slash", "int-route", "reserved-route", "str-methods",
        "int-in-methods", "empty-methods", "no-backend", "int-backend", "unknown-backend",
        "empty-name", "none-name", "dot-segment", "query", "percent", "space", "crlf",
        "bad-method", "control-character-in-name"])
def test_create_endpoint_rejects_bad_arguments(serve_instance: tuple, name: Any, kwargs: dict,
                                               error: type, fragments: List[str]) -> None:
    client, _ = serve_instance
    client.create_backend("target", echo_function)

    with pytest.raises(error) as excinfo:
        client.create_endpoint(name, **kwargs)

    assert_names(excinfo.value, fragments)
    assert client.list_endpoints() == {}


def test_a_deploy_file_is_held_to_the_same_checks(serve_instance: tuple) -> None:
    client, _ = serve_instance
    before = instance_processes(client)
    with pytest.raises(ValueError) as excinfo:
        client.deploy({
            "backends": [{"name": "target", "import_path": "backends_for_tests:Echo",
                          "init_args": ["target"]}],
            "endpoints": [{"name": "ep", "route": "/ep/../admin", "methods": ["GET /x"],
                           "traffic": {"target": 1}}]})
    assert_names(excinfo.value, ["endpoints[0].route: '/ep/../admin'",
                                 "'.' or '..' segment",
                                 "endpoints[0].methods: holds 'GET /x'"])
    assert client.list_backends() == {} and client.list_endpoints() == {}
    assert instance_processes(client) == before


def test_duplicate_endpoints_and_routes_are_value_errors(serve_instance: tuple) -> None:
    client, url = serve_instance
    client.create_backend("target", Echo, "target")
    client.create_endpoint("taken", backend="target", route="/taken", methods=["GET"])
    before = client.list_endpoints()

    with pytest.raises(ValueError) as same_route_and_methods:
        client.create_endpoint("taken", backend="target", route="/taken", methods=["get"])
    with pytest.raises(ValueError) as same_name:
        client.create_endpoint("taken", backend="target", route="/elsewhere")
    with pytest.raises(ValueError) as same_route:
        client.create_endpoint("other", backend="target", route="/taken")

    assert_names(same_route_and_methods.value, ["'/taken'", "'taken'"])
    assert_names(same_name.value, ["'taken'"])
    assert_names(same_route.value, ["'/taken'"])
    assert client.list_endpoints() == before
    assert get(f"{url}/elsewhere").status_code == 404
    assert get(f"{url}/taken", params={"x": "a"}).text == "target:a"


def test_delete_endpoint_removes_route_and_keeps_backend(serve_instance: tuple) -> None:
    client, url = serve_instance
    serve_echo(client, "gone")

    client.delete_endpoint("gone")

    assert client.list_endpoints() == {}
    assert list(client.list_backends()) == ["gone"]
    wait_for(lambda: get(f"{url}/gone").status_code == 404, message="/gone to return 404")
    with pytest.raises(KeyError):
        client.get_handle("gone")
    # Name and route can be used again at once.
    client.create_endpoint("gone", backend="gone", route="/gone")
    assert get(f"{url}/gone", params={"x": "b"}).text == "echo:b"


def test_delete_endpoint_of_unknown_name_is_a_no_op(serve_instance: tuple) -> None:
    client, _ = serve_instance
    serve_echo(client, "kept")

    client.delete_endpoint("never-created")

    assert list(client.list_endpoints()) == ["kept"]


# ---------------------------------------------------------------- handles


def test_get_handle_of_unknown_endpoint_is_a_key_error(serve_instance: tuple) -> None:
    client, _ = serve_instance
    with pytest.raises(KeyError) as excinfo:
        client.get_handle("never-created")
    assert_names(excinfo.value, ["never-created"])


def test_get_handle_sync_and_async(serve_instance: tuple) -> None:
    client, _ = serve_instance
    serve_echo(client, "handled", prefix="h")
    client.create_backend("async-caller", call_other_endpoint_async)
    client.create_endpoint("async-caller", backend="async-caller")

    sync_handle = client.get_handle("handled")
    async_handle = client.get_handle("handled", sync=False)

    assert isinstance(sync_handle, serve.ServeSyncHandle)
    assert sync_handle.remote("s").result(timeout=10) == "h:s"
    assert isinstance(async_handle, serve.ServeHandle)
    # An async handle used on a running loop: inside an async backend.
    assert client.get_handle("async-caller").remote("handled").result(timeout=20) == \
        ["ServeHandle", "h:from-async"]


def test_async_handle_under_asyncio_run_leaves_no_open_connections() -> None:
    """A script that uses an async handle in ``asyncio.run`` must not leak its sockets."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        client = serve.start(http_options={"port": free_port()})
        try:
            serve_echo(client, "handled", prefix="h", route=None)
            handle = client.get_handle("handled", sync=False)

            async def call() -> Any:
                return await (await handle.remote("a"))

            assert asyncio.run(call()) == "h:a"
        finally:
            client.shutdown()
        gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == []


def test_get_handle_missing_ok_gives_a_handle_before_the_endpoint_exists(
        serve_instance: tuple) -> None:
    client, _ = serve_instance
    handle = client.get_handle("later", missing_ok=True)

    serve_echo(client, "later", prefix="later")

    assert handle.remote("a").result(timeout=10) == "later:a"


@pytest.mark.parametrize("kwargs, fragments", [
    ({"sync": "False"}, ["sync", "'False'"]),
    ({"missing_ok": "yes"}, ["missing_ok", "'yes'"]),
], ids=["str-sync", "str-missing_ok"])
def test_get_handle_rejects_non_bool_flags(serve_instance: tuple, kwargs: dict,
                                           fragments: List[str]) -> None:
    client, _ = serve_instance
    serve_echo(client, "flags")
    with pytest.raises(TypeError) as excinfo:
        client.get_handle("flags", **kwargs)
    assert_names(excinfo.value, fragments)


# ---------------------------------------------------------------- inside a backend


def test_replica_context_inside_a_backend_and_its_constructor(serve_instance: tuple) -> None:
    client, _ = serve_instance
    client.create_backend("ctx", ContextReporter)
    client.create_endpoint("ctx", backend="ctx")

    seen = client.get_handle("ctx").remote().result(timeout=10)

    backend_tag, replica_tag = seen["call"]
    assert backend_tag == "ctx"
    assert re.fullmatch(r"ctx#\w+", replica_tag)
    assert seen["init"] == seen["call"]


@pytest.mark.parametrize("getter", [serve.get_current_backend_tag,
                                    serve.get_current_replica_tag])
def test_replica_context_outside_a_backend_is_a_serve_error(getter: Callable) -> None:
    with pytest.raises(serve.ServeError) as excinfo:
        getter()
    assert_names(excinfo.value, [getter.__name__])


def test_connect_inside_a_backend_returns_a_client_of_the_same_instance(
        serve_instance: tuple) -> None:
    client, _ = serve_instance
    client.create_backend("inner", connect_and_describe)
    client.create_endpoint("inner", backend="inner")
    serve_echo(client, "neighbour", prefix="neighbour")
    client.create_backend("composer", call_other_endpoint)
    client.create_endpoint("composer", backend="composer")

    seen = client.get_handle("inner").remote().result(timeout=10)
    composed = client.get_handle("composer").remote("neighbour").result(timeout=20)

    assert seen == {"controller_address": client._controller_address,
                    "backends": ["composer", "inner", "neighbour"],
                    "endpoints": ["composer", "inner", "neighbour"]}
    assert composed == "neighbour:from-inside"


# ---------------------------------------------------------------- after shutdown


SHUT_DOWN_CALLS: List[Tuple[str, Callable[[serve.Client], Any]]] = [
    ("create_backend", lambda c: c.create_backend("b", echo_function)),
    ("list_backends", lambda c: c.list_backends()),
    ("get_backend_config", lambda c: c.get_backend_config("b")),
    ("update_backend_config", lambda c: c.update_backend_config("b", {"num_replicas": 2})),
    ("delete_backend", lambda c: c.delete_backend("b")),
    ("create_endpoint", lambda c: c.create_endpoint("e", backend="b", route="/e")),
    ("delete_endpoint", lambda c: c.delete_endpoint("e")),
    ("list_endpoints", lambda c: c.list_endpoints()),
    ("set_traffic", lambda c: c.set_traffic("e", {"b": 1.0})),
    ("shadow_traffic", lambda c: c.shadow_traffic("e", "b", 0.5)),
    ("get_handle", lambda c: c.get_handle("e", missing_ok=True)),
    ("shutdown", lambda c: c.shutdown()),
]


def test_every_method_after_shutdown_raises_serve_error() -> None:
    client = serve.start(http_options={"port": free_port()})
    client.shutdown()

    wrong = []
    for name, call in SHUT_DOWN_CALLS:
        try:
            call(client)
        except serve.ServeError as exc:
            if str(exc) != "Client has already been shut down.":
                wrong.append(f"{name}: {exc!r}")
        except Exception as exc:
            wrong.append(f"{name}: {exc!r}")
        else:
            wrong.append(f"{name}: no error")
    assert wrong == []
    assert isinstance(serve.ServeError("x"), serve.RayServeException)
