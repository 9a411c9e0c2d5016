"""Supervision, the execution model, and the config replicas really run: real processes.

Frozen and dead replicas are replaced while other requests keep succeeding; a failed proxy
restart is retried until the proxy is back; sync code runs ``sync_threads`` calls at a time
and never alongside ``reconfigure``; a replica that was still starting when ``user_config``
changed runs the new one, and a failed scale-up puts the old config back everywhere.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import httpx
import pytest
from processes import start_time
from robustness_backends import (
    Concurrency,
    FlakyMiddleware,
    Freezable,
    GatedConfig,
    HealthFlag,
    SlowStart,
    StartError,
    echo_function,
)
from starlette.middleware import Middleware

import servekit as serve
from conftest import free_port, wait_for
from servekit.exceptions import BackendUnavailableError

pytestmark = pytest.mark.integration

TIMEOUT = 15.0
# Health checks fast enough that a frozen replica is noticed within about a second.
FAST_HEALTH = {"health_check_period_s": 0.2, "health_check_timeout_s": 0.3,
               "health_check_failure_threshold": 2}


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def signals(tmp_path: Path) -> Iterator[Path]:
    """A directory for signal files; ``release`` is created at teardown whatever happened."""
    yield tmp_path
    (tmp_path / "release").touch()


def alive(pid: int) -> bool:
    return start_time(pid) is not None


def pool(count: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(count)


def marker(path: Path) -> Optional[str]:
    return path.read_text() if path.exists() else None


def files(directory: Path, prefix: str) -> List[str]:
    return sorted(p.name for p in directory.iterdir()
                  if p.name.startswith(prefix) and not p.name.endswith(".tmp"))


def two_replicas(handle: Any) -> Dict[str, int]:
    """{tag: pid} of the replicas that answer two requests sent together (each holds its
    replica 0.3 s, and the router sends a request to the replica with the fewest)."""
    responses = [handle.remote(0.3) for _ in range(2)]
    answers = [response.result(timeout=TIMEOUT) for response in responses]
    return {answer["tag"]: answer["pid"] for answer in answers}


class Traffic:
    """Requests sent one after another from a thread until ``stop``; their outcomes."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.answers: List[dict] = []
        self.errors: List[BaseException] = []
        self._running = True
        self._pool = pool(1)
        self._future = self._pool.submit(self._run)

    def _run(self) -> None:
        while self._running:
            try:
                self.answers.append(self.handle.remote().result(timeout=TIMEOUT))
            except Exception as exc:
                self.errors.append(exc)
            time.sleep(0.02)  # pacing, not synchronisation

    def stop(self) -> None:
        self._running = False
        self._future.result(timeout=TIMEOUT * 2)
        self._pool.shutdown()


# --------------------------------------------------------------------------- 2. health


def test_health_check_defaults_are_in_the_backend_config(serve_instance):
    client, _ = serve_instance
    client.create_backend("defaults", echo_function)
    config = client.get_backend_config("defaults")
    # As the README says: a ping every 1 s, each allowed 1 s, replaced after 3 misses.
    assert (config.health_check_period_s, config.health_check_timeout_s,
            config.health_check_failure_threshold) == (1.0, 1.0, 3)
    assert config.sync_threads == 1
    client.create_backend("fast", echo_function, config=FAST_HEALTH)
    fast = client.get_backend_config("fast")
    assert (fast.health_check_period_s, fast.health_check_timeout_s,
            fast.health_check_failure_threshold) == (0.2, 0.3, 2)


