"""Replicas against real processes: batching, the concurrency cap, the execution model,
user_config, in-place config changes, graceful drain, composition, resources, environments."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import httpx
import numpy as np
import pytest
from processes import start_time
from starlette.requests import Request

import servekit as serve
from conftest import BOTH_RUNTIMES, free_port, wait_for
from servekit.exceptions import BackendUnavailableError, BatchOutputError

pytestmark = pytest.mark.integration
RUNTIMES = BOTH_RUNTIMES

TIMEOUT = 15.0
VENV_MODULE = "servekit_venv_only_probe"


# --------------------------------------------------------------------------- helpers


def _value(request: Any) -> Any:
    """The data of a handle call, or the ``x`` query parameter of an HTTP call."""
    if isinstance(request, Request):
        return request.query_params.get("x")
    return request.data


def _alive(pid: int) -> bool:
    return start_time(pid) is not None  # a zombie has exited (Ray's raylet reaps late)


def per_replica(handle: Any, count: int, hold: float = 0.4) -> Dict[str, Any]:
    """Answers of ``count`` requests sent at once, keyed by the replica tag they report.

    Each request holds its replica for ``hold`` seconds; the router sends a request to the
    replica with the fewest of its requests in flight, so ``count`` requests sent together
    reach ``count`` different replicas.
    """
    responses = [handle.remote(hold) for _ in range(count)]
    answers = [response.result(timeout=TIMEOUT) for response in responses]
    by_tag = {answer["tag"]: answer for answer in answers}
    assert len(by_tag) == count, f"expected {count} distinct replicas, got {answers}"
    return by_tag


def concurrently(calls: List[Any], workers: int = 10) -> List[Any]:
    """Run the zero-argument callables at once in threads; their results, in order."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result(timeout=TIMEOUT * 2) for future in futures]


def read_events(directory: Path) -> List[str]:
    path = directory / "events"
    if not path.exists():
        return []
    return path.read_text().splitlines()


# --------------------------------------------------------------------------- backends


def plain_function(request: Any) -> str:
    return "plain"


@serve.accept_batch
def batch_size_reporter(requests: list) -> list:
    time.sleep(0.2)  # work: requests arriving meanwhile queue up into the next batch
    return [len(requests)] * len(requests)


@serve.accept_batch
def picky_batch(requests: list) -> Any:
    values = [_value(request) for request in requests]
    if "long" in values:
        return values + ["one too many"]
    if "dict" in values:
        return {"values": values}
    return [f"ok:{value}" for value in values]


class BatchedModel:
    def __call__(self, request: Any) -> list:
        return ["unbatched", _value(request)]

    @serve.accept_batch
    def predict(self, requests: list) -> list:
        time.sleep(0.2)
        return [[len(requests), int(_value(request)) * 10] for request in requests]


class Gate:
    """Logs "start <id>" / "end <id>"; a request waits until the file release-<id> exists."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _log(self, line: str) -> None:
        with open(os.path.join(self.directory, "events"), "a") as f:
            f.write(line + "\n")

    async def __call__(self, request: Any) -> str:
        name = request.query_params["id"]
        self._log(f"start {name}")
        release = os.path.join(self.directory, f"release-{name}")
        # The test releases this call from another process: a file is the simplest signal.
        while not os.path.exists(release):  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.01)
        self._log(f"end {name}")
        return f"done {name}"


class SleepyConfigurable:
    """A sync backend that blocks for a second; reports its user_config when done."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.config = None

    def reconfigure(self, config: Any) -> None:
        self.config = config

    def __call__(self, request: Any) -> Any:
        Path(self.directory, "started").touch()
        time.sleep(1.0)
        return self.config


class Configurable:
    def __init__(self) -> None:
        self.events: list = ["init"]

    def reconfigure(self, config: Any) -> None:
        time.sleep(config.get("delay", 0))  # a slow reconfigure: updates must wait for it
        self.events.append(["reconfigure", config])

    def __call__(self, request: Any) -> dict:
        if request.data:
            time.sleep(request.data)
        return {"tag": serve.get_current_replica_tag(), "events": self.events}


