"""Metrics a backend defines for itself.

They are Prometheus metrics (prometheus-client) that appear at the proxy's ``/-/metrics``
and in ``serve.metrics_text()`` beside servekit's own, labelled with the ``backend`` and
``replica`` that recorded them, plus the ``tag_keys`` you give::

    from servekit import metrics

    class Model:
        def __init__(self):
            self.hits = metrics.Counter("model_cache_hits", "Cache hits.", tag_keys=("kind",))

        def __call__(self, request):
            self.hits.inc(tags={"kind": "exact"})

Creating a metric of the same name again (a second replica object in one process, a module
imported twice) returns to the same series.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Optional, Sequence, Tuple

import prometheus_client

from servekit._private.context import current_replica_context
from servekit._private.metrics import REGISTRY

_made: Dict[str, Any] = {}
_lock = threading.Lock()


class _Metric:
    _kind: Any = None

    def __init__(self, name: str, description: str = "", tag_keys: Sequence[str] = (),
                 **options: Any) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"A metric name must be a non-empty str, got {name!r}.")
        self.tag_keys: Tuple[str, ...] = tuple(tag_keys)
        with _lock:
            metric = _made.get(name)
            if metric is None:
                metric = self._kind(name, description or name, ["backend", "replica",
                                                                 *self.tag_keys],
                                    registry=REGISTRY, **options)
                _made[name] = metric
            elif type(metric) is not self._kind or \
                    tuple(metric._labelnames[2:]) != self.tag_keys:
                raise ValueError(f"A metric named {name!r} already exists with another kind "
                                 f"or tag keys ({metric._labelnames[2:]}).")
        self._metric = metric

    def _series(self, tags: Optional[Dict[str, str]]) -> Any:
        tags = tags or {}
        unknown = set(tags) - set(self.tag_keys)
        missing = set(self.tag_keys) - set(tags)
        if unknown or missing:
            raise ValueError(f"Tags {sorted(tags)} do not match the metric's tag keys "
                             f"{list(self.tag_keys)}.")
        context = current_replica_context()
        where = ("", "") if context is None else (context.backend_tag, context.replica_tag)
        return self._metric.labels(*where, *(str(tags[key]) for key in self.tag_keys))


class Counter(_Metric):
    """A count that only goes up."""

    _kind = prometheus_client.Counter

    def inc(self, value: float = 1.0, tags: Optional[Dict[str, str]] = None) -> None:
        self._series(tags).inc(value)


class Gauge(_Metric):
    """A value that goes up and down."""

    _kind = prometheus_client.Gauge

    def set(self, value: float, tags: Optional[Dict[str, str]] = None) -> None:
        self._series(tags).set(value)


class Histogram(_Metric):
    """Observed values counted into ``boundaries`` (upper bounds of the buckets)."""

    _kind = prometheus_client.Histogram

    def __init__(self, name: str, description: str = "",
                 boundaries: Sequence[float] = prometheus_client.Histogram.DEFAULT_BUCKETS,
                 tag_keys: Sequence[str] = ()) -> None:
        super().__init__(name, description, tag_keys, buckets=tuple(boundaries))

    def observe(self, value: float, tags: Optional[Dict[str, str]] = None) -> None:
        self._series(tags).observe(value)