def _replaced_while_others_succeed(client: serve.Client, handle: Any, directory: Path,
                                   method: str, stop_it: Any) -> None:
    """Hold one of two replicas with ``method`` (the other stays free), ``stop_it(pid)``, and
    check: the held request fails naming the replica, within seconds; requests meanwhile all
    succeed on the other one; a new replica (new tag, new pid) takes the stopped one's place."""
    before = two_replicas(handle)
    assert len(before) == 2, before
    held = handle.options(method_name=method).remote("x")
    wait_for(lambda: marker(directory / f"{method}-x"), TIMEOUT, f"{method} to start")
    tag, pid = marker(directory / f"{method}-x").split()  # type: ignore[union-attr]
    (other,) = set(before) - {tag}
    traffic = Traffic(handle)
    try:
        stopped_at = time.monotonic()
        stop_it(int(pid))
        with pytest.raises(BackendUnavailableError) as info:
            held.result(timeout=TIMEOUT)
        taken_out = time.monotonic() - stopped_at
        assert tag in str(info.value)
        assert taken_out < 5.0, f"the stopped replica was replaced after {taken_out:.1f}s"
        wait_for(lambda: not alive(int(pid)), TIMEOUT, f"the stopped replica {pid} to be gone")

        def replaced() -> bool:
            now = two_replicas(handle)
            return len(now) == 2 and other in now and tag not in now

        wait_for(replaced, TIMEOUT, "a new replica next to the surviving one")
        now = two_replicas(handle)
        (new,) = set(now) - {other}
        assert new != tag and new.startswith(f"{handle.endpoint_name}#")
        assert now[new] != int(pid) and now[other] == before[other]
    finally:
        traffic.stop()
    assert traffic.errors == [], traffic.errors[:3]
    assert len(traffic.answers) > 0
    seen = {answer["tag"] for answer in traffic.answers}
    assert tag not in seen and other in seen, seen
    assert {answer["pid"] for answer in traffic.answers}.isdisjoint({int(pid)})


def test_replica_with_a_blocked_event_loop_is_replaced(serve_instance, signals):
    client, _ = serve_instance
    client.create_backend("frozen-loop", Freezable, str(signals),
                          config={"num_replicas": 2, **FAST_HEALTH})
    client.create_endpoint("frozen-loop", backend="frozen-loop")
    _replaced_while_others_succeed(client, client.get_handle("frozen-loop"), signals,
                                   "freeze", lambda pid: None)


def test_sigstopped_replica_is_replaced(serve_instance, signals):
    client, _ = serve_instance
    client.create_backend("sigstop", Freezable, str(signals),
                          config={"num_replicas": 2, **FAST_HEALTH})
    client.create_endpoint("sigstop", backend="sigstop")
    stopped: List[int] = []

    def sigstop(pid: int) -> None:
        stopped.append(pid)
        os.kill(pid, signal.SIGSTOP)

    try:
        _replaced_while_others_succeed(client, client.get_handle("sigstop"), signals,
                                       "hold", sigstop)
    finally:
        for pid in stopped:
            if alive(pid):
                os.kill(pid, signal.SIGCONT)


def test_replica_whose_check_health_raises_is_replaced_at_once(serve_instance, tmp_path):
    client, _ = serve_instance
    # 50 failed pings 0.2 s apart would take 10 s: only an immediate replacement is in time.
    client.create_backend("health-flag", HealthFlag, str(tmp_path),
                          config={"health_check_period_s": 0.2, "health_check_timeout_s": 2.0,
                                  "health_check_failure_threshold": 50})
    client.create_endpoint("health-flag", backend="health-flag")
    handle = client.get_handle("health-flag")
    first = handle.remote().result(timeout=TIMEOUT)

    (tmp_path / f"unhealthy-{first['tag']}").touch()
    wait_for(lambda: not alive(first["pid"]), 3.0, "the unhealthy replica to be stopped")
    second = handle.remote().result(timeout=TIMEOUT)
    assert second["tag"] != first["tag"] and second["pid"] != first["pid"]
    # The replacement is healthy and stays.
    time.sleep(0.6)  # three health periods: not synchronisation, a window to fail in
    assert handle.remote().result(timeout=TIMEOUT) == second


# --------------------------------------------------------------------------- 2. the proxy