class NoReconfigure:
    def __call__(self, request: Any) -> str:
        return "no reconfigure here"


class Identity:
    """Reports (replica tag, pid); accepts every in-place config field."""

    def reconfigure(self, config: Any) -> None:
        self.config = config

    def __call__(self, request: Any) -> dict:
        if request.data:
            time.sleep(request.data)
        return {"tag": serve.get_current_replica_tag(), "pid": os.getpid()}

    @serve.accept_batch
    def batched(self, requests: list) -> list:
        return [len(requests)] * len(requests)


def slow_identity(request: Any) -> dict:
    time.sleep(0.3)
    return {"tag": serve.get_current_replica_tag(), "pid": os.getpid()}


def held_identity(request: Any) -> dict:
    if request.data:
        time.sleep(request.data)
    return {"tag": serve.get_current_replica_tag(), "pid": os.getpid()}


class Sleeper:
    """Touches started-<id>, sleeps ``seconds``, returns the wall time its sleep ended."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def __call__(self, request: Any) -> float:
        Path(self.directory, f"started-{request.query_params['id']}").touch()
        time.sleep(request.data)
        return time.time()


def level_c(request: Any) -> dict:
    array = request.data
    return {"c": array * 2, "dtype": str(array.dtype), "backend": serve.get_current_backend_tag()}


class LevelB:
    def __init__(self) -> None:
        self.c = serve.connect().get_handle("comp-c", sync=False)

    async def __call__(self, request: Any) -> dict:
        inner = await (await self.c.remote(request.data))
        return {"b": inner, "backend": serve.get_current_backend_tag()}


def level_a(request: Any) -> dict:
    handle = serve.connect().get_handle("comp-b")
    inner = handle.remote(request.data).result(timeout=10)
    return {"a": inner, "backend": serve.get_current_backend_tag()}


class HoldsHandle:
    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def __call__(self, request: Any) -> dict:
        return {"via_init_handle": self.handle.remote(request.data).result(timeout=10)}


def venv_probe(request: Any) -> dict:
    import servekit_venv_only_probe  # only the test's virtualenv has it

    return {"prefix": sys.prefix, "marker": servekit_venv_only_probe.MARKER}


# --------------------------------------------------------------------------- 1. batching


def test_batches_never_exceed_max_batch_size_over_handles_and_http(serve_instance):
    client, url = serve_instance
    client.create_backend("batcher", batch_size_reporter, config={"max_batch_size": 4})
    client.create_endpoint("batcher", backend="batcher", route="/batcher")
    handle = client.get_handle("batcher")

    via_handle = concurrently([lambda: handle.remote(1).result(timeout=TIMEOUT)] * 9)
    assert len(via_handle) == 9
    assert all(1 <= size <= 4 for size in via_handle), via_handle
    assert max(via_handle) > 1, f"no request was batched with another: {via_handle}"

    def over_http() -> int:
        response = httpx.get(f"{url}/batcher", timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return response.json()

    via_http = concurrently([over_http] * 9)
    assert len(via_http) == 9
    assert all(1 <= size <= 4 for size in via_http), via_http
    assert max(via_http) > 1, f"no HTTP request was batched with another: {via_http}"


def test_lone_request_waits_for_batch_wait_timeout(serve_instance):
    client, _ = serve_instance
    client.create_backend("waiting-batcher", batch_size_reporter,
                          config={"max_batch_size": 4, "batch_wait_timeout": 0.5})
    client.create_endpoint("waiting-batcher", backend="waiting-batcher")
    handle = client.get_handle("waiting-batcher")
    start = time.monotonic()
    size = handle.remote(1).result(timeout=TIMEOUT)
    elapsed = time.monotonic() - start
    assert size == 1
    assert elapsed >= 0.4, f"a lone request ran after {elapsed:.3f}s, before the 0.5s timeout"
    # Requests arriving within the timeout are gathered into one full batch.
    responses = [handle.remote(1) for _ in range(4)]
    assert [response.result(timeout=TIMEOUT) for response in responses] == [4, 4, 4, 4]


def test_max_batch_size_on_unmarked_callable_is_value_error(serve_instance):
    client, _ = serve_instance
    with pytest.raises(ValueError, match="accept_batch"):
        client.create_backend("unmarked", plain_function, config={"max_batch_size": 2})
    assert "unmarked" not in client.list_backends()

    client.create_backend("unmarked", plain_function)
    with pytest.raises(ValueError, match="accept_batch"):
        client.update_backend_config("unmarked", {"max_batch_size": 2})
    assert client.get_backend_config("unmarked").max_batch_size is None
    client.create_endpoint("unmarked", backend="unmarked")
    assert client.get_handle("unmarked").remote().result(timeout=TIMEOUT) == "plain"


def test_wrong_batch_output_fails_the_whole_batch_and_replica_keeps_serving(serve_instance):
    client, url = serve_instance
    # The batch waits (up to 2 s) until all three requests are in: one batch of three.
    client.create_backend("picky", picky_batch,
                          config={"max_batch_size": 3, "batch_wait_timeout": 2.0})
    client.create_endpoint("picky", backend="picky", route="/picky")
    handle = client.get_handle("picky")

    for bad, expected in (("long", r"got 3 requests but returned 4 results"),
                          ("dict", r"returned a dict")):
        responses = [handle.remote(value) for value in (bad, "a", "b")]
        for response in responses:
            with pytest.raises(BatchOutputError, match=expected):
                response.result(timeout=TIMEOUT)

    responses = [handle.remote(value) for value in ("a", "b", "c")]
    assert [r.result(timeout=TIMEOUT) for r in responses] == ["ok:a", "ok:b", "ok:c"]

    def get(x: str) -> httpx.Response:
        return httpx.get(f"{url}/picky", params={"x": x}, timeout=TIMEOUT)

    failed = concurrently([lambda: get("long"), lambda: get("a"), lambda: get("b")])
    for response in failed:
        assert response.status_code == 500
        assert "BatchOutputError" in response.text
        assert "got 3 requests but returned 4 results" in response.text

    served = concurrently([lambda: get("x"), lambda: get("y"), lambda: get("z")])
    assert [(r.status_code, r.text) for r in served] == [(200, "ok:x"), (200, "ok:y"),
                                                         (200, "ok:z")]


def test_marked_method_of_a_class_is_batched_via_method_name(serve_instance):
    client, url = serve_instance
    client.create_backend("batched-model", BatchedModel, config={"max_batch_size": 3})
    client.create_endpoint("batched-model", backend="batched-model", route="/batched-model")
    handle = client.get_handle("batched-model")
    predict = handle.options(method_name="predict")

    answers = concurrently([lambda i=i: predict.remote(i).result(timeout=TIMEOUT)
                            for i in range(7)])
    assert [value for _, value in answers] == [i * 10 for i in range(7)]
    sizes = [size for size, _ in answers]
    assert all(1 <= size <= 3 for size in sizes), sizes
    assert max(sizes) > 1, f"no request was batched with another: {sizes}"

    # The unmarked __call__ of the same class gets one request, not a list.
    assert handle.remote(5).result(timeout=TIMEOUT) == ["unbatched", 5]

    def over_http(i: int) -> list:
        response = httpx.get(f"{url}/batched-model", params={"x": i},
                             headers={"X-SERVE-CALL-METHOD": "predict"}, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return response.json()

    answers = concurrently([lambda i=i: over_http(i) for i in range(7)])
    assert [value for _, value in answers] == [i * 10 for i in range(7)]
    sizes = [size for size, _ in answers]
    assert all(1 <= size <= 3 for size in sizes), sizes
    assert max(sizes) > 1, f"no HTTP request was batched with another: {sizes}"


def test_requests_sent_together_from_a_new_event_loop_all_succeed(serve_instance):
    """Several requests that wait together for the router's first connection to a replica."""
    client, _ = serve_instance
    client.create_backend("together", held_identity)
    client.create_endpoint("together", backend="together")
    handle = client.get_handle("together", sync=False)

    async def burst() -> list:
        responses = await asyncio.gather(*(handle.remote() for _ in range(3)),
                                         return_exceptions=True)
        return [r if isinstance(r, BaseException) else await r for r in responses]

    answers = asyncio.run(burst())  # a new loop: a new router, no connection yet
    errors = [answer for answer in answers if isinstance(answer, BaseException)]
    assert errors == [], f"{len(errors)} of 3 requests failed: {errors}"
    assert len({answer["tag"] for answer in answers}) == 1


