"""Rollouts a user can watch, readiness and the controller's log, with real processes.

A detached instance in a private ``$SERVEKIT_HOME`` runs backends whose constructor sleeps;
the ``servekit`` command runs in subprocesses, and this process reads the same instance
through ``serve.connect()`` (``Client.status``) and HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import httpx
import pytest
import yaml

import servekit as serve
from conftest import free_port, wait_for
from servekit._private import constants

pytestmark = pytest.mark.integration

MODELS = textwrap.dedent("""
    import time

    class Slow:
        def __init__(self, version, delay):
            time.sleep(delay)
            self.version = version

        def __call__(self, request):
            return self.version
""")
# Seconds each replica's constructor takes.
DELAY_S = 1.5


class Instance:
    """A project directory with ``models.py``, the ``servekit`` command run in it with a
    private home, and a client of the instance it runs."""

    def __init__(self, directory: Path, home: Path, port: int) -> None:
        self.directory = directory
        self.home = home
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "SERVEKIT_HOME": str(home)}
        (directory / "models.py").write_text(MODELS)

    def file(self, version: str, replicas: int = 4, max_surge: Any = 2,
             tag: str = "greet:v1", delay: float = DELAY_S) -> str:
        """A deploy file: backend ``tag`` (``Slow(version, delay)``) behind /greet, and a
        handle-only endpoint ``inner`` on it."""
        data: Dict[str, Any] = {
            "name": "greet",  # one app in versions: --prune removes what an older one made
            "http_options": {"host": "127.0.0.1", "port": self.port},
            "backends": [{"name": tag, "import_path": "models:Slow",
                          "init_args": [version, delay],
                          "config": {"num_replicas": replicas, "max_surge": max_surge}}],
            "endpoints": [{"name": "greet", "route": "/greet", "traffic": {tag: 1.0}},
                          {"name": "inner", "traffic": {tag: 1.0}}],
        }
        path = self.directory / f"deploy-{version}.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    def command(self, *args: str) -> List[str]:
        return [sys.executable, "-m", "servekit.cli", *args]

    def servekit(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(self.command(*args), cwd=self.directory, env=self.env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (done.stdout, done.stderr)
        return done

    def client(self) -> serve.Client:
        return serve.connect()

    def backend(self, tag: str = "greet:v1") -> Dict[str, Any]:
        return self.client().status()["backends"][tag]

    def controller_log(self) -> str:
        return "".join(path.read_text(errors="replace")
                       for path in sorted(self.home.rglob("controller*.log*")))


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    home = tmp_path_factory.mktemp("home")
    instance = Instance(tmp_path_factory.mktemp("project"), home, free_port())
    with pytest.MonkeyPatch.context() as patch:  # serve.connect() of this process finds it
        patch.setattr(constants, "SERVEKIT_HOME", str(home))
        instance.servekit("start", "--http-port", str(instance.port))
        try:
            yield instance
        finally:
            subprocess.run(instance.command("shutdown"), env=instance.env,
                           capture_output=True, timeout=120)


class Watch:
    """Samples ``Client.status`` and sends requests to /greet in the background until
    stopped: the statuses seen, the most replicas of the newest revision starting at once,
    the fewest replicas running, and every answer."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.statuses: List[str] = []
        self.most_starting = 0
        self.fewest_running = 1 << 30
        self.answers: List[Any] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sample),
                         threading.Thread(target=self._request)]

    def __enter__(self) -> "Watch":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _sample(self) -> None:
        client = self.instance.client()
        while not self._stop.is_set():
            state = client.status()
            backend = state["backends"]["greet:v1"]
            if not self.statuses or self.statuses[-1] != backend["status"]:
                self.statuses.append(backend["status"])
            starting = [p for p in state["processes"] if p["role"] == "replica" and
                        p["state"] == "STARTING" and p["revision"] == backend["revision"]]
            self.most_starting = max(self.most_starting, len(starting))
            self.fewest_running = min(self.fewest_running, backend["running"])
            time.sleep(0.05)

    def _request(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                try:
                    response = http.get(self.instance.url + "/greet")
                    self.answers.append(response.text if response.status_code == 200
                                        else response)
                except httpx.HTTPError as exc:
                    self.answers.append(exc)


def test_a_slow_rollout_is_watched_from_updating_to_healthy_and_never_serves_fewer(
        instance: Instance) -> None:
    instance.servekit("deploy", "--prune", instance.file("v1"))
    assert instance.backend()["status"] == "HEALTHY"
    with Watch(instance) as watch:
        done = instance.servekit("deploy", instance.file("v2"))
    lines = done.stdout.splitlines()
    progress = [line for line in lines if line.startswith("greet:v1 ")]
    assert any("UPDATING: rolling out revision" in line and "new replicas ready" in line
               for line in progress), done.stdout
    assert progress[-1] == "greet:v1 HEALTHY: 4/4 replicas running", done.stdout
    assert lines[-1] == "Applied."
    assert "UPDATING" in watch.statuses and watch.statuses[-1] == "HEALTHY", watch.statuses
    assert watch.most_starting == 2  # max_surge new replicas started at once, never more
    assert watch.fewest_running >= 4  # as many served as before throughout
    assert watch.answers and set(watch.answers) <= {"v1", "v2"}, \
        [a for a in watch.answers if a not in ("v1", "v2")]
    assert "v2" in watch.answers
    assert instance.backend()["revision_running"] == 4


def test_deploy_no_wait_returns_once_accepted_and_ready_follows_the_first_replica(
        instance: Instance) -> None:
    instance.servekit("deploy", "--prune", instance.file("v1", replicas=1))
    # A new backend (the old one pruned) whose first replica takes a while: the route is
    # there at once, and readiness says it cannot serve until that replica runs.
    done = instance.servekit("deploy", "--prune", "--no-wait",
                             instance.file("v3", replicas=1, tag="other", delay=4.0))
    assert "Accepted" in done.stdout and "Applied." not in done.stdout, done.stdout
    assert instance.backend("other")["status"] == "UPDATING"
    ready = httpx.get(instance.url + "/-/ready", timeout=10)
    assert ready.status_code == 503, ready.text
    assert "endpoint greet (/greet): no running replica of other" in ready.text
    assert httpx.get(instance.url + "/-/healthz", timeout=10).status_code == 200
    wait_for(lambda: httpx.get(instance.url + "/-/ready", timeout=10).status_code == 200,
             timeout=30, message="/-/ready to answer 200")
    assert instance.backend("other")["status"] == "HEALTHY"
    assert httpx.get(instance.url + "/greet", timeout=10).text == "v3"


def test_the_controller_logs_replica_starts_and_a_killed_replicas_replacement(
        instance: Instance) -> None:
    instance.servekit("deploy", "--prune", instance.file("v1", replicas=2, delay=0.1))
    state = instance.client().status()
    [victim, *_] = [p for p in state["processes"]
                    if p["role"] == "replica" and p["backend"] == "greet:v1"]
    log = instance.controller_log()
    assert f"Replica {victim['name']} of backend greet:v1 is running" in log
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced() -> bool:
        state = instance.client().status()
        names = {p["name"] for p in state["processes"] if p["role"] == "replica"}
        return victim["name"] not in names and \
            state["backends"]["greet:v1"]["status"] == "HEALTHY"

    wait_for(replaced, timeout=30, message="the killed replica's replacement")
    wait_for(lambda: f"Replica {victim['name']} was killed by signal SIGKILL; replacing it"
             in instance.controller_log(), timeout=10, message="the replacement's log line")
    log = instance.controller_log()
    assert log.count("of backend greet:v1 is running") >= 3, log


def test_status_in_python_and_in_the_table(instance: Instance) -> None:
    instance.servekit("deploy", "--prune", instance.file("v1", replicas=1, delay=0.1))
    state = instance.client().status()
    assert set(state) == {"backends", "endpoints", "processes", "http_options"}
    backend = state["backends"]["greet:v1"]
    assert backend["status"] == "HEALTHY" and backend["message"] == "1/1 replicas running"
    assert (backend["running"], backend["target"], backend["revision_running"]) == (1, 1, 1)
    assert backend["config"]["max_concurrent_queries"] == 8  # a sync class's default
    assert state["endpoints"]["greet"]["prefix"] is False
    assert state["endpoints"]["inner"]["route"] is None
    assert json.loads(instance.servekit("status", "--json").stdout)["backends"].keys() == \
        state["backends"].keys()
    table = instance.servekit("status").stdout.splitlines()
    assert any(line.split()[:4] == ["greet:v1", "HEALTHY", "1/1",
                                    "max_concurrent_queries=8,"] for line in table), table
    assert any(line.split() == ["greet", "/greet", "GET", "greet:v1=1"]
               for line in table), table
    assert any(line.split() == ["inner", "(handle", "only)", "greet:v1=1"]
               for line in table), table
