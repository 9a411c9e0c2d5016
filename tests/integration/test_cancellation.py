"""Timeouts and cancellation against real processes: a request whose caller is gone (timed
out, disconnected, cancelled) is taken out of the queue if it still waits, and an async
backend's coroutine is cancelled in the replica; nothing runs on for a caller that left."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import threading
import time
from typing import Any, Iterator

import httpx
import pytest
from robustness_backends import async_wait_for_file, wait_for_file
from starlette.requests import Request

import servekit as serve
from conftest import free_port, wait_for
from servekit.handle import routers

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


def _name(request: Any) -> str:
    if isinstance(request, Request):
        return request.query_params["name"]
    return request.data


class Recorder:
    """Async requests named ``name`` mark ``<dir>/<name>.started``, wait for
    ``<dir>/release``, then mark ``.finished``; a cancelled one marks ``.cancelled``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _mark(self, name: str, event: str) -> None:
        open(os.path.join(self.directory, f"{name}.{event}"), "w").close()

    async def __call__(self, request: Any) -> str:
        name = _name(request)
        self._mark(name, "started")
        try:
            await async_wait_for_file(os.path.join(self.directory, "release"))
        except asyncio.CancelledError:
            self._mark(name, "cancelled")
            raise
        self._mark(name, "finished")
        return name


class SyncRecorder(Recorder):
    """The same, as a sync method: a cancelled one runs to its end (its result dropped)."""

    def __call__(self, request: Any) -> str:  # type: ignore[override]
        name = _name(request)
        self._mark(name, "started")
        wait_for_file(os.path.join(self.directory, "release"))
        self._mark(name, "finished")
        return name


def marked(directory: Any, name: str, event: str) -> bool:
    return os.path.exists(os.path.join(str(directory), f"{name}.{event}"))


@pytest.fixture
def timed(tmp_path: Any) -> Iterator[tuple]:
    port = free_port()
    client = serve.start(http_options={"port": port, "request_timeout_s": 1.0})
    client.create_backend("rec", Recorder, str(tmp_path),
                          config={"max_concurrent_queries": 1})
    client.create_endpoint("rec", backend="rec", route="/rec", methods=["GET", "POST"])
    yield client, f"http://127.0.0.1:{port}", port, tmp_path
    client.shutdown()


def test_past_the_timeout_the_client_gets_504_and_the_coroutine_is_cancelled(
        timed: tuple) -> None:
    _, url, _, directory = timed
    started = time.monotonic()
    response = httpx.get(f"{url}/rec", params={"name": "slow"}, timeout=TIMEOUT)
    assert response.status_code == 504
    assert "request_timeout_s" in response.text
    assert time.monotonic() - started < 10  # the 1 s timeout, not the backend's pace
    wait_for(lambda: marked(directory, "slow", "cancelled"), TIMEOUT,
             "the backend's coroutine cancelled in the replica")
    assert not marked(directory, "slow", "finished")


def test_a_request_timed_out_while_queued_never_runs(timed: tuple) -> None:
    client, url, _, directory = timed
    # A handle call (no HTTP timeout) holds the only place of the replica...
    holder = client.get_handle("rec").remote("holder")
    wait_for(lambda: marked(directory, "holder", "started"), TIMEOUT, "the holder to run")
    # ... so this request waits in the proxy until its timeout.
    response = httpx.get(f"{url}/rec", params={"name": "queued"}, timeout=TIMEOUT)
    assert response.status_code == 504
    (directory / "release").touch()
    assert holder.result(timeout=TIMEOUT) == "holder"
    assert httpx.get(f"{url}/rec", params={"name": "after"}, timeout=TIMEOUT).text == "after"
    assert not marked(directory, "queued", "started")  # taken out of the queue: never ran


def test_a_body_that_does_not_arrive_in_time_gets_408(timed: tuple) -> None:
    _, _, port, directory = timed
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /rec?name=body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                     b"only ten b")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
    assert not marked(directory, "body", "started")