# --------------------------------------------------------------------------- 2. the cap


def test_max_concurrent_queries_holds_across_routers(serve_instance, tmp_path):
    client, url = serve_instance
    client.create_backend("gate", Gate, str(tmp_path), config={"max_concurrent_queries": 1})
    client.create_endpoint("gate", backend="gate", route="/gate")
    handle = client.get_handle("gate")

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # First the proxy's router holds the replica's only slot, then the driver's router.
        http_first = pool.submit(httpx.get, f"{url}/gate", params={"id": "A"}, timeout=TIMEOUT)
        wait_for(lambda: read_events(tmp_path) == ["start A"], message="A to start")
        second = handle.remote(id="B")
        with pytest.raises(TimeoutError):
            second.result(timeout=0.5)
        assert read_events(tmp_path) == ["start A"], "B started while A held the only slot"
        (tmp_path / "release-A").touch()
        assert http_first.result(timeout=TIMEOUT).text == "done A"
        wait_for(lambda: "start B" in read_events(tmp_path), message="B to start")
        (tmp_path / "release-B").touch()
        assert second.result(timeout=TIMEOUT) == "done B"
        assert read_events(tmp_path) == ["start A", "end A", "start B", "end B"]

        handle_first = handle.remote(id="C")
        wait_for(lambda: read_events(tmp_path)[4:] == ["start C"], message="C to start")
        http_second = pool.submit(httpx.get, f"{url}/gate", params={"id": "D"},
                                  timeout=TIMEOUT)
        with pytest.raises(concurrent.futures.TimeoutError):
            http_second.result(timeout=0.5)
        assert read_events(tmp_path)[4:] == ["start C"], "D started while C held the slot"
        (tmp_path / "release-C").touch()
        assert handle_first.result(timeout=TIMEOUT) == "done C"
        wait_for(lambda: "start D" in read_events(tmp_path), message="D to start")
        (tmp_path / "release-D").touch()
        response = http_second.result(timeout=TIMEOUT)
        assert (response.status_code, response.text) == (200, "done D")
    assert read_events(tmp_path)[4:] == ["start C", "end C", "start D", "end D"]


