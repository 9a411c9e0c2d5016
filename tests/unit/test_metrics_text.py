"""servekit's own metrics are rendered without prometheus-client: the text must be what
prometheus-client writes for the same recordings (but its ``_created`` samples)."""

from __future__ import annotations

from typing import List

import prometheus_client

from servekit._private import metrics

_LABELS = ["route", "status"]


def _recorded(counter, gauge, histogram) -> None:
    counter.labels("/a", "200").inc(3)
    counter.labels('/"odd"\\path\n', "500").inc()
    gauge.labels("/a", "200").set(2.5)
    gauge.labels("/b", "200").set_function(lambda: 7)
    for value in (0.5, 1, 5, 1e7):
        histogram.labels("/a", "200").observe(value)


def _lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if "_created" not in line]


def test_the_text_is_prometheus_clients() -> None:
    ours = metrics._Registry()
    _recorded(metrics.Counter("t_requests", "Requests.", _LABELS, registry=ours),
              metrics.Gauge("t_level", "A level\\with a backslash.", _LABELS, registry=ours),
              metrics.Histogram("t_latency_ms", "Latency.", _LABELS, buckets=(1, 10, 1e6),
                                registry=ours))
    theirs = prometheus_client.CollectorRegistry()
    _recorded(prometheus_client.Counter("t_requests", "Requests.", _LABELS, registry=theirs),
              prometheus_client.Gauge("t_level", "A level\\with a backslash.", _LABELS,
                                      registry=theirs),
              prometheus_client.Histogram("t_latency_ms", "Latency.", _LABELS,
                                          buckets=(1, 10, 1e6), registry=theirs))
    text = "\n".join(line for family in ours.families for line in family.render()) + "\n"
    assert _lines(text) == _lines(prometheus_client.generate_latest(theirs).decode())


def test_a_removed_series_is_no_longer_shown() -> None:
    registry = metrics._Registry()
    gauge = metrics.Gauge("t_queued", "Queued.", ["backend"], registry=registry)
    gauge.labels("a").set(1)
    gauge.labels("b").set(2)
    gauge.remove("a")
    assert [line for line in gauge.render() if not line.startswith("#")] == \
        ['t_queued{backend="b"} 2.0']
