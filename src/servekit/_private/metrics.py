"""servekit's Prometheus metrics: one registry per process, merged into one exposition.

Every process (proxy, replicas, controller, and any process whose routers send handle
calls) counts into its own ``REGISTRY``; ``exposition()`` renders it, and ``merge`` joins the
texts of several processes into one valid exposition (each family once, the samples of all).
Names follow Ray Serve 1.x's where it has the metric; the rest start with ``servekit_``.

servekit's own families are recorded and rendered here, in the Prometheus text format,
without prometheus-client: a process imports it only to merge texts (a scrape) or when a
backend defines metrics of its own (``servekit.metrics``, registered in ``REGISTRY`` too).

Ray Serve 2.x exports its metrics with ``ray_`` in front and other label names
(``deployment`` for the backend, an ``application``), which is what its Grafana dashboards
query. ``merge`` adds those names as aliases of the same samples (``RAY_NAMES``), made at
scrape time: a request is recorded once, under servekit's name.
"""

from __future__ import annotations

import abc
import bisect
import math
import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

from servekit._private import constants

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

# The content type of an exposition (prometheus-client's CONTENT_TYPE_LATEST).
CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"


def _number(value: float) -> str:
    """``value`` as Prometheus writes numbers (Go's format: ``1.0``, ``+Inf``, ``1e+07``)."""
    value = float(value)
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return text


def _escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_text(pairs: Iterable[Tuple[str, str]]) -> str:
    """``{name="value",...}`` by name, as prometheus-client writes them."""
    text = ",".join(f'{name}="{_escaped(value)}"' for name, value in sorted(pairs))
    return f"{{{text}}}" if text else ""


class _Series:
    """One labelled series of a counter or gauge."""

    __slots__ = ("_value", "_lock", "_function")

    def __init__(self) -> None:
        self._value = 0.0
        self._lock = threading.Lock()
        self._function: Callable[[], float] | None = None

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value -= amount

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def set_function(self, function: Callable[[], float]) -> None:
        """Read the value from ``function`` when the metrics are rendered."""
        self._function = function

    def get(self) -> float:
        return float(self._function()) if self._function is not None else self._value


class _HistogramSeries:
    """One labelled series of a histogram: a count per bucket, the sum."""

    __slots__ = ("_bounds", "_counts", "_sum", "_lock")

    def __init__(self, bounds: Tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self._bounds, value)] += 1
            self._sum += value

    def lines(self, name: str, labels: List[Tuple[str, str]]) -> Iterator[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = 0
        for bound, count in zip((*self._bounds, math.inf), counts, strict=True):
            cumulative += count
            yield f"{name}_bucket{_label_text([*labels, ('le', _number(bound))])} {cumulative}.0"
        yield f"{name}_count{_label_text(labels)} {cumulative}.0"
        yield f"{name}_sum{_label_text(labels)} {_number(total)}"


class _Family(abc.ABC):
    """A metric family: its name, help, label names and a series per label values."""

    _type = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: _Registry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: Dict[Tuple[str, ...], Any] = {}
        self._lock = threading.Lock()
        registry.add(self)

    @abc.abstractmethod
    def _new_series(self) -> Any:
        """A new series of this family's kind."""

    def labels(self, *values: Any) -> Any:
        """The series of these label values (made at first use)."""
        key = tuple(str(value) for value in values)
        series = self._series.get(key)
        if series is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes the labels {list(self.labelnames)}, got "
                                 f"{len(key)} values: {list(key)}.")
            with self._lock:
                series = self._series.setdefault(key, self._new_series())
        return series

    def remove(self, *values: Any) -> None:
        """Drop the series of these label values (KeyError if it was never made)."""
        with self._lock:
            del self._series[tuple(str(value) for value in values)]

    def render(self) -> Iterator[str]:
        exposed = f"{self.name}_total" if self._type == "counter" else self.name
        yield f"# HELP {exposed} {_escaped_help(self.documentation)}"
        yield f"# TYPE {exposed} {self._type}"
        with self._lock:
            series = list(self._series.items())
        for values, one in series:
            labels = list(zip(self.labelnames, values, strict=True))
            yield from self._lines(exposed, labels, one)

    def _lines(self, name: str, labels: List[Tuple[str, str]], series: Any) -> Iterator[str]:
        yield f"{name}{_label_text(labels)} {_number(series.get())}"


def _escaped_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class Counter(_Family):
    _type = "counter"

    def _new_series(self) -> _Series:
        return _Series()


class Gauge(_Family):
    _type = "gauge"

    def _new_series(self) -> _Series:
        return _Series()


class Histogram(_Family):
    _type = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float], registry: _Registry) -> None:
        self._bounds = tuple(sorted(float(bound) for bound in buckets))
        super().__init__(name, documentation, labelnames, registry)

    def _new_series(self) -> _HistogramSeries:
        return _HistogramSeries(self._bounds)

    def _lines(self, name: str, labels: List[Tuple[str, str]], series: Any) -> Iterator[str]:
        return series.lines(name, labels)


class _Registry:
    """servekit's families, and the prometheus-client collectors registered beside them
    (a backend's own metrics: ``servekit.metrics``)."""

    def __init__(self) -> None:
        self.families: List[_Family] = []
        self.collectors: List[Any] = []

    def add(self, family: _Family) -> None:
        self.families.append(family)

    def register(self, collector: Any) -> None:
        """(prometheus-client's registry API: its metrics register themselves.)"""
        self.collectors.append(collector)

    def unregister(self, collector: Any) -> None:
        self.collectors.remove(collector)

    def collect(self) -> Iterator[Any]:
        """The registered prometheus-client collectors' families."""
        for collector in list(self.collectors):
            yield from collector.collect()

    def names(self) -> List[str]:
        """The names of every family, servekit's and the registered collectors'."""
        return [family.name for family in self.families] + \
            [family.name for family in self.collect()]


