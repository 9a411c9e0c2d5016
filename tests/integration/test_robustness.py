"""Every request ends, and only public methods are callable: real processes, sockets, HTTP.

Unpicklable arguments and results, user code raising BaseExceptions, replicas that exit or
are killed mid-request, deleted and not-yet-created endpoints, HTTP clients that vanish
half-way through a body, pipelined handle calls, and the methods a request may name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import httpx
import pytest
from robustness_backends import (
    Doomed,
    PipelineError,
    Recorder,
    Robust,
    add_one,
    cap_one,
    double,
    echo_function,
)

import servekit as serve
from conftest import wait_for
from servekit._private import constants
from servekit.exceptions import (
    BackendUnavailableError,
    EndpointNotFoundError,
    MethodNotFoundError,
)

pytestmark = pytest.mark.integration

TIMEOUT = 15.0
# A request on a replica that dies must fail well before any timeout.
PROMPT_S = 5.0

# What a request may call on a Robust backend: its public methods and __call__.
ROBUST_METHODS = {"__call__", "apredict", "batch", "pid", "predict", "raise_async",
                  "raise_sync"}
# What it may not: servekit's hooks, private and dunder names, attributes that are no methods.
FORBIDDEN = ["reconfigure", "check_health", "_private", "__init__", "model", "model_name"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared(instance: tuple) -> Iterator[tuple]:
    """Backends and endpoints that several tests use and none breaks."""
    client, url = instance
    client.create_backend("robust", Robust,
                          config={"max_batch_size": 3, "batch_wait_timeout": 2.0})
    client.create_endpoint("robust", backend="robust", route="/robust", methods=["GET", "POST"])
    client.create_backend("echo-fn", echo_function)
    client.create_endpoint("echo-fn", backend="echo-fn", route="/echo-fn")
    yield client, url


@pytest.fixture
def fresh(shared: tuple) -> Iterator[tuple]:
    """The module's instance; endpoints and backends a test adds are removed after it."""
    client, url = shared
    endpoints, backends = set(client.list_endpoints()), set(client.list_backends())
    yield client, url
    for endpoint in set(client.list_endpoints()) - endpoints:
        client.delete_endpoint(endpoint)
    for backend in set(client.list_backends()) - backends:
        client.delete_backend(backend, force=True)


