"""Request ids and logs against real processes: every request has an id (the client's
X-Request-ID, else a new one) that the backend, its log lines, the access log and the
response all carry; every process logs to a file of the instance, shown by `servekit logs`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any, Iterator

import httpx
import pytest

import servekit as serve
from conftest import free_port, wait_for

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


def tell_id(request: Any) -> dict:
    logging.getLogger("my.model").warning("scoring a request")
    headers = request.headers
    return {"id": serve.get_request_id(), "header": headers.get("x-request-id")}


@pytest.fixture(scope="module")
def instance_with_logs() -> Iterator[tuple]:
    port = free_port()
    client = serve.start(http_options={"port": port})
    client.create_backend("ids", tell_id)
    client.create_endpoint("ids", backend="ids", route="/ids")
    yield client, f"http://127.0.0.1:{port}", os.path.join(client._instance.instance_dir,
                                                            "logs")
    client.shutdown()


def read(directory: str, prefix: str) -> str:
    text = ""
    for name in sorted(os.listdir(directory)):
        if name.startswith(prefix):
            with open(os.path.join(directory, name)) as f:
                text += f.read()
    return text


def test_the_clients_request_id_is_honoured_and_returned(instance_with_logs: tuple) -> None:
    _, url, _ = instance_with_logs
    response = httpx.get(f"{url}/ids", headers={"X-Request-ID": "client-id-7"},
                         timeout=TIMEOUT)
    assert response.headers["x-request-id"] == "client-id-7"
    assert response.json() == {"id": "client-id-7", "header": "client-id-7"}


def test_a_request_without_an_id_gets_one(instance_with_logs: tuple) -> None:
    _, url, _ = instance_with_logs
    first = httpx.get(f"{url}/ids", timeout=TIMEOUT)
    second = httpx.get(f"{url}/ids", timeout=TIMEOUT)
    made = first.headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    assert first.json() == {"id": made, "header": made}  # the backend saw the same one
    assert second.headers["x-request-id"] != made
    # Every response has one, errors and unknown paths too.
    assert httpx.get(f"{url}/nowhere", timeout=TIMEOUT).headers["x-request-id"]


def test_the_access_log_and_the_backends_log_lines_carry_the_request_id(
        instance_with_logs: tuple) -> None:
    client, url, logs = instance_with_logs
    response = httpx.get(f"{url}/ids", params={"q": 1}, timeout=TIMEOUT)
    request_id = response.headers["x-request-id"]
    [replica] = [p["name"] for p in client._call("status")["processes"]
                 if p["role"] == "replica"]

    def access_line() -> str:
        return next((line for line in read(logs, "access").splitlines()
                     if f"request_id={request_id}" in line), "")

    line = wait_for(access_line, TIMEOUT, "the access-log line")
    assert " GET /ids 200 " in line
    assert "ms endpoint=ids backend=ids" in line
    assert f"replica={replica}" in line
    user_line = wait_for(
        lambda: next((line for line in read(logs, "replica").splitlines()
                      if f"[request {request_id}]" in line), ""), TIMEOUT,
        "the backend's log line in its log file")
    assert "scoring a request" in user_line and replica in user_line


def test_a_newline_in_a_request_path_cannot_forge_a_log_line(
        instance_with_logs: tuple) -> None:
    _, url, logs = instance_with_logs
    response = httpx.get(f"{url}/nowhere%0AGET%20/ids%20200%20forged", timeout=TIMEOUT)
    assert response.status_code == 404
    request_id = response.headers["x-request-id"]

    def access_line() -> str:
        return next((line for line in read(logs, "access").splitlines()
                     if f"request_id={request_id}" in line), "")

    line = wait_for(access_line, TIMEOUT, "the access-log line")
    assert "/nowhere\\nGET /ids 200 forged 404 " in line  # escaped, on its own line
    assert not any(line.startswith("GET /ids 200 forged")
                   for line in read(logs, "access").splitlines())


def test_handle_calls_have_request_ids_too(instance_with_logs: tuple) -> None:
    client, _, _ = instance_with_logs
    handle = client.get_handle("ids")
    made = handle.remote().result(timeout=TIMEOUT)
    assert len(made["id"]) == 32
    given = handle.options(http_headers={"X-Request-ID": "mine"}).remote() \
        .result(timeout=TIMEOUT)
    assert given["id"] == "mine"


def test_get_request_id_outside_a_request_is_a_serve_error() -> None:
    with pytest.raises(serve.ServeError, match="get_request_id"):
        serve.get_request_id()


def test_servekit_logs_shows_the_detached_instances_logs(tmp_path: Any) -> None:
    env = {**os.environ, "SERVEKIT_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    port = free_port()

    def servekit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "servekit.cli", *args],
                              capture_output=True, text=True, timeout=120, env=env)

    assert servekit("start", "--http-port", str(port)).returncode == 0
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/-/healthz",
                             headers={"X-Request-ID": "from-the-cli-test"}, timeout=TIMEOUT)
        assert response.status_code == 200
        shown = wait_for(lambda: (lambda out: out if "from-the-cli-test" in out else "")(
            servekit("logs", "--process", "access").stdout), TIMEOUT, "the access log")
        assert "==> access.log <==" in shown
        everything = servekit("logs").stdout
        assert "==> controller-controller.log <==" in everything
    finally:
        assert servekit("shutdown").returncode == 0
