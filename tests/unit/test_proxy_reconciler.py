"""Unit tests of the HTTP proxies a controller runs (``ProxyReconciler``), over the
FakeRuntime: restarts with backoff, one per node as nodes come and go, adoption by a
restarted controller, none without HTTP."""

from __future__ import annotations

import pytest
from controller_helpers import eventually
from fake_runtime import FakeRuntime
from loop_helpers import run

from servekit._private import constants
from servekit._private.controller.controller import Controller
from servekit._private.specs import HTTPSettings
from servekit.config import HTTPOptions


def test_proxy_restart_is_retried_until_it_comes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy that fails to restart is retried with backoff; one failure never leaves
    HTTP down for good."""
    monkeypatch.setattr(constants, "HEALTH_CHECK_PERIOD_S", 0.01)
    monkeypatch.setattr(constants, "MAX_RESTART_BACKOFF_S", 0.02)

    async def main() -> None:
        runtime = FakeRuntime()
        controller = Controller(runtime, HTTPSettings.of(HTTPOptions(host="127.0.0.1", port=8000)))
        await controller.start()
        try:
            assert runtime.alive(role="proxy") == ["proxy"]
            runtime.fail_launches("proxy", OSError("address in use"))
            runtime.kill("proxy")
            await eventually(lambda: runtime.launch_order.count("proxy") >= 4,
                             "three failed restarts")
            assert runtime.alive(role="proxy") == []
            runtime.fail_launches("proxy", None)
            await eventually(lambda: runtime.alive(role="proxy") == ["proxy"],
                             "the proxy back")
        finally:
            await controller.shutdown()

    run(main)


# --------------------------------------------------------------------------- proxy locations


def test_every_node_proxies_follow_nodes_as_they_join_and_leave(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HEALTH_CHECK_PERIOD_S", 0.01)

    async def main() -> None:
        runtime = FakeRuntime()
        runtime.nodes = ["a", "b"]
        options = HTTPSettings.of(HTTPOptions(port=8000, location="EveryNode"))
        controller = Controller(runtime, options)
        await controller.start()
        try:
            # start() returns with a proxy on each node, each placed on its node.
            assert runtime.alive(role="proxy") == ["proxy-a", "proxy-b"]
            assert runtime.launched_on["proxy-a"] == "a"
            assert runtime.launched_on["proxy-b"] == "b"
            runtime.nodes = ["b", "c"]  # a leaves, c joins
            await eventually(lambda: runtime.alive(role="proxy") == ["proxy-b", "proxy-c"],
                             "the proxies to follow the nodes")
            assert runtime.launched_on["proxy-c"] == "c"
            status = [p["name"] for p in controller.status()["processes"]
                      if p["role"] == "proxy"]
            assert sorted(status) == ["proxy-b", "proxy-c"]
        finally:
            await controller.shutdown()
        assert runtime.alive(role="proxy") == []

    run(main)


def test_a_proxy_that_cannot_start_on_one_node_does_not_keep_the_others_down(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HEALTH_CHECK_PERIOD_S", 0.01)
    monkeypatch.setattr(constants, "MAX_RESTART_BACKOFF_S", 0.02)

    async def main() -> None:
        runtime = FakeRuntime()
        runtime.nodes = ["a", "b"]
        options = HTTPSettings.of(HTTPOptions(port=8000, location="EveryNode"))
        controller = Controller(runtime, options)
        await controller.start()
        try:
            runtime.fail_launches("proxy-b", OSError("address in use"))
            runtime.kill("proxy-a")
            runtime.kill("proxy-b")
            await eventually(lambda: runtime.alive(role="proxy") == ["proxy-a"],
                             "the proxy of the healthy node back")
            runtime.fail_launches("proxy-b", None)
            await eventually(lambda: runtime.alive(role="proxy") == ["proxy-a", "proxy-b"],
                             "the other proxy back once it can start")
        finally:
            await controller.shutdown()

    run(main)


@pytest.mark.parametrize("location", ["HeadOnly", "EveryNode"])
def test_a_restarted_controller_adopts_every_proxy(location: str) -> None:
    async def main() -> None:
        runtime = FakeRuntime()
        runtime.nodes = ["a", "b"]
        options = HTTPSettings.of(HTTPOptions(port=8000, location=location))
        first = Controller(runtime, options)
        await first.start()
        proxies = runtime.alive(role="proxy")
        launches = len(runtime.launch_order)
        for task in (first._health_task, first.proxies._task):
            assert task is not None
            task.cancel()  # the first controller "dies": its processes live on
        second = Controller(runtime, options)
        await second.start()
        try:
            assert runtime.alive(role="proxy") == proxies
            assert len(runtime.launch_order) == launches  # adopted, none started again
        finally:
            await second.shutdown()

    run(main)


def test_no_server_runs_no_proxy() -> None:
    async def main() -> None:
        runtime = FakeRuntime()
        controller = Controller(runtime, HTTPSettings.of(HTTPOptions(location="NoServer")))
        await controller.start()
        try:
            assert runtime.alive(role="proxy") == []
            assert runtime.http_bound is None
        finally:
            await controller.shutdown()

    run(main)
