"""``@serve.batch`` against real processes: a FastAPI route's batched method under
concurrent HTTP requests, a plain backend's batched ``__call__``, a batched method called
through handles (errors, runtime settings), and batched async generators streamed over
HTTP and to handles."""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, List

import httpx
import pytest
from batch_backends import Echo, Held, Scorer

from conftest import wait_for
from servekit.exceptions import BatchOutputError

pytestmark = pytest.mark.integration

TIMEOUT = 30.0
CONCURRENT = 32


@pytest.fixture
def scorer(serve_instance: tuple) -> Iterator[tuple]:
    """The Scorer ingress class at /scorer, one replica."""
    client, url = serve_instance
    client.create_backend("scorer:v1", Scorer)
    client.create_endpoint("scorer", backend="scorer:v1", route="/scorer")
    yield client, url


def get_all(urls: List[str]) -> List[httpx.Response]:
    """GET every url at once."""

    async def main() -> List[httpx.Response]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            return list(await asyncio.gather(*(http.get(url) for url in urls)))

    return asyncio.run(main())


def test_concurrent_requests_to_a_fastapi_route_are_batched(scorer: tuple) -> None:
    client, url = scorer
    responses = get_all([f"{url}/scorer/score/{x}" for x in range(CONCURRENT)])
    assert [r.status_code for r in responses] == [200] * CONCURRENT
    assert [r.json() for r in responses] == [{"x": x, "score": x * 10}
                                             for x in range(CONCURRENT)]
    sizes = client.get_handle("scorer").options(method_name="batch_sizes").remote().result()
    assert sum(sizes) == CONCURRENT and max(sizes) > 1 and max(sizes) <= 8


def test_handle_calls_to_a_batched_method_are_batched(scorer: tuple) -> None:
    client, _ = scorer
    handle = client.get_handle("scorer").options(method_name="score_one")
    responses = [handle.remote(x) for x in range(CONCURRENT)]
    assert [response.result(timeout=TIMEOUT) for response in responses] == \
        [x * 10 for x in range(CONCURRENT)]
    sizes = client.get_handle("scorer").options(method_name="batch_sizes").remote().result()
    assert sum(sizes) == CONCURRENT and max(sizes) > 1


def test_a_failing_batch_fails_each_of_its_callers(scorer: tuple) -> None:
    client, url = scorer
    handle = client.get_handle("scorer").options(method_name="score_one")
    with pytest.raises(ValueError, match="cannot score a batch holding -1"):
        handle.remote(-1).result(timeout=TIMEOUT)
    with pytest.raises(BatchOutputError, match=r"Scorer\.score must return one result per "
                                               r"request: it got 1 requests but returned 0"):
        handle.remote(-2).result(timeout=TIMEOUT)
    response = httpx.get(f"{url}/scorer/score/-1", timeout=TIMEOUT)
    assert response.status_code == 500
    assert handle.remote(3).result(timeout=TIMEOUT) == 30  # the replica batches on


def test_settings_change_through_reconfigure(scorer: tuple) -> None:
    client, url = scorer
    client.update_backend_config("scorer:v1", {"user_config": {
        "max_batch_size": 2, "batch_wait_timeout_s": 0.05}})
    responses = get_all([f"{url}/scorer/score/{x}" for x in range(12)])
    assert [r.json()["score"] for r in responses] == [x * 10 for x in range(12)]
    sizes = client.get_handle("scorer").options(method_name="batch_sizes").remote().result()
    assert sum(sizes) == 12 and max(sizes) == 2


def test_a_plain_backends_batched_call_gets_http_requests(serve_instance: tuple) -> None:
    client, url = serve_instance
    client.create_backend("echo:v1", Echo)
    client.create_endpoint("echo", backend="echo:v1", route="/echo")
    responses = get_all([f"{url}/echo?text=t{i}" for i in range(CONCURRENT)])
    assert [r.text for r in responses] == [f"t{i}!" for i in range(CONCURRENT)]
    sizes = client.get_handle("echo").options(method_name="batch_sizes").remote().result()
    assert sum(sizes) == CONCURRENT and max(sizes) > 1


def test_a_request_timeout_shorter_than_the_batch_wait_is_refused(
        serve_instance: tuple) -> None:
    client, _ = serve_instance
    with pytest.raises(ValueError, match="batch_wait_timeout_s=0.05"):
        client.create_backend("scorer:v1", Scorer, config={"request_timeout_s": 0.05})
    client.create_backend("scorer:v1", Scorer, config={"request_timeout_s": 5})
    with pytest.raises(ValueError, match="smaller than request_timeout_s"):
        client.update_backend_config("scorer:v1", {"request_timeout_s": 0.01})


def test_streamed_batches_reach_each_http_client(scorer: tuple) -> None:
    client, url = scorer
    responses = get_all([f"{url}/scorer/tokens/p{i}" for i in range(CONCURRENT)])
    assert [r.text for r in responses] == [f"p{i}.0 p{i}.1 p{i}.2 " for i in range(CONCURRENT)]
    sizes = client.get_handle("scorer").options(
        method_name="stream_batch_sizes").remote().result()
    assert sum(sizes) == CONCURRENT and max(sizes) > 1


def test_streamed_batches_reach_each_handle_caller(scorer: tuple) -> None:
    client, _ = scorer

    async def main() -> List[List[str]]:
        handle = client.get_handle("scorer", sync=False).options(method_name="stream_tokens",
                                                                 stream=True)

        async def read(prompt: str) -> List[str]:
            return [token async for token in await handle.remote(prompt)]

        return list(await asyncio.gather(*(read(f"h{i}") for i in range(8))))

    assert asyncio.run(main()) == [[f"h{i}.{step} " for step in range(3)] for i in range(8)]
    sizes = client.get_handle("scorer").options(
        method_name="stream_batch_sizes").remote().result()
    assert sum(sizes) == 8 and max(sizes) > 1


def test_an_http_client_that_leaves_before_its_batch_starts_is_taken_out(
        serve_instance: tuple, tmp_path: Path) -> None:
    client, url = serve_instance
    client.create_backend("held", Held, str(tmp_path))
    client.create_endpoint("held", backend="held", route="/held")
    queued = client.get_handle("held").options(method_name="queued")
    ran = tmp_path / "ran"
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.get, f"{url}/held/run/a", timeout=TIMEOUT)
        wait_for(lambda: ran.exists() and ran.read_text() == "a\n", TIMEOUT, "a's batch")
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /held/run/b HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_for(lambda: queued.remote().result() == 1, TIMEOUT, "b queued")
        # Its client left: b leaves the queue at once, without waiting for a's batch.
        wait_for(lambda: queued.remote().result() == 0, TIMEOUT, "b taken out")
        (tmp_path / "release").touch()
        assert first.result().json() == "a"
    assert httpx.get(f"{url}/held/run/c", timeout=TIMEOUT).json() == "c"
    assert ran.read_text() == "a\nc\n"  # b never ran
