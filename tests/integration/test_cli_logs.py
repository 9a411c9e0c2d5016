"""The CLI as a user drives it: `servekit logs` (the user's log lines at INFO, JSON lines,
live processes by default, following, after a shutdown), errors worded for the CLI, the
line saying where `servekit run` serves, and a sync backend reading a POST body."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List

import httpx
import pytest

from conftest import busy_port, free_port, wait_for

pytestmark = pytest.mark.integration

TIMEOUT = 60.0

MODELS = '''
import logging

log = logging.getLogger(__name__)


def echo(request):
    payload = request.json_data()  # a sync backend: the body without awaiting
    log.info("scoring %s", payload)
    return {"got": payload}
'''

DEPLOY = '''
backends:
  - name: echo
    import_path: models:echo
endpoints:
  - name: echo
    route: /echo
    methods: [POST]
    traffic: {echo: 1.0}
'''


class Project:
    """A directory with a backend and its deploy file, and a SERVEKIT_HOME of its own."""

    def __init__(self, root: Path, **env: str) -> None:
        self.directory = root / "project"
        self.directory.mkdir(parents=True)
        (self.directory / "models.py").write_text(textwrap.dedent(MODELS))
        (self.directory / "deploy.yaml").write_text(textwrap.dedent(DEPLOY))
        self.home = root / "home"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "SERVEKIT_HOME": str(self.home),
                    "PYTHONPATH": os.pathsep.join(sys.path), **env}

    def command(self, *args: str) -> List[str]:
        return [sys.executable, "-m", "servekit.cli", *args]

    def servekit(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(self.command(*args), cwd=self.directory, env=self.env,
                              capture_output=True, text=True, timeout=TIMEOUT)
        if ok:
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    def deploy(self) -> None:
        self.servekit("start", "--http-port", str(self.port))
        self.servekit("deploy", "deploy.yaml")

    def post(self, payload: Any, request_id: str) -> Dict[str, Any]:
        response = httpx.post(f"{self.url}/echo", json=payload, timeout=TIMEOUT,
                              headers={"X-Request-ID": request_id})
        assert response.status_code == 200, response.text
        return response.json()

    def logs_showing(self, text: str, *args: str) -> str:
        """The output of `servekit logs ARGS` once it shows ``text``."""
        return str(wait_for(lambda: (lambda out: out if text in out else "")(
            self.servekit("logs", *args).stdout), TIMEOUT, f"{text!r} in servekit logs"))

    def replicas(self) -> List[Dict[str, Any]]:
        status = json.loads(self.servekit("status", "--json").stdout)
        return [p for p in status["processes"] if p["role"] == "replica"]


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    made = Project(tmp_path)
    try:
        yield made
    finally:
        made.servekit("shutdown", ok=False)


class Lines:
    """The lines a process writes to ``stream``, read by a thread as they come."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue = queue.Queue()
        self.seen: List[str] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> str:
        """The first line (from the start) that holds ``text``; fails after ``timeout``."""
        for line in self.seen:
            if text in line:
                return line
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no line with {text!r} in {timeout}s; read: {self.seen}")
            self.seen.append(line)
            if text in line:
                return line


def test_a_user_log_line_is_in_servekit_logs_and_a_sync_backend_reads_the_post_body(
        project: Project) -> None:
    project.deploy()
    assert project.post({"a": 1}, "first-request") == {"got": {"a": 1}}
    shown = project.logs_showing("scoring {'a': 1}")
    line = next(line for line in shown.splitlines() if "scoring" in line)
    assert "INFO models [request first-request]" in line
    assert "==> access.log <==" in shown and "==> controller-controller.log <==" in shown


def test_logs_hides_the_logs_of_ended_replicas_unless_all(project: Project) -> None:
    project.deploy()
    project.post({"n": 1}, "before-the-kill")
    [killed] = project.replicas()
    header = f"==> replica-{killed['name'].replace('#', '_')}.log <=="
    assert header in project.logs_showing("before-the-kill")
    os.kill(killed["pid"], signal.SIGKILL)
    wait_for(lambda: [r for r in project.replicas() if r["name"] != killed["name"]
                      and r["state"].upper() == "RUNNING"], TIMEOUT, "a replica in its place")
    shown = project.servekit("logs")
    assert header not in shown.stdout
    assert "1 logs of processes that have ended are not shown" in shown.stderr
    everything = project.servekit("logs", "--all").stdout
    assert header in everything and "before-the-kill" in everything


