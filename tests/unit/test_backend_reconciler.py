"""Unit tests of a backend's reconciler over the FakeRuntime: autoscaling driven by load
reports, and redeploys rolled over ``max_surge`` replicas at a time (with the real
``Replica`` in process)."""

from __future__ import annotations

from typing import Any, Dict, List

import cloudpickle
import pytest
from controller_helpers import (
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
from loop_helpers import run

from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig
from servekit._private.controller.controller import Controller
from servekit._private.controller.state import RUNNING, STARTING
from servekit._private.specs import HTTPSettings
from servekit.config import BackendConfig, HTTPOptions

FAST = {"upscale_delay_s": 0, "downscale_delay_s": 0, "look_back_period_s": 0.01,
        "metrics_interval_s": 0.02}


def autoscaled(**fields: Any) -> Dict[str, Any]:
    return {"autoscaling_config": {**FAST, **fields}}


class Loader:
    """A constructor that raises when its init arg says so."""

    def __init__(self, weights: str) -> None:
        if weights == "corrupt":
            raise ValueError("weights are corrupt")
        self.weights = weights

    def __call__(self, request: Any) -> str:
        return self.weights


# --------------------------------------------------------------------------- autoscaling


def test_load_reports_scale_a_backend_up_and_down_with_drain() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", **autoscaled(max_replicas=4))
            assert replica_tags(controller, "m", RUNNING) != []
            controller.report_load("router-1", {"m": 5.0})
            controller.report_load("router-2", {"m": 3.0})  # 8 at 2 per replica
            await eventually(lambda: len(replica_tags(controller, "m", RUNNING)) == 4,
                             "4 replicas")
            status = controller.status()["backends"]["m"]
            # (The next sample may have come since: it finds 4 right.)
            assert status["target"] == 4 and ("scaled up to 4" in status["autoscaling"] or
                                              "4 is right" in status["autoscaling"]), status
            four = replica_tags(controller, "m")
            controller.report_load("router-1", {"m": 0.0})
            controller.report_load("router-2", {"m": 0.0})
            await eventually(lambda: len(replica_tags(controller, "m")) == 1, "1 replica")
            for tag in set(four) - set(replica_tags(controller, "m")):
                calls = runtime.calls(tag)
                assert "drain" in calls, calls  # finished its requests before it stopped

    run(main)


def test_scale_to_zero_and_back_on_a_waiting_request() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", **autoscaled(min_replicas=0))
            assert replica_tags(controller, "m") == []  # initial_replicas = min_replicas
            controller.report_load("router", {"m": 1.0})
            await eventually(lambda: replica_tags(controller, "m", RUNNING), "a replica")
            controller.report_load("router", {"m": 0.0})
            await eventually(lambda: not replica_tags(controller, "m"), "scaled to zero")

    run(main)


def test_requests_that_wait_while_the_first_replicas_start_add_replicas_at_once() -> None:
    async def main() -> None:
        runtime = FakeRuntime()
        async with running_controller(runtime) as (controller, _):
            await start_backend(controller, "m", **autoscaled(
                min_replicas=0, max_replicas=4, upscale_delay_s=60))
            runtime.hold_launches()
            controller.report_load("router", {"m": 1.0})
            await eventually(lambda: len(runtime.held()) == 1, "one replica launching")
            controller.report_load("router", {"m": 6.0})  # more wait; none runs yet
            await eventually(lambda: len(runtime.held()) == 3, "three launching")
            runtime.hold_launches(False)
            runtime.release()
            await eventually(lambda: len(replica_tags(controller, "m", RUNNING)) == 3,
                             "3 replicas, without waiting for upscale_delay_s")

    run(main)


def test_a_router_that_leaves_takes_its_load_with_it() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", **autoscaled(max_replicas=3))
            controller.report_load("router", {"m": 6.0})
            await eventually(lambda: len(replica_tags(controller, "m", RUNNING)) == 3,
                             "3 replicas")
            controller.loads.forget("router")  # what a closed connection does
            await eventually(lambda: len(replica_tags(controller, "m")) == 1, "1 replica")

    run(main)


def test_scaling_down_removes_starting_replicas_first() -> None:
    async def main() -> None:
        runtime = FakeRuntime()
        async with running_controller(runtime) as (controller, _):
            await start_backend(controller, "m", **autoscaled(max_replicas=3))
            [first] = replica_tags(controller, "m")
            runtime.hold_launches()
            controller.report_load("router", {"m": 6.0})
            await eventually(lambda: len(runtime.held()) == 2, "two launches held")
            controller.report_load("router", {"m": 2.0})
            await eventually(lambda: replica_tags(controller, "m") == [first],
                             "the starting replicas removed")
            assert runtime.is_alive(first)
            runtime.release()

    run(main)


def test_switching_between_num_replicas_and_autoscaling() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", num_replicas=3)
            await wait_goal(controller, await controller.update_backend_config(
                "m", BackendConfig(**autoscaled(min_replicas=1, max_replicas=2,
                                                downscale_delay_s=60))))
            await eventually(lambda: len(replica_tags(controller, "m")) == 2,
                             "kept within max_replicas")
            await wait_goal(controller, await controller.update_backend_config(
                "m", BackendConfig(num_replicas=3)))
            assert len(replica_tags(controller, "m", RUNNING)) == 3
            assert controller.status()["backends"]["m"]["autoscaling"] is None

    run(main)


def test_a_restarted_controller_keeps_the_autoscaled_count() -> None:
    async def main() -> None:
        runtime = FakeRuntime()
        first = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await first.start()
        await start_backend(first, "m", **autoscaled(max_replicas=3, downscale_delay_s=60))
        first.report_load("router", {"m": 6.0})
        await eventually(lambda: len(replica_tags(first, "m", RUNNING)) == 3, "3 replicas")
        replicas = replica_tags(first, "m")
        await first.save()
        abandon(first)
        async with running_controller(runtime) as (second, _):
            assert sorted(replica_tags(second, "m")) == sorted(replicas)
            assert second.backends["m"].state.target_replicas == 3

    run(main)


# --------------------------------------------------------------------------- redeploy


def weights_of(runtime: FakeRuntime, tags: List[str]) -> List[str]:
    return sorted(runtime.workers[tag].instance.weights for tag in tags)


def test_a_redeploy_rolls_replicas_over_one_at_a_time() -> None:
    async def main() -> None:
        runtime = FakeRuntime()
        async with running_controller(runtime) as (controller, _):
            await start_backend(controller, "m", Loader, "v1", num_replicas=2)
            runtime.hold_launches()
            goal = await controller.redeploy_backend(
                "m", replica_config(Loader, "v2"), BackendMetadata.inspect(Loader))
            backend = controller.backends["m"].state
            serving: List[int] = []
            for started in (1, 2):
                await eventually(lambda: runtime.held(), "a new replica launching")
                assert len(runtime.held()) == 1  # one at a time
                serving.append(len(replica_tags(controller, "m", RUNNING)))
                runtime.release()
                await eventually(lambda n=started: len(backend.current(RUNNING)) == n,
                                 f"new replica {started} running")
            await wait_goal(controller, goal)
            assert serving == [2, 2]  # as many served as before throughout
            running = replica_tags(controller, "m", RUNNING)
            assert weights_of(runtime, running) == ["v2", "v2"]

    run(main)


def test_a_redeploy_starts_max_surge_new_replicas_at_once() -> None:
    async def main() -> None:
        runtime = FakeRuntime()
        async with running_controller(runtime) as (controller, _):
            await start_backend(controller, "m", Loader, "v1", num_replicas=4, max_surge=2)
            runtime.hold_launches()
            goal = await controller.redeploy_backend(
                "m", replica_config(Loader, "v2"), BackendMetadata.inspect(Loader))
            backend = controller.backends["m"].state
            launching: List[int] = []
            serving: List[int] = []
            while len(backend.current(RUNNING)) < 4:
                await eventually(lambda: runtime.held() or len(backend.current(RUNNING)) == 4,
                                 "new replicas launching")
                launching.append(len(runtime.held()))
                serving.append(len(replica_tags(controller, "m", RUNNING)))
                [first, *_] = runtime.held() or [None]
                if first is not None:
                    runtime.release(first)
                    await eventually(lambda t=first: backend.replicas.get(t) is None or
                                     backend.replicas[t].state == RUNNING, "it running")
            await wait_goal(controller, goal)
            assert launching[0] == 2  # the surge at once
            assert max(launching) == 2  # never more
            assert min(serving) >= 4  # as many served as before throughout
            running = replica_tags(controller, "m", RUNNING)
            assert weights_of(runtime, running) == ["v2"] * 4

    run(main)


def test_a_redeploys_surge_stays_within_the_resources_left() -> None:
    async def main() -> None:
        runtime = FakeRuntime(capacity={"CPU": 6.0})
        async with running_controller(runtime) as (controller, _):
            definition = ReplicaConfig(cloudpickle.dumps((Loader, ("v1",))), {"num_cpus": 1},
                                       "Loader")
            await wait_goal(controller, await controller.create_backend(
                "m", definition, BackendConfig(num_replicas=4, max_surge="100%"),
                BackendMetadata.inspect(Loader)))
            runtime.hold_launches()
            goal = await controller.redeploy_backend(
                "m", ReplicaConfig(cloudpickle.dumps((Loader, ("v2",))), {"num_cpus": 1},
                                   "Loader"), BackendMetadata.inspect(Loader))
            # (A redeploy starts its first new replicas before it returns.) 6 CPUs: the 4
            # old replicas and 2 new ones.
            assert len(controller.backends["m"].state.current(STARTING)) == 2
            runtime.hold_launches(False)
            runtime.release()
            await wait_goal(controller, goal)
            assert weights_of(runtime, replica_tags(controller, "m", RUNNING)) == ["v2"] * 4

    run(main)


def test_a_redeploy_whose_constructor_raises_keeps_the_old_version() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "m", Loader, "v1", num_replicas=2)
            before = replica_tags(controller, "m")
            goal = await controller.redeploy_backend(
                "m", replica_config(Loader, "corrupt"), BackendMetadata.inspect(Loader))
            with pytest.raises(ValueError, match="weights are corrupt"):
                await wait_goal(controller, goal)
            assert replica_tags(controller, "m") == before
            assert weights_of(runtime, before) == ["v1", "v1"]
            # A later redeploy works.
            await wait_goal(controller, await controller.redeploy_backend(
                "m", replica_config(Loader, "v3"), BackendMetadata.inspect(Loader)))
            running = replica_tags(controller, "m", RUNNING)
            assert weights_of(runtime, running) == ["v3", "v3"]

    run(main)


