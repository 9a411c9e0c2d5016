"""Unit tests of the ``servekit status`` table, from a status dict as ``Client.status``
returns it (no instance: the client is a stand-in)."""

from __future__ import annotations

import json
from typing import Any, Dict

import pytest
from click.testing import CliRunner

from servekit import cli

STATUS: Dict[str, Any] = {
    "backends": {
        "iris:v1": {"status": "UPDATING", "running": 5, "target": 5, "revision": 2,
                    "revision_running": 2,
                    "message": "rolling out revision 2: 2/5 new replicas ready, 3 of the "
                               "old revision running",
                    "config": {"max_concurrent_queries": 8, "max_batch_size": None,
                               "sync_threads": 1, "max_surge": "25%"}},
    },
    "endpoints": {
        "iris": {"route": "/iris", "methods": ["GET", "POST"], "prefix": False,
                 "traffic": {"iris:v1": 0.9, "a=b, c": 0.1}, "shadows": {}},
        "api": {"route": "/api", "methods": ["GET"], "prefix": True,
                "traffic": {"api": 1.0}, "shadows": {"iris:v1": 0.5}},
        "inner": {"route": None, "methods": ["GET"], "prefix": False,
                  "traffic": {"iris:v1": 1.0}, "shadows": {}},
    },
    "processes": [{"role": "controller", "name": "controller", "pid": 7,
                   "state": "RUNNING", "node": None}],
    "http_options": {},
}


class StandIn:
    def status(self) -> Dict[str, Any]:
        return STATUS


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> Dict[str, str]:
    """The status table's rows, by their first cell."""
    monkeypatch.setattr(cli, "_connect", lambda address: StandIn())
    result = CliRunner().invoke(cli.main, ["status"])
    assert result.exit_code == 0, result.output
    return {line.split("  ")[0]: " ".join(line.split()) for line in result.output.splitlines()
            if line.strip()}


def test_a_backend_shows_its_status_message_and_effective_config(table: Dict[str, str]) -> None:
    assert table["iris:v1"] == (
        "iris:v1 UPDATING 5/5 max_concurrent_queries=8, sync_threads=1, max_surge=25% "
        "rolling out revision 2: 2/5 new replicas ready, 3 of the old revision running")


def test_methods_only_for_exact_routes_and_traffic_written_unambiguously(
        table: Dict[str, str]) -> None:
    assert table["iris"] == 'iris /iris GET,POST "a=b, c"=0.1, iris:v1=0.9'
    assert table["api"] == "api /api (prefix) api=1 iris:v1=0.5"
    assert table["inner"] == "inner (handle only) iris:v1=1"


def test_json_is_the_status_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_connect", lambda address: StandIn())
    result = CliRunner().invoke(cli.main, ["status", "--json"])
    assert json.loads(result.output) == STATUS


def test_the_models_replicas_hold_show_in_a_column_of_their_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A multiplexed backend's replicas list their models; without any, no column."""
    replicas = [{"role": "replica", "name": f"lora#{i}", "pid": 10 + i, "state": "RUNNING",
                 "node": None, "backend": "lora", "revision": 1, "models": models}
                for i, models in enumerate((["a", "b"], []))]
    status = {**STATUS, "processes": STATUS["processes"] + replicas}
    monkeypatch.setattr(cli, "_connect", lambda address: type(
        "WithModels", (), {"status": lambda self: status})())
    output = CliRunner().invoke(cli.main, ["status"]).output
    rows = {line.split()[1]: line.split() for line in output.splitlines()
            if line.startswith(("replica", "role"))}
    assert rows["name"][-1] == "models" and rows["lora#0"][-1] == "a,b"
    assert rows["lora#1"][-1] == "RUNNING"  # (nothing held: the cell is empty)
    monkeypatch.setattr(cli, "_connect", lambda address: StandIn())
    assert "models" not in CliRunner().invoke(cli.main, ["status"]).output
