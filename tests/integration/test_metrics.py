"""Prometheus metrics against real processes: ``/-/metrics`` and ``serve.metrics_text()``
parse with prometheus-client's parser and count what was sent."""

from __future__ import annotations

import os
import signal
from typing import Any, Dict, Iterator, List

import httpx
import pytest
from asgi_backends import items_app
from prometheus_client.parser import text_string_to_metric_families

import servekit as serve
from conftest import free_port, wait_for
from servekit import metrics

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


class Counted:
    def __init__(self) -> None:
        self.hits = metrics.Counter("test_model_hits", "Hits of the test model.",
                                    tag_keys=("kind",))
        self.size = metrics.Gauge("test_model_size", "Size of the test model.")
        self.size.set(42)

    def __call__(self, request: Any) -> str:
        self.hits.inc(tags={"kind": "plain"})
        return "ok"


@serve.accept_batch
def batched(requests: List[Any]) -> List[int]:
    return [len(requests)] * len(requests)


def samples(text: str) -> Dict[str, List[Any]]:
    """Sample name -> its samples, from a parsed exposition."""
    found: Dict[str, List[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def value(found: Dict[str, List[Any]], name: str, **labels: str) -> float:
    return sum(s.value for s in found.get(name, [])
               if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def measured() -> Iterator[tuple]:
    port = free_port()
    client = serve.start(http_options={"port": port})
    client.create_backend("counted", Counted, config={"num_replicas": 2})
    client.create_endpoint("counted", backend="counted", route="/counted")
    yield client, f"http://127.0.0.1:{port}"
    client.shutdown()


def test_proxy_metrics_count_the_http_traffic_sent(measured: tuple) -> None:
    client, url = measured
    with httpx.Client(base_url=url, timeout=TIMEOUT) as session:
        for _ in range(7):
            assert session.get("/counted").status_code == 200
        assert session.get("/no-such-route").status_code == 404
        response = session.get("/-/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    assert value(found, "serve_num_http_requests_total", route="/counted", method="GET",
                 status_code="200") == 7
    assert value(found, "serve_num_http_error_requests_total", status_code="404") == 1
    assert value(found, "serve_http_request_latency_ms_count", route="/counted",
                 method="GET", status_code="200") == 7
    # The same under Ray Serve 2.x's names and labels, for its dashboards.
    assert value(found, "ray_serve_num_http_requests_total", route="/counted", method="GET",
                 status_code="200", application="default") == 7
    assert value(found, "ray_serve_num_http_error_requests_total", route="-",
                 error_code="404", application="") == 1
    assert value(found, "ray_serve_deployment_request_counter_total",
                 deployment="counted", application="default") == 7
    assert value(found, "ray_serve_deployment_replica_healthy", deployment="counted") == 2
    # The scrape itself is a request the proxy is serving.
    [ongoing] = found["servekit_num_ongoing_http_requests"]
    assert ongoing.labels["process"].startswith("proxy-") and ongoing.value >= 1
    assert value(found, "ray_serve_num_ongoing_http_requests") == ongoing.value
    # Gathered from both replicas: their counts add up to what was sent.
    per_replica = [s for s in found["serve_deployment_request_counter_total"]
                   if s.labels["backend"] == "counted"]
    assert {s.labels["replica"] for s in per_replica} == \
        {p["name"] for p in client._call("status")["processes"] if p["role"] == "replica"}
    assert sum(s.value for s in per_replica) == 7
    assert value(found, "serve_deployment_processing_latency_ms_count", backend="counted") == 7
    assert value(found, "serve_num_router_requests_total", backend="counted") == 7
    assert value(found, "servekit_replica_starts_total", backend="counted") == 2
    # The backend's own metrics, labelled with the replica that recorded them.
    assert value(found, "test_model_hits_total", backend="counted", kind="plain") == 7
    sizes = [s for s in found["test_model_size"] if s.labels["backend"] == "counted"]
    assert len(sizes) == 2 and all(s.value == 42 for s in sizes)


def test_an_asgi_apps_requests_are_labelled_with_the_route_they_matched(
        measured: tuple) -> None:
    """Not the raw path (one series per item id), nor only the app's prefix."""
    client, url = measured
    client.create_backend("items", items_app)
    client.create_endpoint("items", backend="items", route="/api")
    with httpx.Client(base_url=url, timeout=TIMEOUT) as session:
        for item_id in (1, 2, 3):
            assert session.get(f"/api/items/{item_id}").status_code == 200
        assert session.get("/api/events", params={"n": 2}).status_code == 200  # streamed
        assert session.get("/api/no-such-thing").status_code == 404

        def counted() -> Dict[str, List[Any]]:
            found = samples(session.get("/-/metrics").text)
            return found if value(found, "serve_num_http_requests_total",
                                  status_code="404", route="/api") else {}

        found = wait_for(counted, TIMEOUT, "the app's requests counted")
    assert isinstance(found, dict)
    assert value(found, "serve_num_http_requests_total", route="/api/items/{item_id}",
                 status_code="200") == 3
    assert value(found, "serve_http_request_latency_ms_count",
                 route="/api/items/{item_id}") == 3
    assert value(found, "serve_num_http_requests_total", route="/api/events") == 1
    assert not [s for s in found["serve_num_http_requests_total"]
                if s.labels["route"].startswith("/api/items/") and
                s.labels["route"] != "/api/items/{item_id}"]


def test_metrics_text_has_the_handle_side_too(measured: tuple) -> None:
    client, _ = measured
    client.create_backend("batched", batched, config={"max_batch_size": 4,
                                                      "batch_wait_timeout": 0.2})
    client.create_backend("shadow", Counted)
    client.create_endpoint("batched", backend="batched")
    client.shadow_traffic("batched", "shadow", 1.0)
    handle = client.get_handle("batched")
    responses = [handle.remote(i) for i in range(4)]
    assert [r.result(timeout=TIMEOUT) for r in responses] == [4, 4, 4, 4]
    found = samples(serve.metrics_text())
    assert value(found, "servekit_batch_size_count", backend="batched") == 1
    assert value(found, "servekit_batch_size_sum", backend="batched") == 4
    # Shadow copies of handle calls are counted by this process's router.
    wait_for(lambda: value(samples(serve.metrics_text()), "servekit_num_shadow_requests_total",
                           endpoint="batched", backend="shadow", outcome="sent") == 4,
             TIMEOUT, "four shadow copies counted")
    # ... as are the requests it sent.
    assert value(found, "serve_num_router_requests_total", backend="batched",
                 process=f"router-{os.getpid()}") == 4


def test_health_check_failures_and_restarts_are_counted() -> None:
    client = serve.start(http_options={"host": None})  # handle-only: metrics_text serves
    try:
        client.create_backend("fragile", Counted, config={
            "health_check_period_s": 0.2, "health_check_timeout_s": 0.2,
            "health_check_failure_threshold": 2})
        client.create_endpoint("fragile", backend="fragile")
        [replica] = [p for p in client._call("status")["processes"] if p["role"] == "replica"]
        os.kill(replica["pid"], signal.SIGSTOP)  # frozen: its pings time out
        try:
            wait_for(lambda: value(samples(serve.metrics_text()),
                                   "servekit_replica_restarts_total", backend="fragile") == 1,
                     TIMEOUT, "the frozen replica replaced")
        finally:
            try:
                os.kill(replica["pid"], signal.SIGCONT)
            except ProcessLookupError:
                pass
        wait_for(lambda: value(samples(serve.metrics_text()), "servekit_replica_starts_total",
                               backend="fragile") == 2, TIMEOUT, "its replacement started")
        found = samples(serve.metrics_text())
        assert value(found, "servekit_health_check_failures_total", backend="fragile") >= 2
    finally:
        client.shutdown()


def test_a_metric_redefined_with_other_tag_keys_is_a_value_error() -> None:
    metrics.Counter("test_redefined", tag_keys=("a",))
    metrics.Counter("test_redefined", tag_keys=("a",))  # the same one again: fine
    with pytest.raises(ValueError, match="another kind or tag keys"):
        metrics.Counter("test_redefined", tag_keys=("b",))
    with pytest.raises(ValueError, match="do not match the metric's tag keys"):
        metrics.Counter("test_redefined", tag_keys=("a",)).inc(tags={"b": "1"})


def test_scrapes_within_the_cache_period_share_one_gathering(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Scraping cannot load the proxy and replicas: scrapes within METRICS_CACHE_S (here
    made long, so that the test does not race the clock) get the same gathering."""
    monkeypatch.setenv("SERVEKIT_METRICS_CACHE_S", "600")
    port = free_port()
    client = serve.start(http_options={"port": port})
    try:
        client.create_backend("counted", Counted)
        client.create_endpoint("counted", backend="counted", route="/counted")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as session:
            assert session.get("/counted").status_code == 200
            first = session.get("/-/metrics").text
            for _ in range(3):
                assert session.get("/counted").status_code == 200
            later = [session.get("/-/metrics").text for _ in range(5)]
        assert value(samples(first), "serve_num_http_requests_total", route="/counted") == 1
        assert all(text == first for text in later)
        # serve.metrics_text() gathers afresh: it is not the proxy's scrape endpoint.
        assert value(samples(serve.metrics_text()), "serve_num_http_requests_total",
                     route="/counted") == 4
    finally:
        client.shutdown()
