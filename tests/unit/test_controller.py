"""Unit tests of the controller's logic over the in-memory FakeRuntime (no processes).

Each test runs one event loop with ``asyncio.run``; ``running_controller`` starts a
controller without an HTTP proxy and always shuts it down. Waits poll a condition with a
deadline instead of sleeping for a fixed time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import pickle
import threading
import types
from typing import (
    Any,
    Dict,
    Iterable,
    List,
    Mapping,
    Set,
    Tuple,
)

import cloudpickle
import pytest
from controller_helpers import (
    TIMEOUT_S,
    Model,
    abandon,
    eventually,
    replica_config,
    replica_tags,
    running_controller,
    start_backend,
    wait_goal,
)
from fake_runtime import FakeRuntime
from loop_helpers import run, spin

from servekit._private import constants
from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig
from servekit._private.backend_settings import BackendSettings
from servekit._private.controller import backend_reconciler
from servekit._private.controller.controller import Controller
from servekit._private.controller.durable import LoadedState, load
from servekit._private.controller.state import RUNNING, STARTING
from servekit._private.controller.store import MemoryStore
from servekit._private.specs import HTTPSettings
from servekit.config import AutoscalingConfig, BackendConfig, HTTPOptions
from servekit.exceptions import ServeError

# --------------------------------------------------------------------------- backends


class ModelLoadError(Exception):
    """What a user's constructor raises in these tests."""


class BrokenModel:
    def __init__(self) -> None:
        raise ModelLoadError("weights.bin is corrupt")

    def __call__(self, request: Any) -> None:
        return None


FLAKY = {"fail": False}


class FlakyModel:
    """Its constructor raises while ``FLAKY["fail"]`` is set (read in-process by the fake)."""

    def __init__(self) -> None:
        if FLAKY["fail"]:
            raise ModelLoadError("out of memory")

    def __call__(self, request: Any) -> None:
        return None


class FlakyConfigurable(Model):
    """A ``Model`` whose constructor raises while ``FLAKY["fail"]`` is set."""

    def __init__(self) -> None:
        if FLAKY["fail"]:
            raise ModelLoadError("out of memory")
        super().__init__()


class PickyModel:
    """Its reconfigure refuses a user_config without "v"."""

    def __init__(self) -> None:
        self.user_config: Any = None

    def reconfigure(self, user_config: Any) -> None:
        if "v" not in user_config:
            raise KeyError("user_config needs 'v'")
        self.user_config = user_config

    def __call__(self, request: Any) -> Any:
        return self.user_config


# The event a SlowReconfigure's reconfigure waits for (created by the test, on its loop).
RECONFIGURE_RELEASE = threading.Event()


class SlowReconfigure:
    """Its reconfigure (on the replica's control thread) waits for ``RECONFIGURE_RELEASE``
    when asked to."""

    def __init__(self) -> None:
        self.user_config: Any = None

    def reconfigure(self, user_config: Any) -> None:
        if user_config.get("slow"):
            RECONFIGURE_RELEASE.wait(TIMEOUT_S)
        self.user_config = user_config

    def __call__(self, request: Any) -> Any:
        return self.user_config


def echo(request: Any) -> Any:
    return request


@pytest.fixture(autouse=True)
def _reset_flaky() -> Any:
    FLAKY["fail"] = False
    yield
    FLAKY["fail"] = False


# --------------------------------------------------------------------------- helpers


def live_replicas(runtime: FakeRuntime) -> List[str]:
    return runtime.alive(role="replica")


def saved(runtime: FakeRuntime) -> LoadedState:
    """What the controller saved in the store (backends being deleted left out)."""
    state = load(runtime.store.read_all(), "the test store")
    state.backends = {tag: b for tag, b in state.backends.items() if not b.deleting}
    return state


# --------------------------------------------------------------------------- create_backend


def test_create_backend_goal_completes_when_all_replicas_run() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            runtime.hold_launches()
            goal = await start_backend(controller, "m", wait=False, num_replicas=3)
            assert goal is not None
            await eventually(lambda: len(runtime.held()) == 3, "3 held launches")
            assert goal in controller.goals.pending()
            runtime.release()
            await wait_goal(controller, goal)
            running = replica_tags(controller, "m", RUNNING)
            assert len(running) == 3 == len(replica_tags(controller, "m"))
            assert sorted(live_replicas(runtime)) == sorted(running)
            for tag in running:
                assert runtime.calls(tag) == ["ready"]
            assert controller.list_backends() == {"m": BackendSettings.check({"num_replicas": 3})}

    run(main)


def test_replicas_start_in_parallel() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            runtime.hold_launches()
            goal = await start_backend(controller, "m", wait=False, num_replicas=4)
            # Every launch is under way before any of them was let go.
            held = await eventually(lambda: len(runtime.held()) == 4 and runtime.held(),
                                    "4 launches in flight at once")
            assert sorted(held) == sorted(replica_tags(controller, "m", STARTING))
            runtime.release()
            await wait_goal(controller, goal)
            assert len(replica_tags(controller, "m", RUNNING)) == 4

    run(main)


def test_replica_gets_its_spec_and_resources() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            config = ReplicaConfig(cloudpickle.dumps((Model, ("resnet",))), {"num_cpus": 2},
                                   "Model")
            goal = await controller.create_backend("m", config, BackendConfig(),
                                                   BackendMetadata.inspect(Model))
            await wait_goal(controller, goal)
            [tag] = replica_tags(controller, "m")
            worker = runtime.workers[tag]
            assert worker.role == "replica"
            assert worker.resources == {"num_cpus": 2}
            assert worker.payload.backend_tag == "m"
            assert worker.payload.replica_tag == tag
            assert worker.instance.name == "resnet"

    run(main)


def test_raising_constructor_fails_goal_and_frees_the_tag() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            goal = await start_backend(controller, "m", BrokenModel, wait=False,
                                       num_replicas=2)
            with pytest.raises(ModelLoadError, match="weights.bin is corrupt"):
                await wait_goal(controller, goal)
            await eventually(lambda: "m" not in controller.backends, "the backend removed")
            assert controller.list_backends() == {}
            assert live_replicas(runtime) == []
            assert "m" not in saved(runtime).backends
            # The tag is free: the fixed version can be created under it.
            await start_backend(controller, "m", Model, num_replicas=2)
            assert len(replica_tags(controller, "m", RUNNING)) == 2

    run(main)


class SlowStopRuntime(FakeRuntime):
    """A FakeRuntime whose ``stop`` of the workers in ``slow`` takes until ``finish_stops``,
    as a real process takes a while to exit."""

    def __init__(self) -> None:
        super().__init__()
        self.slow: Set[str] = set()
        self._stops_may_finish = asyncio.Event()

    def finish_stops(self) -> None:
        self._stops_may_finish.set()

    async def stop(self, name: str, timeout: float) -> None:
        if name in self.slow:
            await self._stops_may_finish.wait()
        await super().stop(name, timeout)


def test_failed_create_can_be_retried_at_once() -> None:
    """Once create_backend raised, creating the tag again must work, even while the other
    replicas of the failed backend are still being stopped."""

    async def main() -> None:
        runtime = SlowStopRuntime()
        async with running_controller(runtime) as (controller, _):
            try:
                runtime.hold_launches()
                goal = await start_backend(controller, "m", BrokenModel, wait=False,
                                           num_replicas=2)
                first, second = await eventually(
                    lambda: len(runtime.held()) == 2 and runtime.held(), "2 held launches")
                runtime.slow.add(second)
                runtime.release(first)
                with pytest.raises(ModelLoadError):
                    await wait_goal(controller, goal)
                assert controller.list_backends() == {}
                runtime.hold_launches(False)
                # The second replica's process is still exiting; the user retries now.
                retry = await controller.create_backend(
                    "m", replica_config(Model), BackendConfig(), BackendMetadata.inspect(Model))
                runtime.finish_stops()
                await wait_goal(controller, retry)
                assert controller.list_backends() == {"m": BackendSettings.check({})}
                await eventually(lambda: len(replica_tags(controller, "m", RUNNING)) == 1,
                                 "one running replica of the retried backend")
            finally:
                runtime.finish_stops()

    run(main)


