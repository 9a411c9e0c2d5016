"""Python handles against real processes: sync and async calls, options, errors, scaling."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time

import numpy as np
import pytest
from starlette.requests import Request

import servekit as serve
from conftest import BOTH_RUNTIMES, wait_for
from servekit.request import ServeRequest

pytestmark = pytest.mark.integration
RUNTIMES = BOTH_RUNTIMES

TIMEOUT = 10.0


# --------------------------------------------------------------------------- backends


class ModelError(Exception):
    """A user exception defined in the test module: it must come back with this type."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


def describe(request: ServeRequest) -> dict:
    """Report what a handle call delivered."""
    return {
        "type": type(request).__name__,
        "data": request.data,
        "kwargs": dict(request.query_params),
        "method": request.method,
        "header": request.headers.get("X-Trace"),
        "body": asyncio.run(request.body()),
    }


async def async_describe(request: ServeRequest) -> dict:
    payload = await request.json()
    return {"json": payload, "body_is_data": (await request.body()) is request.data,
            "kwargs": dict(request.query_params)}


def starlette_passthrough(request) -> dict:
    if not isinstance(request, Request):
        return {"type": type(request).__name__}
    return {"type": "Request", "path": request.url.path,
            "query": dict(request.query_params), "method": request.method}


def raise_builtin(request: ServeRequest) -> None:
    return 1 / request.data


def raise_custom(request: ServeRequest) -> None:
    raise ModelError("the model refused", code=request.data)


async def async_raise_custom(request: ServeRequest) -> None:
    raise ModelError("async refusal", code=7)


def slow(request: ServeRequest) -> str:
    time.sleep(request.data)
    return f"slept {request.data}"


def numpy_double(request: ServeRequest) -> dict:
    array = request.data
    return {"doubled": array * 2, "dtype": str(array.dtype), "shape": array.shape,
            "is_ndarray": isinstance(array, np.ndarray)}


def whoami(request: ServeRequest) -> str:
    if request.data:
        time.sleep(request.data)
    return serve.get_current_replica_tag()


def whoami_backend(request: ServeRequest) -> str:
    return serve.get_current_backend_tag()


class Calculator:
    def __init__(self, offset: int) -> None:
        self.offset = offset

    def __call__(self, request: ServeRequest) -> str:
        return "call"

    def add(self, request: ServeRequest) -> int:
        return request.data + self.offset

    async def multiply(self, request: ServeRequest) -> int:
        return request.data * request.query_params["factor"]

    def method_seen(self, request: ServeRequest) -> dict:
        return {"method": request.method, "headers": dict(request.headers)}


# --------------------------------------------------------------------------- basics


def test_sync_handle_delivers_data_kwargs_as_serve_request(serve_instance):
    client, _ = serve_instance
    client.create_backend("describe", describe)
    client.create_endpoint("describe", backend="describe")
    handle = client.get_handle("describe")
    result = handle.remote({"x": [1, 2]}, top_k=3, name="n").result(timeout=TIMEOUT)
    assert result == {"type": "ServeRequest", "data": {"x": [1, 2]},
                      "kwargs": {"top_k": 3, "name": "n"}, "method": "GET", "header": None,
                      "body": {"x": [1, 2]}}


def test_remote_without_data_gives_none(serve_instance):
    client, _ = serve_instance
    client.create_backend("describe", describe)
    client.create_endpoint("describe", backend="describe")
    result = client.get_handle("describe").remote().result(timeout=TIMEOUT)
    assert result["data"] is None
    assert result["kwargs"] == {}


def test_remote_with_two_positional_args_is_type_error(serve_instance):
    client, _ = serve_instance
    client.create_backend("describe", describe)
    client.create_endpoint("describe", backend="describe")
    with pytest.raises(TypeError, match="positional"):
        client.get_handle("describe").remote(1, 2)


