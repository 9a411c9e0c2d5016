"""Timeouts and cancellation against real processes: a request whose caller is gone (timed
out, disconnected, cancelled) is taken out of the queue if it still waits, and an async
backend's coroutine is cancelled in the replica; nothing runs on for a caller that left."""

from __future__ import annotations

import asyncio
import os
import socket
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