def proxy_pid(client: serve.Client) -> Optional[int]:
    """The pid of the instance's HTTP proxy, as its controller reports it."""
    processes = client._call("status")["processes"]
    pids = [p["pid"] for p in processes if p["role"] == "proxy"]
    return pids[0] if pids else None


def test_failed_proxy_restart_is_retried_until_the_proxy_is_back(tmp_path, monkeypatch,
                                                                  capfd):
    monkeypatch.setenv("SERVEKIT_MAX_RESTART_BACKOFF_S", "0.5")  # the controller inherits it
    flag = tmp_path / "flaky"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client = serve.start(http_options={
        "port": port, "middlewares": [Middleware(FlakyMiddleware, flag=str(flag))]})
    log: List[str] = []

    def controller_log() -> str:
        log.append(capfd.readouterr().err)
        return "".join(log)

    try:
        client.create_backend("echo", echo_function)
        client.create_endpoint("echo", backend="echo", route="/echo")
        assert httpx.get(f"{url}/echo", params={"x": 1}, timeout=TIMEOUT).text == "fn:1"
        first = proxy_pid(client)
        assert first is not None

        flag.touch()
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: "could not be restarted" in controller_log(), TIMEOUT,
                 "the controller to log a failed proxy restart")
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/-/healthz", timeout=0.5)  # still down

        flag.unlink()

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/-/healthz", timeout=1.0).text == "success"
            except httpx.TransportError:
                return False

        wait_for(healthy, TIMEOUT, "the HTTP proxy to come back once it can start")
        second = proxy_pid(client)
        assert second is not None and second != first
        assert httpx.get(f"{url}/echo", params={"x": 2}, timeout=TIMEOUT).text == "fn:2"
        assert client.get_handle("echo").remote(3).result(timeout=TIMEOUT) == "fn:3"
    finally:
        if flag.exists():
            flag.unlink()
        client.shutdown()


def test_the_first_proxy_and_replica_start_beside_the_controller_which_adopts_them():
    """The supervisor starts the first proxy and the first replica while the controller
    starts (its children, not the controller's); the controller runs those, and they
    serve. The second replica is the controller's own."""
    port = free_port()
    client = serve.start(http_options={"port": port})
    try:
        client.create_backend("echo", echo_function)
        client.create_endpoint("echo", backend="echo", route="/echo")
        assert httpx.get(f"http://127.0.0.1:{port}/echo", params={"x": 1},
                         timeout=TIMEOUT).text == "fn:1"
        client.update_backend_config("echo", {"num_replicas": 2})
        processes = client._call("status")["processes"]
        parents = {p["pid"]: parent_pid(p["pid"]) for p in processes}
        [supervisor] = [p["pid"] for p in processes if p["role"] == "supervisor"]
        [controller] = [p["pid"] for p in processes if p["role"] == "controller"]
        [proxy] = [p["pid"] for p in processes if p["role"] == "proxy"]
        replicas = [p["pid"] for p in processes if p["role"] == "replica"]
        assert parents[proxy] == parents[controller] == supervisor
        assert sorted(parents[pid] for pid in replicas) == sorted([supervisor, controller])
        assert client.get_handle("echo").remote(2).result(timeout=TIMEOUT) == "fn:2"
    finally:
        client.shutdown()


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


# --------------------------------------------------------------------------- 3. execution


def test_sync_class_sees_one_call_at_a_time_by_default(serve_instance, tmp_path):
    client, _ = serve_instance
    client.create_backend("serial", Concurrency, str(tmp_path))
    client.create_endpoint("serial", backend="serial")
    config = client.get_backend_config("serial")
    assert (config.sync_threads, config.max_concurrent_queries) == (1, None)
    work = client.get_handle("serial").options(method_name="work")

    responses = [work.remote(0.05) for _ in range(16)]  # 8 in the replica, 8 wait
    assert [r.result(timeout=TIMEOUT) for r in responses] == [1] * 16
    assert client.get_handle("serial").remote().result(timeout=TIMEOUT) == 1