def test_handle_to_unknown_endpoint_is_key_error(serve_instance):
    client, _ = serve_instance
    with pytest.raises(KeyError, match="nope"):
        client.get_handle("nope")


def test_async_handle_returns_value(serve_instance):
    client, _ = serve_instance
    client.create_backend("async-describe", async_describe)
    client.create_endpoint("async-describe", backend="async-describe")

    async def main() -> list:
        handle = client.get_handle("async-describe", sync=False)
        single = await (await handle.remote({"a": 1}, k="v"))
        responses = [await handle.remote({"i": i}) for i in range(10)]
        many = await asyncio.gather(*responses)
        return [single, many]

    single, many = asyncio.run(main())
    assert single == {"json": {"a": 1}, "body_is_data": True, "kwargs": {"k": "v"}}
    assert [reply["json"] for reply in many] == [{"i": i} for i in range(10)]


def test_async_handle_works_in_successive_event_loops(serve_instance):
    client, _ = serve_instance
    client.create_backend("describe", describe)
    client.create_endpoint("describe", backend="describe")
    handle = client.get_handle("describe", sync=False)

    async def call(value: int) -> int:
        return (await (await handle.remote(value)))["data"]

    assert asyncio.run(call(1)) == 1
    assert asyncio.run(call(2)) == 2


def test_sync_response_is_awaitable_and_usable_from_other_threads(serve_instance):
    client, _ = serve_instance
    client.create_backend("describe", describe)
    client.create_endpoint("describe", backend="describe")
    handle = client.get_handle("describe")

    async def await_it() -> int:
        return (await handle.remote(5))["data"]

    assert asyncio.run(await_it()) == 5

    response = handle.remote(6)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: response.result(timeout=TIMEOUT)["data"], range(2)))
    assert results == [6, 6]


def test_starlette_request_as_single_argument_is_passed_through(serve_instance):
    client, _ = serve_instance
    client.create_backend("passthrough", starlette_passthrough)
    client.create_endpoint("passthrough", backend="passthrough")
    request = Request({"type": "http", "method": "POST", "path": "/some/path",
                       "query_string": b"a=1&b=2", "headers": []})
    result = client.get_handle("passthrough").remote(request).result(timeout=TIMEOUT)
    assert result == {"type": "Request", "path": "/some/path", "query": {"a": "1", "b": "2"},
                      "method": "POST"}
    other = client.get_handle("passthrough").remote({"not": "a request"}).result(TIMEOUT)
    assert other == {"type": "ServeRequest"}


def test_numpy_arrays_pass_through_intact(serve_instance):
    client, _ = serve_instance
    client.create_backend("numpy", numpy_double)
    client.create_endpoint("numpy", backend="numpy")
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    result = client.get_handle("numpy").remote(array).result(timeout=TIMEOUT)
    assert result["is_ndarray"] is True
    assert result["dtype"] == "float32"
    assert result["shape"] == (2, 3, 4)
    assert isinstance(result["doubled"], np.ndarray)
    assert result["doubled"].dtype == np.float32
    np.testing.assert_array_equal(result["doubled"], array * 2)

    big = np.random.default_rng(0).random((512, 512))  # 2 MiB
    np.testing.assert_array_equal(
        client.get_handle("numpy").remote(big).result(timeout=TIMEOUT)["doubled"], big * 2)


# --------------------------------------------------------------------------- options


def apply_it(request: ServeRequest) -> object:
    return request.data(request.query_params["x"])


def test_arguments_plain_pickle_cannot_carry_are_sent_with_cloudpickle(serve_instance):
    """As Ray sent them: a lambda, a closure, a class of the caller's script."""
    client, _ = serve_instance
    client.create_backend("apply", apply_it)
    client.create_endpoint("apply", backend="apply")
    handle = client.get_handle("apply")
    factor = 3
    assert handle.remote(lambda x: x * factor, x=2).result(timeout=TIMEOUT) == 6
    scripted = type("Scripted", (), {"__module__": "__main__",
                                     "__init__": lambda self, x: setattr(self, "x", x)})
    made = handle.remote(scripted, x=5).result(timeout=TIMEOUT)
    assert type(made).__name__ == "Scripted" and made.x == 5


