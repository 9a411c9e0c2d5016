"""Shared fixtures: free ports, a Ray cluster, and a servekit instance that is always shut down.

A test module runs its ``instance`` tests on both runtimes by declaring
``RUNTIMES = BOTH_RUNTIMES``; the default is the embedded runtime only. The Ray runs share
one ``ray.cluster_utils.Cluster`` per session; each module connects to it and disconnects
afterwards, so the modules after it run embedded again.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any, Callable, Iterator

import pytest

import servekit as serve

BOTH_RUNTIMES = ["local", pytest.param("ray", marks=pytest.mark.ray)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    """A port of 127.0.0.1 that something listens on while the block runs."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        yield blocker.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float = 10.0,
             message: str = "condition") -> object:
    """Poll ``condition`` until it is truthy or ``timeout`` passes (then fail the test)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"Timed out after {timeout}s waiting for {message}.")
        time.sleep(0.02)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "runtime" in metafunc.fixturenames:
        runtimes = getattr(metafunc.module, "RUNTIMES", ["local"])
        metafunc.parametrize("runtime", runtimes, indirect=True, scope="module")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list) -> None:
    """Within each module, the tests on Ray last: this process is a Ray driver from the
    first of them to the end of the module, and a test that starts an instance of its own
    must not find Ray initialized (it would run there)."""
    modules: dict = {}
    for item in items:
        modules.setdefault(item.module, len(modules))

    def on_ray(item: Any) -> bool:
        callspec = getattr(item, "callspec", None)
        return callspec is not None and callspec.params.get("runtime") == "ray"

    items.sort(key=lambda item: (modules[item.module], on_ray(item)))


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A one-machine Ray cluster (its head node only; tests may add nodes and must remove
    them), shut down at the end of the session."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "include_dashboard": False, "resources": {"head": 1}})
    yield cluster
    cluster.shutdown()


@contextlib.contextmanager
def ray_connected(cluster: Any) -> Iterator[None]:
    """This process as a Ray driver of ``cluster`` (so servekit runs on Ray) meanwhile."""
    import ray

    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def runtime(request: pytest.FixtureRequest) -> Iterator[str]:
    """The runtime the module's instance runs on: "local", or "ray" (connected meanwhile)."""
    if request.param == "ray":
        with ray_connected(request.getfixturevalue("ray_cluster")):
            yield "ray"
    else:
        yield "local"


@pytest.fixture(scope="module")
def instance(runtime: str) -> Iterator[tuple]:
    """A running instance shared by one test module: (client, base_url)."""
    port = free_port()
    client = serve.start(http_options={"port": port})
    yield client, f"http://127.0.0.1:{port}"
    client.shutdown()


@pytest.fixture
def serve_instance(instance: tuple) -> Iterator[tuple]:
    """The module's instance, emptied of endpoints and backends after each test."""
    client, url = instance
    yield client, url
    for endpoint in client.list_endpoints():
        client.delete_endpoint(endpoint)
    for backend in client.list_backends():
        client.delete_backend(backend, force=True)