def test_a_new_backend_that_fails_to_start_stays_when_an_endpoint_uses_it() -> None:
    """(``deploy --no-wait`` creates the endpoint before the replicas run.) Removed, the
    backend would leave the endpoint sending traffic nowhere: it stays, UNHEALTHY with the
    error, its replicas tried again, until a redeploy fixes it."""

    async def main() -> None:
        runtime = FakeRuntime()
        async with running_controller(runtime) as (controller, _):
            runtime.hold_launches()
            goal = await start_backend(controller, "m", Loader, "corrupt", wait=False)
            await controller.create_endpoint("e", "m", None, ["GET"])
            runtime.hold_launches(False)
            runtime.release()
            with pytest.raises(ValueError, match="weights are corrupt"):
                await wait_goal(controller, goal)
            status = controller.status()["backends"]["m"]
            assert status["status"] == "UNHEALTHY", status
            assert "weights are corrupt" in status["message"]
            assert controller.list_endpoints()["e"]["traffic"] == {"m": 1.0}
            await wait_goal(controller, await controller.redeploy_backend(
                "m", replica_config(Loader, "v2"), BackendMetadata.inspect(Loader)))
            assert controller.status()["backends"]["m"]["status"] == "HEALTHY"
            assert weights_of(runtime, replica_tags(controller, "m", RUNNING)) == ["v2"]

    run(main)