def test_replica_killed_before_ready_fails_the_create() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            runtime.hold_launches()
            goal = await start_backend(controller, "m", wait=False)
            [name] = await eventually(runtime.held, "a held launch")
            runtime.kill(name)
            runtime.release()
            with pytest.raises(ServeError, match="was killed by signal SIGKILL before its "
                                                 "constructor finished"):
                await wait_goal(controller, goal)
            await eventually(lambda: "m" not in controller.backends, "the backend removed")

    run(main)


def test_create_backend_refused_beyond_capacity() -> None:
    async def main() -> None:
        async with running_controller(FakeRuntime(capacity={"CPU": 4.0})) as (controller,
                                                                               runtime):
            config = ReplicaConfig(cloudpickle.dumps((Model, ())), {"num_cpus": 2}, "Model")
            with pytest.raises(ServeError, match="only 2 fit"):
                await controller.create_backend("big", config, BackendConfig(num_replicas=3),
                                                BackendMetadata.inspect(Model))
            assert controller.list_backends() == {}
            assert runtime.launch_order == []
            await wait_goal(controller, await controller.create_backend(
                "big", config, BackendConfig(num_replicas=2), BackendMetadata.inspect(Model)))
            with pytest.raises(ServeError, match="only 0 fit"):
                await controller.update_backend_config("big", BackendConfig(num_replicas=3))
            assert controller.get_backend_config("big").num_replicas == 2
            assert len(live_replicas(runtime)) == 2
            # Replicas that ask for nothing always fit.
            await start_backend(controller, "small", num_replicas=3)

    run(main)


def test_create_backend_with_an_identical_definition_is_refused_but_a_retry_is_not() -> None:
    """As in 1.x, a second create_backend of a tag raises even when it is identical; the
    same call made again (the client retries after a controller crash) succeeds."""
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            config = replica_config(echo)
            goal = await controller.create_backend("m", config, BackendConfig(), None, "c-1")
            await wait_goal(controller, goal)
            retried = await controller.create_backend("m", config, BackendConfig(), None,
                                                      "c-1")
            assert retried in (goal, None)  # its goal, or none left to wait on
            with pytest.raises(ValueError, match="'m' is already registered"):
                await controller.create_backend("m", config, BackendConfig(), None, "c-2")
            with pytest.raises(ValueError, match="'m' is already registered"):
                await controller.create_backend("m", config, BackendConfig(), None)
            assert len(live_replicas(runtime)) == 1

    run(main)


def test_create_backend_duplicate_tag_is_refused() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", num_replicas=1)
            with pytest.raises(ValueError, match="'m' is already registered"):
                await start_backend(controller, "m", num_replicas=2)
            with pytest.raises(ValueError, match="'m' is already registered"):
                await start_backend(controller, "m", echo)
            assert controller.get_backend_config("m") == BackendSettings.check({"num_replicas": 1})
            assert len(live_replicas(runtime)) == 1

    run(main)


def test_create_backend_with_bad_config_for_callable_is_refused() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            with pytest.raises(ValueError, match="reconfigure"):
                await start_backend(controller, "f", echo, user_config={"a": 1})
            assert controller.list_backends() == {}
            assert runtime.launch_order == []

    run(main)