# --------------------------------------------------------------------------- 3. execution


@pytest.mark.parametrize("max_concurrent_queries", [None, 1])
def test_reconfigure_waits_for_the_running_request(serve_instance, tmp_path,
                                                   max_concurrent_queries):
    """reconfigure never runs while a request of that replica runs: the running call ends
    with the old config, update_backend_config returns after it, later calls see the new."""
    client, _ = serve_instance
    config = {"user_config": {"v": 1}}
    if max_concurrent_queries is not None:
        config["max_concurrent_queries"] = max_concurrent_queries
    client.create_backend("sleepy", SleepyConfigurable, str(tmp_path), config=config)
    client.create_endpoint("sleepy", backend="sleepy")
    handle = client.get_handle("sleepy")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        request = pool.submit(lambda: handle.remote().result(timeout=TIMEOUT))
        wait_for(lambda: (tmp_path / "started").exists(), message="the request to start")
        client.update_backend_config("sleepy", {"user_config": {"v": 2}})
        assert request.result(timeout=TIMEOUT) == {"v": 1}
    assert handle.remote().result(timeout=TIMEOUT) == {"v": 2}
    assert client.get_backend_config("sleepy").user_config == {"v": 2}


# --------------------------------------------------------------------------- 4. user_config


def test_reconfigure_after_init_and_on_user_config_change_only(serve_instance):
    client, _ = serve_instance
    client.create_backend("cfg", Configurable,
                          config={"num_replicas": 2, "user_config": {"threshold": 1}})
    client.create_backend("cfg-other", Configurable, config={"user_config": {"other": 1}})
    client.create_endpoint("cfg", backend="cfg")
    handle = client.get_handle("cfg")

    first = [["reconfigure", {"threshold": 1}]]
    for answer in per_replica(handle, 2).values():
        assert answer["events"] == ["init", *first]

    # Returns once every replica applied it: both answer with the new config right away.
    client.update_backend_config("cfg", {"user_config": {"threshold": 2, "delay": 0.5}})
    second = first + [["reconfigure", {"threshold": 2, "delay": 0.5}]]
    tags = set()
    for tag, answer in per_replica(handle, 2).items():
        assert answer["events"] == ["init", *second]
        tags.add(tag)

    # Other fields of the same backend and other backends' user_config do not reconfigure.
    client.update_backend_config("cfg", {"max_concurrent_queries": 4})
    client.update_backend_config("cfg", {"batch_wait_timeout": 0.1})
    client.update_backend_config("cfg-other", {"user_config": {"other": 2}})
    answers = per_replica(handle, 2)
    assert set(answers) == tags
    for answer in answers.values():
        assert answer["events"] == ["init", *second]


