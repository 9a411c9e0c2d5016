"""The Grafana dashboard shipped in dashboards/servekit.json queries series a live instance
serves: every metric its panels and variables name is in ``/-/metrics`` after some traffic,
with the labels the queries group and filter by, and its filters (variables at "All") leave
some series to show."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set, Tuple

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import servekit as serve
from conftest import free_port, wait_for

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "servekit.json"
TIMEOUT = 30.0

_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?\s*(?=\[|\)|,|$)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset"}

Selector = Tuple[str, List[Tuple[str, str, str]]]  # (metric, [(label, op, value)])


def selectors(expr: str) -> List[Selector]:
    """The series selectors of a PromQL expression (the metric and its label matchers);
    the dashboard's variables stand for every value ("All")."""
    expr = expr.replace("$__rate_interval", "5m").replace('"$route"', '".*"') \
        .replace('"$backend"', '".*"')
    expr = _GROUPING.sub("", expr)
    found: List[Selector] = []
    for match in _SELECTOR.finditer(expr):
        name, matchers = match.group(1), match.group(2) or ""
        if name in _KEYWORDS or name.replace(".", "").isdigit():
            continue
        found.append((name, _MATCHER.findall(matchers)))
    return found


def queries(dashboard: Dict[str, Any]) -> List[Tuple[str, str, Set[str]]]:
    """(where, expression, labels it groups by or names in its legend) of every panel target
    and variable query."""
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            labels = {label.strip() for group in _GROUPING.findall(target["expr"])
                      for label in group.split(",") if label.strip()}
            labels |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            found.append((f"panel {panel['title']!r}", target["expr"], labels))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"])
            assert match, variable["query"]
            found.append((f"variable {variable['name']!r}", match.group(1), {match.group(2)}))
    return found


def matches(labels: Dict[str, str], matchers: List[Tuple[str, str, str]]) -> bool:
    for label, op, value in matchers:
        have = labels.get(label, "")
        if op == "=" and have != value or op == "!=" and have == value:
            return False
        if op in ("=~", "!~") and bool(re.fullmatch(value, have)) != (op == "=~"):
            return False
    return True


@pytest.fixture(scope="module")
def scraped() -> Iterator[Dict[str, List[Dict[str, str]]]]:
    """Sample name -> the label sets of its samples, from /-/metrics of an instance that
    served HTTP, shadow copies, batches, an error, and replaced a frozen replica."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client = serve.start(http_options={"port": port})
    try:
        client.create_backend("echo", _echo)
        client.create_backend("echo:shadow", _echo)
        client.create_backend("batched", _batched, config={"max_batch_size": 4,
                                                           "batch_wait_timeout": 0.05})
        client.create_backend("fragile", _echo, config={
            "health_check_period_s": 0.2, "health_check_timeout_s": 0.2,
            "health_check_failure_threshold": 2})
        client.create_endpoint("echo", backend="echo", route="/echo")
        client.shadow_traffic("echo", "echo:shadow", 1.0)
        client.create_endpoint("batched", backend="batched", route="/batched")
        client.create_endpoint("fragile", backend="fragile", route="/fragile")
        with httpx.Client(base_url=url, timeout=TIMEOUT) as session:
            for _ in range(5):
                assert session.get("/echo").status_code == 200
                assert session.get("/batched").status_code == 200
            assert session.get("/nowhere").status_code == 404
            [frozen] = [p["pid"] for p in client._call("status")["processes"]
                        if p["role"] == "replica" and p["name"].startswith("fragile#")]
            os.kill(frozen, signal.SIGSTOP)  # its health checks fail: it is replaced
            try:
                wait_for(lambda: "servekit_replica_restarts_total" in _scrape(session),
                         TIMEOUT, "the frozen replica replaced")
            finally:
                try:
                    os.kill(frozen, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            yield _scrape(session)
    finally:
        client.shutdown()


def _echo(request: Any) -> str:
    return "ok"


@serve.accept_batch
def _batched(requests: List[Any]) -> List[int]:
    return [len(requests)] * len(requests)


def _scrape(session: httpx.Client) -> Dict[str, List[Dict[str, str]]]:
    found: Dict[str, List[Dict[str, str]]] = {}
    for family in text_string_to_metric_families(session.get("/-/metrics").text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample.labels)
    return found


def test_the_dashboard_is_grafana_json_over_servekits_own_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = [name for name, _ in selectors(target["expr"])]
            assert names and all(name.startswith(("serve_", "servekit_")) for name in names), \
                (panel["title"], target["expr"])


def test_every_series_the_dashboard_queries_is_served(
        scraped: Dict[str, List[Dict[str, str]]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    problems = []
    for where, expr, grouped_by in queries(dashboard):
        for name, matchers in selectors(expr):
            samples = scraped.get(name)
            if not samples:
                problems.append(f"{where}: no {name} in /-/metrics")
                continue
            shown = [labels for labels in samples if matches(labels, matchers)]
            if not shown:
                problems.append(f"{where}: {name} has no series matching {matchers}")
                continue
            named = {label for label, _, _ in matchers} | grouped_by
            missing = named - {"le"} - set().union(*shown)
            if missing:
                problems.append(f"{where}: {name} has no label {sorted(missing)}")
    assert not problems, "\n".join(problems)