def test_replicas_start_in_bounded_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A big scale-up has at most MAX_STARTING_REPLICAS starts under way at once, the
    next ones begin as those end, and the controller answers meanwhile (status, a call on
    another backend, shutdown)."""
    monkeypatch.setattr(constants, "MAX_STARTING_REPLICAS", 4, raising=False)

    async def main() -> None:
        runtime = FakeRuntime()
        controller = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await controller.start()
        runtime.hold_launches()
        goal = await start_backend(controller, "big", wait=False, num_replicas=10)
        first = await eventually(lambda: len(runtime.held()) == 4 and runtime.held(),
                                 "4 held launches")
        await spin()
        assert runtime.launch_order == first  # no more than 4 at once
        assert len(replica_tags(controller, "big", STARTING)) == 4
        runtime.release()
        await eventually(lambda: len(replica_tags(controller, "big", RUNNING)) == 4,
                         "the first 4 running")
        second = await eventually(lambda: len(runtime.held()) == 4 and runtime.held(),
                                  "the next 4 launches")
        assert not set(first) & set(second)
        await spin()
        assert len(runtime.launch_order) == 8
        status = controller.status()["backends"]["big"]
        assert (status["running"], status["target"]) == (4, 10)
        assert goal in controller.goals.pending()
        assert await start_backend(controller, "other", wait=False)  # answered meanwhile
        await asyncio.wait_for(controller.shutdown(), TIMEOUT_S)
        assert live_replicas(runtime) == []

    run(main)


@pytest.mark.parametrize("config", [
    {"num_replicas": 10**9},
    {"autoscaling_config": {"max_replicas": 10**9, "initial_replicas": 10**9}},
    BackendConfig.model_construct(num_replicas=10**9),
    BackendConfig.model_construct(autoscaling_config=AutoscalingConfig.model_construct(
        max_replicas=10**9, initial_replicas=10**9)),
], ids=["num_replicas", "autoscaling", "num_replicas-model", "autoscaling-model"])
def test_a_controller_does_not_take_more_replicas_than_the_bound(config: Any) -> None:
    """A config that did not come through the client's checks is checked again, its
    autoscaling bounds too (the simulator found those taken: replicas started without
    end): as plain data (what clients send) and as an unchecked model (what clients of
    earlier versions sent)."""

    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "small")
            launched = list(runtime.launch_order)
            with pytest.raises(ValueError, match="replicas=1000000000"):
                await controller.create_backend("huge", replica_config(Model), config,
                                                BackendMetadata.inspect(Model))
            with pytest.raises(ValueError, match="replicas=1000000000"):
                await controller.update_backend_config("small", config)
            assert list(controller.list_backends()) == ["small"]
            assert controller.get_backend_config("small").num_replicas == 1
            assert runtime.launch_order == launched

    run(main)


# --------------------------------------------------------------------------- update_backend_config


def test_update_backend_config_scales_up() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", num_replicas=1)
            [original] = replica_tags(controller, "m")
            goal = await controller.update_backend_config("m", BackendConfig(num_replicas=3))
            await wait_goal(controller, goal)
            running = replica_tags(controller, "m", RUNNING)
            assert len(running) == 3 and original in running
            assert sorted(live_replicas(runtime)) == sorted(running)
            assert controller.get_backend_config("m").num_replicas == 3
            assert saved(runtime).backends["m"].config.num_replicas == 3
            # A scale-only change does not reconfigure running replicas.
            assert runtime.calls(original) == ["ready"]

    run(main)


def test_update_backend_config_scales_down_newest_first_with_drain() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", num_replicas=1)
            for count in (2, 3):
                await wait_goal(controller, await controller.update_backend_config(
                    "m", BackendConfig(num_replicas=count)))
            oldest, middle, newest = replica_tags(controller, "m")
            goal = await controller.update_backend_config("m", BackendConfig(num_replicas=1))
            await wait_goal(controller, goal)
            assert replica_tags(controller, "m") == [oldest]
            assert live_replicas(runtime) == [oldest]
            for victim in (middle, newest):
                assert runtime.calls(victim)[-1] == "drain"
                assert runtime.workers[victim].stop_timeout == constants.PROCESS_STOP_TIMEOUT_S
            assert "drain" not in runtime.calls(oldest)

    run(main)


def test_update_backend_config_pushes_user_config_to_running_replicas() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", num_replicas=2, user_config={"v": 1})
            tags = replica_tags(controller, "m")
            for tag in tags:
                assert runtime.workers[tag].instance.user_configs == [{"v": 1}]
            goal = await controller.update_backend_config("m", BackendConfig(user_config={"v": 2}))
            await wait_goal(controller, goal)
            for tag in tags:
                worker = runtime.workers[tag]
                assert worker.instance.user_configs == [{"v": 1}, {"v": 2}]
                assert worker.config == BackendConfig(user_config={"v": 2}).replica_settings()
            # The merge kept num_replicas; nothing was restarted.
            assert replica_tags(controller, "m") == tags

    run(main)


def test_scale_down_stops_starting_replicas_before_running_ones() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", num_replicas=1)
            [original] = replica_tags(controller, "m")
            runtime.hold_launches()
            scale_up = await controller.update_backend_config("m", BackendConfig(num_replicas=3))
            await eventually(lambda: len(runtime.held()) == 2, "2 held launches")
            goal = await controller.update_backend_config("m", BackendConfig(num_replicas=1))
            await wait_goal(controller, scale_up)  # superseded by the newer call
            await wait_goal(controller, goal)
            assert replica_tags(controller, "m") == [original]
            assert live_replicas(runtime) == [original]
            assert "drain" not in runtime.calls(original)

    run(main)


def test_a_slow_reconfigure_holds_up_neither_other_calls_nor_replacements() -> None:
    """While one backend's replicas apply a config, the controller serves other calls and
    replaces a dead replica of another backend; a second update of the same backend waits
    for the first."""

    async def main() -> None:
        RECONFIGURE_RELEASE.clear()
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "slow", SlowReconfigure, user_config={"v": 1})
            await start_backend(controller, "other", echo)
            update = asyncio.ensure_future(controller.update_backend_config(
                "slow", BackendConfig(user_config={"v": 2, "slow": True})))
            [slow] = replica_tags(controller, "slow")
            await eventually(lambda: runtime.calls(slow).count("update_config") == 1,
                             "the slow replica to get the new config")
            second = asyncio.ensure_future(controller.update_backend_config(
                "slow", BackendConfig(user_config={"v": 3})))
            try:
                await asyncio.wait_for(start_backend(controller, "third", echo), TIMEOUT_S)
                [victim] = replica_tags(controller, "other")
                runtime.kill(victim)
                await asyncio.wait_for(controller._check_health(), TIMEOUT_S)
                await eventually(lambda: [t for t in replica_tags(controller, "other", RUNNING)
                                          if t != victim], "the dead replica replaced")
                assert not update.done() and not second.done()
                assert runtime.calls(slow).count("update_config") == 1  # the second waits
            finally:
                RECONFIGURE_RELEASE.set()
            await wait_goal(controller, await asyncio.wait_for(update, TIMEOUT_S))
            await wait_goal(controller, await asyncio.wait_for(second, TIMEOUT_S))
            assert runtime.workers[slow].instance.user_config == {"v": 3}
            assert controller.get_backend_config("slow").user_config == {"v": 3}

    run(main)


def test_update_backend_config_that_fails_to_apply_leaves_the_config_unchanged() -> None:
    """When reconfigure raises on the replicas, the call raises and the old config stays."""

    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", PickyModel, user_config={"v": 1})
            with pytest.raises(KeyError, match="needs 'v'"):
                await controller.update_backend_config("m", BackendConfig(user_config={}))
            assert controller.get_backend_config("m").user_config == {"v": 1}
            assert saved(runtime).backends["m"].config.user_config == {"v": 1}

    run(main)


def test_update_backend_config_errors() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            with pytest.raises(ValueError, match="'nope' is not registered"):
                await controller.update_backend_config("nope", BackendConfig(num_replicas=2))
            await start_backend(controller, "f", echo)
            with pytest.raises(ValueError, match="reconfigure"):
                await controller.update_backend_config("f", BackendConfig(user_config=1))
            assert controller.get_backend_config("f") == BackendSettings.check({})

    run(main)


def test_failed_scale_up_reverts_the_config() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", FlakyModel, num_replicas=1)
            [original] = replica_tags(controller, "m")
            FLAKY["fail"] = True
            goal = await controller.update_backend_config("m", BackendConfig(num_replicas=2))
            with pytest.raises(ModelLoadError, match="out of memory"):
                await wait_goal(controller, goal)
            assert controller.get_backend_config("m").num_replicas == 1
            await eventually(lambda: replica_tags(controller, "m") == [original],
                             "only the original replica left")
            assert live_replicas(runtime) == [original]
            assert saved(runtime).backends["m"].config.num_replicas == 1

    run(main)


# --------------------------------------------------------------------------- delete_backend


def test_delete_backend_removes_all_replicas_gracefully() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", num_replicas=3)
            tags = replica_tags(controller, "m")
            goal = await controller.delete_backend("m", force=False)
            assert "m" not in controller.list_backends()
            await wait_goal(controller, goal)
            assert "m" not in controller.backends
            assert live_replicas(runtime) == []
            for tag in tags:
                assert runtime.calls(tag)[-1] == "drain"
                assert runtime.workers[tag].stop_timeout == constants.PROCESS_STOP_TIMEOUT_S
            assert "m" not in saved(runtime).backends
            with pytest.raises(ValueError, match="not registered"):
                controller.get_backend_config("m")

    run(main)


def test_force_delete_backend_skips_drain() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", num_replicas=2)
            tags = replica_tags(controller, "m")
            await wait_goal(controller, await controller.delete_backend("m", force=True))
            assert live_replicas(runtime) == []
            for tag in tags:
                assert "drain" not in runtime.calls(tag)
                assert runtime.workers[tag].stop_timeout == 0

    run(main)


def test_delete_unknown_backend_is_a_no_op() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m")
            assert await controller.delete_backend("nope", force=False) is None
            assert list(controller.list_backends()) == ["m"]

    run(main)


def test_delete_backend_refused_while_an_endpoint_uses_it() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            for tag in ("a", "b"):
                await start_backend(controller, tag)
            await controller.create_endpoint("e", "a", "/e", ["GET"])
            await controller.shadow_traffic("e", "b", 0.5)
            with pytest.raises(ValueError, match="used by endpoint 'e'"):
                await controller.delete_backend("a", force=False)
            with pytest.raises(ValueError, match="used by endpoint 'e'"):
                await controller.delete_backend("b", force=True)
            assert sorted(controller.list_backends()) == ["a", "b"]
            assert len(live_replicas(runtime)) == 2
            # Once no longer used, it can go.
            await controller.shadow_traffic("e", "b", 0)
            await wait_goal(controller, await controller.delete_backend("b", force=False))
            assert sorted(controller.list_backends()) == ["a"]

    run(main)


def test_delete_backend_while_replicas_start() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            runtime.hold_launches()
            await start_backend(controller, "m", wait=False, num_replicas=2)
            await eventually(lambda: len(runtime.held()) == 2, "2 held launches")
            goal = await controller.delete_backend("m", force=False)
            await wait_goal(controller, goal)
            assert "m" not in controller.backends
            assert live_replicas(runtime) == []

    run(main)


CONSTRUCTIONS = {"count": 0}


class FailsAfterItsFirst:
    """Its first construction works, the next ones raise."""

    def __init__(self) -> None:
        CONSTRUCTIONS["count"] += 1
        if CONSTRUCTIONS["count"] > 1:
            raise ModelLoadError("out of memory")

    def __call__(self, request: Any) -> None:
        return None


def test_a_backend_left_mixed_by_a_failed_redeploy_can_be_deleted() -> None:
    """A redeploy whose second new replica failed went back to the old definition with
    one new replica still serving; the old definition's replacement failed too. Deleting
    the backend then stops every replica, of both definitions, and ends."""
    CONSTRUCTIONS["count"] = 0

    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", FlakyModel, num_replicas=2)
            FLAKY["fail"] = True  # the old definition's replacements fail from now on
            goal = await controller.redeploy_backend(
                "m", replica_config(FailsAfterItsFirst), BackendMetadata.inspect(
                    FailsAfterItsFirst))
            with pytest.raises(ModelLoadError):
                await wait_goal(controller, goal)
            backend = controller.backends["m"].state
            await eventually(lambda: not backend.in_state(STARTING), "no start under way")
            versions = sorted(r.version for r in backend.in_state(RUNNING))
            assert versions == [0, 1], versions  # one of each definition serves
            await wait_goal(controller, await controller.delete_backend("m", force=True))
            assert "m" not in controller.backends
            assert live_replicas(runtime) == []

    run(main)


# --------------------------------------------------------------------------- endpoints


def test_create_endpoint_and_list_endpoints() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "a")
            await controller.create_endpoint("e", "a", "/e", ["GET", "POST"])
            await controller.create_endpoint("headless", "a", None, ["GET"])
            assert controller.list_endpoints() == {
                "e": {"route": "/e", "methods": ["GET", "POST"], "traffic": {"a": 1.0},
                      "shadows": {}},
                "headless": {"route": None, "methods": ["GET"], "traffic": {"a": 1.0},
                             "shadows": {}},
            }
            assert controller.endpoint_exists("e")
            assert not controller.endpoint_exists("nope")
            endpoints = saved(runtime).endpoints
            assert sorted(endpoints) == ["e", "headless"]
            assert endpoints["e"].traffic == {"a": 1.0}

    run(main)


def test_an_endpoint_of_an_app_given_by_import_path_becomes_a_prefix_once_it_loads() -> None:
    """Until a replica has loaded an import path, nobody knows it is an ASGI app; the
    endpoint is published again, as an app's, once one has."""
    async def main() -> None:
        async with running_controller() as (controller, _):
            goal = await controller.create_backend(
                "app", replica_config("asgi_apps_for_tests:app"),
                BackendConfig(autoscaling_config={"min_replicas": 0, "max_replicas": 1}), None)
            await wait_goal(controller, goal)
            await controller.create_endpoint("e", "app", "/api", ["GET"])
            published = controller.long_poll._values[constants.KEY_ENDPOINTS][1]
            assert not published["e"].asgi  # not known yet
            await wait_goal(controller, await controller.update_backend_config(
                "app", BackendConfig(num_replicas=1, autoscaling_config=None)))
            await eventually(
                lambda: controller.long_poll._values[constants.KEY_ENDPOINTS][1]["e"].asgi,
                "the endpoint to be published as an app's")

    run(main)


