"""Unit tests of the supervisor's controller watchdog (``supervisor._kill_when_frozen``).

The "controller" is a real ``RpcServer`` on a Unix socket in this event loop whose ``ping``
handler the test holds or releases; the process is a fake whose ``kill`` is recorded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Tuple

import pytest
from loop_helpers import run

from servekit._private import constants
from servekit._private.wire.transport import RpcServer
from servekit._private.workers import supervisor
from servekit._private.workers.process import bind_unix_socket, cpu_state


class FakeController:
    """What the watchdog needs of a ``WorkerProcess``: a pid and ``popen.kill()``."""

    def __init__(self) -> None:
        self.pid = 4242
        self.popen = self
        self.killed = asyncio.Event()

    def kill(self) -> None:
        self.killed.set()


@pytest.fixture
def quick_pings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "CONTROLLER_PING_TIMEOUT_S", 0.05)
    monkeypatch.setattr(supervisor, "_PING_PERIOD_S", 0.01)


async def serving(tmp_path: Path, ping: Any) -> Tuple[str, RpcServer]:
    path = str(tmp_path / "controller.sock")
    server = RpcServer({"ping": ping})
    await server.start(bind_unix_socket(path))
    return path, server


def test_a_controller_that_stops_answering_is_killed(tmp_path: Path, quick_pings: None) -> None:
    async def main() -> None:
        answering = asyncio.Event()
        answering.set()
        pings = 0
        answered_five = asyncio.Event()

        async def ping() -> bool:
            nonlocal pings
            pings += 1
            if pings == 5:
                answered_five.set()
            await answering.wait()
            return True

        address, server = await serving(tmp_path, ping)
        controller = FakeController()
        watchdog = asyncio.ensure_future(supervisor._kill_when_frozen(address, controller))
        await asyncio.wait_for(answered_five.wait(), 5)  # answered pings: nothing happens
        assert not controller.killed.is_set()
        answering.clear()  # frozen from now on
        await asyncio.wait_for(controller.killed.wait(), 5)
        await asyncio.wait_for(watchdog, 1)  # done once it killed
        answering.set()
        server.close()

    run(main)


def test_a_slow_first_answer_is_waited_for(tmp_path: Path, quick_pings: None) -> None:
    """The first ping gets the startup timeout: a controller still importing and taking
    over state is not killed for it."""

    async def main() -> None:
        started = asyncio.Event()
        answered = asyncio.Event()

        async def ping() -> bool:
            await started.wait()
            answered.set()
            return True

        address, server = await serving(tmp_path, ping)
        controller = FakeController()
        watchdog = asyncio.ensure_future(supervisor._kill_when_frozen(address, controller))
        await asyncio.sleep(10 * constants.CONTROLLER_PING_TIMEOUT_S)  # many ping timeouts
        assert not controller.killed.is_set()
        started.set()
        await asyncio.wait_for(answered.wait(), 5)
        await asyncio.sleep(5 * supervisor._PING_PERIOD_S)
        assert not controller.killed.is_set() and not watchdog.done()
        watchdog.cancel()
        await asyncio.wait([watchdog])
        server.close()

    run(main)


def test_a_controller_that_only_waits_for_a_cpu_is_not_killed(
        tmp_path: Path, quick_pings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of replicas starting at once saturate the machine: pings missed while the
    controller is runnable but gets no CPU do not count; once it is frozen, they do."""
    waiting_for_cpu = True
    monkeypatch.setattr(supervisor, "cpu_state", lambda pid: ("R", 0.0))
    monkeypatch.setattr(supervisor, "starved", lambda pid, before, timeout: waiting_for_cpu)

    async def main() -> None:
        nonlocal waiting_for_cpu
        answering = asyncio.Event()
        answering.set()  # the first pings are answered (the first waits as long as a start)
        pings = 0
        missed_many = asyncio.Event()

        async def ping() -> bool:
            nonlocal pings
            pings += 1
            if pings == 2:
                answering.clear()  # from now on it gets no CPU
            if pings == 12:
                missed_many.set()
            await answering.wait()
            return True

        address, server = await serving(tmp_path, ping)
        controller = FakeController()
        watchdog = asyncio.ensure_future(supervisor._kill_when_frozen(address, controller))
        await asyncio.wait_for(missed_many.wait(), 5)  # far more than _PINGS_MISSED
        assert not controller.killed.is_set()
        waiting_for_cpu = False  # frozen from now on
        await asyncio.wait_for(controller.killed.wait(), 5)
        await asyncio.wait_for(watchdog, 1)
        answering.set()
        server.close()

    run(main)


def test_starved_tells_a_process_waiting_for_a_cpu_from_a_frozen_one() -> None:
    """Real processes: a stopped one and a sleeping one are not starved; one that is
    runnable and got little CPU in the window is."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = cpu_state(spinner.pid)
        assert state is not None
        assert supervisor.starved(spinner.pid, state[1], timeout=1e6)  # runnable, no CPU yet
        os.kill(spinner.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while (cpu_state(spinner.pid) or ("?",))[0] != "T":
            assert time.monotonic() < deadline, "the process did not stop"
            time.sleep(0.01)
        assert not supervisor.starved(spinner.pid, state[1], timeout=1e6)  # stopped: frozen
        deadline = time.monotonic() + 5
        while (cpu_state(sleeper.pid) or ("?",))[0] != "S":
            assert time.monotonic() < deadline, "the process did not start sleeping"
            time.sleep(0.01)
        assert not supervisor.starved(sleeper.pid, 0.0, timeout=1e6)  # blocked: frozen
    finally:
        for process in (spinner, sleeper):
            process.kill()
            process.wait()
