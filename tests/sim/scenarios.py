"""The simulator's scenarios: each runs the real code for one seed and checks the invariants.

A scenario is a function ``(seed) -> None`` registered with ``@scenario("name")``; it raises
``InvariantBroken`` (naming the invariant and what broke it) when a run breaks one. The same
seed always gives the same run, so a failure replays with ``python tests/sim --scenario NAME
--seed SEED``.
"""

from __future__ import annotations

from typing import Callable, Dict

Scenario = Callable[[int], None]
SCENARIOS: Dict[str, Scenario] = {}


class InvariantBroken(AssertionError):
    """A run broke one of the invariants (the message says which, and how)."""


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    """Register ``function`` as the scenario ``name``."""
    def register(function: Scenario) -> Scenario:
        if name in SCENARIOS:
            raise ValueError(f"Two scenarios are named {name!r}.")
        SCENARIOS[name] = function
        return function
    return register


def check(condition: object, invariant: str, detail: str) -> None:
    """Raise ``InvariantBroken`` unless ``condition`` holds."""
    if not condition:
        raise InvariantBroken(f"{invariant}: {detail}")