def test_create_endpoint_errors() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "a")
            with pytest.raises(ValueError, match="backend 'nope' that is not registered"):
                await controller.create_endpoint("e", "nope", "/e", ["GET"])
            await controller.create_endpoint("e", "a", "/e", ["GET"])
            with pytest.raises(ValueError, match="Endpoint 'e' is already registered"):
                await controller.create_endpoint("e", "a", "/other", ["GET"])
            with pytest.raises(ValueError, match="Route '/e' is already registered"):
                await controller.create_endpoint("f", "a", "/e", ["GET"])
            assert list(controller.list_endpoints()) == ["e"]

    run(main)


def test_create_endpoint_same_call_is_idempotent() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "a")
            await controller.create_endpoint("e", "a", "/e", ["GET"])
            before = controller.list_endpoints()
            await controller.create_endpoint("e", "a", "/e", ["GET"])
            assert controller.list_endpoints() == before

    run(main)


def test_delete_endpoint() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "a")
            await controller.create_endpoint("e", "a", "/e", ["GET"])
            await controller.delete_endpoint("e")
            await controller.delete_endpoint("e")  # unknown: a no-op
            assert controller.list_endpoints() == {}
            assert saved(runtime).endpoints == {}
            # The route is free again.
            await controller.create_endpoint("f", "a", "/e", ["GET"])

    run(main)


# --------------------------------------------------------------------------- traffic


