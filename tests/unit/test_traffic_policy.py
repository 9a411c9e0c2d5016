"""Unit tests of the traffic policy (``pick_backend``): weighted split and shard keys.

No processes: ``pick_backend`` is the pure function every router (proxy, handles, replicas)
uses to choose a backend. Shares are checked against a binomial bound of five standard
deviations, so a correct implementation fails with probability below one in a million.
"""

from __future__ import annotations

import collections
import math
from typing import Dict, List

import pytest

from servekit._private.routing.router import pick_backend

N = 10_000


def within_binomial(observed: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """Whether ``observed`` successes of ``n`` draws fit a share ``p`` (|x - np| <= k sigma)."""
    sigma = math.sqrt(n * p * (1.0 - p))
    return abs(observed - n * p) <= sigmas * sigma


def assert_shares(counts: Dict[str, int], traffic: Dict[str, float], n: int) -> None:
    assert sum(counts.values()) == n
    assert set(counts) <= {b for b, w in traffic.items() if w > 0}, counts
    for backend, weight in traffic.items():
        if weight <= 0:
            assert counts.get(backend, 0) == 0, (backend, counts)
            continue
        share = weight / math.fsum(traffic.values())
        assert within_binomial(counts.get(backend, 0), n, share), (
            f"{backend}: {counts.get(backend, 0)} of {n}, expected about {n * share:.0f}; "
            f"all counts {dict(counts)}")


def assignments(traffic: Dict[str, float], keys: List[str]) -> Dict[str, str]:
    return {key: pick_backend(traffic, key) for key in keys}


KEYS = [f"user-{i}" for i in range(N)]


# --------------------------------------------------------------------------- random split


@pytest.mark.parametrize("traffic", [
    {"a": 0.3, "b": 0.7},
    {"a": 0.2, "b": 0.3, "c": 0.5},
    {"a": 0.05, "b": 0.95},
    {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4},
])
def test_split_shares_follow_weights(traffic):
    counts = collections.Counter(pick_backend(traffic, None) for _ in range(N))
    assert_shares(counts, traffic, N)


def test_single_backend_gets_everything():
    assert {pick_backend({"only": 1.0}, None) for _ in range(1000)} == {"only"}
    assert {pick_backend({"only": 1.0}, key) for key in KEYS[:1000]} == {"only"}


@pytest.mark.parametrize("traffic", [
    {"zero-first": 0.0, "a": 0.4, "zero-middle": 0.0, "b": 0.6, "zero-last": 0.0},
    {"a": 0.1, "b": 0.2, "c": 0.7, "zero": 0.0},  # 0.1 + 0.2 + 0.7 < 1 in floating point
    {"zero": 0.0, "a": 1.0},
    {"a": 1.0, "zero": 0.0},
])
def test_zero_weight_backends_are_never_chosen(traffic):
    zero = {b for b, w in traffic.items() if w == 0}
    random_picks = collections.Counter(pick_backend(traffic, None) for _ in range(N))
    keyed_picks = collections.Counter(pick_backend(traffic, key) for key in KEYS)
    assert not zero & set(random_picks), random_picks
    assert not zero & set(keyed_picks), keyed_picks
    assert_shares(random_picks, traffic, N)
    assert_shares(keyed_picks, traffic, N)


# --------------------------------------------------------------------------- shard keys


def test_shard_key_always_picks_the_same_backend():
    traffic = {"a": 0.2, "b": 0.3, "c": 0.5}
    first = assignments(traffic, KEYS[:2000])
    for _ in range(3):
        assert assignments(traffic, KEYS[:2000]) == first
    # An equal policy built in another order (as another process may hold it) agrees.
    reordered = {"c": 0.5, "a": 0.2, "b": 0.3}
    assert assignments(reordered, KEYS[:2000]) == first


def test_shard_keys_spread_by_weight():
    traffic = {"a": 0.2, "b": 0.3, "c": 0.5}
    counts = collections.Counter(assignments(traffic, KEYS).values())
    assert_shares(counts, traffic, N)


def test_similar_shard_keys_do_not_cluster():
    """Keys differing in one character are spread like any others (a hash, not a prefix)."""
    traffic = {"a": 0.5, "b": 0.5}
    keys = [f"tenant-000000{i % 10}{i // 10:05d}" for i in range(N)]
    counts = collections.Counter(assignments(traffic, keys).values())
    assert_shares(counts, traffic, N)


def moved(before: Dict[str, str], after: Dict[str, str]) -> List[tuple]:
    return [(before[k], after[k]) for k in before if before[k] != after[k]]


def test_raising_one_weight_only_moves_keys_to_that_backend():
    before_policy = {"a": 0.2, "b": 0.3, "c": 0.5}
    # a doubles; b and c keep their ratio (both scaled by 0.75 so the weights sum to 1).
    after_policy = {"a": 0.4, "b": 0.225, "c": 0.375}
    before = assignments(before_policy, KEYS)
    after = assignments(after_policy, KEYS)
    changes = moved(before, after)
    assert changes, "raising a's weight moved no key at all"
    assert {to for _, to in changes} == {"a"}, collections.Counter(changes)
    assert all(frm in ("b", "c") for frm, _ in changes)
    # Only the share a gained moves: about 0.2 of the keys, not more.
    assert within_binomial(len(changes), N, 0.2), len(changes)
    assert_shares(collections.Counter(after.values()), after_policy, N)


def test_lowering_one_weight_only_moves_keys_away_from_that_backend():
    before_policy = {"a": 0.2, "b": 0.3, "c": 0.5}
    # b drops from 0.3 to 0.1; a and c keep their ratio.
    scale = 0.9 / 0.7
    after_policy = {"a": 0.2 * scale, "b": 0.1, "c": 0.5 * scale}
    before = assignments(before_policy, KEYS)
    after = assignments(after_policy, KEYS)
    changes = moved(before, after)
    assert changes, "lowering b's weight moved no key at all"
    assert {frm for frm, _ in changes} == {"b"}, collections.Counter(changes)
    assert {to for _, to in changes} <= {"a", "c"}
    assert within_binomial(len(changes), N, 0.2), len(changes)
    # Keys that stayed on b are exactly b's keys under the new policy.
    assert {k for k, v in after.items() if v == "b"} <= {k for k, v in before.items()
                                                         if v == "b"}


def test_unnormalised_weight_change_leaves_other_backends_alone():
    """Changing only one entry of the dict: keys move only between it and the rest."""
    before_policy = {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}
    after_policy = dict(before_policy, c=0.5)
    before = assignments(before_policy, KEYS)
    after = assignments(after_policy, KEYS)
    changes = moved(before, after)
    assert changes
    assert all(to == "c" and frm != "c" for frm, to in changes), collections.Counter(changes)


def test_adding_a_backend_only_moves_keys_to_it_and_zero_weight_moves_none():
    before_policy = {"a": 0.5, "b": 0.5}
    before = assignments(before_policy, KEYS)
    # A new backend with weight 0 changes nothing.
    assert assignments({"a": 0.5, "b": 0.5, "new": 0.0}, KEYS) == before
    assert assignments({"new": 0.0, "a": 0.5, "b": 0.5}, KEYS) == before
    # With weight 0.2 (a and b scaled alike) it takes about 0.2 of the keys, from both.
    after = assignments({"a": 0.4, "b": 0.4, "new": 0.2}, KEYS)
    changes = moved(before, after)
    assert {to for _, to in changes} == {"new"}
    assert {frm for frm, _ in changes} == {"a", "b"}
    assert within_binomial(len(changes), N, 0.2), len(changes)


def test_removing_a_backend_only_moves_its_keys():
    before = assignments({"a": 0.2, "b": 0.3, "c": 0.5}, KEYS)
    after = assignments({"a": 0.2 / 0.7, "c": 0.5 / 0.7}, KEYS)  # b removed, a:c kept
    for key in KEYS:
        if before[key] != "b":
            assert after[key] == before[key], key
        else:
            assert after[key] in ("a", "c")
