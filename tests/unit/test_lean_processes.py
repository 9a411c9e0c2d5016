"""What servekit's own processes import: each role's entry module, its spec unpickled and
its first request served, without the heavy libraries it does not need (their memory and
start-up time are paid by every replica and proxy of every instance).

Each case runs in a fresh interpreter, as a worker starts, and lists the modules it loaded.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from typing import Any, List

import cloudpickle

from servekit._private.backend_metadata import ReplicaConfig
from servekit._private.specs import ProxySettings, ProxySpec, ReplicaSpec
from servekit.config import BackendConfig, HTTPOptions

# Loaded by no role below but the one that needs it (uvicorn: the proxy; cloudpickle, to
# unpickle its backend, and starlette's requests, as its HTTP calls get a starlette Request:
# the replica).
HEAVY = ("pydantic", "prometheus_client", "fastapi", "yaml", "uvicorn", "click", "websockets",
         "cloudpickle", "starlette", "starlette.responses", "starlette.applications",
         "starlette.routing", "starlette.middleware")

_LOADED = """
import pickle, sys
{body}
heavy = {heavy!r}
print(" ".join(sorted(name for name in heavy if name in sys.modules)))
"""


def loaded(body: str, payload: Any = None) -> List[str]:
    """Which of ``HEAVY`` a fresh interpreter has loaded after running ``body`` (which
    finds ``payload``, pickled, on its stdin)."""
    script = _LOADED.format(body=body, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(payload),
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().split()


def test_a_replica_of_a_plain_function_loads_no_heavy_library() -> None:
    spec = ReplicaSpec("noop", "noop#1", ReplicaConfig(cloudpickle.dumps((len, ())), {}, "len"),
                       BackendConfig().replica_settings(), None)
    body = """
import asyncio
import servekit._private.workers.worker as worker
from servekit._private import metrics
from servekit._private.http_request import request_from_wire
from servekit._private.http_wire import HTTPRequestWire, to_http_response
worker.role_main("replica")  # imports the replica's module, as a replica starts
spec = pickle.loads(sys.stdin.buffer.read())
pickle.loads(spec.replica_config.serialized)
request = request_from_wire(HTTPRequestWire(
    "GET", "/noop", b"", [], b"", "http", None, None, "", "1.1"))
asyncio.run(to_http_response({"path": request.url.path}))
metrics.exposition()
"""
    assert loaded(body, spec) == ["cloudpickle", "starlette"]


def test_a_proxy_loads_uvicorn_without_its_command_line_and_nothing_else_heavy() -> None:
    spec = ProxySpec(ProxySettings.of(HTTPOptions()))
    body = """
import servekit._private.workers.worker as worker
worker.role_main("proxy")
spec = pickle.loads(sys.stdin.buffer.read())
from servekit._private.proxy.proxy import front_end
"""
    assert loaded(body, spec) == ["uvicorn"]


def test_the_supervisor_loads_no_heavy_library() -> None:
    assert loaded("""
import servekit._private.workers.worker as worker
worker.role_main("supervisor")
""") == []
