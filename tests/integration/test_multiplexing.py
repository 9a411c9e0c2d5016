"""Model multiplexing against real processes: the ``serve_multiplexed_model_id`` header
over HTTP (a plain backend and a FastAPI ingress class), ``handle.options(
multiplexed_model_id=...)``, the replica a model's requests go to, eviction, failed loads,
a hot model spread over replicas, and what ``Client.status()`` and the metrics show."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Optional

import httpx
import pytest
from multiplexed_backends import BatchedModels, Models, ModelsApp

from conftest import wait_for

pytestmark = pytest.mark.integration

TIMEOUT = 30.0
HEADER = "serve_multiplexed_model_id"


def get(url: str, model_id: Optional[str], **params: Any) -> Dict[str, Any]:
    headers = {} if model_id is None else {HEADER: model_id}
    response = httpx.get(url, headers=headers, params=params, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def get_all(url: str, model_ids: List[str], **params: Any) -> List[Dict[str, Any]]:
    """GET ``url`` once per model id, all at once."""

    async def main() -> List[httpx.Response]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            return list(await asyncio.gather(*(
                http.get(url, headers={HEADER: m}, params=params) for m in model_ids)))

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * len(model_ids)
    return [r.json() for r in responses]


def serve_models(client: Any, replicas: int = 2, backend: Any = Models,
                 route: str = "/models", **config: Any) -> None:
    client.create_backend("models:v1", backend, config={"num_replicas": replicas, **config})
    client.create_endpoint("models", backend="models:v1", route=route)


def test_a_models_http_requests_go_to_the_replica_that_loaded_it(
        serve_instance: tuple) -> None:
    client, url = serve_instance
    serve_models(client, replicas=2)
    first = [get(f"{url}/models", "m1") for _ in range(4)]
    assert {answer["replica"] for answer in first} == {first[0]["replica"]}
    assert first[-1]["loads"].count("m1") == 1 and first[-1]["model"] == "m1"
    second = get(f"{url}/models", "m2")
    assert second["model"] == "m2" and second["loads"].count("m2") == 1
    again = get(f"{url}/models", "m1")
    assert again["replica"] == first[0]["replica"] and again["loads"].count("m1") == 1


def test_handle_options_name_the_model(serve_instance: tuple) -> None:
    client, _ = serve_instance
    serve_models(client, replicas=2)
    handle = client.get_handle("models")
    answers = [handle.options(multiplexed_model_id="a").remote().result(timeout=TIMEOUT)
               for _ in range(3)]
    assert [a["model"] for a in answers] == ["a"] * 3
    assert {a["replica"] for a in answers} == {answers[0]["replica"]}
    assert answers[-1]["loads"] == ["a"]

    async def from_async_handle() -> Dict[str, Any]:
        async_handle = client.get_handle("models", sync=False)
        return await (await async_handle.options(multiplexed_model_id="b").remote())

    assert asyncio.run(from_async_handle())["model"] == "b"


def test_a_fastapi_ingress_class_reads_the_header(serve_instance: tuple) -> None:
    client, url = serve_instance
    serve_models(client, replicas=1, backend=ModelsApp, route="/app")
    answer = get(f"{url}/app/predict", "x")
    assert answer["model"] == "x" and answer["loads"] == ["x"]


def test_beyond_the_limit_the_oldest_model_is_evicted_and_closed_and_status_shows_the_rest(
        serve_instance: tuple) -> None:
    client, url = serve_instance
    serve_models(client, replicas=1)
    for model_id in ("a", "b", "c"):
        answer = get(f"{url}/models", model_id)
    answer = get(f"{url}/models", "c")
    assert answer["closed"] == ["a"] and answer["loads"] == ["a", "b", "c"]
    replica = answer["replica"]

    def held() -> Optional[List[str]]:
        for process in client.status()["processes"]:
            if process["name"] == replica and process["models"]:
                return process["models"]
        return None

    assert wait_for(held, message="status to show the replica's models") == ["b", "c"]
    metrics = httpx.get(f"{url}/-/metrics", timeout=TIMEOUT).text
    labels = f'{{backend="models:v1",replica="{replica}"}}'
    assert f"servekit_multiplexed_model_evictions_total{labels} 1.0" in metrics
    assert f"servekit_multiplexed_model_loads_total{labels} 3.0" in metrics
    assert "ray_serve_multiplexed_models_load_counter_total{" in metrics


def test_a_failed_load_fails_its_requests_and_the_next_one_loads_again(
        serve_instance: tuple) -> None:
    client, url = serve_instance
    serve_models(client, replicas=1)
    for _ in range(2):
        response = httpx.get(f"{url}/models", headers={HEADER: "bad-1"}, timeout=TIMEOUT)
        assert response.status_code == 500
        assert "FileNotFoundError" in response.text and "bad-1" in response.text
    assert get(f"{url}/models", "good")["loads"] == ["bad-1", "bad-1", "good"]


def test_concurrent_first_requests_load_once_and_a_hot_model_spreads_to_another_replica(
        serve_instance: tuple) -> None:
    client, url = serve_instance
    serve_models(client, replicas=2, max_concurrent_queries=2)
    # Two at once fit the first replica that gets the model: loaded once, one replica.
    pair = get_all(f"{url}/models", ["hot", "hot"], sleep=0.3)
    assert {a["replica"] for a in pair} == {pair[0]["replica"]}
    assert pair[-1]["loads"] == ["hot"]
    # Four at once overfill it: the others go to the second replica, which loads it too.
    four = get_all(f"{url}/models", ["hot"] * 4, sleep=1.0)
    assert len({a["replica"] for a in four}) == 2
    assert all(a["loads"].count("hot") == 1 for a in four)


def test_a_batch_holds_the_requests_of_one_model_and_loads_it_inside(
        serve_instance: tuple) -> None:
    client, url = serve_instance
    serve_models(client, replicas=1, backend=BatchedModels)
    model_ids = ["m1", "m2"] * 6
    answers = get_all(f"{url}/models", model_ids, sleep=0.05)
    for model_id, answer in zip(model_ids, answers, strict=True):
        assert answer["model"] == model_id and answer["batch_models"] == [model_id]
    assert max(answer["batch_size"] for answer in answers) > 1  # (they did batch)