def test_options_method_name_calls_other_methods(serve_instance):
    client, _ = serve_instance
    client.create_backend("calc", Calculator, 10)
    client.create_endpoint("calc", backend="calc")
    handle = client.get_handle("calc")
    assert handle.remote(1).result(timeout=TIMEOUT) == "call"
    assert handle.options(method_name="add").remote(5).result(timeout=TIMEOUT) == 15
    assert handle.options(method_name="multiply").remote(4, factor=3).result(TIMEOUT) == 12


def test_options_returns_new_handle_and_chains(serve_instance):
    client, _ = serve_instance
    client.create_backend("calc", Calculator, 0)
    client.create_endpoint("calc", backend="calc")
    original = client.get_handle("calc")
    chained = original.options(method_name="method_seen").options(
        http_method="post").options(http_headers={"X-Trace": "abc"})
    assert chained is not original
    assert chained.remote().result(timeout=TIMEOUT) == {"method": "POST",
                                                        "headers": {"x-trace": "abc"}}
    # The original handle is unchanged.
    assert original.remote().result(timeout=TIMEOUT) == "call"
    # An intermediate handle keeps only what was set on it.
    only_method = original.options(method_name="method_seen")
    assert only_method.remote().result(timeout=TIMEOUT) == {"method": "GET", "headers": {}}


def test_http_headers_are_case_insensitive_in_backend(serve_instance):
    client, _ = serve_instance
    client.create_backend("describe", describe)
    client.create_endpoint("describe", backend="describe")
    handle = client.get_handle("describe").options(http_headers={"x-trace": "t-1"},
                                                   http_method="PUT")
    result = handle.remote().result(timeout=TIMEOUT)
    assert result["header"] == "t-1"
    assert result["method"] == "PUT"


def test_async_handle_options(serve_instance):
    client, _ = serve_instance
    client.create_backend("calc", Calculator, 100)
    client.create_endpoint("calc", backend="calc")

    async def main() -> int:
        handle = client.get_handle("calc", sync=False).options(method_name="add")
        return await (await handle.remote(1))

    assert asyncio.run(main()) == 101


def test_shard_key_option_is_accepted(serve_instance):
    client, _ = serve_instance
    client.create_backend("calc", Calculator, 1)
    client.create_endpoint("calc", backend="calc")
    handle = client.get_handle("calc").options(shard_key="user-42", method_name="add")
    assert [handle.remote(i).result(timeout=TIMEOUT) for i in range(3)] == [1, 2, 3]


def test_shard_key_pins_backend_of_a_split(serve_instance):
    client, _ = serve_instance
    client.create_backend("left", whoami_backend)
    client.create_backend("right", whoami_backend)
    client.create_endpoint("split", backend="left")
    client.set_traffic("split", {"left": 0.5, "right": 0.5})
    handle = client.get_handle("split")
    for key in ("alice", "bob", "carol", "dave"):
        keyed = handle.options(shard_key=key)
        backends = {keyed.remote().result(timeout=TIMEOUT) for _ in range(8)}
        assert len(backends) == 1, (key, backends)


def test_unknown_method_is_error_listing_available_methods(serve_instance):
    client, _ = serve_instance
    client.create_backend("calc", Calculator, 0)
    client.create_endpoint("calc", backend="calc")
    handle = client.get_handle("calc")
    with pytest.raises(serve.RayServeException) as info:
        handle.options(method_name="divide").remote(1).result(timeout=TIMEOUT)
    message = str(info.value)
    assert "divide" in message
    for name in ("add", "multiply", "method_seen"):
        assert name in message
    # The replica is fine afterwards.
    assert handle.options(method_name="add").remote(2).result(timeout=TIMEOUT) == 2


