"""Unit tests of goals (``servekit._private.controller.goals``): what clients wait on."""

from __future__ import annotations

import asyncio

import pytest
from loop_helpers import run

from servekit._private import constants
from servekit._private.controller.goals import GoalManager


@pytest.fixture
def short_retention(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(constants, "GOAL_RETENTION_S", 0.01)
    return 0.01


def test_a_finished_goal_nobody_waits_on_is_forgotten(short_retention: float) -> None:
    async def main() -> None:
        goals = GoalManager()
        done, failed, running = goals.create(), goals.create(), goals.create()
        goals.complete(done)
        goals.fail(failed, ValueError("constructor raised"))
        # the loop runs timers in order of their deadlines: both expiries fire before this
        await asyncio.sleep(short_retention * 5)
        assert list(goals._goals) == [running]  # the one still under way is kept
        assert goals.pending() == [running]

    run(main)


def test_a_failed_goal_waited_on_within_the_retention_raises_its_error() -> None:
    async def main() -> None:
        goals = GoalManager()
        goal = goals.create()
        goals.fail(goal, ValueError("constructor raised"))
        with pytest.raises(ValueError, match="constructor raised"):
            await goals.wait(goal)
        # Asked again (the first answer may not have reached the client): the same error,
        # never "done", until the goal expires.
        with pytest.raises(ValueError, match="constructor raised"):
            await goals.wait(goal)

    run(main)