REGISTRY = _Registry()

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
    ["route", "method", "status_code"], buckets=_LATENCY_MS, registry=REGISTRY)
ONGOING_HTTP = Gauge(
    "servekit_num_ongoing_http_requests",
    "HTTP requests (and WebSocket connections) a proxy is serving now.",
    ["process"], registry=REGISTRY)

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
MODEL_LOADS = Counter(
    "servekit_multiplexed_model_loads", "Models a replica's @serve.multiplexed loader loaded.",
    ["backend", "replica"], registry=REGISTRY)
MODEL_LOAD_FAILURES = Counter(
    "servekit_multiplexed_model_load_failures", "Model loads that raised.",
    ["backend", "replica"], registry=REGISTRY)
MODEL_LOAD_LATENCY = Histogram(
    "servekit_multiplexed_model_load_latency_ms", "Time a model's load took, in ms.",
    ["backend", "replica"], buckets=_LATENCY_MS, registry=REGISTRY)
MODEL_EVICTIONS = Counter(
    "servekit_multiplexed_model_evictions",
    "Models a replica evicted beyond max_num_models_per_replica.",
    ["backend", "replica"], registry=REGISTRY)
MODEL_HITS = Counter(
    "servekit_multiplexed_model_hits",
    "Calls of a @serve.multiplexed loader answered with a model the replica held.",
    ["backend", "replica"], registry=REGISTRY)
MODELS_HELD = Gauge(
    "servekit_multiplexed_models", "Models a replica holds now (loading included).",
    ["backend", "replica"], registry=REGISTRY)

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
    lines = [line for family in REGISTRY.families for line in family.render()]
    text = "\n".join(lines) + "\n"
    if REGISTRY.collectors:
        from prometheus_client import generate_latest

        text += generate_latest(REGISTRY).decode()  # type: ignore[arg-type]
    return text


# servekit's family -> Ray Serve 2.x's name for it. Ray 2.x exports Ray 1.x's names (those
# servekit uses) with "ray_" in front; two of servekit's own have a counterpart too.
RAY_NAMES: Dict[str, str] = {
    **{name: f"ray_{name}" for name in (
        "serve_num_http_requests", "serve_num_http_error_requests",
        "serve_http_request_latency_ms", "serve_num_router_requests",
        "serve_deployment_queued_queries", "serve_deployment_request_counter",
        "serve_deployment_error_counter", "serve_deployment_processing_latency_ms",
        "serve_replica_processing_queries")},
    "servekit_num_ongoing_http_requests": "ray_serve_num_ongoing_http_requests",
    # Ray counts a replica started again after a failure; so does this one.
    "servekit_replica_restarts": "ray_serve_deployment_replica_starts",
    "servekit_multiplexed_model_loads": "ray_serve_multiplexed_models_load_counter",
    "servekit_multiplexed_model_evictions": "ray_serve_multiplexed_models_unload_counter",
    "servekit_multiplexed_model_load_latency_ms": "ray_serve_multiplexed_model_load_latency_ms",
    "servekit_multiplexed_models": "ray_serve_num_multiplexed_models",
    # Ray has a 0/1 series per replica; this one a series per backend whose value is the
    # number of replicas taking requests: a sum over replicas is the same.
    "servekit_backend_running_replicas": "ray_serve_deployment_replica_healthy",
}
# servekit's label -> Ray's, for every alias (the error counter's status is Ray's error_code).
_RAY_LABELS = {"backend": "deployment"}
_RAY_LABELS_OF = {name: {**_RAY_LABELS, "status_code": "error_code"}
                  if name == "serve_num_http_error_requests" else _RAY_LABELS
                  for name in RAY_NAMES}
# The ``application`` label of the aliases: a servekit instance is one application in Ray's
# terms. A request that matched no route (route "-") has none (""), as in Ray.
RAY_APPLICATION = "default"


def ray_alias(family: Metric) -> Metric:
    """``family`` under its Ray Serve 2.x name (``RAY_NAMES``): the same samples, their
    labels renamed as Ray names them, with an ``application``."""
    from prometheus_client.metrics_core import Metric

    name = RAY_NAMES[family.name]
    renames = _RAY_LABELS_OF[family.name]
    alias = Metric(name, family.documentation, family.type, family.unit)
    cut = len(family.name)
    for sample in family.samples:
        labels = {renames.get(key, key): value for key, value in sample.labels.items()}
        labels["application"] = "" if labels.get("route") == "-" else RAY_APPLICATION
        alias.samples.append(sample._replace(name=name + sample.name[cut:], labels=labels))
    return alias


class _Merged:
    def __init__(self, texts: Iterable[str], ray_names: bool) -> None:
        self._texts = list(texts)
        self._ray_names = ray_names

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import Metric
        from prometheus_client.parser import text_string_to_metric_families

        families: Dict[str, Metric] = {}
        for text in self._texts:
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit)
                merged.samples.extend(family.samples)
        aliases: List[Metric] = []
        if self._ray_names:
            aliases = [ray_alias(family) for name, family in families.items()
                       if name in RAY_NAMES]
        return iter([*families.values(), *aliases])


def merge(texts: Iterable[str], ray_names: bool = constants.RAY_METRIC_NAMES) -> str:
    """One exposition with every family of ``texts`` once and all their samples; with
    ``ray_names``, also those of ``RAY_NAMES`` under Ray Serve 2.x's names."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(texts, ray_names))  # type: ignore[arg-type]
    return generate_latest(registry).decode()
