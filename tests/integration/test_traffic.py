"""Traffic against real processes: set_traffic, splits, shard keys, shadows, live switching.

Every backend here answers with something that tells which backend served the request, so
the tests check where requests went from what an HTTP client or a handle sees. Shares are
checked against a binomial bound of five standard deviations (|x - np| <= 5 sqrt(np(1-p))).
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import signal
import statistics
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import httpx
import pytest
from processes import is_worker, start_time
from request_streams import RequestStream, answers_between, bad_records

import servekit as serve
from conftest import BOTH_RUNTIMES, wait_for

pytestmark = pytest.mark.integration
RUNTIMES = BOTH_RUNTIMES

TIMEOUT = 10.0


# --------------------------------------------------------------------------- backends


def whoami(request) -> str:
    """The tag of the backend that served the request."""
    return serve.get_current_backend_tag()


def doubler(request) -> int:
    """``x`` doubled; ``x`` is a query parameter over HTTP and a keyword argument of remote()."""
    return 2 * int(request.query_params["x"])


def sleeps_two_seconds(request) -> str:
    time.sleep(2.0)
    return "slow"


def always_raises(request) -> None:
    raise RuntimeError("the shadow backend exploded")


def sleeps_one_second(request) -> str:
    time.sleep(1.0)
    return "saturated"


def report_pid(request) -> int:
    return os.getpid()


# --------------------------------------------------------------------------- helpers


def within_binomial(observed: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    sigma = math.sqrt(n * p * (1.0 - p))
    return abs(observed - n * p) <= sigmas * sigma


def shadow_table(url: str) -> dict:
    response = httpx.get(url + "/-/shadows", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def shadow_counts(url: str, endpoint: str, backend: str) -> Dict[str, int]:
    return shadow_table(url).get(endpoint, {}).get(backend, {"sent": 0, "dropped": 0,
                                                             "failed": 0})


def endpoints_unchanged(client, expected: dict) -> None:
    assert client.list_endpoints() == expected


# --------------------------------------------------------------------------- set_traffic


def test_set_traffic_validation_names_the_bad_value(serve_instance):
    client, _ = serve_instance
    client.create_backend("tv:a", whoami)
    client.create_backend("tv:b", whoami)
    client.create_endpoint("tv", backend="tv:a", route="/tv")
    before = client.list_endpoints()

    with pytest.raises(ValueError, match="tv:ghost"):
        client.set_traffic("tv", {"tv:a": 0.5, "tv:ghost": 0.5})
    with pytest.raises(ValueError, match=r"-0\.5.*tv:b|tv:b.*-0\.5"):
        client.set_traffic("tv", {"tv:a": 1.5, "tv:b": -0.5})
    with pytest.raises(ValueError, match=r"0\.9"):
        client.set_traffic("tv", {"tv:a": 0.5, "tv:b": 0.4})
    with pytest.raises(ValueError, match=r"1\.1"):
        client.set_traffic("tv", {"tv:a": 0.6, "tv:b": 0.5})
    with pytest.raises(ValueError, match=r"sum to 0"):
        client.set_traffic("tv", {})
    with pytest.raises(ValueError, match="no-such-endpoint"):
        client.set_traffic("no-such-endpoint", {"tv:a": 1.0})
    for bad in ("1", None, [1.0], True):
        with pytest.raises(TypeError, match="tv:a"):
            client.set_traffic("tv", {"tv:a": bad})
    # Nothing was changed by any of the refused calls, and the route still serves.
    endpoints_unchanged(client, before)
    assert httpx.get(serve_instance[1] + "/tv", timeout=TIMEOUT).text == "tv:a"


def test_set_traffic_replaces_split_and_keeps_shadows(serve_instance):
    client, _ = serve_instance
    for tag in ("tk:a", "tk:b", "tk:shadow", "tk:shadow2"):
        client.create_backend(tag, whoami)
    client.create_endpoint("tk", backend="tk:a", route="/tk", methods=["GET", "POST"])
    client.shadow_traffic("tk", "tk:shadow", 0.25)
    client.shadow_traffic("tk", "tk:shadow2", 1.0)

    client.set_traffic("tk", {"tk:a": 0.25, "tk:b": 0.75})
    assert client.list_endpoints()["tk"] == {
        "route": "/tk", "methods": ["GET", "POST"],
        "traffic": {"tk:a": 0.25, "tk:b": 0.75},
        "shadows": {"tk:shadow": 0.25, "tk:shadow2": 1.0}}

    # Replaced, not merged: tk:a is gone from the split.
    client.set_traffic("tk", {"tk:b": 1.0})
    assert client.list_endpoints()["tk"] == {
        "route": "/tk", "methods": ["GET", "POST"],
        "traffic": {"tk:b": 1.0},
        "shadows": {"tk:shadow": 0.25, "tk:shadow2": 1.0}}
    # tk:a is no longer used, so it can be deleted; the shadows still block theirs.
    client.delete_backend("tk:a")
    with pytest.raises(ValueError, match="tk"):
        client.delete_backend("tk:shadow")


def test_set_traffic_returns_once_the_proxy_uses_it(serve_instance):
    client, url = serve_instance
    client.create_backend("ti:a", whoami)
    client.create_backend("ti:b", whoami)
    client.create_backend("ti:shadow", whoami)
    client.create_endpoint("ti", backend="ti:a", route="/ti")
    client.shadow_traffic("ti", "ti:shadow", 0.5)
    with httpx.Client(timeout=TIMEOUT) as http:
        for target in ("ti:b", "ti:a", "ti:b", "ti:a"):
            client.set_traffic("ti", {target: 1.0})
            answers = collections.Counter(http.get(url + "/ti").text for _ in range(20))
            assert answers == {target: 20}
        # Through a split and back to a single backend.
        client.set_traffic("ti", {"ti:a": 0.5, "ti:b": 0.5})
        client.set_traffic("ti", {"ti:b": 1.0})
        assert {http.get(url + "/ti").text for _ in range(20)} == {"ti:b"}


# --------------------------------------------------------------------------- split


def test_split_over_handles_and_http_follows_weights(serve_instance):
    client, url = serve_instance
    client.create_backend("sp:a", whoami)
    client.create_backend("sp:b", whoami)
    client.create_endpoint("sp", backend="sp:a", route="/sp")
    client.set_traffic("sp", {"sp:a": 0.3, "sp:b": 0.7})

    handle = client.get_handle("sp")
    n_handle = 2000
    responses = [handle.remote() for _ in range(n_handle)]
    handle_counts = collections.Counter(r.result(timeout=TIMEOUT) for r in responses)
    assert set(handle_counts) == {"sp:a", "sp:b"}, handle_counts
    assert sum(handle_counts.values()) == n_handle
    assert within_binomial(handle_counts["sp:a"], n_handle, 0.3), handle_counts

    n_http = 1000
    with httpx.Client(timeout=TIMEOUT) as http:
        http_counts = collections.Counter(http.get(url + "/sp").text for _ in range(n_http))
    assert set(http_counts) == {"sp:a", "sp:b"}, http_counts
    assert within_binomial(http_counts["sp:a"], n_http, 0.3), http_counts


def test_concurrent_first_handle_requests_across_a_split_all_succeed(serve_instance):
    """Handle requests sent together from many threads, before any replica was connected."""
    client, _ = serve_instance
    client.create_backend("cf:a", whoami)
    client.create_backend("cf:b", whoami)
    client.create_endpoint("cf", backend="cf:a")
    client.set_traffic("cf", {"cf:a": 0.5, "cf:b": 0.5})
    handle = client.get_handle("cf")
    n = 32
    barrier = threading.Barrier(n)

    def request(_) -> str:
        barrier.wait(TIMEOUT)
        try:
            return handle.remote().result(timeout=TIMEOUT)
        except Exception as exc:  # recorded and asserted on below
            return repr(exc)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        answers = collections.Counter(pool.map(request, range(n)))
    assert set(answers) == {"cf:a", "cf:b"}, answers
    assert sum(answers.values()) == n


# --------------------------------------------------------------------------- shard key


def test_shard_key_sends_each_key_to_one_backend(serve_instance):
    client, url = serve_instance
    tags = ("sk:a", "sk:b", "sk:c")
    for tag in tags:
        client.create_backend(tag, whoami)
    client.create_endpoint("sk", backend="sk:a", route="/sk")
    client.set_traffic("sk", {"sk:a": 0.2, "sk:b": 0.3, "sk:c": 0.5})
    handle = client.get_handle("sk")
    keys = [f"customer-{i}" for i in range(50)]

    def backends_of(key: str, http: httpx.Client) -> set:
        keyed = handle.options(shard_key=key)
        seen = {keyed.remote().result(timeout=TIMEOUT) for _ in range(3)}
        seen |= {http.get(url + "/sk", headers={"X-SERVE-SHARD-KEY": key}).text
                 for _ in range(3)}
        return seen

    with httpx.Client(timeout=TIMEOUT) as http:
        assignment = {}
        for key in keys:
            seen = backends_of(key, http)
            # Same key, same backend: over repeated requests, and over handles and HTTP alike.
            assert len(seen) == 1, (key, seen)
            assignment[key] = seen.pop()
        assert set(assignment.values()) == set(tags), collections.Counter(assignment.values())

        # Raising sk:a's weight (the others keep their ratio) only moves keys to sk:a.
        client.set_traffic("sk", {"sk:a": 0.4, "sk:b": 0.225, "sk:c": 0.375})
        for key in keys:
            seen = backends_of(key, http)
            assert len(seen) == 1, (key, seen)
            now = seen.pop()
            assert now == assignment[key] or now == "sk:a", (key, assignment[key], now)


# --------------------------------------------------------------------------- shadow_traffic


def test_shadow_traffic_validation_and_listing(serve_instance):
    client, _ = serve_instance
    for tag in ("sv:main", "sv:s1", "sv:s2"):
        client.create_backend(tag, whoami)
    client.create_endpoint("sv", backend="sv:main", route="/sv")
    before = client.list_endpoints()

    for bad, shown in ((1.5, "1.5"), (-0.1, "-0.1"), ("0.5", "'0.5'"), (None, "None"),
                       (True, "True"), (float("nan"), "nan")):
        with pytest.raises(TypeError, match=shown):
            client.shadow_traffic("sv", "sv:s1", bad)
    with pytest.raises(ValueError, match="sv:ghost"):
        client.shadow_traffic("sv", "sv:ghost", 0.5)
    with pytest.raises(ValueError, match="no-such-endpoint"):
        client.shadow_traffic("no-such-endpoint", "sv:s1", 0.5)
    endpoints_unchanged(client, before)

    client.shadow_traffic("sv", "sv:s1", 0.5)
    client.shadow_traffic("sv", "sv:s2", 0.25)
    assert client.list_endpoints()["sv"]["shadows"] == {"sv:s1": 0.5, "sv:s2": 0.25}
    client.shadow_traffic("sv", "sv:s1", 1)  # an int is a number too; updates in place
    assert client.list_endpoints()["sv"]["shadows"] == {"sv:s1": 1.0, "sv:s2": 0.25}
    assert client.list_endpoints()["sv"]["traffic"] == {"sv:main": 1.0}

    # A shadowed backend cannot be deleted; 0 removes the shadow, and then it can.
    with pytest.raises(ValueError, match="sv"):
        client.delete_backend("sv:s1")
    client.shadow_traffic("sv", "sv:s1", 0)
    assert client.list_endpoints()["sv"]["shadows"] == {"sv:s2": 0.25}
    client.delete_backend("sv:s1")
    assert "sv:s1" not in client.list_backends()
    client.shadow_traffic("sv", "sv:s2", 0.0)
    assert client.list_endpoints()["sv"]["shadows"] == {}


def test_shadow_copies_follow_the_proportion(serve_instance):
    client, url = serve_instance
    client.create_backend("sp2:main", whoami)
    client.create_backend("sp2:half", whoami)
    client.create_endpoint("sp2", backend="sp2:main", route="/sp2")
    client.shadow_traffic("sp2", "sp2:half", 0.5)
    n = 400
    with httpx.Client(timeout=TIMEOUT) as http:
        answers = collections.Counter(http.get(url + "/sp2").text for _ in range(n))
    assert answers == {"sp2:main": n}  # shadow answers are thrown away

    # Copies finish asynchronously: wait until every one is counted (two equal readings).
    last: list = [None]

    def settled():
        counts = shadow_counts(url, "sp2", "sp2:half")
        stable = counts == last[0] and counts["sent"] + counts["dropped"] > 0
        last[0] = counts
        return counts if stable else None

    counts = wait_for(settled, timeout=TIMEOUT, message="shadow counters of sp2 to settle")
    assert within_binomial(counts["sent"] + counts["dropped"], n, 0.5), counts
    assert counts["failed"] == 0, counts


# --------------------------------------------------------------------------- shadows never hurt


def _timed(call: Callable[[], object]) -> Tuple[float, object]:
    start = time.perf_counter()
    value = call()
    return time.perf_counter() - start, value


def test_shadows_never_hurt_the_primary(serve_instance):
    client, url = serve_instance
    client.create_backend("sh:primary", doubler)
    # Thread-safe, so up to 8 copies sleep at once (sync calls run one at a time by default).
    client.create_backend("sh:slow", sleeps_two_seconds, config={"sync_threads": 8})
    client.create_backend("sh:raises", always_raises)
    client.create_backend("sh:saturated", sleeps_one_second,
                          config={"max_concurrent_queries": 1})
    client.create_backend("sh:killed", report_pid)
    client.create_endpoint("sh", backend="sh:primary", route="/sh")
    client.create_endpoint("sh-pid", backend="sh:killed")  # handle-only, to learn its pid
    handle = client.get_handle("sh")
    n = 50

    def run_batch(http: httpx.Client) -> Tuple[List[float], List[float]]:
        http_times, handle_times = [], []
        for i in range(n):
            elapsed, response = _timed(lambda i=i: http.get(url + "/sh", params={"x": i}))
            assert response.status_code == 200, response.text
            assert response.json() == 2 * i
            http_times.append(elapsed)
        for i in range(n):
            elapsed, value = _timed(lambda i=i: handle.remote(x=i).result(timeout=TIMEOUT))
            assert value == 2 * i
            handle_times.append(elapsed)
        return http_times, handle_times

    with httpx.Client(timeout=TIMEOUT) as http:
        run_batch(http)  # warm up connections on both paths
        base_http, base_handle = run_batch(http)

        for backend in ("sh:slow", "sh:raises", "sh:saturated", "sh:killed"):
            client.shadow_traffic("sh", backend, 1.0)
        assert client.list_endpoints()["sh"]["shadows"] == {
            "sh:slow": 1.0, "sh:raises": 1.0, "sh:saturated": 1.0, "sh:killed": 1.0}

        pid = client.get_handle("sh-pid").remote().result(timeout=TIMEOUT)
        assert isinstance(pid, int) and is_worker(pid), pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: start_time(pid) is None, timeout=TIMEOUT,
                 message=f"killed replica {pid} to exit")

        shadowed_http, shadowed_handle = run_batch(http)

    for label, base, shadowed in (("HTTP", base_http, shadowed_http),
                                  ("handle", base_handle, shadowed_handle)):
        base_median = statistics.median(base)
        median = statistics.median(shadowed)
        assert median <= 3 * base_median + 0.020, (
            f"{label}: primary median {median * 1000:.1f} ms with shadows, "
            f"{base_median * 1000:.1f} ms without")
        # Never waits for a shadow: the slow one takes 2 s, the saturated one 1 s.
        assert max(shadowed) < 0.9, (label, sorted(shadowed)[-5:])

    # Every HTTP copy is accounted for exactly once, as sent or dropped, once they finish.
    def all_accounted():
        table = shadow_table(url).get("sh", {})
        done = all(
            backend in table and table[backend]["sent"] + table[backend]["dropped"] == n
            for backend in ("sh:slow", "sh:raises", "sh:saturated", "sh:killed"))
        return table if done else None

    table = wait_for(all_accounted, timeout=15, message="every shadow copy of /sh counted")
    assert set(table) == {"sh:slow", "sh:raises", "sh:saturated", "sh:killed"}, table
    for backend, counts in table.items():
        assert set(counts) == {"sent", "dropped", "failed"}, (backend, counts)
    assert table["sh:raises"]["sent"] > 0, table
    assert table["sh:raises"]["failed"] == table["sh:raises"]["sent"], table
    assert table["sh:saturated"]["dropped"] > 0, table
    assert table["sh:saturated"]["sent"] >= 1, table
    assert table["sh:saturated"]["failed"] == 0, table
    assert table["sh:slow"]["sent"] >= 1 and table["sh:slow"]["failed"] == 0, table
    killed = table["sh:killed"]
    assert killed["failed"] + killed["dropped"] >= 1, table


# --------------------------------------------------------------------------- live switching


def test_set_traffic_switch_under_load_has_no_errors(serve_instance):
    client, url = serve_instance
    client.create_backend("sw:v1", whoami)
    client.create_backend("sw:v2", whoami)
    client.create_endpoint("sw", backend="sw:v1", route="/sw")

    windows = []  # (target, returned_at, next_call_at)
    with RequestStream(url + "/sw") as stream:
        stream.wait_for_requests_since(time.monotonic(), 20)
        for target in ("sw:v2", "sw:v1", "sw:v2", "sw:v1"):
            called = time.monotonic()
            if windows:
                windows[-1][2] = called
            client.set_traffic("sw", {target: 1.0})
            returned = time.monotonic()
            windows.append([target, returned, math.inf])
            stream.wait_for_requests_since(returned, 60)
    records = stream.snapshot()

    assert len(records) >= 4 * 60, len(records)
    bad = bad_records(records)
    assert not bad, (f"{len(bad)} of {len(records)} requests failed while traffic switched, "
                     f"e.g. {collections.Counter((r[2], r[3]) for r in bad)}")
    assert {body for *_, body in records} == {"sw:v1", "sw:v2"}
    for target, returned, next_call in windows:
        answers = answers_between(records, returned, next_call)
        assert answers and set(answers) == {target}, (target, answers)


def test_switch_to_fresh_backends_under_concurrent_requests(serve_instance):
    """The first requests to a backend the proxy never used, arriving together, all succeed."""
    client, url = serve_instance
    fresh = [f"fr:v{i}" for i in range(5)]
    client.create_backend("fr:v0", whoami)
    client.create_endpoint("fr", backend="fr:v0", route="/fr")
    for tag in fresh[1:]:
        client.create_backend(tag, whoami)
    parallel = 16
    barrier = threading.Barrier(parallel)

    def request(_) -> Tuple[Optional[int], str]:
        barrier.wait(TIMEOUT)
        try:
            response = httpx.get(url + "/fr", timeout=TIMEOUT)
        except Exception as exc:  # recorded and asserted on below
            return None, repr(exc)
        return response.status_code, response.text

    failures = {}
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        for tag in fresh:
            client.set_traffic("fr", {tag: 1.0})
            outcomes = collections.Counter(pool.map(request, range(parallel)))
            if outcomes != {(200, tag): parallel}:
                failures[tag] = outcomes
    assert not failures, failures


def test_recreate_endpoint_under_load_has_no_errors(serve_instance):
    client, url = serve_instance
    client.create_backend("rc:v1", whoami)
    client.create_backend("rc:v2", whoami)
    client.create_endpoint("rc", backend="rc:v1", route="/rc")

    windows = []
    with RequestStream(url + "/rc") as stream:
        stream.wait_for_requests_since(time.monotonic(), 20)
        for target in ("rc:v2", "rc:v1", "rc:v2"):
            called = time.monotonic()
            if windows:
                windows[-1][2] = called
            client.delete_endpoint("rc")
            client.create_endpoint("rc", backend=target, route="/rc")
            returned = time.monotonic()
            windows.append([target, returned, math.inf])
            stream.wait_for_requests_since(returned, 60)
    records = stream.snapshot()

    assert len(records) >= 3 * 60, len(records)
    bad = bad_records(records)
    assert not bad, (f"{len(bad)} of {len(records)} requests failed while the endpoint was "
                     f"re-created, e.g. {collections.Counter((r[2], r[3]) for r in bad)}")
    for target, returned, next_call in windows:
        answers = answers_between(records, returned, next_call)
        assert answers and set(answers) == {target}, (target, answers)
    assert client.list_endpoints()["rc"]["traffic"] == {"rc:v2": 1.0}