def test_sync_threads_runs_that_many_calls_at_once(serve_instance, signals):
    client, _ = serve_instance
    client.create_backend("threaded", Concurrency, str(signals),
                          config={"sync_threads": 4, "max_concurrent_queries": 8})
    client.create_endpoint("threaded", backend="threaded")
    gated = client.get_handle("threaded").options(method_name="gated")

    responses = [gated.remote(i) for i in range(8)]  # all 8 fit the replica's cap
    wait_for(lambda: len(files(signals, "started-")) >= 4, TIMEOUT, "4 calls to start")
    time.sleep(0.5)  # not synchronisation: a window for a fifth call to start in
    assert len(files(signals, "started-")) == 4, files(signals, "started-")

    (signals / "release").touch()
    results = [r.result(timeout=TIMEOUT) for r in responses]
    assert max(results) == 4, results
    assert len(files(signals, "started-")) == 8
    assert client.get_handle("threaded").remote().result(timeout=TIMEOUT) == 4


def test_reconfigure_waits_for_the_running_request(serve_instance, signals):
    client, _ = serve_instance
    client.create_backend("gated-config", GatedConfig, str(signals),
                          config={"user_config": {"v": 1}})
    client.create_endpoint("gated-config", backend="gated-config")
    handle = client.get_handle("gated-config")
    events = signals / "events"

    def log() -> List[str]:
        return events.read_text().splitlines() if events.exists() else []

    blocked = handle.remote("block")
    wait_for(lambda: "call-start" in log(), TIMEOUT, "the request to start")
    with pool(1) as executor:
        update = executor.submit(client.update_backend_config, "gated-config",
                                 {"user_config": {"v": 2}})
        wait_for(lambda: client.get_backend_config("gated-config").user_config == {"v": 2},
                 TIMEOUT, "the controller to take the update")
        time.sleep(0.5)  # not synchronisation: a window for reconfigure to start in
        assert not update.done(), "update_backend_config returned while a request ran"
        assert log() == ["reconfigure-start 1", "reconfigure-end 1", "call-start"]

        (signals / "release").touch()
        update.result(timeout=TIMEOUT)
    assert blocked.result(timeout=TIMEOUT) == {"v": 1}
    assert log() == ["reconfigure-start 1", "reconfigure-end 1", "call-start", "call-end",
                     "reconfigure-start 2", "reconfigure-end 2"]
    assert handle.remote().result(timeout=TIMEOUT) == {"v": 2}


def replica_pids(client: serve.Client, backend: str) -> Dict[str, int]:
    """{tag: pid} of the backend's running replicas, as the controller reports them."""
    return {p["name"]: p["pid"] for p in client._call("status")["processes"]
            if p["role"] == "replica" and p["name"].startswith(f"{backend}#")
            and p["state"] == "RUNNING"}


def test_a_reconfigure_waiting_for_a_request_holds_up_nothing_else(serve_instance, signals):
    """While one backend's replicas wait to apply a user_config (a request still runs),
    other API calls return and a dead replica of another backend is replaced."""
    client, _ = serve_instance
    client.create_backend("gated-config", GatedConfig, str(signals),
                          config={"user_config": {"v": 1}})
    client.create_endpoint("gated-config", backend="gated-config")
    client.create_backend("bystander", lambda request: os.getpid())
    client.create_endpoint("bystander", backend="bystander")
    events = signals / "events"
    blocked = client.get_handle("gated-config").remote("block")
    wait_for(lambda: events.exists() and "call-start" in events.read_text(), TIMEOUT,
             "the request to start")
    with pool(1) as executor:
        update = executor.submit(client.update_backend_config, "gated-config",
                                 {"user_config": {"v": 2}})
        wait_for(lambda: client.get_backend_config("gated-config").user_config == {"v": 2},
                 TIMEOUT, "the controller to take the update")
        [(tag, pid)] = replica_pids(client, "bystander").items()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(replica_pids(client, "bystander")) == 1 and
                 tag not in replica_pids(client, "bystander"), TIMEOUT,
                 "the dead bystander replica to be replaced")
        client.update_backend_config("bystander", {"num_replicas": 2})
        assert len(replica_pids(client, "bystander")) == 2
        assert client.get_handle("bystander").remote().result(timeout=TIMEOUT) != pid
        assert not update.done(), "the update returned while a request ran"
        (signals / "release").touch()
        update.result(timeout=TIMEOUT)
    assert blocked.result(timeout=TIMEOUT) == {"v": 1}
    assert client.get_handle("gated-config").remote().result(timeout=TIMEOUT) == {"v": 2}


