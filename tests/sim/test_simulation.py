"""The quick sweep CI runs: every scenario of the simulator on a range of seeds, for about
a minute in all. A failure names its invariant and the command that replays its seed; the
long sweep is ``python tests/sim --seeds 100000``."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Iterable

import pytest
import runner
import simloop

# Seeds tried per scenario at most, and the seconds a scenario may take (whichever ends
# first): a different start each day, so CI runs move through the seed space.
SEEDS = int(os.environ.get("SERVEKIT_SIM_SEEDS", "5000"))
SECONDS = float(os.environ.get("SERVEKIT_SIM_SECONDS", "25"))
START = int(os.environ.get("SERVEKIT_SIM_START", str(int(time.time() // 86400) * 10_000)))


@pytest.mark.timeout(SECONDS * 4 + 60)
@pytest.mark.parametrize("name", runner.scenario_names())
def test_quick_sweep(name: str) -> None:
    deadline = time.monotonic() + SECONDS
    seeds = (seed for seed in range(START, START + SEEDS) if time.monotonic() < deadline)
    report = runner.sweep(name, seeds, max_failures=3)
    assert report.runs > 0
    assert not report.failures, "\n".join(
        f"seed {f.seed}: {f.message}\n  replay: python tests/sim --scenario {name} "
        f"--seed {f.seed}" for f in report.failures)


def test_a_seed_replays_exactly() -> None:
    """One seed is one history: two runs of it make the same loop schedule."""

    def schedule(seed: int) -> list:
        order: list = []

        async def main(loop: simloop.SimLoop) -> None:
            async def worker(name: str) -> None:
                for step in range(5):
                    await asyncio.sleep(loop.rng.choice([0, 0.001]))
                    order.append((name, step, loop.time()))
            await asyncio.gather(*(worker(f"w{i}") for i in range(4)))

        simloop.run(main, seed)
        return order

    assert schedule(7) == schedule(7)
    assert schedule(7) != schedule(8)


@pytest.mark.parametrize("name", runner.scenario_names())
def test_a_scenarios_seed_replays_exactly_whatever_ran_before(name: str) -> None:
    """The history of a seed does not depend on what the process ran before it (nothing in
    the world is ordered by where objects happen to live in memory): seeds run forwards
    and then backwards give the same histories."""
    seeds = range(START, START + 12)

    def fingerprints(order: Iterable[int]) -> dict:
        found = {}
        for seed in order:
            try:
                runner.run_one(name, seed)
            except AssertionError:
                pass  # (the quick sweep reports it)
            found[seed] = simloop.last_run
        return found

    assert fingerprints(seeds) == fingerprints(reversed(seeds))
