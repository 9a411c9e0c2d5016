"""A controller that comes back leaves nothing unowned, against real processes of the
embedded runtime: GPUs of adopted replicas stay taken, and a worker launched just before
the controller died, before its record was saved, is found by the socket it serves and
stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
from typing import Iterator

import pytest

from conftest import wait_for
from servekit._private.runtime.local import LocalRuntime
from servekit._private.workers.process import process_start_time, unix_socket_holders

pytestmark = pytest.mark.integration

# A stand-in for a worker whose controller died before saving its record: it binds and
# serves a worker socket in the instance directory, and waits to be stopped.
UNRECORDED_WORKER = """
import socket, sys, time
sock = socket.socket(socket.AF_UNIX)
sock.bind(sys.argv[1])
sock.listen()
print("listening", flush=True)
time.sleep(600)
"""


@pytest.fixture
def instance_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="servekit-test-") as directory:
        yield directory


def runtime_in(directory: str) -> LocalRuntime:
    return LocalRuntime(directory, os.path.join(directory, "controller.sock"), sys.path)


@contextlib.contextmanager
def serving(path: str) -> Iterator[subprocess.Popen]:
    """A process that serves the Unix socket ``path``, killed on the way out."""
    with subprocess.Popen([sys.executable, "-c", UNRECORDED_WORKER, path],
                          stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "listening"
            yield process
        finally:
            process.kill()


def test_an_unrecorded_worker_is_found_by_its_socket_and_stopped(instance_dir: str) -> None:
    path = os.path.join(instance_dir, "r-0123456789ab.sock")
    with serving(path) as orphan:
        assert unix_socket_holders(path) == [orphan.pid]
        runtime = runtime_in(instance_dir)
        try:
            assert asyncio.run(runtime.reap_unrecorded()) == [path]
        finally:
            runtime.store.close()
        assert orphan.wait(timeout=10) != 0  # killed
        assert not os.path.exists(path)


def test_workers_a_runtime_adopted_are_left_running(instance_dir: str) -> None:
    path = os.path.join(instance_dir, "r-ba9876543210.sock")
    with serving(path) as adopted:
        runtime = runtime_in(instance_dir)
        try:
            assert runtime.adopt("b#1", "replica", path, {
                "pid": adopted.pid, "start_time": process_start_time(adopted.pid)})
            assert asyncio.run(runtime.reap_unrecorded()) == []
            assert adopted.poll() is None and os.path.exists(path)
        finally:
            runtime.store.close()


def test_an_adopted_replicas_gpus_stay_taken(instance_dir: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity a controller saves carries the replica's GPUs; the next controller's
    runtime adopts them, so a new replica gets another device."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        wait_for(lambda: process_start_time(holder.pid) is not None)
        runtime = runtime_in(instance_dir)
        try:
            identity = {"pid": holder.pid, "start_time": process_start_time(holder.pid),
                        "gpus": ["0"], "num_gpus": 1}
            assert runtime.adopt("gpu#1", "replica", "/nowhere.sock", identity)
            assert runtime.identity("gpu#1") == identity  # saved again as it was
            assert runtime._gpus.assign("gpu#2", 1) == "1"
        finally:
            runtime.store.close()
    finally:
        holder.kill()
        holder.wait()
