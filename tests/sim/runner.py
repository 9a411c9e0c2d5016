"""Sweeps of seeds over the registered scenarios (used by ``python tests/sim`` and CI)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import importlib
from typing import Iterable, List, Optional

import simloop
from scenarios import SCENARIOS

# The modules that register scenarios.
_SCENARIO_MODULES = ("dataplane", "proxyplane", "controlplane", "wireplane", "multiplexplane")


def load_scenarios() -> None:
    for module in _SCENARIO_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def scenario_names(only: Optional[str] = None) -> List[str]:
    load_scenarios()
    if only is None:
        return sorted(SCENARIOS)
    if only not in SCENARIOS:
        raise SystemExit(f"No scenario {only!r}; there are: {', '.join(sorted(SCENARIOS))}.")
    return [only]


@dataclasses.dataclass
class Failure:
    seed: int
    message: str


@dataclasses.dataclass
class Report:
    runs: int = 0
    failures: List[Failure] = dataclasses.field(default_factory=list)


def run_one(name: str, seed: int, collect: bool = False) -> None:
    """Run one seed of one scenario; raises what it raised (an ``AssertionError`` when an
    invariant broke). ``collect``: collect the garbage it left first, so that an error left
    unread in a reference cycle is found too (a sweep collects every so many seeds)."""
    load_scenarios()
    SCENARIOS[name](seed)
    if collect:
        gc.collect()
        simloop.check_unretrieved(seed)


def sweep_in_parallel(name: str, seeds: range, jobs: int, max_failures: int = 5) -> Report:
    """``sweep`` split over ``jobs`` processes (each takes every ``jobs``-th seed)."""
    if jobs <= 1:
        return sweep(name, seeds, max_failures)
    parts = [seeds[i::jobs] for i in range(jobs)]
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        reports = list(pool.map(sweep, [name] * jobs, parts, [max_failures] * jobs))
    merged = Report(runs=sum(r.runs for r in reports))
    merged.failures = sorted((f for r in reports for f in r.failures), key=lambda f: f.seed)
    return merged


def sweep(name: str, seeds: Iterable[int], max_failures: int = 5) -> Report:
    """Run ``seeds``; every failure is recorded with its seed (at most ``max_failures``)."""
    report = Report()
    for seed in seeds:
        report.runs += 1
        try:
            run_one(name, seed)
        except Exception as exc:  # an invariant, or a crash of the code under test
            report.failures.append(Failure(seed, f"{type(exc).__name__}: {exc}"))
            if len(report.failures) >= max_failures:
                break
        if report.runs % 200 == 0:
            _collect(report)
    _collect(report)
    return report


def _collect(report: Report) -> None:
    """Collect the garbage of the seeds run so far: an error one of them left unread in a
    reference cycle is reported now, as a failure of its seed."""
    gc.collect()
    for seed in sorted(simloop.unretrieved):
        try:
            simloop.check_unretrieved(seed)
        except simloop.Unretrieved as exc:
            report.failures.append(Failure(seed, f"Unretrieved: {exc}"))
