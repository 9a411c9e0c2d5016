"""The container story, as far as it runs without Docker: the Dockerfile's entrypoint run as
the image would run it (a real process serving over HTTP, its health paths answering, SIGTERM
ending it in the time Kubernetes gives), and the Kubernetes manifests' probes, ports and
timing checked against what that process serves."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import httpx
import pytest
import yaml

from conftest import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
MANIFESTS = ROOT / "deploy" / "kubernetes"
START_TIMEOUT_S = 60.0


def dockerfile_instructions(text: str) -> List[Tuple[str, str]]:
    """(INSTRUCTION, its arguments) for each instruction, continuation lines joined and
    comments left out."""
    instructions: List[Tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def one(instructions: List[Tuple[str, str]], keyword: str) -> str:
    """The arguments of the last ``keyword`` instruction (the one in force)."""
    found = [arguments for name, arguments in instructions if name == keyword]
    assert found, f"the Dockerfile has no {keyword}"
    return found[-1]


def exec_form(arguments: str) -> List[str]:
    """A JSON-array (exec form) ENTRYPOINT or CMD: no shell stands between it and SIGTERM."""
    assert arguments.startswith("["), f"{arguments!r} is not in exec form"
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value)
    return value


def option(command: List[str], name: str) -> str:
    return command[command.index(name) + 1]


class Image:
    """What the Dockerfile says the container runs."""

    def __init__(self) -> None:
        instructions = dockerfile_instructions(DOCKERFILE.read_text())
        self.instructions = instructions
        self.base = one(instructions, "FROM")
        self.user = one(instructions, "USER")
        self.workdir = one(instructions, "WORKDIR")
        self.command = exec_form(one(instructions, "ENTRYPOINT")) + \
            exec_form(one(instructions, "CMD"))
        self.exposed = one(instructions, "EXPOSE").split()
        self.env = dict(
            pair.split("=", 1) for name, arguments in instructions if name == "ENV"
            for pair in shlex.split(arguments))
        # The directory of this repository that the image's WORKDIR is a copy of.
        [copied] = [shlex.split(arguments) for name, arguments in instructions
                    if name == "COPY" and shlex.split(arguments)[-1].rstrip("/") ==
                    self.workdir.rstrip("/")]
        self.app_source = ROOT / copied[-2]
        self.healthcheck = one(instructions, "HEALTHCHECK")

    def servekit_command(self) -> List[str]:
        """The command after the init process (tini, which only passes signals on and
        reaps children)."""
        command = self.command
        if command[:2] == ["tini", "--"]:
            command = command[2:]
        assert command[0] == "servekit", command
        return command


@pytest.fixture(scope="module")
def image() -> Image:
    return Image()


def manifests() -> List[Dict[str, Any]]:
    documents: List[Dict[str, Any]] = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        documents.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return documents


def of_kind(kind: str) -> Dict[str, Any]:
    [document] = [doc for doc in manifests() if doc["kind"] == kind]
    return document


def container() -> Dict[str, Any]:
    [only] = of_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    return only


def container_port(port: Any) -> int:
    """A probe's or Service's port, a number or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container()["ports"] if p["name"] == port]
    return number


# --------------------------------------------------------------------------- the image


def test_the_image_is_slim_python_and_runs_servekit_as_a_user_not_root(image: Image) -> None:
    assert image.base.startswith("python:3.11-slim")
    user = image.user.split(":")[0]
    assert user.isdigit() and int(user) != 0, \
        f"USER {image.user}: a numeric uid other than 0 (runAsNonRoot can check it)"
    assert of_kind("Deployment")["spec"]["template"]["spec"]["securityContext"][
        "runAsUser"] == int(user)
    command = image.servekit_command()
    assert command[1] == "run"
    assert option(command, "--http-host") == "0.0.0.0"  # reachable from outside it
    assert image.exposed == [option(command, "--http-port")]
    assert (image.app_source / command[-1]).is_file(), "the CMD's deploy file is not copied"
    # The health check asks a path the proxy serves, on the port it binds.
    assert f"127.0.0.1:{option(command, '--http-port')}/-/healthz" in image.healthcheck