def test_set_traffic_validation() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            for tag in ("a", "b", "c"):
                await start_backend(controller, tag)
            await controller.create_endpoint("e", "a", "/e", ["GET"])
            with pytest.raises(ValueError, match="backend 'nope' that is not registered"):
                await controller.set_traffic("e", {"a": 0.5, "nope": 0.5})
            with pytest.raises(ValueError, match="cannot be negative"):
                await controller.set_traffic("e", {"a": 1.5, "b": -0.5})
            with pytest.raises(ValueError, match="must sum to 1"):
                await controller.set_traffic("e", {"a": 0.5, "b": 0.4})
            with pytest.raises(ValueError, match="must sum to 1"):
                await controller.set_traffic("e", {"a": 0.5, "b": 0.5 + 1e-7})
            with pytest.raises(ValueError, match="endpoint 'nope' that is not registered"):
                await controller.set_traffic("nope", {"a": 1.0})
            assert controller.list_endpoints()["e"]["traffic"] == {"a": 1.0}
            # Within 1e-8 of 1 is accepted (float rounding).
            await controller.set_traffic("e", {"a": 0.5, "b": 0.5 + 5e-9})
            assert controller.list_endpoints()["e"]["traffic"] == {"a": 0.5, "b": 0.5 + 5e-9}
            weights = {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
            await controller.set_traffic("e", weights)
            assert controller.list_endpoints()["e"]["traffic"] == weights
            assert saved(runtime).endpoints["e"].traffic == weights

    run(main)


def test_set_traffic_keeps_shadows() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            for tag in ("a", "b", "c"):
                await start_backend(controller, tag)
            await controller.create_endpoint("e", "a", "/e", ["GET"])
            await controller.shadow_traffic("e", "c", 0.2)
            await controller.set_traffic("e", {"a": 0.5, "b": 0.5})
            assert controller.list_endpoints()["e"] == {
                "route": "/e", "methods": ["GET"], "traffic": {"a": 0.5, "b": 0.5},
                "shadows": {"c": 0.2}}

    run(main)


def test_shadow_traffic_add_and_remove() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            for tag in ("a", "b"):
                await start_backend(controller, tag)
            await controller.create_endpoint("e", "a", "/e", ["GET"])
            await controller.shadow_traffic("e", "b", 0.3)
            assert controller.list_endpoints()["e"]["shadows"] == {"b": 0.3}
            assert saved(runtime).endpoints["e"].shadows == {"b": 0.3}
            await controller.shadow_traffic("e", "b", 0.6)
            assert controller.list_endpoints()["e"]["shadows"] == {"b": 0.6}
            await controller.shadow_traffic("e", "b", 0)
            assert controller.list_endpoints()["e"]["shadows"] == {}
            assert saved(runtime).endpoints["e"].shadows == {}
            assert controller.list_endpoints()["e"]["traffic"] == {"a": 1.0}
            with pytest.raises(ValueError, match="backend 'nope' that is not registered"):
                await controller.shadow_traffic("e", "nope", 0.1)
            with pytest.raises(ValueError, match="endpoint 'nope' that is not registered"):
                await controller.shadow_traffic("nope", "b", 0.1)

    run(main)


# --------------------------------------------------------------------------- checkpoint


def test_checkpoint_written_after_mutations_and_removed_on_shutdown() -> None:
    async def main() -> None:
        runtime = FakeRuntime()
        async with running_controller(runtime) as (controller, _):
            assert runtime.store.read_all() == {}
            await start_backend(controller, "a", Model, "x", num_replicas=2)
            backend = saved(runtime).backends["a"]
            assert backend.replica_config == replica_config(Model, "x")
            assert backend.config == BackendSettings.check({"num_replicas": 2})
            assert backend.metadata == BackendMetadata.inspect(Model)
            assert sorted(backend.replicas) == sorted(replica_tags(controller, "a"))
            await controller.create_endpoint("e", "a", "/e", ["GET"])
            assert saved(runtime).endpoints["e"].route == "/e"
        assert runtime.is_shut_down
        assert runtime.store.read_all() == {}

    run(main)


def test_checkpoint_is_written_before_the_change_is_published() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            seen: List[Tuple[str, Any]] = []
            publish = controller.long_poll.publish

            async def recording_publish(key: str, value: Any) -> int:
                seen.append((key, saved(runtime)))
                return await publish(key, value)

            controller.long_poll.publish = recording_publish  # type: ignore[method-assign]
            await start_backend(controller, "a")
            await start_backend(controller, "b")
            await controller.create_endpoint("e", "a", "/e", ["GET"])
            await controller.set_traffic("e", {"a": 0.25, "b": 0.75})
            endpoint_states = [state for key, state in seen if key == constants.KEY_ENDPOINTS]
            assert [s.endpoints["e"].traffic for s in endpoint_states] == [
                {"a": 1.0}, {"a": 0.25, "b": 0.75}]
            first_backends = next(s for k, s in seen if k == constants.KEY_BACKENDS)
            assert "a" in first_backends.backends

    run(main)


def test_restarted_controller_adopts_replicas_and_keeps_the_state() -> None:
    async def main() -> None:
        runtime = FakeRuntime()
        first = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await first.start()
        await start_backend(first, "m", Model, "x", num_replicas=2, user_config={"v": 1})
        await first.create_endpoint("e", "m", "/e", ["GET"])
        await first.shadow_traffic("e", "m", 0.5)
        tags = replica_tags(first, "m")
        launched = list(runtime.launch_order)
        abandon(first)

        second = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await second.start()
        try:
            assert sorted(replica_tags(second, "m", RUNNING)) == sorted(tags)
            assert runtime.launch_order == launched  # nothing started again
            assert second.get_backend_config("m") == BackendSettings.check(
                {"num_replicas": 2, "user_config": {"v": 1}})
            assert second.list_endpoints() == {"e": {
                "route": "/e", "methods": ["GET"], "traffic": {"m": 1.0},
                "shadows": {"m": 0.5}}}
            _, view = second.long_poll._values[constants.KEY_REPLICAS]
            assert sorted(tag for tag, _ in view["m"]) == sorted(tags)
            for tag in tags:  # reconfigure is not called again for the same user_config
                assert runtime.workers[tag].instance.user_configs == [{"v": 1}]
        finally:
            await second.shutdown()

    run(main)


def test_restarted_controller_finishes_a_scale_up_in_progress() -> None:
    async def main() -> None:
        runtime = FakeRuntime()
        first = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await first.start()
        await start_backend(first, "m", num_replicas=1)
        [original] = replica_tags(first, "m")
        runtime.hold_launches()
        goal = await first.update_backend_config("m", BackendConfig(num_replicas=3))
        await eventually(lambda: len(runtime.held()) == 2, "2 held launches")
        abandon(first)  # while two replicas start
        runtime.hold_launches(False)
        runtime.release()

        second = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await second.start()
        try:
            await wait_goal(second, goal)  # the caller's goal, waited on again
            running = replica_tags(second, "m", RUNNING)
            assert len(running) == 3 and original in running
            assert all(runtime.is_alive(tag) for tag in running)
        finally:
            await second.shutdown()

    run(main)


def test_a_config_push_cut_short_by_a_crash_is_finished_or_undone() -> None:
    """The controller died while its push of a new user_config (saved as under way) had not
    reached the replica. The restarted controller pushes it again: the replica refuses it,
    so the backend goes back to the config before it and the goal fails, as the call would
    have."""

    async def main() -> None:
        runtime = FakeRuntime()
        first = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await first.start()
        await start_backend(first, "m", PickyModel, user_config={"v": 1})
        [tag] = replica_tags(first, "m")
        runtime.freeze(tag)  # the push hangs on its way
        update = asyncio.ensure_future(first.update_backend_config(
            "m", BackendConfig(user_config={"w": 2})))
        await eventually(lambda: runtime.calls(tag).count("update_config") == 1,
                         "the push under way")
        goal = first.backends["m"].state.goal
        abandon(first)
        update.cancel()
        first.backends["m"].state.replicas[tag].connection.close()  # its process is gone
        runtime.thaw(tag)

        second = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await second.start()
        try:
            with pytest.raises(KeyError, match="needs 'v'"):
                await wait_goal(second, goal)
            assert second.get_backend_config("m").user_config == {"v": 1}
            assert saved(runtime).backends["m"].config.user_config == {"v": 1}
            assert runtime.workers[tag].instance.user_config == {"v": 1}
        finally:
            await second.shutdown()

    run(main)


def test_replicas_that_died_with_the_controller_are_started_anew() -> None:
    async def main() -> None:
        runtime = FakeRuntime()
        first = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await first.start()
        await start_backend(first, "m", num_replicas=2)
        victim, survivor = replica_tags(first, "m")
        abandon(first)
        runtime.kill(victim)

        second = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await second.start()
        try:
            await eventually(lambda: len(replica_tags(second, "m", RUNNING)) == 2,
                             "two running replicas")
            assert survivor in replica_tags(second, "m") and victim not in replica_tags(
                second, "m")
        finally:
            await second.shutdown()

    run(main)


def test_damaged_saved_state_is_a_clear_error_at_start() -> None:
    async def main() -> None:
        runtime = FakeRuntime()
        runtime.store.write({"backend/m": b"{not json", "endpoint/e": b"[]"})
        controller = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        with pytest.raises(ServeError, match="saved state in the in-memory store is damaged"):
            await controller.start()

    run(main)


# --------------------------------------------------------------------------- failed saves


class FullDiskStore(MemoryStore):
    """A MemoryStore whose writes raise while ``full`` is set (a full disk), changing
    nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False
        self.failed_writes = 0

    def write(self, puts: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None:
        if self.full:
            self.failed_writes += 1
            raise OSError(28, "No space left on device")
        super().write(puts, deletes)


def full_disk_runtime() -> Tuple[FakeRuntime, FullDiskStore]:
    runtime = FakeRuntime()
    store = runtime.store = FullDiskStore()
    return runtime, store


def published(controller: Controller, key: str) -> Any:
    return controller.long_poll._values[key][1]


def test_a_call_whose_save_fails_changes_nothing_and_a_retry_works() -> None:
    """Disk full: every mutating call fails with a clear error and leaves the controller
    (memory, routers, replicas, store) as it was; once the disk has room the same calls
    work, and a restarted controller restores exactly what they did."""

    async def main() -> None:
        runtime, store = full_disk_runtime()
        first = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await first.start()
        await start_backend(first, "a", num_replicas=1)
        await start_backend(first, "c")
        await first.create_endpoint("e", "a", "/e", ["GET"])
        launched = list(runtime.launch_order)
        before = (first.list_backends(), first.list_endpoints(), runtime.store.read_all())
        definition = first.get_backend_definition("a")

        store.full = True
        calls: List[Tuple[str, Any]] = [
            ("create_backend", lambda: start_backend(first, "b")),
            ("update_backend_config", lambda: first.update_backend_config(
                "a", BackendConfig(num_replicas=3))),
            ("redeploy_backend", lambda: first.redeploy_backend(
                "a", replica_config(Model, "v2"), BackendMetadata.inspect(Model))),
            ("delete_backend", lambda: first.delete_backend("c", force=False)),
            ("create_endpoint", lambda: first.create_endpoint("f", "a", "/f", ["GET"])),
            ("update_endpoint", lambda: first.update_endpoint("e", "/moved", ["GET"], False)),
            ("set_traffic", lambda: first.set_traffic("e", {"a": 0.5, "c": 0.5})),
            ("shadow_traffic", lambda: first.shadow_traffic("e", "c", 0.5)),
            ("delete_endpoint", lambda: first.delete_endpoint("e")),
        ]
        for name, call in calls:
            with pytest.raises(ServeError, match="could not be saved .*No space left on "
                                                 "device.*Nothing was changed"):
                await call()
            assert (first.list_backends(), first.list_endpoints(),
                    runtime.store.read_all()) == before, name
            assert first.get_backend_definition("a") == definition, name
            assert published(first, constants.KEY_ENDPOINTS)["e"].route == "/e", name
            assert sorted(published(first, constants.KEY_BACKENDS)) == ["a", "c"], name
            await spin()
            assert runtime.launch_order == launched, name  # nothing started or stopped
            assert sorted(live_replicas(runtime)) == sorted(launched), name

        store.full = False
        await start_backend(first, "b")  # not "already registered"
        await wait_goal(first, await first.update_backend_config(
            "a", BackendConfig(num_replicas=2)))
        await first.create_endpoint("f", "b", "/f", ["GET"])
        await first.set_traffic("e", {"a": 0.5, "c": 0.5})
        expected = (first.list_backends(), first.list_endpoints())
        abandon(first)

        second = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await second.start()
        try:
            assert (second.list_backends(), second.list_endpoints()) == expected
            assert len(replica_tags(second, "a", RUNNING)) == 2
        finally:
            await second.shutdown()

    run(main)


def test_an_update_made_again_after_a_crash_gets_the_first_ones_outcome() -> None:
    """The client makes a call again (same call id) when the controller died under it:
    the restarted controller answers with the first call's goal and changes nothing (even
    with a full disk), whether that call succeeded or failed."""

    async def main() -> None:
        runtime, store = full_disk_runtime()
        controller = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await controller.start()
        await start_backend(controller, "m", PickyModel, user_config={"v": 1})

        async def restart() -> Controller:
            abandon(controller)  # the reply to the last call is lost with it
            restarted = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
            await restarted.start()
            return restarted

        await wait_goal(controller, await controller.update_backend_config(
            "m", BackendConfig(num_replicas=2), "call-1"))
        controller = await restart()
        store.full = True
        await wait_goal(controller, await controller.update_backend_config(
            "m", BackendConfig(num_replicas=2), "call-1"))
        store.full = False
        with pytest.raises(KeyError):
            await controller.update_backend_config("m", BackendConfig(user_config={}),
                                                   "call-2")
        controller = await restart()
        try:
            store.full = True
            with pytest.raises(KeyError, match="needs 'v'"):
                await wait_goal(controller, await controller.update_backend_config(
                    "m", BackendConfig(user_config={}), "call-2"))
            assert controller.get_backend_config("m") == BackendSettings.check(
                {"num_replicas": 2, "user_config": {"v": 1}})
            store.full = False
            await wait_goal(controller, await controller.delete_backend("m", force=False))
            store.full = True
            await wait_goal(controller, await controller.delete_backend("m", force=False))
            assert controller.list_backends() == {}
        finally:
            store.full = False
            await controller.shutdown()

    run(main)


def test_a_user_config_the_store_cannot_hold_is_refused_and_changes_nothing() -> None:
    """A user_config plain pickle cannot carry (a lambda) cannot be saved: the call fails
    naming it, nothing is applied, and later changes are saved as usual."""

    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", user_config={"v": 1})
            [tag] = replica_tags(controller, "m")
            with pytest.raises(TypeError, match="user_config of backend 'm' cannot be saved"):
                await controller.update_backend_config(
                    "m", BackendConfig(user_config=lambda: "v2"))
            assert controller.get_backend_config("m").user_config == {"v": 1}
            assert runtime.workers[tag].instance.user_configs == [{"v": 1}]
            with pytest.raises(TypeError, match="user_config of backend 'new' cannot be "
                                                "saved"):
                await start_backend(controller, "new", user_config=lambda: "v1")
            assert list(controller.list_backends()) == ["m"]
            assert [n for n in runtime.launch_order if n.startswith("new#")] == []
            await start_backend(controller, "new", user_config={"v": 1})
            await wait_goal(controller, await controller.update_backend_config(
                "m", BackendConfig(user_config={"v": 2})))
            assert saved(runtime).backends["new"].config.user_config == {"v": 1}
            assert saved(runtime).backends["m"].config.user_config == {"v": 2}

    run(main)


def test_an_acknowledged_scale_up_is_not_rolled_back_after_a_restart() -> None:
    """update_backend_config returned: a restarted controller whose new replicas fail to
    start keeps the new num_replicas (and retries), it does not roll the change back."""

    async def main() -> None:
        runtime = FakeRuntime()
        first = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await first.start()
        await start_backend(first, "m", FlakyModel, num_replicas=1)
        await wait_goal(first, await first.update_backend_config(
            "m", BackendConfig(num_replicas=2)))  # acknowledged
        tags = replica_tags(first, "m")
        abandon(first)  # the controller and its replicas die
        for tag in tags:
            runtime.kill(tag)
        FLAKY["fail"] = True

        second = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await second.start()
        try:
            await eventually(lambda: second.status()["backends"]["m"]["last_start_error"],
                             "a new replica failing to start")
            assert second.get_backend_config("m").num_replicas == 2
            assert saved(runtime).backends["m"].config.num_replicas == 2
            FLAKY["fail"] = False
            second.backends["m"].state.retry_at = 0.0
            await second._check_health()
            await eventually(lambda: len(replica_tags(second, "m", RUNNING)) == 2,
                             "2 running replicas")
        finally:
            await second.shutdown()

    run(main)


def test_a_goal_ends_only_once_its_outcome_is_saved() -> None:
    """While the store refuses writes, a scale-up whose replicas all run is not reported
    done (a restart could still undo it); it is once the store takes the write."""

    async def main() -> None:
        runtime, store = full_disk_runtime()
        async with running_controller(runtime) as (controller, _):
            await start_backend(controller, "m", num_replicas=1)
            runtime.hold_launches()
            goal = await controller.update_backend_config("m", BackendConfig(num_replicas=2))
            [new] = await eventually(runtime.held, "the new replica's launch")
            store.full = True
            runtime.release()
            await eventually(lambda: replica_tags(controller, "m", RUNNING) ==
                             replica_tags(controller, "m"), "both replicas running")
            writes = store.failed_writes
            await eventually(lambda: store.failed_writes >= writes + 2,
                             "the outcome's save to be tried again")
            assert goal in controller.goals.pending()
            assert saved(runtime).backends["m"].config_before_update is not None
            store.full = False
            await wait_goal(controller, goal)
            assert saved(runtime).backends["m"].config_before_update is None
            assert saved(runtime).backends["m"].goal is None

    run(main)


def test_a_client_waiting_again_after_a_crash_is_told_its_call_failed() -> None:
    """A create that failed, its failure saved: the client, whose controller died before
    telling it, waits on the goal again and is told the failure, not success."""

    async def main() -> None:
        runtime = FakeRuntime()
        first = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await first.start()
        goal = await start_backend(first, "m", BrokenModel, wait=False)
        assert goal is not None
        await eventually(lambda: "m" not in first.backends, "the failed backend removed")
        abandon(first)  # the client has not been told yet

        second = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await second.start()
        try:
            with pytest.raises(ModelLoadError, match="weights.bin is corrupt"):
                await wait_goal(second, goal)
            with pytest.raises(ModelLoadError):  # and again, if that answer is lost too
                await wait_goal(second, goal)
            assert second.list_backends() == {}
        finally:
            await second.shutdown()

    run(main)


def test_a_failed_create_is_reported_only_once_its_removal_is_saved() -> None:
    async def main() -> None:
        runtime, store = full_disk_runtime()
        async with running_controller(runtime) as (controller, _):
            runtime.hold_launches()
            goal = await start_backend(controller, "m", BrokenModel, wait=False)
            await eventually(runtime.held, "the replica's launch")
            store.full = True
            runtime.release()
            await eventually(lambda: store.failed_writes >= 2,
                             "the failure's save to be tried again")
            assert goal in controller.goals.pending()
            store.full = False
            with pytest.raises(ModelLoadError):
                await wait_goal(controller, goal)
            assert "m" not in saved(runtime).backends

    run(main)


# --------------------------------------------------------------------------- the sweep on Ray


class _Ref:
    def __init__(self, future: "concurrent.futures.Future[Any]") -> None:
        self._future = future

    def future(self) -> "concurrent.futures.Future[Any]":
        return self._future


class _FakeActor:
    """A Ray actor handle whose ``info`` answers when the test says (its process starts)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.info = types.SimpleNamespace(remote=lambda: _Ref(self.started))
        self.wait_for_exit = types.SimpleNamespace(
            remote=lambda: _Ref(concurrent.futures.Future()))

    def start(self) -> None:
        self.started.set_result({"address": f"tcp://10.0.0.2:{len(self.name)}", "pid": 1,
                                 "node": "another-node", "http": None})


