"""Resource accounting and GPU assignment, without processes."""

from __future__ import annotations

import pytest

from servekit._private.resources import (
    GPUAllocator,
    add_up,
    demand,
    detect_gpus,
    replicas_that_fit,
)


def test_gpus_come_from_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert detect_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == []


def test_a_replica_reserves_only_what_it_asks_for() -> None:
    assert demand({}) == {}
    assert demand({"num_cpus": 1, "num_gpus": 0.5, "resources": {"accel": 2}}) == {
        "CPU": 1.0, "GPU": 0.5, "accel": 2.0}


def test_replicas_that_fit_takes_the_scarcest_resource() -> None:
    capacity = {"CPU": 4.0, "GPU": 1.0}
    used = add_up([{"CPU": 1.0}, {"CPU": 1.0, "GPU": 0.5}])
    assert used == {"CPU": 2.0, "GPU": 0.5}
    assert replicas_that_fit(capacity, used, {"CPU": 1.0}) == 2
    assert replicas_that_fit(capacity, used, {"CPU": 0.5, "GPU": 0.25}) == 2
    assert replicas_that_fit(capacity, used, {"accel": 1.0}) == 0


def test_each_gpu_replica_gets_its_own_devices_until_they_run_out() -> None:
    gpus = GPUAllocator(["0", "1", "2"])
    assert gpus.assign("a", 0) is None
    first = gpus.assign("a", 1)
    second = gpus.assign("b", 2)
    assert first is not None and second is not None
    assert set(first.split(",")).isdisjoint(second.split(","))
    assert len(second.split(",")) == 2
    gpus.release("a", 1)
    assert gpus.assign("c", 1) == first  # the freed device is the least used again


def test_restored_devices_stay_taken_and_are_given_back_on_release() -> None:
    """A new controller adopts a replica that holds GPU 0: a new replica gets GPU 1, and
    GPU 0 is free again once the adopted one stops."""
    gpus = GPUAllocator(["0", "1"])
    gpus.restore("adopted", ["0"], 1)
    assert gpus.devices("adopted") == ["0"]
    assert gpus.assign("new", 1) == "1"
    gpus.release("adopted", 1)
    assert gpus.assign("later", 1) == "0"


def test_a_restored_device_the_machine_no_longer_has_is_left_out() -> None:
    gpus = GPUAllocator(["0"])
    gpus.restore("adopted", ["0", "7"], 2)
    assert gpus.devices("adopted") == ["0"]
    gpus.release("adopted", 2)
    assert gpus.assign("new", 1) == "0"