def test_user_config_without_reconfigure_is_value_error(serve_instance):
    client, _ = serve_instance
    with pytest.raises(ValueError, match="user_config"):
        client.create_backend("cfg-func", plain_function, config={"user_config": {"a": 1}})
    with pytest.raises(ValueError, match="reconfigure"):
        client.create_backend("cfg-class", NoReconfigure, config={"user_config": {"a": 1}})
    backends = client.list_backends()
    assert "cfg-func" not in backends and "cfg-class" not in backends

    client.create_backend("cfg-class", NoReconfigure)
    with pytest.raises(ValueError, match="reconfigure"):
        client.update_backend_config("cfg-class", {"user_config": {"a": 1}})
    assert client.get_backend_config("cfg-class").user_config is None


# --------------------------------------------------------------------------- 5. in place


def test_in_place_config_changes_keep_the_same_replicas(serve_instance):
    client, _ = serve_instance
    client.create_backend("identity", Identity, config={"num_replicas": 2})
    client.create_endpoint("identity", backend="identity")
    handle = client.get_handle("identity")
    before = {tag: answer["pid"] for tag, answer in per_replica(handle, 2).items()}

    for change in ({"max_batch_size": 2}, {"batch_wait_timeout": 0.05},
                   {"max_concurrent_queries": 3}, {"user_config": {"version": 2}}):
        client.update_backend_config("identity", change)
        config = client.get_backend_config("identity")
        for field, value in change.items():
            assert getattr(config, field) == value
        after = {tag: answer["pid"] for tag, answer in per_replica(handle, 2).items()}
        assert after == before, f"{change} replaced replicas: {before} -> {after}"
    assert all(_alive(pid) for pid in before.values())


# --------------------------------------------------------------------------- 6. drain


def test_scale_down_under_load_fails_no_request(serve_instance):
    client, url = serve_instance
    client.create_backend("drain", slow_identity, config={"num_replicas": 3})
    client.create_endpoint("drain", backend="drain", route="/drain")
    pids = {tag: answer["pid"] for tag, answer in
            per_replica(client.get_handle("drain"), 3).items()}

    done = 0
    lock = threading.Lock()

    def one_request() -> tuple:
        nonlocal done
        try:
            response = httpx.get(f"{url}/drain", timeout=TIMEOUT)
            return response.status_code, response.text
        except Exception as exc:  # a transport error counts as a failed request
            return None, repr(exc)
        finally:
            with lock:
                done += 1

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one_request) for _ in range(60)]
        wait_for(lambda: done >= 12, timeout=TIMEOUT, message="the stream to be under way")
        client.update_backend_config("drain", {"num_replicas": 1})
        # When the call returns, the two removed replicas have exited.
        gone = [pid for pid in pids.values() if not _alive(pid)]
        assert len(gone) == 2, f"expected 2 of {pids} to be gone, {gone} are"
        assert done < 60, "the stream ended before the scale-down: it tested nothing"
        results = [future.result(timeout=TIMEOUT * 2) for future in futures]

    failures = [result for result in results if result[0] != 200]
    assert failures == [], f"{len(failures)} of 60 requests failed: {failures[:3]}"
    (survivor,) = [tag for tag, pid in pids.items() if _alive(pid)]
    later = httpx.get(f"{url}/drain", timeout=TIMEOUT).json()
    assert later["tag"] == survivor


