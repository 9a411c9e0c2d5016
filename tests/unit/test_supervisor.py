"""Unit tests of the supervisor's controller watchdog (``supervisor._kill_when_frozen``).

The "controller" is a real ``RpcServer`` on a Unix socket in this event loop whose ``ping``
handler the test holds or releases; the process is a fake whose ``kill`` is recorded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Tuple

import pytest
from loop_helpers import run

from servekit._private import constants, supervisor
from servekit._private.process import bind_unix_socket
from servekit._private.transport import RpcServer


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
