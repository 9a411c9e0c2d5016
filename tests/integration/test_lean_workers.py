"""What an instance's running proxy and replica of a plain function have imported: none of
the heavy libraries they do not need (each costs every such process its memory and its
start-up time). The processes are the instance's own, started as ``serve.start()`` starts
them; each lists its modules when asked (``module_listing/sitecustomize.py``).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Dict, List

import httpx
import pytest
from plain_backends import noop

import servekit as serve
from conftest import free_port, wait_for

LISTING = str(Path(__file__).parent / "module_listing")

# Loaded by neither: the proxy's HTTP server and the replica's Request come without them.
NEITHER = ("pydantic", "prometheus_client", "fastapi", "yaml", "click", "watchfiles",
           "multiprocessing", "importlib.metadata", "starlette.responses",
           "starlette.applications", "starlette.routing", "starlette.middleware")
# Loaded by the replica (cloudpickle: its backend's pickle; starlette: the Request it
# gives an HTTP call), not by the proxy; websockets by neither until a WebSocket comes.
NOT_THE_PROXY = ("starlette", "anyio", "http.client", "cloudpickle", "websockets")
NOT_THE_REPLICA = ("uvicorn", "httptools", "websockets", "servekit._private.routing",
                   "servekit._private.replica.asgi_runner",
                   "servekit._private.replica.batching",
                   "servekit._private.replica.multiplexed")


def modules_of(pid: int, directory: Path) -> List[str]:
    """The modules process ``pid`` has loaded (it writes their names when signalled)."""
    os.kill(pid, signal.SIGUSR1)
    listing = directory / str(pid)
    wait_for(listing.exists, message=f"process {pid} to list its modules")
    return listing.read_text().split()


def loaded(modules: List[str], names: tuple) -> List[str]:
    """Those of ``names`` that ``modules`` holds, or any module of theirs."""
    return [name for name in names
            if any(module == name or module.startswith(name + ".") for module in modules)]


@pytest.fixture
def listed_instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Dict[str, List[str]]:
    """The modules of an instance's proxy and of its replica of ``noop``, idle after an
    HTTP request: {"proxy": [...], "replica": [...]}."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [LISTING, *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("SERVEKIT_TEST_MODULES_DIR", str(tmp_path))
    port = free_port()
    client = serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        client.create_backend("noop", noop)
        client.create_endpoint("noop", backend="noop", route="/noop")
        assert httpx.get(f"http://127.0.0.1:{port}/noop", timeout=30).text == "ok"
        pids = {process["role"]: process["pid"] for process in client._call("status")["processes"]
                if process["role"] in ("proxy", "replica")}
        return {role: modules_of(pid, tmp_path) for role, pid in pids.items()}
    finally:
        client.shutdown()


def test_a_proxy_and_a_plain_replica_load_no_library_they_do_not_use(
        listed_instance: Dict[str, List[str]]) -> None:
    proxy, replica = listed_instance["proxy"], listed_instance["replica"]
    assert "uvicorn.server" in proxy and "starlette.requests" in replica  # (listed for real)
    assert loaded(proxy, NEITHER + NOT_THE_PROXY) == []
    assert loaded(replica, NEITHER + NOT_THE_REPLICA) == []
