"""Shared fixtures: free ports, and a servekit instance that is always shut down."""

from __future__ import annotations

import socket
import time
from typing import Callable, Iterator

import pytest

import servekit as serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@pytest.fixture(scope="module")
def instance() -> Iterator[tuple]:
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
