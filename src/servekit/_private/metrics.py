"""servekit's Prometheus metrics: one registry per process, merged into one exposition.

Every process (proxy, replicas, controller, and any process whose routers send handle
calls) counts into its own ``REGISTRY``; ``exposition()`` renders it, and ``merge`` joins the
texts of several processes into one valid exposition (each family once, the samples of all).
Names follow Ray Serve's where it has the metric; the rest start with ``servekit_``.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000)

# --- HTTP proxy
HTTP_REQUESTS = Counter(
    "serve_num_http_requests", "HTTP requests the proxy answered, by route, method and status.",
    ["route", "method", "status_code"], registry=REGISTRY)
HTTP_ERRORS = Counter(
    "serve_num_http_error_requests", "HTTP requests answered with a status of 400 or more.",
    ["route", "method", "status_code"], registry=REGISTRY)
HTTP_LATENCY = Histogram(
    "serve_http_request_latency_ms", "End-to-end latency of HTTP requests in the proxy, in ms.",
    ["route"], buckets=_LATENCY_MS, registry=REGISTRY)

# --- routers (in the proxy and in every process that makes handle calls)
ROUTER_REQUESTS = Counter(
    "serve_num_router_requests", "Requests a router sent to a backend.",
    ["backend", "process"], registry=REGISTRY)
QUEUED = Gauge(
    "serve_deployment_queued_queries",
    "Requests waiting in a router for a replica of the backend with room.",
    ["backend", "process"], registry=REGISTRY)
SHED = Counter(
    "servekit_num_shed_requests",
    "Requests a router refused at once because the backend's queue was full.",
    ["backend", "process"], registry=REGISTRY)
SHADOWS = Counter(
    "servekit_num_shadow_requests",
    "Shadow copies of requests, by outcome: sent, dropped (every replica full), failed.",
    ["endpoint", "backend", "outcome", "process"], registry=REGISTRY)

# --- replicas
REPLICA_REQUESTS = Counter(
    "serve_deployment_request_counter", "Requests a replica finished.",
    ["backend", "replica"], registry=REGISTRY)
REPLICA_ERRORS = Counter(
    "serve_deployment_error_counter", "Requests whose backend code raised.",
    ["backend", "replica"], registry=REGISTRY)
PROCESSING = Histogram(
    "serve_deployment_processing_latency_ms", "Time a replica spent on a request, in ms.",
    ["backend", "replica"], buckets=_LATENCY_MS, registry=REGISTRY)
RUNNING = Gauge(
    "serve_replica_processing_queries", "Requests a replica holds now (running or waiting "
    "for its threads or a batch).", ["backend", "replica"], registry=REGISTRY)
BATCH_SIZE = Histogram(
    "servekit_batch_size", "Requests in each batch a batched method ran.",
    ["backend", "replica"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY)

# --- controller
REPLICA_STARTS = Counter(
    "servekit_replica_starts", "Replicas started (their constructor finished).",
    ["backend"], registry=REGISTRY)
REPLICA_RESTARTS = Counter(
    "servekit_replica_restarts",
    "Replicas replaced because they died or failed their health checks.",
    ["backend"], registry=REGISTRY)
HEALTH_CHECK_FAILURES = Counter(
    "servekit_health_check_failures", "Health checks of replicas that failed or timed out.",
    ["backend"], registry=REGISTRY)
TARGET_REPLICAS = Gauge(
    "servekit_backend_target_replicas", "Replicas a backend should have (the autoscaler's "
    "decision, or num_replicas).", ["backend"], registry=REGISTRY)
RUNNING_REPLICAS = Gauge(
    "servekit_backend_running_replicas", "Replicas of a backend that take requests.",
    ["backend"], registry=REGISTRY)


def process_label(role: str) -> str:
    """The ``process`` label of this process's router metrics: its role and pid."""
    return f"{role}-{os.getpid()}"


def exposition() -> str:
    """This process's metrics in the Prometheus text format."""
    return generate_latest(REGISTRY).decode()


class _Merged:
    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = list(texts)

    def collect(self) -> Iterator[Metric]:
        families: Dict[str, Metric] = {}
        for text in self._texts:
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit)
                merged.samples.extend(family.samples)
        return iter(families.values())


def merge(texts: Iterable[str]) -> str:
    """One exposition with every family of ``texts`` once and all their samples."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(texts))  # type: ignore[arg-type]
    return generate_latest(registry).decode()