# --------------------------------------------------------------------------- errors


def test_builtin_exception_reraised_with_its_type(serve_instance):
    client, _ = serve_instance
    client.create_backend("divide", raise_builtin)
    client.create_endpoint("divide", backend="divide")
    handle = client.get_handle("divide")
    with pytest.raises(ZeroDivisionError):
        handle.remote(0).result(timeout=TIMEOUT)
    assert handle.remote(4).result(timeout=TIMEOUT) == 0.25


def test_custom_exception_reraised_with_its_type_and_attributes(serve_instance):
    client, _ = serve_instance
    client.create_backend("custom", raise_custom)
    client.create_endpoint("custom", backend="custom")
    with pytest.raises(ModelError, match="the model refused") as info:
        client.get_handle("custom").remote(42).result(timeout=TIMEOUT)
    assert info.value.code == 42


def test_custom_exception_through_async_handle(serve_instance):
    client, _ = serve_instance
    client.create_backend("async-custom", async_raise_custom)
    client.create_endpoint("async-custom", backend="async-custom")

    async def main() -> None:
        handle = client.get_handle("async-custom", sync=False)
        await (await handle.remote())

    with pytest.raises(ModelError, match="async refusal") as info:
        asyncio.run(main())
    assert info.value.code == 7


def test_result_timeout_raises_timeout_error_then_reply_still_arrives(serve_instance):
    client, _ = serve_instance
    client.create_backend("slow", slow)
    client.create_endpoint("slow", backend="slow")
    response = client.get_handle("slow").remote(1.5)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        response.result(timeout=0.2)
    assert time.monotonic() - started < 1.0
    assert response.result(timeout=TIMEOUT) == "slept 1.5"


# --------------------------------------------------------------------------- replicas


def _replica_tags(handle, count: int, work_s: float) -> list:
    responses = [handle.remote(work_s) for _ in range(count)]
    return [response.result(timeout=TIMEOUT) for response in responses]


def test_requests_spread_over_replicas(serve_instance):
    client, _ = serve_instance
    client.create_backend("whoami", whoami, config={"num_replicas": 3})
    client.create_endpoint("whoami", backend="whoami")
    handle = client.get_handle("whoami")
    seen: set = set()
    wait_for(lambda: seen.update(_replica_tags(handle, 12, 0.05)) or len(seen) == 3,
             TIMEOUT, "requests to reach all three replicas")
    assert all(tag.startswith("whoami#") for tag in seen)


def test_handle_survives_scale_up_and_down(serve_instance):
    client, _ = serve_instance
    client.create_backend("whoami", whoami, config={"num_replicas": 1})
    client.create_endpoint("whoami", backend="whoami")
    handle = client.get_handle("whoami")
    (first,) = set(_replica_tags(handle, 3, 0))

    client.update_backend_config("whoami", {"num_replicas": 3})
    assert client.get_backend_config("whoami").num_replicas == 3
    seen: set = set()
    wait_for(lambda: seen.update(_replica_tags(handle, 12, 0.05)) or len(seen) == 3,
             TIMEOUT, "the handle to use all three replicas after scaling up")

    # Requests in flight while scaling down still get answers.
    in_flight = [handle.remote(0.3) for _ in range(6)]
    client.update_backend_config("whoami", {"num_replicas": 1})
    assert all(r.result(timeout=TIMEOUT) in seen for r in in_flight)

    def one_replica_left() -> bool:
        return len(set(_replica_tags(handle, 6, 0.02))) == 1

    wait_for(one_replica_left, TIMEOUT, "requests to go to the single remaining replica")
    survivors = set(_replica_tags(handle, 6, 0))
    assert len(survivors) == 1
    assert survivors <= seen | {first}