def test_delete_backend_waits_for_in_flight_request(serve_instance, tmp_path):
    client, _ = serve_instance
    client.create_backend("sleeper", Sleeper, str(tmp_path))
    client.create_endpoint("sleeper", backend="sleeper")
    response = client.get_handle("sleeper").remote(1.0, id="slow")
    wait_for(lambda: (tmp_path / "started-slow").exists(), message="the request to start")
    client.delete_endpoint("sleeper")
    client.delete_backend("sleeper")
    returned_at = time.time()
    finished_at = response.result(timeout=TIMEOUT)
    assert finished_at <= returned_at, "delete_backend returned before the request finished"
    assert "sleeper" not in client.list_backends()


def test_force_delete_fails_in_flight_request_promptly(serve_instance, tmp_path):
    client, _ = serve_instance
    client.create_backend("sleeper", Sleeper, str(tmp_path))
    client.create_endpoint("sleeper", backend="sleeper")
    response = client.get_handle("sleeper").remote(10.0, id="doomed")
    wait_for(lambda: (tmp_path / "started-doomed").exists(), message="the request to start")
    client.delete_endpoint("sleeper")
    start = time.monotonic()
    client.delete_backend("sleeper", force=True)
    with pytest.raises(BackendUnavailableError):
        response.result(timeout=5)
    assert time.monotonic() - start < 5, "the request was not failed promptly"
    assert "sleeper" not in client.list_backends()


# --------------------------------------------------------------------------- 7. composition


def test_composition_three_levels_deep_with_numpy(serve_instance):
    client, _ = serve_instance
    client.create_backend("comp-c", level_c)
    client.create_endpoint("comp-c", backend="comp-c")
    client.create_backend("comp-b", LevelB)
    client.create_endpoint("comp-b", backend="comp-b")
    client.create_backend("comp-a", level_a)
    client.create_endpoint("comp-a", backend="comp-a")

    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    result = client.get_handle("comp-a").remote(array).result(timeout=TIMEOUT)
    assert result["backend"] == "comp-a"
    assert result["a"]["backend"] == "comp-b"
    inner = result["a"]["b"]
    assert inner["backend"] == "comp-c"
    assert inner["dtype"] == "float32"
    assert isinstance(inner["c"], np.ndarray)
    np.testing.assert_array_equal(inner["c"], array * 2)
    assert inner["c"].dtype == np.float32


def test_handle_passed_as_init_arg(serve_instance):
    client, _ = serve_instance
    client.create_backend("comp-c", level_c)
    client.create_endpoint("comp-c", backend="comp-c")
    client.create_backend("holder", HoldsHandle, client.get_handle("comp-c"))
    client.create_endpoint("holder", backend="holder")

    array = np.linspace(0.0, 1.0, 5)
    result = client.get_handle("holder").remote(array).result(timeout=TIMEOUT)
    np.testing.assert_array_equal(result["via_init_handle"]["c"], array * 2)
    assert result["via_init_handle"]["dtype"] == "float64"


# --------------------------------------------------------------------------- 8. resources


def test_replicas_that_do_not_fit_the_cpus_are_refused(serve_instance, runtime):
    client, _ = serve_instance
    if runtime == "ray":
        import ray

        cpus = int(ray.cluster_resources()["CPU"])
    else:
        cpus = os.cpu_count()
    with pytest.raises(serve.ServeError, match=rf"only {cpus} fit"):
        client.create_backend("cpu-hungry", plain_function, ray_actor_options={"num_cpus": 1},
                              config={"num_replicas": cpus + 1})
    assert "cpu-hungry" not in client.list_backends()