def test_the_manifests_probe_what_the_entrypoint_serves(image: Image) -> None:
    command = image.servekit_command()
    served_port = int(option(command, "--http-port"))
    spec = container()
    assert container_port(spec["readinessProbe"]["httpGet"]["port"]) == served_port
    assert container_port(spec["livenessProbe"]["httpGet"]["port"]) == served_port
    assert spec["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/-/healthz"
    assert spec["resources"]["requests"]["cpu"] and spec["resources"]["requests"]["memory"]
    assert (image.app_source / spec["args"][-1]).is_file()  # the deploy file it runs
    # The Service sends its traffic to that port, of these pods.
    service = of_kind("Service")
    [port] = service["spec"]["ports"]
    assert container_port(port["targetPort"]) == served_port
    pod_labels = of_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    # What servekit writes goes to /tmp, the one writable place of a read-only root.
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert image.env["SERVEKIT_HOME"].startswith("/tmp/")
    assert [m["mountPath"] for m in spec["volumeMounts"]] == ["/tmp"]


def _grace_after_prestop() -> float:
    """Seconds Kubernetes leaves servekit between SIGTERM and SIGKILL."""
    pod = of_kind("Deployment")["spec"]["template"]["spec"]
    [container_spec] = pod["containers"]
    sleep = container_spec["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    return pod["terminationGracePeriodSeconds"] - float(sleep[1])


# --------------------------------------------------------------------------- the entrypoint


class Running:
    """The image's command, run as a process of its own session (as in a container)."""

    def __init__(self, process: subprocess.Popen, url: str, app: Path, home: Path,
                 output: Path) -> None:
        self.process = process
        self.url = url
        self.app = app
        self.home = home
        self.output = output

    def get(self, path: str) -> Optional[httpx.Response]:
        try:
            return httpx.get(self.url + path, timeout=5)
        except httpx.HTTPError:
            return None

    def until(self, path: str, status: int) -> httpx.Response:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            response = self.get(path)
            if response is not None and response.status_code == status:
                return response
            if self.process.poll() is not None:
                pytest.fail(f"the entrypoint exited ({self.process.returncode}): "
                            f"{self.output.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{path} did not answer {status} within {START_TIMEOUT_S}s "
                            f"(last: {response and response.status_code})")
            time.sleep(0.05)


@pytest.fixture
def entrypoint(image: Image, tmp_path: Path) -> Iterator[Running]:
    """The Dockerfile's ENTRYPOINT + CMD in a copy of the image's /app, as its user would run
    it: HOME empty, SERVEKIT_HOME and TMPDIR the only writable places; on a free port (the
    image's 8000 may be taken here)."""
    app = tmp_path / "app"
    shutil.copytree(image.app_source, app, ignore=shutil.ignore_patterns("__pycache__"))
    home, scratch = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    scratch.mkdir()
    port = free_port()
    command = image.servekit_command()
    command[command.index("--http-port") + 1] = str(port)
    env = {**os.environ, **image.env, "HOME": str(home), "TMPDIR": str(scratch),
           "SERVEKIT_HOME": str(scratch / "servekit")}
    output = tmp_path / "output.log"
    executable = str(Path(sys.executable).with_name("servekit"))
    with open(output, "wb") as sink:
        process = subprocess.Popen([executable, *command[1:]], cwd=app, env=env,
                                   stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    running = Running(process, f"http://127.0.0.1:{port}", app, home, output)
    try:
        yield running
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _session_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_entrypoint_serves_answers_its_probes_and_stops_on_sigterm(
        entrypoint: Running) -> None:
    spec = container()
    entrypoint.until(spec["livenessProbe"]["httpGet"]["path"], 200)
    entrypoint.until(spec["readinessProbe"]["httpGet"]["path"], 200)
    # Ready means it serves the deploy file (not an instance that has yet to apply it).
    answer = entrypoint.get("/sentiment?text=great")
    assert answer is not None and answer.json() == {"text": "great", "positive": True}
    metrics = entrypoint.get("/-/metrics")
    assert metrics is not None and "ray_serve_num_http_requests_total" in metrics.text

    # Kubernetes: preStop, then SIGTERM to the container's init, which hands it on.
    stopped_at = time.monotonic()
    entrypoint.process.send_signal(signal.SIGTERM)
    code = entrypoint.process.wait(timeout=_grace_after_prestop())
    took = time.monotonic() - stopped_at
    assert code == 0, entrypoint.output.read_text()[-3000:]
    assert took < _grace_after_prestop()
    deadline = time.monotonic() + 10
    while _session_alive(entrypoint.process.pid):
        assert time.monotonic() < deadline, "processes of the instance outlived it"
        time.sleep(0.05)
    # Nothing written outside SERVEKIT_HOME and TMPDIR (a read-only root works).
    assert not list(entrypoint.home.iterdir())
    assert sorted(p.name for p in entrypoint.app.iterdir()) == \
        sorted(p.name for p in Image().app_source.iterdir() if p.name != "__pycache__")
