"""Crash recovery, fault injected: real processes, SIGKILL, real HTTP.

- The controller is SIGKILLed between API calls and in the middle of a scale-up: the
  supervisor starts a new one, which adopts the proxy and replicas that still run (same
  tags, same pids) and finishes what was under way; HTTP and handles keep answering
  meanwhile, and no change that returned success is lost.
- The proxy is SIGKILLed: it comes back on the same port with every route, and a change
  made right after the kill neither hangs nor fails.
- Detached instances: used and shut down from another process and through the CLI; every
  process SIGKILLed (a reboot) and brought back by ``servekit start`` from the state file; a
  corrupt state file refused cleanly; a graceful stop lets requests in flight finish.

Processes are identified by (pid, start time) through /proc, and every pid is checked
before it is signalled. A detached instance's processes are found by the tmp
``SERVEKIT_HOME`` in their environment (never by name), and always killed in teardown.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import httpx
import pytest
from processes import (
    cmdline,
    descendants,
    is_worker,
    kill_leftovers,
    snapshot,
    start_time,
    still_alive,
)
from recovery_backends import GatedStart, Whoami

import servekit as serve
from conftest import free_port, wait_for

pytestmark = pytest.mark.integration

TIMEOUT = 20.0
INTEGRATION_DIR = os.path.dirname(os.path.abspath(__file__))
_SCRIPT_DIR = os.path.dirname(sys.executable)
CLI = [os.path.join(_SCRIPT_DIR, "servekit")] if os.path.exists(
    os.path.join(_SCRIPT_DIR, "servekit")) else [sys.executable, "-m", "servekit.cli"]


# --------------------------------------------------------------------------- helpers


def status(client: serve.Client) -> dict:
    return client._call("status")


def role_pids(state: dict, role: str) -> List[int]:
    return [p["pid"] for p in state["processes"] if p["role"] == role]


def only_pid(state: dict, role: str) -> int:
    pids = role_pids(state, role)
    assert len(pids) == 1, (role, state["processes"])
    return pids[0]


def replicas(state: dict, backend: str, *states: str) -> Dict[str, int]:
    """{replica tag: pid} of ``backend``'s replicas (in one of ``states``, if given)."""
    return {p["name"]: p["pid"] for p in state["processes"]
            if p["role"] == "replica" and p["name"].startswith(f"{backend}#")
            and (not states or p["state"] in states)}


def all_pids(state: dict) -> Dict[int, int]:
    """pid -> start time of every process the status lists (those alive now)."""
    return snapshot(p["pid"] for p in state["processes"] if p["pid"] is not None)


def signal_process(pid: int, sig: int, started: Optional[int] = None) -> None:
    """Send ``sig`` to ``pid`` through a pidfd, after checking it is a servekit worker (and
    the process that started at ``started``): a recycled pid is never signalled."""
    fd = os.pidfd_open(pid)
    try:
        now = start_time(pid)
        assert now is not None, f"pid {pid} is gone"
        assert started is None or now == started, f"pid {pid} is another process now"
        assert is_worker(pid), f"pid {pid} is not a servekit worker"
        signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def sigkill(pid: int, started: Optional[int] = None) -> None:
    """SIGKILL ``pid`` (checked first) and return once it has exited."""
    fd = os.pidfd_open(pid)
    try:
        signal_process(pid, signal.SIGKILL, started)
        assert select.select([fd], [], [], 10)[0], f"pid {pid} survived SIGKILL"
    finally:
        os.close(fd)