def _queued_in_proxy(port: int, backend: str) -> float:
    """Requests to ``backend`` waiting in the proxy's router, from its metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/-/metrics", timeout=TIMEOUT).text
    for line in text.splitlines():
        if line.startswith("serve_deployment_queued_queries{") and \
                f'backend="{backend}"' in line and 'process="proxy' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_that_disconnects_cancels_its_request(tmp_path: Any) -> None:
    port = free_port()
    client = serve.start(http_options={"port": port})
    try:
        client.create_backend("rec", Recorder, str(tmp_path),
                              config={"max_concurrent_queries": 1})
        client.create_endpoint("rec", backend="rec", route="/rec")

        def open_and_leave(name: str) -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            sock.sendall(f"GET /rec?name={name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            return sock

        running = open_and_leave("running")
        wait_for(lambda: marked(tmp_path, "running", "started"), TIMEOUT, "it to run")
        queued = open_and_leave("queued")
        wait_for(lambda: _queued_in_proxy(port, "rec") == 1, TIMEOUT,
                 "the request to wait in the proxy's router behind it")
        queued.close()
        wait_for(lambda: _queued_in_proxy(port, "rec") == 0, TIMEOUT,
                 "the proxy to see the client leave")
        running.close()
        wait_for(lambda: marked(tmp_path, "running", "cancelled"), TIMEOUT,
                 "the running coroutine cancelled")
        (tmp_path / "release").touch()
        url = f"http://127.0.0.1:{port}/rec"
        assert httpx.get(url, params={"name": "later"}, timeout=TIMEOUT).status_code == 200
        assert not marked(tmp_path, "queued", "started")  # never executed
    finally:
        client.shutdown()


@pytest.fixture
def handles(tmp_path: Any) -> Iterator[tuple]:
    client = serve.start(http_options={"port": free_port()})
    client.create_backend("rec", Recorder, str(tmp_path),
                          config={"max_concurrent_queries": 1})
    client.create_endpoint("rec", backend="rec")
    client.create_backend("sync", SyncRecorder, str(tmp_path),
                          config={"max_concurrent_queries": 1})
    client.create_endpoint("sync", backend="sync")
    yield client, tmp_path
    client.shutdown()


def test_serve_response_cancel_cancels_the_coroutine_in_the_replica(handles: tuple) -> None:
    client, directory = handles
    handle = client.get_handle("rec")
    response = handle.remote("one")
    wait_for(lambda: marked(directory, "one", "started"), TIMEOUT, "it to run")
    response.cancel()
    wait_for(lambda: marked(directory, "one", "cancelled"), TIMEOUT, "it cancelled")
    with pytest.raises(Exception) as raised:
        response.result(timeout=TIMEOUT)
    assert "Cancelled" in type(raised.value).__name__


def test_cancelling_the_awaiting_task_cancels_a_queued_request(handles: tuple) -> None:
    client, directory = handles

    async def main() -> None:
        handle = client.get_handle("rec", sync=False)
        running = await handle.remote("running")
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: wait_for(lambda: marked(directory, "running", "started"),
                                   TIMEOUT, "it to run"))
        queued = asyncio.ensure_future(handle.remote("queued"))  # waits: cap 1
        router = await routers.get(client._controller_address)
        deadline = time.monotonic() + TIMEOUT
        while router._replica_sets["rec"].queued == 0:  # this loop's router holds it
            assert time.monotonic() < deadline, "the request never queued"
            await asyncio.sleep(0.001)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        (directory / "release").touch()
        assert await running == "running"
        assert await (await handle.remote("after")) == "after"

    asyncio.run(main())
    assert not marked(directory, "queued", "started")


def test_a_cancelled_sync_call_finishes_and_its_result_is_dropped(handles: tuple) -> None:
    client, directory = handles
    handle = client.get_handle("sync")
    response = handle.remote("one")
    wait_for(lambda: marked(directory, "one", "started"), TIMEOUT, "it to run")
    response.cancel()
    (directory / "release").touch()
    wait_for(lambda: marked(directory, "one", "finished"), TIMEOUT, "the thread to finish")
    with pytest.raises(Exception) as raised:
        response.result(timeout=TIMEOUT)
    assert "Cancelled" in type(raised.value).__name__
    assert handle.remote("two").result(timeout=TIMEOUT) == "two"


class Concurrency:
    """A sync backend whose calls take ``seconds`` and count how many run at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.running = self.started = self.peak = 0

    def __call__(self, request: Any) -> str:
        with self.lock:
            self.started += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(self.seconds)  # the model's work
        with self.lock:
            self.running -= 1
        return "done"

    def counts(self, request: Any) -> dict:
        with self.lock:
            return {"started": self.started, "peak": self.peak, "running": self.running}


def _give_up_together(url: str, clients: int, after_s: float) -> None:
    """``clients`` HTTP requests at once, each abandoned after ``after_s``."""
    def one(_: int) -> None:
        with pytest.raises(httpx.TimeoutException):
            httpx.get(url, timeout=after_s)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))


@pytest.mark.parametrize("sync_threads, most_started", [(1, 1), (4, 2)])
def test_clients_that_give_up_never_make_a_replica_run_past_its_cap(
        sync_threads: int, most_started: int) -> None:
    """20 HTTP clients give up after 0.2 s on a sync backend (cap 2, 2 s per call). With
    one thread only the first call ever starts (the second, waiting for the thread, is
    withdrawn); with four, at most the cap. Calls already running keep their place until
    they return, so no more than the cap ever run at once.

    Old behaviour caught: a cancelled call gave its place back while its thread ran, so 7 to
    12 calls started and, with four threads, four ran at once."""
    port = free_port()
    client = serve.start(http_options={"port": port})
    try:
        # Each call takes long enough that every client has given up before the first
        # ends, even on a loaded machine where the 20 clients start late.
        client.create_backend("busy", Concurrency, 2.0, config={
            "max_concurrent_queries": 2, "sync_threads": sync_threads})
        client.create_endpoint("busy", backend="busy", route="/busy")
        handle = client.get_handle("busy").options(method_name="counts")
        _give_up_together(f"http://127.0.0.1:{port}/busy", 20, 0.2)
        wait_for(lambda: handle.remote().result(timeout=TIMEOUT)["running"] == 0, TIMEOUT,
                 "the calls already running to return")
        counts = handle.remote().result(timeout=TIMEOUT)
        assert 1 <= counts["started"] <= most_started, counts
        assert counts["peak"] <= 2, counts
        # Nothing was left queued or counted: the next request is answered at once.
        assert httpx.get(f"http://127.0.0.1:{port}/busy", timeout=TIMEOUT).text == "done"
        assert handle.remote().result(timeout=TIMEOUT)["started"] == counts["started"] + 1
    finally:
        client.shutdown()
