"""Unit tests of a backend's status (Ray Serve's words) and message, from its state."""

from __future__ import annotations

from typing import Any

from controller_helpers import Model, replica_config

from servekit._private.controller.backend_status import backend_status
from servekit._private.controller.state import (
    RUNNING,
    STARTING,
    STOPPING,
    BackendState,
    ReplicaRecord,
)
from servekit.config import BackendConfig


def backend(*replicas: str, created: bool = True, version: int = 0,
            **config: Any) -> BackendState:
    """A backend with replicas given as "STATE" or "STATE@version" (default ``version``;
    revision is version + 1)."""
    state = BackendState("m", replica_config(Model), BackendConfig(**config), None,
                         created=created, version=version)
    for index, replica in enumerate(replicas):
        name, _, at = replica.partition("@")
        tag = f"m#{index}"
        state.replicas[tag] = ReplicaRecord(tag, "m", state=name,
                                            version=int(at) if at else version)
    return state


def test_every_replica_running_is_healthy() -> None:
    assert backend_status(backend(RUNNING, RUNNING, num_replicas=2)) == (
        "HEALTHY", "2/2 replicas running")


def test_a_backend_being_created_is_updating() -> None:
    assert backend_status(backend(RUNNING, STARTING, created=False, num_replicas=2)) == (
        "UPDATING", "starting: 1/2 replicas ready")


def test_a_rollout_is_updating_with_how_many_replicas_run_each_revision() -> None:
    state = backend(f"{RUNNING}@0", f"{RUNNING}@0", f"{RUNNING}@1", f"{STARTING}@1",
                    version=1, num_replicas=3)
    status, message = backend_status(state)
    assert status == "UPDATING"
    assert message == ("rolling out revision 2: 1/3 new replicas ready, 2 of the old "
                       "revision running")


def test_replicas_that_fail_to_start_make_it_unhealthy_with_the_error() -> None:
    state = backend(RUNNING, num_replicas=2)
    state.last_start_error = "ValueError: weights are corrupt"
    assert backend_status(state) == (
        "UNHEALTHY", "1/2 replicas running; starting replicas fails: ValueError: weights "
                     "are corrupt")


def test_a_replica_being_replaced_makes_it_unhealthy_with_why() -> None:
    state = backend(RUNNING, STARTING, num_replicas=2)
    state.replacing = "replica m#9 was killed by signal SIGKILL"
    assert backend_status(state) == (
        "UNHEALTHY", "1/2 replicas running; replacing: replica m#9 was killed by signal "
                     "SIGKILL")


def test_a_replica_failing_its_health_checks_makes_it_unhealthy() -> None:
    state = backend(RUNNING, RUNNING, num_replicas=2)
    state.replicas["m#1"].unhealthy.set()
    assert backend_status(state)[0] == "UNHEALTHY"


def test_more_replicas_wanted_is_upscaling_and_fewer_downscaling() -> None:
    assert backend_status(backend(RUNNING, STARTING, STARTING, num_replicas=3)) == (
        "UPSCALING", "1/3 replicas running, 2 starting")
    assert backend_status(backend(RUNNING, STOPPING, num_replicas=1)) == (
        "DOWNSCALING", "1/1 replicas running, 1 stopping")


def test_an_autoscaled_backend_says_what_the_autoscaler_decided() -> None:
    state = backend(RUNNING, STARTING, autoscaling_config={"max_replicas": 3})
    state.autoscaled_replicas = 2
    state.scaling_reason = "load 4 at 2 per replica: scaled up to 2"
    assert backend_status(state) == (
        "UPSCALING", "1/2 replicas running, 1 starting (autoscaling: load 4 at 2 per "
                     "replica: scaled up to 2)")