def parent(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None



def within(seconds: float, function: Callable, *args: Any) -> Any:
    """``function(*args)`` on a thread; fail the test if it has not returned in ``seconds``
    (a hung call is a finding, not a reason to hang the suite)."""
    executor = concurrent.futures.ThreadPoolExecutor(1)
    try:
        future = executor.submit(function, *args)
        try:
            return future.result(timeout=seconds)
        except concurrent.futures.TimeoutError:
            pytest.fail(f"{getattr(function, '__name__', function)}{args} did not return "
                        f"within {seconds}s")
    finally:
        executor.shutdown(wait=False)


def get(port: int, path: str, timeout: float = 10.0, **params: Any) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", params=params, timeout=timeout)


def healthy(port: int) -> bool:
    try:
        return get(port, "/-/healthz", timeout=1.0).text == "success"
    except httpx.TransportError:
        return False


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def listening_inodes(port: int) -> set:
    """Inodes of the TCP sockets listening on ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    return inodes


def holds_listener(pid: int, port: int) -> bool:
    """Whether process ``pid`` has an fd on the socket listening on ``port``."""
    wanted = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                return True
        except OSError:
            pass
    return False


@pytest.fixture
def local_instance() -> Iterator[tuple]:
    """A non-detached instance of this test process: (client, port). Whatever happened,
    it is shut down afterwards and any of its processes still running is killed."""
    port = free_port()
    client = serve.start(http_options={"port": port})
    assert client._instance is not None
    supervisor = client._instance.pid
    seen = snapshot([supervisor])
    try:
        yield client, port
    finally:
        seen.update(snapshot(descendants(supervisor)))
        try:
            if not client._shut_down:
                within(60, client.shutdown)
        finally:
            kill_leftovers(seen)


# --------------------------------------------------------------------------- 1. controller


def test_controller_killed_three_times_between_api_calls(local_instance):
    client, port = local_instance
    client.create_backend("base", Whoami, "base",
                          config={"num_replicas": 2, "user_config": {"v": 1}})
    client.create_endpoint("base", backend="base", route="/base")
    handle = client.get_handle("base")
    assert handle.remote("warm").result(timeout=TIMEOUT)["config"] == {"v": 1}
    before = status(client)
    supervisor = only_pid(before, "supervisor")
    proxy = only_pid(before, "proxy")
    base_replicas = replicas(before, "base", "RUNNING")
    assert len(base_replicas) == 2, before["processes"]
    workers = all_pids(before)
    controllers = [only_pid(before, "controller")]
    answers: List[dict] = []

    def serve_while_down(round_: int) -> None:
        for i in range(3):
            response = get(port, "/base", x=f"http-{round_}-{i}")
            assert response.status_code == 200, response.text
            answers.append(response.json())
            answers.append(handle.remote(f"handle-{round_}-{i}").result(timeout=TIMEOUT))

    api_calls: List[Callable[[], None]] = [
        lambda: client.create_backend("second", Whoami, "second"),
        lambda: client.create_endpoint("second", backend="second", route="/second"),
        lambda: client.update_backend_config("base", {"user_config": {"v": 2}}),
    ]
    executor = concurrent.futures.ThreadPoolExecutor(1)
    try:
        for round_, api_call in enumerate(api_calls):
            controller = controllers[-1]
            # The supervisor is frozen while the controller is dead, so that the requests
            # and the API call below certainly meet an instance without a controller.
            signal_process(supervisor, signal.SIGSTOP, workers[supervisor])
            try:
                sigkill(controller, workers.get(controller))
                call = executor.submit(api_call)
                serve_while_down(round_)
                assert not call.done(), f"an API call returned without a controller: {call}"
            finally:
                signal_process(supervisor, signal.SIGCONT, workers[supervisor])
            try:
                call.result(timeout=TIMEOUT * 2)  # it waited for the new controller
            except concurrent.futures.TimeoutError:
                pytest.fail(f"API call {round_} did not return within {TIMEOUT * 2}s of "
                            "the controller's restart")
            now = status(client)
            controllers.append(only_pid(now, "controller"))
            assert controllers[-1] not in controllers[:-1], controllers
            workers.update(all_pids(now))
    finally:
        executor.shutdown(wait=False)
    # A change right after the third restart, and one more kill, the supervisor left to
    # restart the controller as it would (0.2 s or more: it keeps dying quickly).
    client.set_traffic("second", {"second": 0.5, "base": 0.5})
    sigkill(controllers[-1], workers.get(controllers[-1]))
    serve_while_down(len(api_calls))

    # Every committed change is there.
    assert sorted(client.list_backends()) == ["base", "second"]
    assert client.get_backend_config("base").user_config == {"v": 2}
    assert client.get_backend_config("base").num_replicas == 2
    assert client.get_backend_config("second").num_replicas == 1
    endpoints = client.list_endpoints()
    assert sorted(endpoints) == ["base", "second"]
    assert (endpoints["base"]["route"], endpoints["base"]["traffic"]) == ("/base", {"base": 1.0})
    assert endpoints["second"]["route"] == "/second"
    assert endpoints["second"]["traffic"] == {"second": 0.5, "base": 0.5}
    # Requests during the downtimes were answered by the original replicas.
    assert len(answers) == 6 * (len(api_calls) + 1)
    assert {(a["tag"], a["pid"]) for a in answers} <= set(base_replicas.items()), answers
    # The same replicas and proxy, adopted by every controller; the same supervisor.
    after = status(client)
    assert replicas(after, "base") == base_replicas, after["processes"]
    assert replicas(after, "base", "RUNNING") == base_replicas
    assert only_pid(after, "proxy") == proxy
    assert only_pid(after, "supervisor") == supervisor
    assert after["backends"]["base"]["running"] == 2
    assert after["backends"]["second"]["running"] == 1
    assert still_alive({pid: workers[pid] for pid in (proxy, *base_replicas.values())}) == \
        [proxy, *base_replicas.values()]
    # The adopted replicas run the new user_config; the new routes serve.
    responses = [handle.remote(f"after-{i}") for i in range(8)]
    assert {r.result(timeout=TIMEOUT)["config"]["v"] for r in responses} == {2}
    assert get(port, "/base", x=1).json()["config"] == {"v": 2}
    assert {get(port, "/second", x=i).json()["name"] for i in range(30)} == {"base", "second"}
    # A shutdown after the recoveries stops every process, adopted ones included.
    workers.update(all_pids(after))
    within(60, client.shutdown)
    wait_for(lambda: still_alive(workers) == [], 10, "every process to stop after shutdown")
    assert port_is_free(port)


@pytest.fixture
def quick_controller_pings(monkeypatch: pytest.MonkeyPatch) -> float:
    """The supervisor gives up on a silent controller after 3 pings of 0.3 s (about 4 s)."""
    monkeypatch.setenv("SERVEKIT_CONTROLLER_PING_TIMEOUT_S", "0.3")
    return 0.3


def test_frozen_controller_is_killed_and_replaced(quick_controller_pings, local_instance):
    """A controller that stops answering (SIGSTOP) is killed by the supervisor and a new
    one adopts the replicas; HTTP serves meanwhile, and a client call made to the frozen
    controller returns once the new one is up."""
    client, port = local_instance
    client.create_backend("base", Whoami, "base", config={"num_replicas": 2})
    client.create_endpoint("base", backend="base", route="/base")
    before = status(client)
    controller = only_pid(before, "controller")
    base_replicas = replicas(before, "base", "RUNNING")
    started = start_time(controller)
    signal_process(controller, signal.SIGSTOP, started)
    try:
        assert get(port, "/base", x="frozen").json()["name"] == "base"
        config = within(TIMEOUT, client.get_backend_config, "base")  # waits, then succeeds
    finally:
        if start_time(controller) == started:
            signal_process(controller, signal.SIGCONT, started)
    assert config.num_replicas == 2
    assert start_time(controller) != started, "the frozen controller still runs"
    after = status(client)
    assert only_pid(after, "controller") != controller
    assert replicas(after, "base", "RUNNING") == base_replicas, after["processes"]
    assert get(port, "/base", x="after").json()["name"] == "base"


def test_controller_killed_during_a_scale_up(local_instance, tmp_path):
    client, port = local_instance
    directory = str(tmp_path)
    client.create_backend("gated", GatedStart, directory)
    client.create_endpoint("gated", backend="gated", route="/gated")
    first = replicas(status(client), "gated", "RUNNING")
    assert len(first) == 1, first
    ((first_tag, first_pid),) = first.items()

    def waiting() -> Dict[str, int]:
        return {name[len("ctor-waiting-"):]: int((tmp_path / name).read_text())
                for name in os.listdir(directory)
                if name.startswith("ctor-waiting-") and not name.endswith(".tmp")}

    (tmp_path / "hold").touch()
    executor = concurrent.futures.ThreadPoolExecutor(1)
    try:
        update = executor.submit(client.update_backend_config, "gated", {"num_replicas": 3})
        wait_for(lambda: len(waiting()) == 2, TIMEOUT,
                 "both new replicas to be in their constructors")
        starting = waiting()
        state = status(client)
        assert replicas(state, "gated", "STARTING") == starting, state["processes"]
        controller = only_pid(state, "controller")
        sigkill(controller)
        assert not update.done(), "the update returned while replicas were still starting"

        # The new controller has adopted the replicas still starting: same tags, same pids.
        state = within(TIMEOUT, status, client)
        assert only_pid(state, "controller") != controller
        assert replicas(state, "gated", "STARTING") == starting, state["processes"]
        assert replicas(state, "gated", "RUNNING") == first
        assert not update.done(), "the update returned while replicas were still starting"

        (tmp_path / "release").touch()
        try:
            update.result(timeout=TIMEOUT)  # waits on its goal again, then succeeds
        except concurrent.futures.TimeoutError:
            pytest.fail(f"update_backend_config did not return within {TIMEOUT}s of the "
                        "release")
        # It returned once every replica runs: no waiting needed here.
        state = status(client)
    finally:
        (tmp_path / "release").touch()
        executor.shutdown(wait=False)
    assert state["backends"]["gated"]["running"] == 3, state["backends"]
    assert state["backends"]["gated"]["target"] == 3
    assert replicas(state, "gated", "RUNNING") == {**first, **starting}, state["processes"]
    assert client.get_backend_config("gated").num_replicas == 3
    # Three constructors ran in all: nothing was restarted.
    done = sorted(n for n in os.listdir(directory)
                  if n.startswith("ctor-done-") and not n.endswith(".tmp"))
    assert done == sorted(f"ctor-done-{tag}" for tag in (first_tag, *starting)), done
    assert start_time(first_pid) is not None
    # All three serve.
    handle = client.get_handle("gated")

    def all_three_serve() -> bool:
        responses = [handle.remote() for _ in range(6)]
        served = {(r["tag"], r["pid"]) for r in (x.result(timeout=TIMEOUT) for x in responses)}
        assert served <= set({**first, **starting}.items()), served
        return len(served) == 3

    wait_for(all_three_serve, TIMEOUT, "requests to reach all three replicas")
    assert get(port, "/gated").json()["tag"] in {first_tag, *starting}


def test_a_change_that_cannot_be_saved_fails_whole_and_a_retry_works(local_instance):
    """A user_config the state file cannot hold (a lambda) fails the call, naming it:
    nothing of it is listed or served, the same tag can be created at once, and every
    change that succeeded survives a controller crash."""
    client, port = local_instance
    with pytest.raises(TypeError, match="user_config of backend 'm' cannot be saved"):
        client.create_backend("m", Whoami, "m", config={"user_config": lambda: 1})
    assert client.list_backends() == {}
    assert replicas(status(client), "m") == {}
    client.create_backend("m", Whoami, "m", config={"user_config": {"v": 1}})
    client.create_endpoint("m", backend="m", route="/m")
    with pytest.raises(TypeError, match="user_config of backend 'm' cannot be saved"):
        client.update_backend_config("m", {"user_config": lambda: 2})
    assert client.get_backend_config("m").user_config == {"v": 1}
    assert get(port, "/m").json()["config"] == {"v": 1}
    client.update_backend_config("m", {"num_replicas": 2})

    sigkill(only_pid(status(client), "controller"))
    state = within(TIMEOUT, status, client)  # from the restarted controller
    assert state["backends"]["m"]["running"] == 2, state["backends"]
    assert client.get_backend_config("m").user_config == {"v": 1}
    assert client.get_backend_config("m").num_replicas == 2
    assert client.list_endpoints()["m"]["route"] == "/m"
    assert get(port, "/m").json()["config"] == {"v": 1}


def test_an_acknowledged_scale_up_survives_a_crash_whose_new_replicas_fail(local_instance,
                                                                            tmp_path):
    """update_backend_config(num_replicas=2) returned; then the controller and every
    replica die, and the replicas the restarted controller starts die in their
    constructors. The scale-up stays: the backend is not rolled back to 1 replica, and
    reaches 2 once replicas start again."""
    client, port = local_instance
    directory = str(tmp_path)
    client.create_backend("gated", GatedStart, directory)
    client.update_backend_config("gated", {"num_replicas": 2})  # acknowledged
    state = status(client)
    supervisor = only_pid(state, "supervisor")
    workers = all_pids(state)
    old = replicas(state, "gated", "RUNNING")
    assert len(old) == 2, state["processes"]

    def waiting() -> Dict[str, int]:
        return {name[len("ctor-waiting-"):]: int((tmp_path / name).read_text())
                for name in os.listdir(directory)
                if name.startswith("ctor-waiting-") and not name.endswith(".tmp")}

    (tmp_path / "hold").touch()  # new replicas block in their constructors
    signal_process(supervisor, signal.SIGSTOP, workers[supervisor])
    try:
        sigkill(only_pid(state, "controller"))
        for pid in old.values():
            sigkill(pid, workers[pid])
    finally:
        signal_process(supervisor, signal.SIGCONT, workers[supervisor])
    try:
        starting = wait_for(lambda: len(waiting()) == 2 and waiting(), TIMEOUT,
                            "the restarted controller's two new replicas")
        for pid in starting.values():
            sigkill(pid)
        wait_for(lambda: status(client)["backends"]["gated"]["last_start_error"], TIMEOUT,
                 "the new replicas' failure to be seen")
        assert client.get_backend_config("gated").num_replicas == 2
        assert status(client)["backends"]["gated"]["target"] == 2
    finally:
        (tmp_path / "release").touch()
    (tmp_path / "hold").unlink()
    wait_for(lambda: status(client)["backends"]["gated"]["running"] == 2, TIMEOUT * 2,
             "two running replicas again")
    assert client.get_backend_config("gated").num_replicas == 2


# --------------------------------------------------------------------------- 3. proxy


def test_proxy_killed_comes_back_with_every_route_and_changes_do_not_hang(local_instance):
    client, port = local_instance
    client.create_backend("a", Whoami, "a")
    client.create_backend("b", Whoami, "b")
    client.create_endpoint("a", backend="a", route="/a")
    client.create_endpoint("b", backend="b", route="/b")
    assert get(port, "/a").json()["name"] == "a"
    assert get(port, "/b").json()["name"] == "b"
    state = status(client)
    proxy = only_pid(state, "proxy")
    replica_pids = {**replicas(state, "a"), **replicas(state, "b")}

    killed_at = time.monotonic()
    sigkill(proxy)
    started = time.monotonic()
    within(10, client.set_traffic, "a", {"b": 1.0})
    set_traffic_s = time.monotonic() - started
    started = time.monotonic()
    within(10, lambda: client.create_endpoint("c", backend="a", route="/c"))
    create_endpoint_s = time.monotonic() - started
    assert set_traffic_s < 10 and create_endpoint_s < 10

    wait_for(lambda: healthy(port), 15, "HTTP to come back on the same port")
    back_after = time.monotonic() - killed_at
    assert back_after < 5, f"HTTP came back only {back_after:.1f}s after the kill"
    # The new proxy serves every route from its first request: no waiting here.
    routes = get(port, "/-/routes").json()
    assert routes == {"/a": ["a", ["GET"]], "/b": ["b", ["GET"]], "/c": ["c", ["GET"]]}
    assert {get(port, "/a", x=i).json()["name"] for i in range(5)} == {"b"}  # new traffic
    assert get(port, "/b").json()["name"] == "b"
    assert get(port, "/c").json()["name"] == "a"
    state = status(client)
    assert only_pid(state, "proxy") != proxy
    assert {**replicas(state, "a"), **replicas(state, "b")} == replica_pids
    assert client.list_endpoints()["a"]["traffic"] == {"b": 1.0}


# --------------------------------------------------------------------------- detached


class Detached:
    """A tmp ``SERVEKIT_HOME`` for detached instances: runs the CLI and scripts with it, and
    finds the processes that were started with it (by their environment)."""

    def __init__(self, home: Path, port: int) -> None:
        self.home = home
        self.port = port
        self.env = {**os.environ, "SERVEKIT_HOME": str(home)}

    @property
    def instance_dir(self) -> Path:
        return self.home / "instance"

    @property
    def state_file(self) -> Path:
        return self.instance_dir / "state.db"

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def script(self, code: str, timeout: float = 60) -> subprocess.CompletedProcess:
        source = f"import sys\nsys.path.insert(0, {INTEGRATION_DIR!r})\n" + \
            textwrap.dedent(code)
        return subprocess.run([sys.executable, "-c", source], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def log(self) -> str:
        path = self.home / "detached.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"

    def processes(self) -> Dict[int, int]:
        """pid -> start time of every live servekit worker started with this home."""
        marker = f"SERVEKIT_HOME={self.home}".encode()
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
            except OSError:
                continue
            if marker in environ and is_worker(int(entry)):
                started = start_time(int(entry))
                if started is not None:
                    found[int(entry)] = started
        return found

    def status(self) -> dict:
        result = self.cli("status", "--json")
        assert result.returncode == 0, (result.stderr, self.log())
        return json.loads(result.stdout)


@pytest.fixture
def detached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Detached]:
    from servekit._private import constants

    home = tmp_path / "home"
    monkeypatch.setattr(constants, "SERVEKIT_HOME", str(home))  # this process's connect()
    instance = Detached(home, free_port())
    try:
        yield instance
    finally:
        try:
            if instance.processes():
                instance.cli("shutdown", timeout=40)
        except subprocess.TimeoutExpired:
            pass
        finally:
            kill_leftovers(instance.processes())


def assert_gone(instance: Detached, processes: Dict[int, int]) -> None:
    wait_for(lambda: still_alive(processes) == [] and not instance.processes(), 10,
             "every process of the instance to exit")
    wait_for(lambda: port_is_free(instance.port), 5, f"port {instance.port} to be free")


START_AND_DEPLOY = """
import json
import servekit as serve
from recovery_backends import Whoami

client = serve.start(detached=True, http_options={{"port": {port}}})
client.create_backend("who", Whoami, "who", config={{"num_replicas": 2}})
client.create_endpoint("who", backend="who", route="/who")
print(json.dumps(client._call("status")))
"""


def test_detached_instance_used_and_shut_down_from_another_process(detached):
    started = detached.script(START_AND_DEPLOY.format(port=detached.port))
    assert started.returncode == 0, (started.stderr, detached.log())
    processes = all_pids(json.loads(started.stdout.strip().splitlines()[-1]))
    assert len(processes) == 5, processes  # supervisor, controller, proxy, two replicas
    assert set(processes) == set(detached.processes())

    # This process is process B: it only connects.
    client = serve.connect()
    assert sorted(client.list_endpoints()) == ["who"]
    response = get(detached.port, "/who", x="http")
    assert response.status_code == 200 and response.json()["x"] == "http", response.text
    answer = client.get_handle("who").remote("handle").result(timeout=TIMEOUT)
    assert answer["x"] == "handle" and answer["pid"] in processes
    processes.update(all_pids(status(client)))

    within(40, client.shutdown)

    assert_gone(detached, processes)
    assert not detached.instance_dir.exists(), list(detached.instance_dir.iterdir())
    # (The record file may stay behind, naming the dead supervisor; it must not count.)
    with pytest.raises(serve.ServeError, match="no instance running"):
        serve.connect()


DEPLOY = """
import servekit as serve

def greet(request):
    return "hi " + request.query_params.get("x", "")

client = serve.connect()
client.create_backend("greet", greet, config={"num_replicas": 2})
client.create_endpoint("greet", backend="greet", route="/greet")
"""


def test_detached_instance_through_the_cli(detached):
    started = detached.cli("start", "--http-port", str(detached.port))
    assert started.returncode == 0, (started.stderr, detached.log())
    assert f":{detached.port}" in started.stdout
    deployed = detached.script(DEPLOY)
    assert deployed.returncode == 0, (deployed.stderr, detached.log())
    assert get(detached.port, "/greet", x="cli").text == "hi cli"

    table = detached.cli("status")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert any(line.split()[:3] == ["greet", "HEALTHY", "2/2"] for line in lines), table.stdout
    assert any(line.split()[:2] == ["greet", "/greet"] for line in lines), table.stdout
    state = detached.status()
    assert state["backends"]["greet"]["running"] == 2
    assert state["endpoints"]["greet"]["route"] == "/greet"
    processes = all_pids(state)
    assert len(processes) == 5 and set(processes) == set(detached.processes()), state

    stopped = detached.cli("shutdown")
    assert stopped.returncode == 0, (stopped.stderr, detached.log())
    assert_gone(detached, processes)
    assert not detached.instance_dir.exists()

    after = detached.cli("status")
    assert after.returncode == 1, after
    assert after.stdout == ""
    assert len(after.stderr.splitlines()) == 1 and after.stderr.startswith("Error:"), \
        after.stderr
    assert "Traceback" not in after.stderr


def kill_everything(processes: Dict[int, int]) -> None:
    """A reboot: freeze every process first (none sees another die), then SIGKILL all."""
    for pid, started in processes.items():
        signal_process(pid, signal.SIGSTOP, started)
    for pid, started in processes.items():
        sigkill(pid, started)


WHOLE = """
import os
import servekit as serve

def answer(request):
    return {"answer": int(request.query_params["x"]) * 2, "pid": os.getpid()}

client = serve.connect()
client.create_backend("double", answer, config={"num_replicas": 2})
client.create_endpoint("double", backend="double", route="/double")
"""


def test_whole_instance_comes_back_after_every_process_was_killed(detached):
    started = detached.cli("start", "--http-port", str(detached.port))
    assert started.returncode == 0, (started.stderr, detached.log())
    deployed = detached.script(WHOLE)
    assert deployed.returncode == 0, (deployed.stderr, detached.log())
    before = get(detached.port, "/double", x=21).json()
    assert before["answer"] == 42
    state = detached.status()
    old = all_pids(state)
    assert len(old) == 5 and set(old) == set(detached.processes()), state["processes"]
    old_replicas = set(replicas(state, "double").values())

    kill_everything(old)
    assert detached.processes() == {}
    assert port_is_free(detached.port)
    assert detached.state_file.exists()

    restarted = detached.cli("start")  # no --http-port: the port it had
    assert restarted.returncode == 0, (restarted.stderr, detached.log())
    assert f":{detached.port}" in restarted.stdout, restarted.stdout

    def answers() -> Optional[dict]:
        try:
            response = get(detached.port, "/double", x=21, timeout=5)
        except httpx.TransportError:
            return None
        return response.json() if response.status_code == 200 else None

    after = wait_for(answers, TIMEOUT, "the restored endpoint to answer on the old port")
    assert isinstance(after, dict)
    assert after["answer"] == 42 and after["pid"] not in old, after

    def both_running() -> Optional[dict]:
        state = detached.status()
        return state if state["backends"]["double"]["running"] == 2 else None

    state = wait_for(both_running, TIMEOUT, "both restored replicas to run")
    assert isinstance(state, dict)
    assert state["backends"]["double"]["target"] == 2
    assert state["endpoints"]["double"]["route"] == "/double"
    new_replicas = set(replicas(state, "double", "RUNNING").values())
    assert len(new_replicas) == 2 and new_replicas.isdisjoint(old_replicas), state
    assert set(all_pids(state)).isdisjoint(old), state["processes"]
    assert get(detached.port, "/double", x=5).json()["answer"] == 10


def _write_database(path: Path, *statements: str) -> None:
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


def _records(path: Path) -> Any:
    db = sqlite3.connect(path)
    try:
        return sorted(db.execute("SELECT * FROM kv"))
    finally:
        db.close()


BAD_STATE_FILES: Dict[str, Any] = {
    "garbage": (lambda path: path.write_bytes(b"this is not a servekit state file\n" * 200),
                "cannot be read", Path.read_bytes),
    "empty": (lambda path: path.write_bytes(b""), "is empty (0 bytes)", Path.read_bytes),
    "another-database": (
        lambda path: _write_database(path, "CREATE TABLE photos (id INTEGER)"),
        "is an SQLite database but not a servekit state file", Path.read_bytes),
    "a-record-of-the-wrong-type": (
        lambda path: _write_database(
            path, "CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB)",
            "INSERT INTO kv VALUES ('endpoint/e', CAST('{\"route\": 5, \"methods\": [\"GET\"], "
            "\"traffic\": {}, \"shadows\": {}}' AS BLOB))"),
        "record 'endpoint/e': 'route' must be a string or null, got 5", _records),
}


@pytest.mark.parametrize("kind", list(BAD_STATE_FILES))
def test_a_bad_state_file_is_a_clear_error_and_nothing_keeps_running(detached, kind):
    """Garbage, an empty file, another program's database, a record of the wrong type:
    each is an error naming the file and what is wrong, never a start without the state."""
    write, fragment, contents = BAD_STATE_FILES[kind]
    detached.home.mkdir(mode=0o700)
    detached.instance_dir.mkdir(mode=0o700)
    write(detached.state_file)
    detached.state_file.chmod(0o600)
    before = contents(detached.state_file)

    result = detached.cli("start", "--http-port", str(detached.port))

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("Error:") and str(detached.state_file) in result.stderr, \
        result.stderr
    assert fragment in result.stderr and "Move it away" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # Exiting may take a moment; a process still there after seconds was left running.
    deadline = time.monotonic() + 5
    while detached.processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = detached.processes()
    assert left == {}, (
        f"processes left running after the failed start: "
        f"{ {pid: (cmdline(pid), 'ppid', parent(pid)) for pid in left} }; "
        f"port {detached.port} free: "
        f"{port_is_free(detached.port)}; log: {detached.log()}")
    assert port_is_free(detached.port)
    assert contents(detached.state_file) == before  # still there, untouched


SLOW = """
import os
import time
import servekit as serve

def slow(request):
    name = request.query_params["i"]
    with open(os.path.join({directory!r}, "started-" + name), "w"):
        pass
    time.sleep(1.5)
    return "done " + name

client = serve.connect()
client.create_backend("slow", slow, config={{"num_replicas": 2, "sync_threads": 4}})
client.create_endpoint("slow", backend="slow", route="/slow")
"""


@pytest.mark.parametrize("how", ["sigterm", "cli-shutdown"])
def test_graceful_stop_finishes_requests_in_flight(detached, tmp_path, how):
    started = detached.cli("start", "--http-port", str(detached.port))
    assert started.returncode == 0, (started.stderr, detached.log())
    markers = tmp_path / "markers"
    markers.mkdir()
    deployed = detached.script(SLOW.format(directory=str(markers)))
    assert deployed.returncode == 0, (deployed.stderr, detached.log())
    state = detached.status()
    processes = all_pids(state)
    supervisor = only_pid(state, "supervisor")
    proxy = only_pid(state, "proxy")

    executor = concurrent.futures.ThreadPoolExecutor(5)
    try:
        requests = [executor.submit(get, detached.port, "/slow", TIMEOUT, i=i)
                    for i in range(4)]
        wait_for(lambda: len(list(markers.iterdir())) == 4, TIMEOUT,
                 "the four requests to be running in the replicas")
        assert holds_listener(proxy, detached.port)
        if how == "sigterm":
            signal_process(supervisor, signal.SIGTERM, processes[supervisor])
            stopping = None
        else:
            stopping = subprocess.Popen([*CLI, "shutdown"], env=detached.env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        assert not any(request.done() for request in requests), "too late: nothing in flight"
        try:
            # Once the proxy no longer listens, a new request is refused (not served).
            wait_for(lambda: not holds_listener(proxy, detached.port), TIMEOUT,
                     "the proxy to stop taking connections")
            late = executor.submit(get, detached.port, "/slow", TIMEOUT, i="late")
            for request in requests:
                response = request.result(timeout=TIMEOUT)
                assert response.status_code == 200, response.text
            assert sorted(r.result().text for r in requests) == [f"done {i}" for i in range(4)]
            with pytest.raises(httpx.TransportError):
                late.result(timeout=TIMEOUT)
            assert not (markers / "started-late").exists()
            if stopping is not None:
                out, err = stopping.communicate(timeout=40)
                assert stopping.returncode == 0, (out, err, detached.log())
        finally:
            if stopping is not None and stopping.poll() is None:
                stopping.kill()
                stopping.communicate()
    finally:
        executor.shutdown(wait=False)
    assert_gone(detached, processes)
    assert not detached.instance_dir.exists()
