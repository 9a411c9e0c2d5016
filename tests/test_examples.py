"""Every example program runs to the end and prints what it promises."""

from __future__ import annotations

import ast
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_TIMEOUT_S = 60


def _port_busy(port: int) -> bool:
    with socket.socket() as sock:
        # As a server would: connections of earlier runs in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _printed(lines: list, prefix: str) -> dict:
    matching = [line for line in lines if line.startswith(prefix)]
    assert len(matching) == 1, f"expected one line starting with {prefix!r} in {lines!r}"
    return ast.literal_eval(matching[0][len(prefix):].strip())


def _run_example(script: str, timeout: float = EXAMPLE_TIMEOUT_S) -> list:
    """Run ``examples/<script>`` to its end (it serves on port 8000); the lines it printed."""
    if _port_busy(8000):
        pytest.skip(f"examples/{script} serves on port 8000, which another program on this "
                    "machine is using")
    try:
        done = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True,
                              text=True, timeout=timeout, cwd=EXAMPLES)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{script} did not finish within {timeout}s; output so far: "
                    f"{exc.stdout!r} {exc.stderr!r}")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert not _port_busy(8000), f"{script} left its HTTP server running"
    return done.stdout.splitlines()


def test_quickstart_runs_and_prints_http_and_handle_results():
    lines = _run_example("quickstart.py")
    assert _printed(lines, "HTTP:") == {"text": "what a great day", "positive": True,
                                        "score": 0.25}
    assert _printed(lines, "handle:") == {"text": "a sad and rainy day", "positive": False,
                                          "score": 0.0}


def test_autoscaling_example_scales_up_and_back_to_zero() -> None:
    lines = _run_example("autoscaling.py", EXAMPLE_TIMEOUT_S * 2)
    assert "replicas at rest: 0" in lines and "first request: done" in lines
    assert "failed requests: 0" in lines
    assert "most replicas under load: 4" in lines or "most replicas under load: 3" in lines
    assert "replicas after the load: 0" in lines


def test_fastapi_example_serves_an_app_a_model_class_and_a_websocket() -> None:
    lines = _run_example("fastapi_app.py")
    assert _printed(lines, "order:") == {"item": "pen", "total": 4.5}
    assert _printed(lines, "bad order:") == 422  # FastAPI's own validation
    assert _printed(lines, "docs at:") == [{"url": "/shop"}]  # root_path is the route
    assert _printed(lines, "prediction:") == {"text": "a great day", "score": 0.333}
    assert _printed(lines, "websocket:") == ["echo: hello", "echo: again"]
    assert _printed(lines, "handle:") == {"text": "a sad and rainy day", "positive": False}


def test_multiplexing_example_keeps_a_model_on_its_replica_and_spreads_a_hot_one() -> None:
    lines = _run_example("multiplexing.py")
    assert _printed(lines, "HTTP:") == {"model": "customer-1", "y": [1, 2, 3]}
    assert _printed(lines, "one replica, one load:") is True
    assert _printed(lines, "handle:") == {"model": "customer-2", "y": 10}
    assert _printed(lines, "hot model served by replicas:") == 2
    assert _printed(lines, "replicas holding customer-7:") == 2
    assert _printed(lines, "at most 2 models per replica:") is True


def test_openai_example_answers_the_official_client() -> None:
    lines = _run_example("openai_server.py")
    assert _printed(lines, "models:") == ["tiny-bard", "tiny-bard-cold", "tiny-chef"]
    chat = _printed(lines, "chat:")
    assert chat["finish_reason"] == "stop" and chat["completion_tokens"] == len(chat["content"])
    streamed = _printed(lines, "streamed:")  # the same seed: the same answer, token by token
    assert streamed == {"content": chat["content"], "chunks": len(chat["content"]) + 2}
    completion = _printed(lines, "completion:")
    assert completion["finish_reason"] == "stop" and "," not in completion["text"]
    assert _printed(lines, "unknown model:") == {"status": 404, "code": "model_not_found"}


def _servekit(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "servekit.cli", *args], cwd=EXAMPLES / "deploy",
                          env={**os.environ, "SERVEKIT_HOME": str(home)}, capture_output=True,
                          text=True, timeout=EXAMPLE_TIMEOUT_S)


def test_the_deploy_file_example_deploys_serves_and_round_trips(tmp_path: Path) -> None:
    if _port_busy(8000):
        pytest.skip("examples/deploy/deploy.yaml serves on port 8000, which another program "
                    "on this machine is using")
    try:
        assert "create          backend sentiment:v1" in \
            _servekit("deploy", "deploy.yaml", "--dry-run", home=tmp_path).stdout
        deployed = _servekit("deploy", "deploy.yaml", home=tmp_path)
        assert deployed.returncode == 0, deployed.stderr
        answer = httpx.get("http://127.0.0.1:8000/sentiment", params={"text": "great"},
                           timeout=10).json()
        assert answer == {"text": "great", "positive": True}
        exported = _servekit("config", home=tmp_path).stdout
        assert "import_path: models:Sentiment" in exported
        assert _servekit("deploy", "deploy.yaml", home=tmp_path).stdout.startswith("No change")
    finally:
        _servekit("shutdown", home=tmp_path)
    assert not _port_busy(8000), "the example left its HTTP server running"


def test_the_run_example_serves_until_interrupted() -> None:
    if _port_busy(8000):
        pytest.skip("examples/deploy/app.py serves on port 8000, which another program on "
                    "this machine is using")
    with subprocess.Popen([sys.executable, "-m", "servekit.cli", "run", "app:build"],
                          cwd=EXAMPLES / "deploy", stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as run:
        try:
            deadline = time.monotonic() + EXAMPLE_TIMEOUT_S
            while True:
                try:
                    response = httpx.get("http://127.0.0.1:8000/sentiment",
                                         params={"text": "meh"}, timeout=5)
                    if response.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "servekit run app:build never served"
                time.sleep(0.05)
            assert response.json() == {"text": "meh", "positive": False}
        finally:
            run.send_signal(signal.SIGINT)
            assert run.wait(timeout=EXAMPLE_TIMEOUT_S) == 0
    assert not _port_busy(8000), "servekit run left its HTTP server running"
