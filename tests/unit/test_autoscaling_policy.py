"""Unit tests of the autoscaling policy and the load book, on a clock the test drives."""

from __future__ import annotations

import random
from typing import Any, Callable, List, Tuple

import pytest

from servekit._private.controller.autoscaling import AutoscalingPolicy, LoadBook
from servekit.config import AutoscalingConfig, BackendConfig

INTERVAL = 1.0


def policy(**fields: Any) -> AutoscalingPolicy:
    defaults = dict(min_replicas=1, max_replicas=10, target_ongoing_requests=2,
                    upscale_delay_s=5, downscale_delay_s=10, look_back_period_s=1,
                    metrics_interval_s=INTERVAL)
    return AutoscalingPolicy(AutoscalingConfig(**{**defaults, **fields}))


def drive(p: AutoscalingPolicy, load: Callable[[float], float], start: int, seconds: float,
          t0: float = 0.0) -> List[Tuple[float, int]]:
    """Sample ``load(t)`` every interval for ``seconds``, applying each decision; the
    (time, replicas) of every change."""
    changes = []
    current = start
    t = t0
    while t < t0 + seconds:
        t += INTERVAL
        p.record(t, load(t))
        decision = p.decide(t, current)
        if decision.replicas != current:
            current = decision.replicas
            changes.append((t, current))
    return changes


def test_a_step_up_scales_up_once_the_upscale_delay_has_passed() -> None:
    p = policy()
    changes = drive(p, lambda t: 2.0 if t < 10 else 8.0, start=1, seconds=30)
    # 4 replicas are wanted from t=10 on (a 1 s look-back averages one sample).
    assert changes == [(15.0, 4)]


def test_an_upscale_goes_to_the_count_wanted_all_through_the_delay() -> None:
    p = policy(look_back_period_s=3)
    changes = drive(p, lambda t: 2.0 if t < 10 else 8.0, start=1, seconds=30)
    # The 3 s average rises over 10..12: at 15 the window still holds t=10 (average 4, 2
    # replicas); at 16 it wanted at least 3 all through; at 17, 4.
    assert changes == [(15.0, 2), (16.0, 3), (17.0, 4)]


def test_a_dip_inside_the_window_postpones_the_upscale() -> None:
    p = policy()
    changes = drive(p, lambda t: 2.0 if t < 10 or 13 <= t < 15 else 8.0, start=1,
                    seconds=30)
    assert changes == [(20.0, 4)]  # the hold began again after the dip


def test_load_gone_scales_down_after_the_downscale_delay_but_not_below_min() -> None:
    p = policy(min_replicas=2)
    changes = drive(p, lambda t: 8.0 if t < 5 else 0.0, start=4, seconds=40)
    assert changes == [(15.0, 2)]  # no load from t=5, held 10 s


def test_a_scale_down_leaves_headroom_so_the_load_it_follows_does_not_bring_it_back() -> None:
    p = policy()
    # 3.7 requests at 2 per replica: 2 replicas would run at 92.5% of the target.
    assert drive(p, lambda t: 3.7, start=3, seconds=60) == []
    p = policy()
    assert drive(p, lambda t: 3.4, start=3, seconds=60)[0][1] == 2


@pytest.mark.parametrize("seed", range(5))
def test_steady_load_at_a_boundary_for_60s_changes_the_count_at_most_once(seed: int) -> None:
    rng = random.Random(seed)
    p = policy(upscale_delay_s=3, downscale_delay_s=6, look_back_period_s=3)
    changes = drive(p, lambda t: 4.0 + rng.uniform(-0.5, 0.5), start=2, seconds=60)
    assert len(changes) <= 1, changes


def test_scale_to_zero_waits_for_the_to_zero_delay_and_comes_back_at_once() -> None:
    p = policy(min_replicas=0, downscale_to_zero_delay_s=20)
    changes = drive(p, lambda t: 2.0 if t < 5 else 0.0, start=1, seconds=40)
    assert changes == [(25.0, 0)]  # no load from t=5, held 20 s
    decision = p.decide(41.0, 0)
    assert decision.replicas == 0
    p.record(42.0, 5.0)  # a router reports 5 waiting requests
    decision = p.decide(42.0, 0)
    assert decision.replicas == 3  # at once, for what waits
    assert "scaled to zero" in decision.reason


def test_factors_take_part_of_each_step() -> None:
    p = policy(upscaling_factor=0.5, upscale_delay_s=0)
    changes = drive(p, lambda t: 16.0, start=2, seconds=4)
    assert [replicas for _, replicas in changes] == [5, 7, 8]


def test_bounds_apply_at_once_when_the_config_changes() -> None:
    p = policy(max_replicas=3)
    assert p.decide(1.0, 5).replicas == 3
    assert p.decide(1.0, 0).replicas == 1  # min_replicas=1


def test_the_reason_says_what_the_policy_waits_for() -> None:
    p = policy()
    p.record(1.0, 8.0)
    reason = p.decide(1.0, 1).reason
    assert "wants 4" in reason and "upscale_delay_s=5" in reason


def test_autoscaling_config_checks_its_bounds_and_excludes_num_replicas() -> None:
    with pytest.raises(ValueError, match="min_replicas=3 is above max_replicas=2"):
        AutoscalingConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="initial_replicas=5 is outside"):
        AutoscalingConfig(max_replicas=2, initial_replicas=5)
    with pytest.raises(ValueError, match="num_replicas=2 and autoscaling_config"):
        BackendConfig(num_replicas=2, autoscaling_config={})
    fixed = BackendConfig(num_replicas=2)
    scaled = fixed.merged({"autoscaling_config": {"max_replicas": 4}})
    assert scaled.autoscaling_config is not None and "num_replicas" not in \
        scaled.model_fields_set
    assert scaled.merged({"num_replicas": 3}).autoscaling_config is None


def test_the_load_book_adds_routers_up_and_forgets_stale_and_gone_ones() -> None:
    book = LoadBook()
    book.report("proxy", {"a": 3.0, "b": 1.0}, now=0.0)
    book.report("script", {"a": 2.0}, now=1.0)
    assert book.total("a", now=1.0, stale_after=5.0) == 5.0
    assert book.total("a", now=5.5, stale_after=5.0) == 2.0  # the proxy's report is stale
    book.forget("script")
    assert book.total("a", now=1.0, stale_after=5.0) == 3.0
    book.forget_backend("b")
    assert book.total("b", now=1.0, stale_after=5.0) == 0.0


def test_leaving_zero_is_not_undone_by_what_was_wanted_while_at_zero() -> None:
    """The idle samples from before a burst neither drag its average down nor count as a
    downscale wanted all through the delay."""
    p = AutoscalingPolicy(AutoscalingConfig(
        min_replicas=0, max_replicas=6, target_ongoing_requests=2, upscale_delay_s=1,
        downscale_delay_s=3, downscale_to_zero_delay_s=6, look_back_period_s=1.5,
        metrics_interval_s=0.25))
    current, t, history = 1, 0.0, []
    for load in [0.0] * 48 + [8.0] * 20:
        t += 0.25
        p.record(t, load)
        current = p.decide(t, current).replicas
        history.append(current)
    assert history[40:48] == [0] * 8  # idle: scaled to zero after its delay
    assert history[48] == 4  # out of zero at once, for what waits
    assert min(history[48:]) == 4  # and never back down while the load lasts