def test_a_redeploy_survives_a_controller_restart_with_its_definition() -> None:
    async def main() -> None:
        runtime = FakeRuntime()
        first = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await first.start()
        await start_backend(first, "m", Model, "one")
        await wait_goal(first, await first.redeploy_backend(
            "m", replica_config(Model, "two"), BackendMetadata.inspect(Model)))
        await first.save()
        abandon(first)
        async with running_controller(runtime) as (second, _):
            [tag] = replica_tags(second, "m", RUNNING)
            assert runtime.workers[tag].instance.name == "two"
            await wait_goal(second, await second.update_backend_config(
                "m", BackendConfig(num_replicas=2)))
            assert sorted(runtime.workers[t].instance.name
                          for t in replica_tags(second, "m")) == ["two", "two"]

    run(main)


def test_a_redeploy_interrupted_by_a_controller_crash_still_rolls_back() -> None:
    """The definition a redeploy goes back to is saved: the next controller finishes the
    redeploy, and when the new constructor raises there, the old version comes back."""

    async def main() -> None:
        runtime = FakeRuntime()
        first = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
        await first.start()
        await start_backend(first, "m", Loader, "v1", num_replicas=2)
        runtime.hold_launches()
        goal = await first.redeploy_backend(
            "m", replica_config(Loader, "corrupt"), BackendMetadata.inspect(Loader))
        await eventually(lambda: runtime.held(), "the new replica launching")
        await first.save()
        abandon(first)  # the controller dies mid-redeploy
        runtime.hold_launches(False)
        runtime.release()
        async with running_controller(runtime) as (second, _):
            with pytest.raises(ValueError, match="weights are corrupt"):
                await wait_goal(second, goal)
            backend = second.backends["m"].state
            await eventually(lambda: len(backend.current(RUNNING)) == 2 and
                             len(backend.replicas) == 2, "two replicas of the old version")
            assert weights_of(runtime, replica_tags(second, "m")) == ["v1", "v1"]
            assert backend.definition_before is None

    run(main)
