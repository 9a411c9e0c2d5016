"""Unit tests of the rollout arithmetic: the surge a max_surge allows, and each step of a
rollout (old replicas kept until new ones run, new ones within target + surge)."""

from __future__ import annotations

from typing import List, Tuple

import pytest

from servekit._private.controller.rollout import RolloutStep, rollout_step, surge_replicas


@pytest.mark.parametrize(("max_surge", "target", "surge"), [
    ("25%", 5, 2),    # 1.25, rounded up
    ("25%", 4, 1),
    ("25%", 1, 1),    # at least one
    ("25%", 0, 1),
    ("1%", 3, 1),
    ("50%", 10, 5),
    ("100%", 7, 7),
    (3, 10, 3),
    (3, 1, 3),
])
def test_surge_is_a_count_or_a_percentage_rounded_up_and_at_least_one(
        max_surge: object, target: int, surge: int) -> None:
    assert surge_replicas(max_surge, target) == surge  # type: ignore[arg-type]


def test_a_rollout_starts_the_surge_at_once_and_keeps_every_old_replica() -> None:
    assert rollout_step(target=5, surge=2, old_running=5, new_running=0, new_starting=0,
                        room=64) == RolloutStep(stop_old=0, start_new=2)


def test_an_old_replica_leaves_for_each_new_one_that_runs() -> None:
    # One new replica runs, one still starts: one old one goes, one more new one starts.
    assert rollout_step(target=5, surge=2, old_running=5, new_running=1, new_starting=1,
                        room=64) == RolloutStep(stop_old=1, start_new=1)


def test_a_rollout_starts_no_more_than_are_missing_nor_than_the_room_allows() -> None:
    assert rollout_step(target=3, surge=10, old_running=3, new_running=0, new_starting=0,
                        room=64) == RolloutStep(stop_old=0, start_new=3)
    assert rollout_step(target=100, surge=100, old_running=100, new_running=0,
                        new_starting=0, room=64) == RolloutStep(stop_old=0, start_new=64)


def test_old_replicas_beyond_a_lower_target_stop_at_once() -> None:
    # Scaled down from 4 to 2 in the middle of a rollout (or deleted: target 0).
    assert rollout_step(target=2, surge=1, old_running=4, new_running=1, new_starting=1,
                        room=64) == RolloutStep(stop_old=3, start_new=0)
    assert rollout_step(target=0, surge=1, old_running=3, new_running=0, new_starting=0,
                        room=64) == RolloutStep(stop_old=3, start_new=0)


def simulate(target: int, surge: int) -> List[Tuple[int, int]]:
    """Run a whole rollout where every new replica started runs by the next step; the
    (serving, starting) counts after each step."""
    old, new_running, new_starting = target, 0, 0
    history = []
    while old or new_running < target:
        step = rollout_step(target, surge, old, new_running, new_starting, room=64)
        old -= step.stop_old
        new_starting += step.start_new
        history.append((old + new_running, new_starting))
        assert old + new_running + new_starting <= target + surge
        new_running, new_starting = new_running + new_starting, 0
    return history


@pytest.mark.parametrize(("target", "surge", "steps"), [(5, 2, 3), (5, 1, 5), (4, 4, 1),
                                                        (1, 1, 1)])
def test_a_whole_rollout_never_serves_fewer_and_takes_target_over_surge_steps(
        target: int, surge: int, steps: int) -> None:
    history = simulate(target, surge)
    assert all(serving >= target for serving, _ in history)
    assert sum(1 for _, starting in history if starting) == steps