def test_logs_follow_prints_a_line_written_after_it_started(project: Project) -> None:
    project.deploy()
    project.post({"n": 1}, "before-following")
    project.logs_showing("before-following", "--process", "replica")
    with subprocess.Popen(project.command("logs", "-f", "--process", "replica"),
                          cwd=project.directory, env=project.env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as follow:
        try:
            lines = Lines(follow.stdout)  # type: ignore[arg-type]
            lines.wait_for("before-following")  # it shows the tail first
            project.post({"n": 2}, "while-following")
            assert "scoring {'n': 2}" in lines.wait_for("while-following")
        finally:
            follow.send_signal(signal.SIGINT)  # Ctrl-C
        assert follow.wait(timeout=TIMEOUT) == 0
        assert "Traceback" not in follow.stderr.read()  # type: ignore[union-attr]


def test_logs_after_shutdown_keep_state_shows_the_old_logs(project: Project) -> None:
    project.deploy()
    project.post({"n": 1}, "before-the-shutdown")
    project.logs_showing("before-the-shutdown")
    project.servekit("shutdown", "--keep-state")
    shown = project.servekit("logs")
    assert "before-the-shutdown" in shown.stdout
    assert "No servekit instance is running: these are the logs of the last one." in \
        shown.stderr
    # The next instance starts with logs of its own; the last one's are kept aside.
    project.servekit("start")
    assert "before-the-shutdown" not in project.servekit("logs", "--all").stdout
    assert "before-the-shutdown" in "".join(
        path.read_text() for path in (project.home / "logs" / "previous").glob("replica-*"))


def test_json_log_lines_parse(tmp_path: Path) -> None:
    project = Project(tmp_path, SERVEKIT_LOG_FORMAT="json")
    try:
        project.deploy()
        project.post({"j": 1}, "json-request")
        shown = project.logs_showing("json-request", "--process", "replica")
    finally:
        project.servekit("shutdown", ok=False)
    records = [json.loads(line) for line in shown.splitlines()
               if line.strip() and not line.startswith("==> ")]
    [mine] = [record for record in records if record.get("request_id") == "json-request"]
    assert mine["message"] == "scoring {'j': 1}"
    assert (mine["level"], mine["logger"], mine["role"]) == ("INFO", "models", "replica")
    assert mine["process"].startswith("echo#") and isinstance(mine["pid"], int)
    assert mine["time"].endswith("+00:00")


@pytest.mark.parametrize("args", [("status",), ("status", "--json"), ("shutdown",),
                                  ("shutdown", "--keep-state"), ("config",)])
def test_commands_that_need_an_instance_say_none_runs(tmp_path: Path,
                                                      args: tuple) -> None:
    done = Project(tmp_path).servekit(*args, ok=False)
    assert done.returncode == 1
    assert done.stderr == ("Error: no servekit instance is running here; start one with "
                           "'servekit start'\n")


def test_cli_mistakes_are_one_line_without_a_traceback(tmp_path: Path) -> None:
    project = Project(tmp_path)
    unreachable = f"127.0.0.1:{free_port()}"
    with busy_port() as busy:
        for args, message in [
            (("logs",), "no servekit instance has run here; start one with 'servekit start'"),
            (("deploy", "missing.yaml"), "missing.yaml: cannot be read: No such file"),
            (("run", "missing.yaml"), "missing.yaml: cannot be read: No such file"),
            (("run", "no_such_module:build"), "No module named 'no_such_module'"),
            (("status", "--address", unreachable), f"no Ray cluster answers at {unreachable}"),
            (("start", "--http-port", str(busy)), "choose another port"),
            (("run", "deploy.yaml", "--http-port", str(busy)), "--http-port"),
        ]:
            done = project.servekit(*args, ok=False)
            assert done.returncode in (1, 2), (args, done.stderr)  # 2: a bad option
            assert message in done.stderr, (args, done.stderr)
            assert "Traceback" not in done.stderr, (args, done.stderr)
    wrong = Project(tmp_path / "wrong", SERVEKIT_LOG_LEVEL="loud").servekit("status", ok=False)
    assert (wrong.returncode, wrong.stderr) == (1, "Error: Environment variable "
                                                   "SERVEKIT_LOG_LEVEL='loud' must be one of "
                                                   "DEBUG, INFO, WARNING, ERROR, CRITICAL (in "
                                                   "any case).\n")


def test_servekit_run_says_where_it_serves(tmp_path: Path) -> None:
    project = Project(tmp_path)
    with subprocess.Popen(project.command("run", "deploy.yaml", "--http-port",
                                          str(project.port)),
                          cwd=project.directory, env=project.env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as run:
        try:
            lines = Lines(run.stderr)  # type: ignore[arg-type]
            assert lines.wait_for("Serving at").strip() == f"Serving at {project.url}"
            assert project.post({"r": 1}, "run-request") == {"got": {"r": 1}}
        finally:
            run.send_signal(signal.SIGINT)
        assert run.wait(timeout=TIMEOUT) == 0


def test_servekit_start_says_where_it_serves(project: Project) -> None:
    started = project.servekit("start", "--http-port", str(project.port))
    assert started.stdout.splitlines()[-1] == f"Serving at {project.url}"
    again = project.servekit("start", ok=False)
    assert (again.returncode, again.stderr) == (1, "Error: a servekit instance is already "
                                                   "running here; 'servekit status' shows "
                                                   "it, 'servekit shutdown' stops it\n")