def test_custom_resources_limit_replicas():
    client = serve.start(http_options={"port": free_port()}, resources={"accel": 2})
    try:
        with pytest.raises(serve.ServeError, match=r"only 2 fit"):
            client.create_backend("accel", held_identity,
                                  ray_actor_options={"resources": {"accel": 1}},
                                  config={"num_replicas": 3})
        assert "accel" not in client.list_backends()

        client.create_backend("accel", held_identity,
                              ray_actor_options={"resources": {"accel": 1}},
                              config={"num_replicas": 2})
        client.create_endpoint("accel", backend="accel")
        assert len(per_replica(client.get_handle("accel"), 2)) == 2

        # Both units are reserved now: nothing else that asks for one fits.
        with pytest.raises(serve.ServeError, match=r"only 0 fit"):
            client.create_backend("accel-more", held_identity,
                                  ray_actor_options={"resources": {"accel": 1}})
        assert "accel-more" not in client.list_backends()
    finally:
        client.shutdown()


# --------------------------------------------------------------------------- 9. environments


@pytest.fixture(scope="module")
def venv_dir(tmp_path_factory) -> Path:
    """A virtualenv that sees servekit (system site-packages) and has a module of its own."""
    root = tmp_path_factory.mktemp("env")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")

    package = root / "package"
    (package / VENV_MODULE).mkdir(parents=True)
    (package / VENV_MODULE / "__init__.py").write_text('MARKER = "installed in the venv"\n')
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{VENV_MODULE}"\nversion = "0.0.1"\n')
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", str(package)],
        capture_output=True, text=True, timeout=120)
    if installed.returncode != 0:
        # No offline wheel build here (e.g. no `wheel` for this setuptools): drop it in.
        purelib = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True, timeout=60).stdout.strip()
        shutil.copytree(package / VENV_MODULE, Path(purelib) / VENV_MODULE)
    check = subprocess.run([python, "-c", f"import {VENV_MODULE}, servekit"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    return venv


def test_backend_runs_in_virtualenv(serve_instance, venv_dir, runtime):
    client, _ = serve_instance
    if runtime == "ray":  # Ray has its own runtime environments for that
        with pytest.raises(serve.ServeError, match="runtime_env"):
            client.create_backend("venv", venv_probe, env=serve.VirtualEnv(str(venv_dir)))
        assert "venv" not in client.list_backends()
        return
    importlib.invalidate_caches()
    assert importlib.util.find_spec(VENV_MODULE) is None, "the test interpreter sees it too"
    client.create_backend("venv", venv_probe, env=serve.VirtualEnv(str(venv_dir)))
    client.create_endpoint("venv", backend="venv")
    result = client.get_handle("venv").remote().result(timeout=TIMEOUT)
    assert result["marker"] == "installed in the venv"
    assert os.path.realpath(result["prefix"]) == os.path.realpath(venv_dir)


def test_virtualenv_that_does_not_exist_is_value_error(serve_instance, tmp_path):
    client, _ = serve_instance
    missing = str(tmp_path / "no-such-venv")
    with pytest.raises(ValueError, match=re.escape(missing)):
        client.create_backend("venv-missing", plain_function, env=serve.VirtualEnv(missing))
    assert "venv-missing" not in client.list_backends()


def test_conda_env_without_conda_is_serve_error(serve_instance, tmp_path, monkeypatch):
    client, _ = serve_instance
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.delenv("CONDA_EXE", raising=False)
    monkeypatch.setenv("PATH", str(empty))  # no conda on PATH
    with pytest.raises(serve.ServeError, match="conda"):
        client.create_backend("conda", plain_function, env=serve.CondaEnv("nope"))
    monkeypatch.undo()
    assert "conda" not in client.list_backends()


def report_devices(request):
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_gpu_replicas_get_their_own_devices(monkeypatch):
    # The instance reads the GPUs it may hand out from CUDA_VISIBLE_DEVICES at start.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    client = serve.start(http_options={"port": free_port()})
    try:
        client.create_backend("gpu", report_devices, ray_actor_options={"num_gpus": 1},
                              config={"num_replicas": 2})
        client.create_endpoint("gpu", backend="gpu")
        handle = client.get_handle("gpu")
        seen = set()
        wait_for(lambda: seen.add(handle.remote().result(timeout=10)) or len(seen) == 2,
                 message="both replicas to answer")
        assert seen == {"0", "1"}
        with pytest.raises(serve.ServeError, match="only 0 fit"):
            client.create_backend("gpu2", report_devices, ray_actor_options={"num_gpus": 1})
    finally:
        client.shutdown()
