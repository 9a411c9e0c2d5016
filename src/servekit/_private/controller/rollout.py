"""Rollouts: how many replicas of a new revision start at once, and when old ones leave.

A redeploy rolls a backend's replicas over to a new definition (a new revision) as a
Kubernetes Deployment does with ``maxUnavailable: 0``: up to ``max_surge`` new replicas
start beyond the replica count, and an old replica stops only as a new one runs, so as
many replicas serve as before throughout. Plain arithmetic, unit-tested on its own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Union


def surge_replicas(max_surge: Union[int, str], target: int) -> int:
    """How many replicas beyond ``target`` a rollout may run at once: ``max_surge`` as a
    number, or as a percentage of ``target`` ("25%", rounded up); at least 1."""
    if isinstance(max_surge, str):
        return max(1, math.ceil(target * int(max_surge.rstrip("%")) / 100))
    return max(1, max_surge)


@dataclasses.dataclass(frozen=True)
class RolloutStep:
    """What a rollout does now: old replicas to stop, new ones to start."""

    stop_old: int
    start_new: int


def rollout_step(target: int, surge: int, old_running: int, new_running: int,
                 new_starting: int, room: int) -> RolloutStep:
    """The next step of a rollout towards ``target`` replicas of the new revision.

    Old replicas are kept until enough new ones run to take their place (``target`` serve
    throughout, or as many old ones as there are); new ones start while old and new
    together stay within ``target + surge``, and at most ``room`` start now (the bound on
    replicas starting at once).
    """
    keep_old = min(old_running, max(0, target - new_running))
    missing = max(0, target - new_running - new_starting)
    headroom = target + surge - keep_old - new_running - new_starting
    return RolloutStep(stop_old=old_running - keep_old,
                       start_new=max(0, min(missing, headroom, room)))