def test_the_sweep_of_unrecorded_actors_spares_those_this_controller_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On Ray a restarted controller stops the actors no saved record names (an earlier
    controller died while starting them), but never one it starts itself: neither one
    whose start is under way while it sweeps, nor one started while Ray lists the actors."""
    ray = pytest.importorskip("ray")
    from servekit._private.runtime import ray as ray_runtime

    listed: Dict[str, _FakeActor] = {}  # what Ray's GCS holds: actor name -> actor
    killed: List[str] = []
    listing_started = threading.Event()
    listing_may_end = threading.Event()
    listing_may_end.set()

    def list_named_actors(all_namespaces: bool = False) -> List[dict]:
        names = list(listed)
        listing_started.set()
        listing_may_end.wait(TIMEOUT_S)
        return [{"name": name, "namespace": ray_runtime.NAMESPACE}
                for name in [*names, *(n for n in listed if n not in names)]]

    def get_actor(name: str, namespace: str) -> _FakeActor:
        if name not in listed:
            raise ValueError(name)
        return listed[name]

    def create(name: str, **options: Any) -> Any:
        return types.SimpleNamespace(
            remote=lambda *args: listed.setdefault(name, _FakeActor(name)))

    monkeypatch.setattr(ray_runtime, "ServekitActor", types.SimpleNamespace(options=create))
    monkeypatch.setattr(ray.util, "list_named_actors", list_named_actors)
    monkeypatch.setattr(ray, "get_actor", get_actor)
    def kill(actor: _FakeActor, no_restart: bool) -> None:
        killed.append(actor.name)
        listed.pop(actor.name, None)

    monkeypatch.setattr(ray, "kill", kill)
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: types.SimpleNamespace(get_node_id=lambda: "this-node"))

    async def main() -> None:
        runtime = ray_runtime.RayRuntime("tcp://10.0.0.1:1", [], None)
        orphan = "servekit:m#left:00000000"
        listed[orphan] = _FakeActor(orphan)
        # A replica whose actor exists but has not answered yet, while the sweep runs.
        starting = asyncio.ensure_future(runtime.launch("m#a", "replica", "spec"))
        [first] = await eventually(lambda: [n for n in listed if ":m#a:" in n], "its actor")
        assert await runtime.reap_unrecorded() == [orphan]
        listed[first].start()
        await asyncio.wait_for(starting, TIMEOUT_S)
        # A replica started from first to last while Ray lists the actors.
        listing_started.clear()
        listing_may_end.clear()
        sweep = asyncio.ensure_future(runtime.reap_unrecorded())
        await eventually(listing_started.is_set, "the listing to begin")
        starting = asyncio.ensure_future(runtime.launch("m#b", "replica", "spec"))
        [second] = await eventually(lambda: [n for n in listed if ":m#b:" in n], "its actor")
        listed[second].start()
        await asyncio.wait_for(starting, TIMEOUT_S)
        listing_may_end.set()
        assert await asyncio.wait_for(sweep, TIMEOUT_S) == []
        assert killed == [orphan]
        assert runtime.is_alive("m#a") and runtime.is_alive("m#b")

    try:
        run(main)
    finally:
        listing_may_end.set()


def test_bad_names_and_routes_are_refused_by_the_controller_too() -> None:
    """Calls that did not come through the Client's checks create nothing either."""
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            with pytest.raises(ValueError, match=r"backend_tag 'm\\n' contains '\\n'"):
                await start_backend(controller, "m\n")
            await start_backend(controller, "m")
            with pytest.raises(ValueError, match=r"route '/a/\.\./b' has a '\.' or '\.\.'"):
                await controller.create_endpoint("e", "m", "/a/../b", ["GET"])
            with pytest.raises(ValueError, match="holds 'GE T'"):
                await controller.create_endpoint("e", "m", "/e", ["GE T"])
            assert list(controller.list_backends()) == ["m"]
            assert controller.list_endpoints() == {}
            assert saved(runtime).endpoints == {}
            assert [n for n in runtime.launch_order if not n.startswith("m#")] == []

    run(main)