# --------------------------------------------------------------------------- 4. config


def test_replica_still_starting_during_a_user_config_change_runs_the_new_one(
        serve_instance, signals):
    client, _ = serve_instance
    client.create_backend("slow-start", SlowStart, str(signals),
                          config={"user_config": {"v": 1}})
    client.create_endpoint("slow-start", backend="slow-start")
    handle = client.get_handle("slow-start")
    first = handle.remote().result(timeout=TIMEOUT)
    assert first["config"] == {"v": 1}

    (signals / "hold").touch()
    with pool(2) as executor:
        scale = executor.submit(client.update_backend_config, "slow-start",
                                {"num_replicas": 2})
        wait_for(lambda: files(signals, "ctor-waiting-"), TIMEOUT,
                 "the new replica's constructor to block")
        (waiting,) = files(signals, "ctor-waiting-")
        new_tag = waiting[len("ctor-waiting-"):]
        change = executor.submit(client.update_backend_config, "slow-start",
                                 {"user_config": {"v": 2}})
        wait_for(lambda: client.get_backend_config("slow-start").user_config == {"v": 2},
                 TIMEOUT, "the controller to take the user_config change")
        assert not files(signals, "release")
        (signals / "release").touch()
        scale.result(timeout=TIMEOUT)
        change.result(timeout=TIMEOUT)

    config = client.get_backend_config("slow-start")
    assert (config.num_replicas, config.user_config) == (2, {"v": 2})
    answers = [handle.remote(0.3) for _ in range(2)]
    by_tag = {a["tag"]: a for a in (r.result(timeout=TIMEOUT) for r in answers)}
    assert set(by_tag) == {first["tag"], new_tag}, by_tag
    assert by_tag[first["tag"]]["pid"] == first["pid"]  # the first replica was kept
    assert by_tag[new_tag]["pid"] != first["pid"]
    assert {tag: a["config"] for tag, a in by_tag.items()} == {
        first["tag"]: {"v": 2}, new_tag: {"v": 2}}
    # Every later request too, whichever replica it reaches.
    responses = [handle.remote() for _ in range(8)]
    assert [r.result(timeout=TIMEOUT)["config"] for r in responses] == [{"v": 2}] * 8


def test_failed_scale_up_with_a_user_config_change_is_rolled_back(serve_instance, tmp_path):
    client, _ = serve_instance
    client.create_backend("rollback", SlowStart, str(tmp_path),
                          config={"user_config": {"v": 1}})
    client.create_endpoint("rollback", backend="rollback")
    handle = client.get_handle("rollback")
    first = handle.remote().result(timeout=TIMEOUT)

    (tmp_path / "fail").touch()
    with pytest.raises(StartError, match="fail flag is set"):
        client.update_backend_config("rollback",
                                     {"num_replicas": 2, "user_config": {"v": 2}})
    config = client.get_backend_config("rollback")
    assert (config.num_replicas, config.user_config) == (1, {"v": 1})
    # The running replica took {"v": 2} with the update; it runs {"v": 1} again.
    answers = [handle.remote().result(timeout=TIMEOUT) for _ in range(4)]
    assert answers == [first] * 4, answers

    # The backend is still usable.
    (tmp_path / "fail").unlink()
    client.update_backend_config("rollback", {"user_config": {"v": 3}})
    assert handle.remote().result(timeout=TIMEOUT)["config"] == {"v": 3}