def test_handle_survives_backend_swap_and_old_backend_deletion(serve_instance):
    client, _ = serve_instance
    client.create_backend("old", whoami_backend)
    client.create_endpoint("swap", backend="old")
    handle = client.get_handle("swap")
    async_results: list = []
    assert handle.remote().result(timeout=TIMEOUT) == "old"

    client.create_backend("new", whoami_backend)
    client.set_traffic("swap", {"new": 1.0})
    wait_for(lambda: handle.remote().result(timeout=TIMEOUT) == "new", TIMEOUT,
             "the handle to reach the new backend")
    client.delete_backend("old")
    assert "old" not in client.list_backends()
    assert [handle.remote().result(timeout=TIMEOUT) for _ in range(5)] == ["new"] * 5

    async def via_async_handle() -> None:
        ah = client.get_handle("swap", sync=False)
        async_results.append(await (await ah.remote()))

    asyncio.run(via_async_handle())
    assert async_results == ["new"]


def test_handle_requests_from_many_threads(serve_instance):
    client, _ = serve_instance
    client.create_backend("calc", Calculator, 1000)
    client.create_endpoint("calc", backend="calc")
    handle = client.get_handle("calc").options(method_name="add")
    barrier = threading.Barrier(8)

    def call(i: int) -> int:
        barrier.wait(timeout=TIMEOUT)
        return handle.remote(i).result(timeout=TIMEOUT)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(call, range(8))) == [1000 + i for i in range(8)]


def test_first_requests_sent_concurrently_all_succeed(serve_instance):
    # Several requests racing to open the first connection to a fresh replica.
    client, _ = serve_instance
    client.create_backend("calc", Calculator, 0)
    client.create_endpoint("calc", backend="calc")

    async def main() -> list:
        handle = client.get_handle("calc", sync=False).options(method_name="add")
        responses = await asyncio.gather(*(handle.remote(i) for i in range(8)))
        return list(await asyncio.gather(*responses))

    assert asyncio.run(main()) == list(range(8))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_async_handles_in_finished_event_loops_do_not_leak_connections(serve_instance):
    # A program may call asyncio.run() with an async handle again and again: the connections
    # opened for a loop must not outlive it.
    client, _ = serve_instance
    client.create_backend("describe", describe)
    client.create_endpoint("describe", backend="describe")

    async def call(value: int) -> int:
        handle = client.get_handle("describe", sync=False)
        return (await (await handle.remote(value)))["data"]

    assert asyncio.run(call(0)) == 0  # warm up: imports, the sync router, caches
    before = _open_fds()
    assert [asyncio.run(call(i)) for i in range(1, 6)] == [1, 2, 3, 4, 5]
    after = _open_fds()
    assert after - before <= 1, (
        f"{after - before} file descriptors are still open after 5 finished event loops")


def wait_for_file(request: ServeRequest) -> str:
    """Answer once the file named by the request exists (a gate the test opens)."""
    deadline = time.monotonic() + 30
    while not os.path.exists(request.data) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "opened"


def test_sync_remote_returns_at_once_while_there_is_room_and_blocks_when_full(
        serve_instance, tmp_path):
    client, _ = serve_instance
    client.create_backend("gated", wait_for_file, config={"max_concurrent_queries": 2})
    client.create_endpoint("gated", backend="gated")
    handle = client.get_handle("gated")
    assert handle.remote(str(tmp_path)).result(timeout=TIMEOUT) == "opened"  # (it exists)
    gate = str(tmp_path / "gate")
    returned: list = []

    def caller() -> None:
        for _ in range(60):
            returned.append(handle.remote(gate))

    thread = threading.Thread(target=caller, daemon=True)
    thread.start()
    # Two calls fill the replica; a few dozen more may go on their way before the handle
    # learns it is full; then remote() blocks until a replica is chosen.
    thread.join(1.0)
    assert thread.is_alive() and len(returned) < 60
    with open(gate, "w"):
        pass
    thread.join(TIMEOUT * 3)
    assert not thread.is_alive()
    assert [response.result(timeout=TIMEOUT) for response in returned] == ["opened"] * 60