class UnreadableStore(MemoryStore):
    def read_all(self) -> Dict[str, bytes]:
        raise pickle.UnpicklingError("invalid load key, 'x'.")


@pytest.mark.parametrize("damage, fragment", [
    (lambda store: store.write({"backend/m": b'{"deleting": "yes"}'}),
     "record 'backend/m' has no record 'definition/m'"),
    (lambda store: store.write({"endpoint/e": b'{"route": "/e?x", "methods": ["GET"], '
                                              b'"traffic": {}, "shadows": {}}'}),
     "'/e?x' contains '?'"),
    (None, "cannot be read (UnpicklingError: invalid load key, 'x'.)"),
], ids=["backend", "endpoint", "unreadable"])
def test_a_damaged_store_is_an_error_at_start_naming_it(damage: Any, fragment: str) -> None:
    async def main() -> None:
        runtime = FakeRuntime()
        if damage is None:
            runtime.store = UnreadableStore()
        else:
            damage(runtime.store)
        controller = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        with pytest.raises(ServeError) as excinfo:
            await controller.start()
        message = str(excinfo.value)
        assert "saved state in the in-memory store" in message and fragment in message, \
            message
        assert "Move it away" in message
        assert runtime.launch_order == []

    run(main)


# --------------------------------------------------------------------------- health


def test_health_check_replaces_a_killed_replica() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", num_replicas=2)
            victim, survivor = replica_tags(controller, "m")
            runtime.kill(victim)
            await controller._check_health()
            assert victim not in controller.backends["m"].state.replicas
            replacement = await eventually(
                lambda: [t for t in replica_tags(controller, "m", RUNNING)
                         if t not in (victim, survivor)],
                "a replacement replica running")
            assert sorted(replica_tags(controller, "m")) == sorted([survivor, *replacement])
            assert sorted(live_replicas(runtime)) == sorted([survivor, *replacement])
            assert runtime.calls(replacement[0]) == ["ready"]
            _, view = (await controller.long_poll.listen(
                "probe", "test", {constants.KEY_REPLICAS: -1}))[constants.KEY_REPLICAS]
            controller.long_poll.forget("probe")
            assert sorted(t for t, _ in view["m"]) == sorted([survivor, *replacement])

    run(main)


def test_health_check_retries_a_replacement_that_failed_to_start() -> None:
    """A backend whose replacement replica failed once must not stay short of replicas."""

    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", FlakyModel, num_replicas=2)
            victim, survivor = replica_tags(controller, "m")
            FLAKY["fail"] = True
            runtime.kill(victim)
            await controller._check_health()
            first_try = await eventually(
                lambda: [n for n in runtime.launch_order if n not in (victim, survivor)],
                "a replacement launched")
            await eventually(lambda: not runtime.is_alive(first_try[0]),
                             "the failed replacement stopped")
            error = await eventually(lambda: controller.status()["backends"]["m"][
                "last_start_error"], "the start error kept for the status view")
            assert error == "ModelLoadError: out of memory"
            status = controller.status()["backends"]["m"]
            assert status["running"] == 1 and status["target"] == 2
            FLAKY["fail"] = False
            await controller._check_health()
            await eventually(lambda: len(replica_tags(controller, "m", RUNNING)) == 2,
                             "the backend back at 2 running replicas", timeout=2.0)
            assert controller.status()["backends"]["m"]["last_start_error"] is None

    run(main)


FAST_HEALTH: Dict[str, Any] = {"health_check_period_s": 0.01, "health_check_timeout_s": 0.05,
               "health_check_failure_threshold": 2}