@pytest.fixture
def release_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for signal files; ``release`` is created at teardown whatever happened."""
    yield tmp_path
    (tmp_path / "release").touch()


def listed_methods(message: str) -> set:
    """The method names after "Methods it serves:" in a MethodNotFoundError message."""
    match = re.search(r"Methods it serves: \[([^\]]*)\]", message)
    assert match, f"no list of methods in {message!r}"
    return {name.strip().strip("'\"") for name in match.group(1).split(",") if name.strip()}


def in_threads(calls: List[Callable[[], Any]]) -> List[concurrent.futures.Future]:
    pool = concurrent.futures.ThreadPoolExecutor(len(calls))
    futures = [pool.submit(call) for call in calls]
    pool.shutdown(wait=False)
    return futures


def markers(directory: Path, prefix: str) -> List[str]:
    return sorted(p.name for p in directory.iterdir()
                  if p.name.startswith(prefix) and not p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- 1a. pickling


def test_unpicklable_argument_is_type_error_at_once_and_leaks_no_slot(fresh):
    client, _ = fresh
    client.create_backend("cap1", cap_one, config={"max_concurrent_queries": 1})
    client.create_endpoint("cap1", backend="cap1")
    handle = client.get_handle("cap1")
    assert handle.remote("warm").result(timeout=TIMEOUT) == "cap1:warm"

    for send in (lambda: handle.remote(threading.Lock()),
                 lambda: handle.remote(x=threading.Lock()),
                 lambda: handle.remote({"nested": [1, threading.Lock()]})):
        started = time.monotonic()
        with pytest.raises(TypeError, match=r"\block\b") as info:
            send()
        assert time.monotonic() - started < 1.0, "the TypeError was not raised at once"
        assert "pickle" in str(info.value)

        # The only slot of the replica is free: the next call is served at once.
        started = time.monotonic()
        assert handle.remote("next").result(timeout=TIMEOUT) == "cap1:next"
        assert time.monotonic() - started < 3.0


def test_unpicklable_result_is_type_error_and_replica_keeps_serving(fresh):
    client, _ = fresh
    client.create_backend("cap1", cap_one, config={"max_concurrent_queries": 1})
    client.create_endpoint("cap1", backend="cap1")
    handle = client.get_handle("cap1")
    pid = handle.remote("pid").result(timeout=TIMEOUT)

    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(TypeError, match=r"\block\b") as info:
            handle.remote("give-lock").result(timeout=TIMEOUT)
        assert time.monotonic() - started < 3.0
        assert "pickle" in str(info.value)
        assert handle.remote("after").result(timeout=TIMEOUT) == "cap1:after"
        assert handle.remote("pid").result(timeout=TIMEOUT) == pid  # the same process


# --------------------------------------------------------------------------- 1b. BaseException


BASE_EXCEPTIONS = ["SystemExit", "KeyboardInterrupt", "CancelledError"]


@pytest.mark.parametrize("method", ["raise_sync", "raise_async"])
@pytest.mark.parametrize("kind", BASE_EXCEPTIONS)
def test_user_base_exception_fails_only_that_request_over_handle(shared, method, kind):
    client, _ = shared
    handle = client.get_handle("robust")
    pid = handle.options(method_name="pid").remote().result(timeout=TIMEOUT)

    started = time.monotonic()
    with pytest.raises(serve.ServeError) as info:
        handle.options(method_name=method).remote(kind).result(timeout=TIMEOUT)
    assert type(info.value) is serve.ServeError, repr(info.value)
    assert kind in str(info.value)
    assert time.monotonic() - started < PROMPT_S

    # The same process keeps serving, every method.
    assert handle.options(method_name="pid").remote().result(timeout=TIMEOUT) == pid
    assert handle.options(method_name="predict").remote(1).result(TIMEOUT) == "predicted:1"
    assert handle.remote().result(timeout=TIMEOUT)["pid"] == pid


@pytest.mark.parametrize("method", ["raise_sync", "raise_async"])
@pytest.mark.parametrize("kind", BASE_EXCEPTIONS)
def test_user_base_exception_is_500_over_http(shared, method, kind):
    client, url = shared
    pid = client.get_handle("robust").options(method_name="pid").remote().result(TIMEOUT)
    with httpx.Client(base_url=url, timeout=TIMEOUT) as session:
        response = session.get("/robust", params={"x": kind},
                               headers={"X-SERVE-CALL-METHOD": method})
        assert response.status_code == 500, response.text
        assert kind in response.text
        assert response.text.startswith("ServeError")

        again = session.get("/robust", headers={"X-SERVE-CALL-METHOD": "pid"})
        assert (again.status_code, again.json()) == (200, pid)


def test_batch_raising_system_exit_fails_that_batch_and_batching_goes_on(shared):
    client, url = shared
    handle = client.get_handle("robust").options(method_name="batch")
    pid = client.get_handle("robust").options(method_name="pid").remote().result(TIMEOUT)

    # The batch waits (up to 2 s) until all three are in: one batch of three.
    responses = [handle.remote(v) for v in ("a", "exit", "b")]
    for response in responses:
        with pytest.raises(serve.ServeError, match="SystemExit"):
            response.result(timeout=TIMEOUT)

    responses = [handle.remote(v) for v in ("c", "d", "e")]
    assert [r.result(timeout=TIMEOUT) for r in responses] == [[3, "c"], [3, "d"], [3, "e"]]

    def get(x: str) -> httpx.Response:
        return httpx.get(f"{url}/robust", params={"x": x},
                         headers={"X-SERVE-CALL-METHOD": "batch"}, timeout=TIMEOUT)

    failed = [f.result(TIMEOUT) for f in in_threads([lambda x=x: get(x)
                                                      for x in ("exit", "f", "g")])]
    assert [r.status_code for r in failed] == [500] * 3, [r.text for r in failed]
    assert all("SystemExit" in r.text for r in failed)
    served = [f.result(TIMEOUT) for f in in_threads([lambda x=x: get(x)
                                                      for x in ("h", "i", "j")])]
    assert [(r.status_code, r.json()) for r in served] == [
        (200, [3, "h"]), (200, [3, "i"]), (200, [3, "j"])]
    assert client.get_handle("robust").options(method_name="pid").remote().result(
        TIMEOUT) == pid


# --------------------------------------------------------------------------- 1c. dying replicas


def _doomed(client: serve.Client, tag: str, directory: Path) -> Tuple[Any, dict]:
    client.create_backend(tag, Doomed, str(directory))
    client.create_endpoint(tag, backend=tag, route=f"/{tag}")
    handle = client.get_handle(tag)
    return handle, handle.remote().result(timeout=TIMEOUT)


def _start_blocked(handle: Any, url: str, directory: Path, names: List[str],
                   http_names: List[str]) -> Tuple[list, list]:
    """Requests that block in the replica until ``release``: handle ones and HTTP ones."""
    block = handle.options(method_name="block")
    responses = [block.remote(name) for name in names]

    def get(name: str) -> Callable[[], httpx.Response]:
        return lambda: httpx.get(url, params={"x": name}, timeout=TIMEOUT * 2,
                                 headers={"X-SERVE-CALL-METHOD": "block"})

    http = in_threads([get(name) for name in http_names])
    expected = sorted(f"blocked-{n}" for n in names + http_names)
    wait_for(lambda: markers(directory, "blocked-") == expected, TIMEOUT,
             f"{expected} to be running")
    return responses, http


def _assert_failed_naming(responses: list, http: list, tag: str, since: float) -> None:
    for response in responses:
        with pytest.raises(BackendUnavailableError) as info:
            response.result(timeout=TIMEOUT)
        assert tag in str(info.value)
        assert time.monotonic() - since < PROMPT_S, "a request on a dead replica was slow to fail"
    for future in http:
        reply = future.result(timeout=TIMEOUT)
        assert reply.status_code == 503, reply.text
        assert "BackendUnavailableError" in reply.text
        assert tag in reply.text
    assert time.monotonic() - since < PROMPT_S


def test_sigkilled_replica_fails_requests_in_flight_at_once(fresh, release_dir):
    client, url = fresh
    handle, before = _doomed(client, "doomed-kill", release_dir)
    responses, http = _start_blocked(handle, f"{url}/doomed-kill", release_dir,
                                     ["h1", "h2"], ["w1", "w2"])

    killed_at = time.monotonic()
    os.kill(before["pid"], signal.SIGKILL)
    _assert_failed_naming(responses, http, before["tag"], killed_at)

    # Later requests go to the replacement (they wait for it if it is not up yet).
    after = handle.remote().result(timeout=TIMEOUT)
    assert after["tag"] != before["tag"] and after["pid"] != before["pid"]
    over_http = httpx.get(f"{url}/doomed-kill", timeout=TIMEOUT)
    assert over_http.status_code == 200
    assert over_http.json() == after


def test_replica_calling_os_exit_fails_requests_in_flight_at_once(fresh, release_dir):
    client, url = fresh
    handle, first = _doomed(client, "doomed-exit", release_dir)
    responses, http = _start_blocked(handle, f"{url}/doomed-exit", release_dir, ["h1"], ["w1"])

    exited_at = time.monotonic()
    exit_now = handle.options(method_name="exit_now").remote()
    _assert_failed_naming([exit_now, *responses], http, first["tag"], exited_at)

    second = handle.remote().result(timeout=TIMEOUT)
    assert second["tag"] != first["tag"] and second["pid"] != first["pid"]

    # The same over HTTP, on the replacement.
    exited_at = time.monotonic()
    reply = httpx.get(f"{url}/doomed-exit", headers={"X-SERVE-CALL-METHOD": "exit_now"},
                      timeout=TIMEOUT)
    assert reply.status_code == 503, reply.text
    assert second["tag"] in reply.text
    assert time.monotonic() - exited_at < PROMPT_S

    third = httpx.get(f"{url}/doomed-exit", timeout=TIMEOUT)
    assert third.status_code == 200, third.text
    assert third.json()["tag"] not in (first["tag"], second["tag"])
    assert handle.remote().result(timeout=TIMEOUT) == third.json()


# --------------------------------------------------------------------------- 1d. endpoints


def _first_not_found(handle: Any) -> Tuple[float, float, EndpointNotFoundError]:
    """Call until a call raises EndpointNotFoundError: (its start, its end, the error)."""
    found: list = []

    def failed() -> bool:
        started = time.monotonic()
        try:
            handle.remote("probe").result(timeout=TIMEOUT)
        except EndpointNotFoundError as exc:
            found.append((started, time.monotonic(), exc))
            return True
        return False

    wait_for(failed, TIMEOUT, "a call to the deleted endpoint to raise EndpointNotFoundError")
    return found[0]


def test_handle_to_deleted_endpoint_raises_after_route_grace(fresh):
    client, _ = fresh
    client.create_endpoint("short-lived", backend="echo-fn")
    handle = client.get_handle("short-lived")
    assert handle.remote("x").result(timeout=TIMEOUT) == "fn:x"

    deleted_at = time.monotonic()
    client.delete_endpoint("short-lived")
    started, ended, error = _first_not_found(handle)
    grace = constants.ROUTE_GRACE_S
    assert ended - deleted_at >= grace, "raised before the route grace period was over"
    assert ended - started <= grace + 2.0
    assert "short-lived" in str(error)

    # Once the grace period is over, a call raises at once.
    started = time.monotonic()
    with pytest.raises(EndpointNotFoundError, match="short-lived"):
        handle.remote("again")
    assert time.monotonic() - started < 1.0


def test_async_handle_to_deleted_endpoint_raises_after_route_grace(fresh):
    client, _ = fresh
    client.create_endpoint("short-lived", backend="echo-fn")

    async def main() -> Tuple[float, float, str]:
        handle = client.get_handle("short-lived", sync=False)
        assert await (await handle.remote("x")) == "fn:x"  # this loop's router knows it
        deleted_at = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(
            None, client.delete_endpoint, "short-lived")
        while True:
            started = time.monotonic()
            try:
                await (await handle.remote("probe"))
            except EndpointNotFoundError as exc:
                return deleted_at, started, str(exc)
            assert time.monotonic() - deleted_at < TIMEOUT, "calls kept succeeding"
            await asyncio.sleep(0.02)

    deleted_at, started, message = asyncio.run(asyncio.wait_for(main(), TIMEOUT * 2))
    ended = time.monotonic()
    assert ended - deleted_at >= constants.ROUTE_GRACE_S
    assert ended - started <= constants.ROUTE_GRACE_S + 2.0
    assert "short-lived" in message


def test_deleted_endpoint_still_raises_promptly_after_other_endpoint_changes(fresh,
                                                                           monkeypatch):
    client, _ = fresh
    # Only so that a failure costs 6 s, not 30: the grace period (1 s) is what must apply.
    monkeypatch.setattr(constants, "MISSING_ENDPOINT_TIMEOUT_S", 6.0)
    client.create_endpoint("short-lived", backend="echo-fn")
    handle = client.get_handle("short-lived")
    assert handle.remote("x").result(timeout=TIMEOUT) == "fn:x"
    client.delete_endpoint("short-lived")
    _first_not_found(handle)

    # Some other endpoint changes once the grace period is over (any client could do this).
    time.sleep(constants.ROUTE_GRACE_S + 0.2)  # not synchronisation: let the grace lapse
    client.create_endpoint("bystander", backend="echo-fn")
    bystander = client.get_handle("bystander")
    assert bystander.remote("y").result(timeout=TIMEOUT) == "fn:y"  # our router has it now

    started = time.monotonic()
    with pytest.raises(EndpointNotFoundError, match="short-lived") as info:
        handle.remote("again").result(timeout=TIMEOUT)
    elapsed = time.monotonic() - started
    assert elapsed < constants.ROUTE_GRACE_S + 1.0, (
        f"a call to the deleted endpoint took {elapsed:.1f}s to fail once another endpoint "
        f"had changed: {info.value}")
    assert "deleted" in str(info.value)


def test_missing_ok_handle_waits_for_the_endpoint_to_be_created(fresh, monkeypatch):
    client, _ = fresh
    monkeypatch.setattr(constants, "MISSING_ENDPOINT_TIMEOUT_S", 10.0)
    handle = client.get_handle("not-yet", missing_ok=True)

    started = time.monotonic()
    (pending,) = in_threads([lambda: handle.remote("late").result(timeout=TIMEOUT)])
    with pytest.raises(concurrent.futures.TimeoutError):
        pending.result(timeout=0.5)  # it waits: the endpoint does not exist yet
    created_at = time.monotonic()
    client.create_endpoint("not-yet", backend="echo-fn")
    assert pending.result(timeout=TIMEOUT) == "fn:late"
    assert created_at - started >= 0.5
    assert time.monotonic() - started < 10.0


def test_missing_ok_handle_fails_when_endpoint_is_never_created(fresh, monkeypatch):
    client, _ = fresh
    monkeypatch.setattr(constants, "MISSING_ENDPOINT_TIMEOUT_S", 1.5)
    handle = client.get_handle("nope", missing_ok=True)
    started = time.monotonic()
    with pytest.raises(EndpointNotFoundError, match="nope") as info:
        handle.remote("x").result(timeout=TIMEOUT)
    elapsed = time.monotonic() - started
    assert 1.4 <= elapsed < 4.0, f"raised after {elapsed:.2f}s, not after the 1.5s timeout"
    assert "1.5" in str(info.value)


# --------------------------------------------------------------------------- 1e. truncated body


def test_http_request_with_truncated_body_never_reaches_the_backend(fresh, tmp_path):
    client, url = fresh
    log = tmp_path / "calls"
    client.create_backend("recorder", Recorder, str(log))
    client.create_endpoint("recorder", backend="recorder", route="/recorder", methods=["POST"])
    port = int(url.rsplit(":", 1)[1])

    for i in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(f"POST /recorder?id=truncated-{i} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         "Content-Type: text/plain\r\nContent-Length: 100\r\n\r\n".encode()
                         + b"x" * 10)
        # The socket is closed: 90 bytes of the promised body never come.

    # A complete request afterwards on the same endpoint is the barrier.
    reply = httpx.post(f"{url}/recorder", params={"id": "complete"}, content=b"y" * 100,
                       timeout=TIMEOUT)
    assert (reply.status_code, reply.text) == (200, "recorded complete")
    wait_for(lambda: log.exists() and "complete 100" in log.read_text(), TIMEOUT,
             "the complete request to be recorded")
    assert log.read_text().splitlines() == ["complete 100"]
    assert httpx.get(f"{url}/-/healthz", timeout=TIMEOUT).text == "success"


# --------------------------------------------------------------------------- 1f. pipelines


@pytest.fixture
def pipeline(fresh) -> Iterator[serve.Client]:
    client, _ = fresh
    client.create_backend("double", double)
    client.create_endpoint("double", backend="double")
    client.create_backend("add-one", add_one)
    client.create_endpoint("add-one", backend="add-one")
    yield client


def test_sync_handle_pipeline_passes_the_upstream_value(pipeline):
    h1, h2 = pipeline.get_handle("double"), pipeline.get_handle("add-one")
    assert h2.remote(h1.remote(5)).result(timeout=TIMEOUT) == ["int", 11]
    assert h2.remote(y=h1.remote(7)).result(timeout=TIMEOUT) == ["int", 15]
    # Several in flight at once.
    responses = [h2.remote(h1.remote(i)) for i in range(5)]
    assert [r.result(timeout=TIMEOUT) for r in responses] == [["int", 2 * i + 1]
                                                              for i in range(5)]

    with pytest.raises(PipelineError, match="double refused"):
        h2.remote(h1.remote("bad")).result(timeout=TIMEOUT)
    with pytest.raises(PipelineError, match="double refused"):
        h2.remote(y=h1.remote("bad")).result(timeout=TIMEOUT)
    assert h2.remote(h1.remote(1)).result(timeout=TIMEOUT) == ["int", 3]


def test_async_handle_pipeline_passes_the_upstream_value(pipeline):
    async def main() -> Dict[str, Any]:
        h1 = pipeline.get_handle("double", sync=False)
        h2 = pipeline.get_handle("add-one", sync=False)
        out: Dict[str, Any] = {}
        out["positional"] = await (await h2.remote(await h1.remote(5)))
        out["keyword"] = await (await h2.remote(y=await h1.remote(7)))
        for name, call in (("error", lambda r: h2.remote(r)),
                           ("keyword_error", lambda r: h2.remote(y=r))):
            try:
                await (await call(await h1.remote("bad")))
            except PipelineError as exc:
                out[name] = str(exc)
        return out

    out = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert out == {"positional": ["int", 11], "keyword": ["int", 15],
                   "error": "double refused 'bad'", "keyword_error": "double refused 'bad'"}


# --------------------------------------------------------------------------- 5. callable methods


@pytest.mark.parametrize("name", FORBIDDEN)
def test_http_cannot_call_non_public_methods_or_attributes(shared, name):
    _, url = shared
    with httpx.Client(base_url=url, timeout=TIMEOUT) as session:
        response = session.get("/robust", headers={"X-SERVE-CALL-METHOD": name})
        assert response.status_code == 404, f"{name}: {response.status_code} {response.text}"
        assert "MethodNotFoundError" in response.text
        assert repr(name) in response.text
        assert listed_methods(response.text) == ROBUST_METHODS
        assert session.get("/robust", headers={"X-SERVE-CALL-METHOD": "predict"},
                           params={"x": 1}).text == "predicted:1"


@pytest.mark.parametrize("name", FORBIDDEN)
def test_handle_cannot_call_non_public_methods_or_attributes(shared, name):
    client, _ = shared
    handle = client.get_handle("robust")
    with pytest.raises(MethodNotFoundError) as info:
        handle.options(method_name=name).remote().result(timeout=TIMEOUT)
    assert repr(name) in str(info.value)
    assert listed_methods(str(info.value)) == ROBUST_METHODS


def test_public_methods_stay_callable(shared):
    client, url = shared
    handle = client.get_handle("robust")
    assert handle.remote().result(timeout=TIMEOUT)["method"] == "__call__"
    assert handle.options(method_name="predict").remote(2).result(TIMEOUT) == "predicted:2"
    assert handle.options(method_name="apredict").remote(3).result(TIMEOUT) == "apredicted:3"
    with httpx.Client(base_url=url, timeout=TIMEOUT) as session:
        assert session.get("/robust").json()["method"] == "__call__"
        for method, expected in (("predict", "predicted:4"), ("apredict", "apredicted:4"),
                                 ("__call__", None)):
            response = session.get("/robust", params={"x": 4},
                                   headers={"X-SERVE-CALL-METHOD": method})
            assert response.status_code == 200, response.text
            if expected is not None:
                assert response.text == expected


@pytest.mark.parametrize("name", ["reconfigure", "_private", "__init__", "anything"])
def test_function_backend_ignores_the_method_name(shared, name):
    client, url = shared
    response = httpx.get(f"{url}/echo-fn", params={"x": "v"},
                         headers={"X-SERVE-CALL-METHOD": name}, timeout=TIMEOUT)
    assert (response.status_code, response.text) == (200, "fn:v")
    handle = client.get_handle("echo-fn").options(method_name=name)
    assert handle.remote("w").result(timeout=TIMEOUT) == "fn:w"
