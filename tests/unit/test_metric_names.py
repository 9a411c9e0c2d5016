"""Ray Serve 2.x's metric names as aliases of servekit's (``metrics.merge``), and the route
template an ASGI app's request is labelled with (``asgi_runner.route_template``)."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Optional

from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from servekit._private import metrics
from servekit._private.replica.asgi_runner import route_template


def _samples(text: str) -> Dict[str, List[Any]]:
    found: Dict[str, List[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def _proxy_and_replica_texts() -> List[str]:
    """What a proxy and a replica would expose: a few of servekit's families, recorded."""
    proxy, replica = CollectorRegistry(), CollectorRegistry()
    requests = Counter("serve_num_http_requests", "", ["route", "method", "status_code"],
                       registry=proxy)
    errors = Counter("serve_num_http_error_requests", "", ["route", "method", "status_code"],
                     registry=proxy)
    latency = Histogram("serve_http_request_latency_ms", "",
                        ["route", "method", "status_code"], buckets=(1, 10), registry=proxy)
    requests.labels("/model", "GET", "200").inc(3)
    latency.labels("/model", "GET", "200").observe(5)
    requests.labels("-", "GET", "404").inc()
    errors.labels("-", "GET", "404").inc()
    processing = Histogram("serve_deployment_processing_latency_ms", "",
                           ["backend", "replica"], buckets=(1, 10), registry=replica)
    processing.labels("model:v1", "model:v1#a").observe(0.5)
    Gauge("servekit_backend_running_replicas", "", ["backend"],
          registry=replica).labels("model:v1").set(2)
    Counter("servekit_replica_starts", "", ["backend"], registry=replica).labels("m").inc()
    return [generate_latest(proxy).decode(), generate_latest(replica).decode()]


def _value(found: Dict[str, List[Any]], name: str, **labels: str) -> Optional[float]:
    matching = [s.value for s in found.get(name, [])
                if all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(matching) if matching else None


def test_ray_names_show_the_same_samples_with_rays_labels() -> None:
    found = _samples(metrics.merge(_proxy_and_replica_texts(), ray_names=True))
    # servekit's own names are all still there.
    assert _value(found, "serve_num_http_requests_total", route="/model",
                  status_code="200") == 3
    # Ray's: the same counts, with an application ...
    assert _value(found, "ray_serve_num_http_requests_total", route="/model", method="GET",
                  status_code="200", application="default") == 3
    # ... which a request that matched no route has not, as in Ray.
    assert _value(found, "ray_serve_num_http_requests_total", route="-",
                  application="") == 1
    # The error counter's status is Ray's error_code.
    [error] = found["ray_serve_num_http_error_requests_total"]
    assert error.labels == {"route": "-", "method": "GET", "error_code": "404",
                            "application": ""}
    # A histogram keeps its buckets, sum and count; the backend is Ray's deployment.
    assert _value(found, "ray_serve_http_request_latency_ms_bucket", route="/model",
                  le="10.0") == 1
    assert _value(found, "ray_serve_deployment_processing_latency_ms_count",
                  deployment="model:v1", replica="model:v1#a", application="default") == 1
    assert _value(found, "ray_serve_deployment_processing_latency_ms_sum",
                  deployment="model:v1") == 0.5
    assert not any("backend" in s.labels for name, samples in found.items()
                   if name.startswith("ray_") for s in samples)
    # The replicas that take requests, summed per deployment as Ray's dashboards do.
    assert _value(found, "ray_serve_deployment_replica_healthy", deployment="model:v1") == 2
    # A family with no Ray counterpart has no alias.
    assert not [name for name in found if name.startswith("ray_serve_deployment_replica_st")]


def test_without_ray_names_only_servekits_are_shown() -> None:
    found = _samples(metrics.merge(_proxy_and_replica_texts(), ray_names=False))
    assert "serve_num_http_requests_total" in found
    assert not [name for name in found if name.startswith("ray_")]


def test_every_aliased_family_is_one_servekit_records() -> None:
    """A family renamed in servekit cannot leave its alias behind, showing nothing."""
    recorded = set(metrics.REGISTRY.names())
    assert set(metrics.RAY_NAMES) <= recorded


def _matched(app: Any, path: str, root_path: str = "") -> Optional[str]:
    """The route template ``app`` leaves in the scope of a GET of ``path``."""
    scope: Dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": root_path + path, "raw_path": (root_path + path).encode(),
        "root_path": root_path, "query_string": b"", "headers": [], "client": None,
        "server": None}

    async def receive() -> Dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Dict[str, Any]) -> None:
        pass

    asyncio.run(app(scope, receive, send))
    return route_template(scope)


def test_a_fastapi_apps_request_is_labelled_with_the_route_it_matched() -> None:
    app = FastAPI()
    items = APIRouter(prefix="/items")

    @items.get("/{item_id}/parts/{part}")
    def part(item_id: int, part: str) -> dict:
        return {}

    @app.get("/health")
    def health() -> str:
        return "ok"

    app.include_router(items)
    assert _matched(app, "/items/7/parts/wheel", root_path="/shop") == \
        "/shop/items/{item_id}/parts/{part}"
    assert _matched(app, "/health") == "/health"
    assert _matched(app, "/nothing/here") is None  # a 404: labelled with the endpoint's route


def test_a_starlette_mount_gives_the_route_inside_it_or_its_own_path() -> None:
    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    async def files(scope: Any, receive: Any, send: Any) -> None:  # not a router
        await PlainTextResponse("a file")(scope, receive, send)

    app = Starlette(routes=[Mount("/v1", routes=[Route("/hello/{name}", hello)]),
                            Mount("/static", app=files)])
    assert _matched(app, "/v1/hello/ann", root_path="/api") == "/api/v1/hello/{name}"
    assert _matched(app, "/static/css/site.css", root_path="/api") == "/api/static"


def test_an_app_that_names_no_route_has_none() -> None:
    async def raw(scope: Any, receive: Any, send: Any) -> None:
        scope["route"] = "/made-up"  # not a route object: ignored

    assert _matched(raw, "/x") is None