def published_replicas(controller: Controller, backend: str) -> List[str]:
    """The replica tags routers are told about for ``backend``."""
    _, view = controller.long_poll._values[constants.KEY_REPLICAS]
    return [tag for tag, _ in view.get(backend, [])]


def test_a_replica_whose_constructor_does_not_return_is_warned_about(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """create_backend waits for the constructor however long it takes, and says so."""
    monkeypatch.setattr(backend_reconciler, "SLOW_START_WARNING_S", 0.05)

    async def main() -> None:
        async with running_controller() as (controller, runtime):
            runtime.hold_launches()
            goal = await start_backend(controller, "m", wait=False)
            [name] = await eventually(runtime.held, "a held launch")
            runtime.freeze(name)  # its ready call hangs, as a constructor that never ends
            runtime.hold_launches(False)
            runtime.release()
            await eventually(lambda: len([r for r in caplog.records
                                          if name in r.getMessage()]) >= 2,
                             "two warnings naming the replica")
            assert "has been starting for" in caplog.records[-1].getMessage()
            assert goal in controller.goals.pending()
            runtime.thaw(name)
            await wait_goal(controller, goal)
            assert replica_tags(controller, "m", RUNNING) == [name]

    with caplog.at_level(logging.WARNING, logger="servekit.controller"):
        run(main)


def test_frozen_replica_is_taken_out_of_routing_and_replaced() -> None:
    """A replica whose pings hang (a blocked event loop, SIGSTOP) is unpublished, killed
    and replaced once it missed ``health_check_failure_threshold`` pings in a row."""

    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", num_replicas=2, **FAST_HEALTH)
            victim, survivor = replica_tags(controller, "m")
            runtime.freeze(victim)
            await eventually(lambda: victim not in published_replicas(controller, "m"),
                             "the frozen replica out of routing")
            assert not runtime.is_alive(victim)
            assert survivor in published_replicas(controller, "m")
            await eventually(lambda: len(replica_tags(controller, "m", RUNNING)) == 2,
                             "a replacement running")
            assert victim not in replica_tags(controller, "m")

    run(main)


def test_slow_pings_below_the_threshold_keep_the_replica() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", health_check_period_s=0.01,
                                health_check_timeout_s=0.05,
                                health_check_failure_threshold=1000)
            [tag] = replica_tags(controller, "m")
            runtime.freeze(tag)
            await eventually(lambda: runtime.calls(tag).count("ping") >= 5, "5 pings sent")
            runtime.thaw(tag)
            await eventually(lambda: runtime.calls(tag).count("ping") >= 10, "pings answered")
            assert replica_tags(controller, "m", RUNNING) == [tag]
            assert runtime.is_alive(tag)

    run(main)


def test_replica_whose_check_health_raises_is_replaced_at_once() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", health_check_period_s=0.01,
                                health_check_timeout_s=1.0,
                                health_check_failure_threshold=1000)
            [tag] = replica_tags(controller, "m")
            runtime.fail_health(tag, RuntimeError("GPU lost"))
            await eventually(lambda: tag not in published_replicas(controller, "m"),
                             "the unhealthy replica out of routing")
            assert runtime.calls(tag).count("ping") >= 1
            await eventually(lambda: len(replica_tags(controller, "m", RUNNING)) == 1 and
                             replica_tags(controller, "m") != [tag], "a replacement running")

    run(main)


def test_config_push_does_not_wait_for_a_frozen_replica() -> None:
    """update_backend_config ends even if a replica froze: the frozen one is replaced, and
    its replacement starts with the new config."""

    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", num_replicas=2, user_config={"v": 1},
                                **FAST_HEALTH)
            victim, survivor = replica_tags(controller, "m")
            runtime.freeze(victim)
            goal = await asyncio.wait_for(controller.update_backend_config(
                "m", BackendConfig(user_config={"v": 2})), TIMEOUT_S)
            await wait_goal(controller, goal)
            running = replica_tags(controller, "m", RUNNING)
            assert victim not in running and survivor in running and len(running) == 2
            for tag in running:
                assert runtime.workers[tag].instance.user_configs[-1] == {"v": 2}

    run(main)


def test_replica_starting_during_a_config_change_gets_it_before_traffic() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", user_config={"v": 1})
            [original] = replica_tags(controller, "m")
            runtime.hold_launches()
            scale_up = await controller.update_backend_config("m", BackendConfig(num_replicas=2))
            [starting] = await eventually(lambda: runtime.held(), "a held launch")
            update = await controller.update_backend_config(
                "m", BackendConfig(user_config={"v": 2}))
            assert starting not in published_replicas(controller, "m")
            runtime.release(starting)
            await wait_goal(controller, scale_up)
            await wait_goal(controller, update)
            assert runtime.calls(starting)[:2] == ["ready", "update_config"]
            assert sorted(published_replicas(controller, "m")) == sorted([original, starting])
            for tag in (original, starting):
                assert runtime.workers[tag].instance.user_configs[-1] == {"v": 2}
                assert runtime.workers[tag].config.user_config == {"v": 2}

    run(main)


def test_failed_scale_up_pushes_the_old_config_back_to_running_replicas() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", FlakyConfigurable, user_config={"v": 1})
            [original] = replica_tags(controller, "m")
            FLAKY["fail"] = True
            goal = await controller.update_backend_config(
                "m", BackendConfig(num_replicas=2, user_config={"v": 2}))
            with pytest.raises(ModelLoadError, match="out of memory"):
                await wait_goal(controller, goal)
            assert controller.get_backend_config("m").user_config == {"v": 1}
            instance = runtime.workers[original].instance
            assert instance.user_configs == [{"v": 1}, {"v": 2}, {"v": 1}]
            assert runtime.workers[original].config.user_config == {"v": 1}

    run(main)


# --------------------------------------------------------------------------- long poll


def test_long_poll_publishes_replicas_as_they_become_running() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            key = constants.KEY_REPLICAS
            version = controller.long_poll.version(key)
            runtime.hold_launches()
            await start_backend(controller, "m", wait=False, num_replicas=2)
            first, second = await eventually(
                lambda: len(runtime.held()) == 2 and runtime.held(), "2 held launches")
            listener = asyncio.ensure_future(
                controller.long_poll.listen("router-1", "router", {key: version}))
            # Nothing is RUNNING yet, so the replica set has not changed.
            assert controller.long_poll.version(key) == version
            assert not listener.done()
            runtime.release(first)
            version, view = (await asyncio.wait_for(listener, TIMEOUT_S))[key]
            assert view["m"] == [(first, f"fake://{first}")]
            listener = asyncio.ensure_future(
                controller.long_poll.listen("router-1", "router", {key: version}))
            runtime.release(second)
            version, view = (await asyncio.wait_for(listener, TIMEOUT_S))[key]
            assert sorted(view["m"]) == sorted([(first, f"fake://{first}"),
                                                (second, f"fake://{second}")])
            controller.long_poll.forget("router-1")

    run(main)


def test_scale_down_unpublishes_a_replica_before_draining_it() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            key = constants.KEY_REPLICAS
            await start_backend(controller, "m", num_replicas=2)
            keeper, victim = replica_tags(controller, "m")
            version = controller.long_poll.version(key)
            listener = asyncio.ensure_future(
                controller.long_poll.listen("router-1", "router", {key: version}))
            goal = await controller.update_backend_config("m", BackendConfig(num_replicas=1))
            version, view = (await asyncio.wait_for(listener, TIMEOUT_S))[key]
            assert view["m"] == [(keeper, f"fake://{keeper}")]
            # The router has not acknowledged the new set yet, so nothing is drained.
            assert "drain" not in runtime.calls(victim)
            listener = asyncio.ensure_future(
                controller.long_poll.listen("router-1", "router", {key: version}))
            await wait_goal(controller, goal)
            assert runtime.calls(victim)[-1] == "drain"
            assert not runtime.is_alive(victim)
            listener.cancel()
            controller.long_poll.forget("router-1")

    run(main)
