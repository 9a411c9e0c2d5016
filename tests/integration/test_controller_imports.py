"""What a running controller has imported: none of the libraries only clients, proxies and
replicas need (pydantic, Starlette, FastAPI, prometheus-client, uvloop), whatever configs
and HTTP options it was given, and also once it restarted from its saved state. Each
process lists its modules when asked (``module_listing/sitecustomize.py``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from test_lean_workers import LISTING, loaded, modules_of

import servekit as serve
from conftest import free_port

# Libraries the controller never loads (their memory would be paid by every instance).
HEAVY = ("pydantic", "pydantic_core", "starlette", "fastapi", "prometheus_client", "uvloop")


def controller_pid(client: serve.api.Client) -> int:
    [pid] = [p["pid"] for p in client._call("status")["processes"]
             if p["role"] == "controller"]
    return pid


class Model:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    def reconfigure(self, user_config: dict) -> None:
        self.greeting = user_config["greeting"]

    def __call__(self, request: object) -> str:
        return self.greeting


def test_a_controller_loads_no_client_or_data_plane_library(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [LISTING, *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("SERVEKIT_TEST_MODULES_DIR", str(tmp_path))
    port = free_port()
    client = serve.start(http_options={
        "port": port, "middlewares": [Middleware(GZipMiddleware, minimum_size=1000)]})
    try:
        client.create_backend("m", Model, "hello", config={
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2},
            "max_surge": "50%", "health_check_period_s": 2})
        client.create_endpoint("m", backend="m", route="/m")
        client.update_backend_config("m", {"user_config": {"greeting": "hi"}})
        assert client.get_backend_config("m").autoscaling_config.max_replicas == 2
        assert client.list_backends()["m"].user_config == {"greeting": "hi"}
        assert httpx.get(f"http://127.0.0.1:{port}/m", timeout=30).text == "hi"
        with pytest.raises(ValueError, match="max_replicas=1000000000"):
            client._call("update_backend_config", "m",
                         {"autoscaling_config": {"max_replicas": 10**9}})
        assert loaded(modules_of(controller_pid(client), tmp_path), HEAVY) == []

        # A controller that restarts restores the same state, without them either.
        before = controller_pid(client)
        os.kill(before, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (pid := controller_pid(client)) == before:
            assert time.monotonic() < deadline, "no new controller"
            time.sleep(0.1)
        assert client.get_backend_config("m").user_config == {"greeting": "hi"}
        assert httpx.get(f"http://127.0.0.1:{port}/m", timeout=30).text == "hi"
        assert loaded(modules_of(pid, tmp_path), HEAVY) == []
    finally:
        client.shutdown()
