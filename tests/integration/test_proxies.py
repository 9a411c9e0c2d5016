"""Several HTTP proxies on one machine (``HTTPOptions.num_proxies``): they share the port,
each takes connections, one that dies is replaced while the others serve, and a backend's
``max_concurrent_queries`` holds across all of them."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import threading
import time
from typing import Any, Dict, Iterator, List, Set, Tuple

import httpx
import pytest

import servekit as serve
from conftest import free_port

TIMEOUT = 30.0


@pytest.fixture
def two_proxies() -> Iterator[Tuple[serve.Client, int]]:
    port = free_port()
    client = serve.start(http_options={"port": port, "num_proxies": 2})
    yield client, port
    client.shutdown()


def proxies(client: serve.Client) -> List[Dict[str, Any]]:
    return [p for p in client._call("status")["processes"] if p["role"] == "proxy"]


def held_connections(pid: int, port: int) -> int:
    """Established TCP connections to ``port`` whose socket process ``pid`` holds (what
    ``ss -tp`` shows), from /proc."""
    inodes: Set[str] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    established = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
                established.add(fields[9])
    return len(inodes & established)


def hello(request: Any) -> str:
    return "hello"


def test_two_proxies_share_the_port_and_both_take_connections(
        two_proxies: Tuple[serve.Client, int]) -> None:
    client, port = two_proxies
    client.create_backend("hello", hello)
    client.create_endpoint("hello", backend="hello", route="/hello")
    found = proxies(client)
    assert sorted(p["name"] for p in found) == ["proxy", "proxy-2"]
    assert len({p["pid"] for p in found}) == 2
    assert all(p["http"] == ["127.0.0.1", port] for p in found)
    connections = []
    try:
        for _ in range(30):  # held open, each after one answered request
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            connections.append(sock)
        held = {p["name"]: held_connections(p["pid"], port) for p in found}
        assert sum(held.values()) == 30 and min(held.values()) >= 1, held
    finally:
        for sock in connections:
            sock.close()


def test_a_killed_proxy_is_replaced_while_the_other_serves(
        two_proxies: Tuple[serve.Client, int]) -> None:
    client, port = two_proxies
    client.create_backend("hello", hello)
    client.create_endpoint("hello", backend="hello", route="/hello")
    victim = next(p for p in proxies(client) if p["name"] == "proxy-2")
    os.kill(victim["pid"], signal.SIGKILL)
    statuses = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        statuses.append(httpx.get(f"http://127.0.0.1:{port}/hello", timeout=TIMEOUT)
                        .status_code)
        replaced = [p for p in proxies(client) if p["name"] == "proxy-2"]
        if replaced and replaced[0]["pid"] != victim["pid"]:
            break
    else:
        pytest.fail("the killed proxy was not replaced")
    assert set(statuses) == {200}


class Counting:
    """A sync backend that counts how many of its calls run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.peak = 0

    def __call__(self, request: Any) -> str:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(0.1)
        with self.lock:
            self.running -= 1
        return "done"

    def get_peak(self, request: Any) -> int:
        return self.peak


def test_max_concurrent_queries_holds_across_proxies(
        two_proxies: Tuple[serve.Client, int]) -> None:
    client, port = two_proxies
    client.create_backend("counting", Counting, config={
        "max_concurrent_queries": 2, "sync_threads": 8})
    client.create_endpoint("counting", backend="counting", route="/counting")

    def call(_: int) -> int:
        return httpx.get(f"http://127.0.0.1:{port}/counting", timeout=TIMEOUT).status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert set(pool.map(call, range(32))) == {200}
    peak = client.get_handle("counting").options(method_name="get_peak").remote().result(
        timeout=TIMEOUT)
    assert peak == 2

