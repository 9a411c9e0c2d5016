"""Autoscaling: the load routers report, and the policy that turns it into a replica count.

``LoadBook`` keeps the latest load each router reported per backend (requests waiting in it
plus those it has on replicas). ``AutoscalingPolicy`` samples a backend's total every
``metrics_interval_s``, averages it over ``look_back_period_s``, and changes the replica
count only once the change was wanted at every sample through its delay: a sliding window,
so one sample the other way postpones a change instead of resetting a counter that the next
sample starts again. Both are plain logic, driven by the caller's clock.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Deque, Dict, Iterable, Optional, Tuple

from servekit._private.backend_settings import AutoscalingSettings

# Fewer replicas are wanted only if they would run at most this share of the target: a
# load that sits at a boundary does not remove the replica it just added.
DOWNSCALE_HEADROOM = 0.9
_EPSILON = 1e-9


class LoadBook:
    """The latest load each router reported, by backend; a report older than its backend's
    staleness bound counts as zero (the router is gone, or stopped sending because it is
    idle)."""

    def __init__(self) -> None:
        self._reports: Dict[str, Dict[str, Tuple[float, float]]] = {}

    def report(self, router: str, loads: Dict[str, float], now: float) -> None:
        reports = self._reports.setdefault(router, {})
        for backend, load in loads.items():
            reports[backend] = (float(load), now)

    def forget(self, router: str) -> None:
        """The router is gone: its load with it."""
        self._reports.pop(router, None)

    def forget_backend(self, backend: str) -> None:
        for reports in self._reports.values():
            reports.pop(backend, None)

    def total(self, backend: str, now: float, stale_after: float) -> float:
        return sum(load for reports in self._reports.values()
                   for load, at in _present(reports.get(backend))
                   if now - at <= stale_after)


def _present(entry: Optional[Tuple[float, float]]) -> Iterable[Tuple[float, float]]:
    return () if entry is None else (entry,)


@dataclasses.dataclass(frozen=True)
class Decision:
    """How many replicas the policy wants now, and why (shown by ``servekit status``)."""

    replicas: int
    reason: str


class AutoscalingPolicy:
    """The replica count of one backend, from samples of its load (see the module doc)."""

    def __init__(self, config: AutoscalingSettings) -> None:
        self.config = config
        self._samples: Deque[Tuple[float, float]] = collections.deque()  # (time, load)
        self._wanted: Deque[Tuple[float, float]] = collections.deque()  # (time, replicas)

    def record(self, now: float, load: float) -> None:
        """One sample of the backend's total load."""
        self._samples.append((now, load))
        while self._samples and self._samples[0][0] <= now - self.config.look_back_period_s:
            self._samples.popleft()

    def average(self) -> float:
        if not self._samples:
            return 0.0
        return math.fsum(load for _, load in self._samples) / len(self._samples)

    def decide(self, now: float, current: int) -> Decision:
        """The replica count to have now, given ``current`` (the count wanted so far)."""
        config = self.config
        low, high = config.min_replicas, config.max_replicas
        if not low <= current <= high:
            target = min(max(current, low), high)
            return Decision(target, f"kept within min_replicas={low}, max_replicas={high}")
        latest = self._samples[-1][1] if self._samples else 0.0
        if current == 0:
            # What was wanted before, and the idle samples, say nothing about the load that
            # arrives: the decisions after leaving zero start afresh from it.
            self._wanted.clear()
            if latest <= 0:
                return Decision(0, "scaled to zero: no requests")
            while len(self._samples) > 1:
                self._samples.popleft()
            target = min(high, max(1, math.ceil(latest / config.target_ongoing_requests
                                                - _EPSILON)))
            return Decision(target, f"{latest:g} requests arrived while scaled to zero")
        average = self.average()
        wanted = average / config.target_ongoing_requests
        self._wanted.append((now, wanted))
        horizon = max(config.upscale_delay_s, config.downscale_delay_s,
                      self._to_zero_delay()) + 2 * config.metrics_interval_s
        while self._wanted and self._wanted[0][0] < now - horizon:
            self._wanted.popleft()
        load = (f"load {average:.2g} (over {config.look_back_period_s:g}s) at "
                f"{config.target_ongoing_requests:g} per replica")
        up = self._held(lambda w: _up(w) > current)
        if up is not None:
            since, least = up
            held = now - since
            step = math.ceil(current + self._factor(config.upscaling_factor)
                             * (_up(least) - current) - _EPSILON)
            target = min(high, max(current + 1, step))
            if target == current:
                return Decision(current, f"{load}; at max_replicas={high}")
            if held >= config.upscale_delay_s:
                return Decision(target, f"{load}: scaled up to {target}")
            return Decision(current, f"{load}: wants {target}, for {held:.1f}s of "
                                     f"upscale_delay_s={config.upscale_delay_s:g}")
        down = self._held(lambda w: _down(w) < current, most=True)
        if down is not None and current > low:
            since, most = down
            held = now - since
            step = math.ceil(current - self._factor(config.downscaling_factor)
                             * (current - _down(most)) - _EPSILON)
            target = max(low, min(current - 1, step))
            delay = config.downscale_delay_s
            if target == 0:
                zero = self._held(lambda w: w <= 0)
                zero_held = -1.0 if zero is None else now - zero[0]
                if zero_held >= self._to_zero_delay() and held >= delay:
                    return Decision(0, f"{load}: no requests for {zero_held:.1f}s, scaled "
                                       "to zero")
                target = 1
                if current == 1:
                    return Decision(1, f"{load}: wants 0, for {max(zero_held, 0):.1f}s of "
                                       f"downscale_to_zero_delay_s={self._to_zero_delay():g}")
            if held >= delay:
                return Decision(target, f"{load}: scaled down to {target}")
            return Decision(current, f"{load}: wants {target}, for {held:.1f}s of "
                                     f"downscale_delay_s={delay:g}")
        return Decision(current, f"{load}: {current} is right")

    def _held(self, wants: "collections.abc.Callable[[float], bool]",
              most: bool = False) -> Optional[Tuple[float, float]]:
        """Since when every sample (newest back) has wanted the change, and the mildest
        count among them (the least asked for, or with ``most`` the most); None if the
        newest sample does not want it."""
        since: Optional[float] = None
        mildest = 0.0
        for at, wanted in reversed(self._wanted):
            if not wants(wanted):
                break
            mildest = wanted if since is None else (max if most else min)(mildest, wanted)
            since = at
        return None if since is None else (since, mildest)

    def _to_zero_delay(self) -> float:
        delay = self.config.downscale_to_zero_delay_s
        return self.config.downscale_delay_s if delay is None else delay

    @staticmethod
    def _factor(factor: Optional[float]) -> float:
        return 1.0 if factor is None else factor


def _up(wanted: float) -> int:
    """Replicas needed to keep each at or below the target."""
    return math.ceil(wanted - _EPSILON)


def _down(wanted: float) -> int:
    """Replicas that would each run at most ``DOWNSCALE_HEADROOM`` of the target."""
    return math.ceil(wanted / DOWNSCALE_HEADROOM - _EPSILON)
