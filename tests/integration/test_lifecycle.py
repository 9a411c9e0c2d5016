"""Starting and ending instances: start options, a busy port, shutdown, dying with the script.

Each test starts its own instance(s) on a free port and always shuts them down. An
instance's processes are the descendants of its controller pid (found through /proc); a
child script prints them, together with their start times, so that a recycled pid is never
mistaken for a survivor.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List

import httpx
import pytest
from backends_for_tests import Echo
from processes import cmdline, descendants, is_worker, kill_leftovers, snapshot, still_alive
from pydantic import ValidationError
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware

import servekit as serve
from conftest import busy_port, free_port, wait_for
from servekit._private import versions
from servekit._private.workers.process import process_start_time

pytestmark = pytest.mark.integration

INTEGRATION_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def start_instance() -> Iterator[Callable[..., serve.Client]]:
    """``serve.start`` that remembers what it started; everything is shut down afterwards."""
    clients: List[serve.Client] = []

    def start(**kwargs: Any) -> serve.Client:
        client = serve.start(**kwargs)
        clients.append(client)
        return client

    yield start
    for client in clients:
        if not client._shut_down:
            client.shutdown()


def healthz(port: int) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/-/healthz", timeout=10)


def my_children() -> List[int]:
    return descendants(os.getpid())



# ---------------------------------------------------------------- start options


@pytest.mark.parametrize("make_options", [
    lambda port: {"host": "127.0.0.1", "port": port},
    lambda port: serve.HTTPOptions(host="127.0.0.1", port=port),
], ids=["dict", "HTTPOptions"])
def test_start_serves_http_where_http_options_say(start_instance: Callable,
                                                  make_options: Callable) -> None:
    port = free_port()
    client = start_instance(http_options=make_options(port))

    response = healthz(port)
    assert (response.status_code, response.text) == (200, "success")
    assert client.list_endpoints() == {}


def test_deprecated_http_host_and_port_warn_and_still_apply(start_instance: Callable) -> None:
    port = free_port()
    with pytest.warns(DeprecationWarning, match="http_port"):
        start_instance(http_host="127.0.0.1", http_port=port)

    assert healthz(port).status_code == 200


def test_deprecated_http_middlewares_warn_and_still_apply(start_instance: Callable) -> None:
    port = free_port()
    with pytest.warns(DeprecationWarning, match="http_middlewares"):
        start_instance(http_port=port,
                       http_middlewares=[Middleware(GZipMiddleware, minimum_size=1)])

    response = httpx.get(f"http://127.0.0.1:{port}/-/healthz",
                         headers={"Accept-Encoding": "gzip"}, timeout=10)
    assert response.headers.get("content-encoding") == "gzip"
    assert response.text == "success"


@pytest.mark.parametrize("deprecated", [
    {"http_host": "127.0.0.1"},
    {"http_port": 8123},
    {"http_middlewares": []},
], ids=["http_host", "http_port", "http_middlewares"])
def test_deprecated_arguments_with_http_options_are_a_value_error(deprecated: dict) -> None:
    before = my_children()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError) as excinfo:
            serve.start(http_options={"port": free_port()}, **deprecated)

    assert "http_options" in str(excinfo.value)
    assert next(iter(deprecated)) in str(excinfo.value)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert my_children() == before


@pytest.mark.parametrize("kwargs, error, fragments", [
    ({"http_options": {"port": 70000}}, ValidationError, ["port", "70000"]),
    ({"http_options": {"prot": 8000}}, ValidationError, ["prot"]),
    ({"http_options": {"middlewares": ["gzip"]}}, ValidationError, ["middlewares", "'gzip'"]),
    ({"http_options": [("port", 8000)]}, TypeError, ["http_options", "[('port', 8000)]"]),
    ({"detached": "no"}, TypeError, ["detached", "'no'"]),
], ids=["port-out-of-range", "unknown-key", "bad-middleware", "list-options", "str-detached"])
def test_start_rejects_bad_arguments(kwargs: dict, error: type, fragments: List[str]) -> None:
    before = my_children()

    with pytest.raises(error) as excinfo:
        serve.start(**kwargs)

    for fragment in fragments:
        assert fragment in str(excinfo.value), \
            f"{fragment!r} is not named in the error: {excinfo.value}"
    assert my_children() == before


def test_port_in_use_is_a_serve_error_and_leaves_nothing_running(
        start_instance: Callable) -> None:
    before = my_children()
    with busy_port() as port:
        with pytest.raises(serve.ServeError) as excinfo:
            serve.start(http_options={"port": port})
        assert str(port) in str(excinfo.value)
        assert my_children() == before
    # Nothing of the failed start holds the port: an instance can use it now.
    start_instance(http_options={"port": port})
    assert healthz(port).status_code == 200


def test_a_host_that_does_not_resolve_is_a_serve_error_and_a_gaierror() -> None:
    """As Ray Serve 1.x's own test expects: socket.gaierror; and servekit's ServeError."""
    before = my_children()
    with pytest.raises(socket.gaierror) as excinfo:
        serve.start(http_options={"host": "bad.ip.address", "port": free_port()})
    assert isinstance(excinfo.value, serve.ServeError)
    assert "bad.ip.address" in str(excinfo.value) and "http_options" in str(excinfo.value)
    assert my_children() == before


def test_processes_say_what_they_are_in_ps(start_instance: Callable) -> None:
    client = start_instance(http_options={"port": free_port()})
    client.create_backend("clf:v1", Echo, "x")
    processes = client._call("status")["processes"]
    roles = {process["role"] for process in processes}
    assert {"controller", "proxy", "replica"} <= roles
    for process in processes:
        title = cmdline(process["pid"]).strip()
        assert title == f"servekit {process['role']} {process['name']}", title
    [replica] = [p["name"] for p in processes if p["role"] == "replica"]
    assert replica.startswith("clf:v1#")


# ---------------------------------------------------------------- socket files


def test_deleted_replicas_leave_no_socket_files_behind(start_instance: Callable) -> None:
    """Old behaviour caught: after 3 rounds of creating and deleting a 3-replica backend, 9
    replica socket files were left in the instance directory."""
    client = start_instance(http_options={"host": None})
    assert client._instance is not None
    instance_dir = client._instance.instance_dir

    def sockets() -> List[str]:
        return sorted(name for name in os.listdir(instance_dir) if name.endswith(".sock"))

    # The first replica is the one the supervisor started with the instance (its socket was
    # there from the start): once it is gone, only the controller's socket is left.
    client.create_backend("echo", Echo, "e")
    client.delete_backend("echo")
    wait_for(lambda: sockets() == ["controller.sock"], 10, "the first replica's socket file to go")
    before = sockets()
    for _ in range(3):
        client.create_backend("echo", Echo, "e", config={"num_replicas": 3})
        assert len(sockets()) == len(before) + 3
        client.delete_backend("echo")
        wait_for(lambda: sockets() == before, 10, "the replicas' socket files to go")


# ---------------------------------------------------------------- shutdown


def test_shutdown_stops_every_process_and_removes_the_instance_dir(
        start_instance: Callable) -> None:
    port = free_port()
    client = start_instance(http_options={"port": port})
    client.create_backend("echo", Echo, "e", config={"num_replicas": 2})
    client.create_endpoint("echo", backend="echo", route="/echo")
    assert client._instance is not None
    controller = client._instance.pid
    instance_dir = client._instance.instance_dir
    processes = snapshot([controller, *descendants(controller)])
    try:
        assert len(processes) >= 4  # controller, proxy, two replicas
        assert all(is_worker(pid) for pid in processes)
        assert os.path.exists(client._controller_address)
        assert httpx.get(f"http://127.0.0.1:{port}/echo", timeout=10).text == "e:None"

        started = time.monotonic()
        client.shutdown()
        elapsed = time.monotonic() - started

        assert elapsed < 15, f"shutdown took {elapsed:.1f}s"
        assert still_alive(processes) == []
        assert not os.path.exists(instance_dir)
        with pytest.raises(httpx.ConnectError):
            healthz(port)
    finally:
        kill_leftovers(processes)


def test_shutdown_is_answered_before_the_controller_exits(
        start_instance: Callable, caplog: pytest.LogCaptureFixture) -> None:
    """The controller exited before its reply was sent, on asyncio's loop: the client was
    told the controller went away, and called again."""
    for _ in range(3):
        start_instance(http_options={"host": None}).shutdown()
    assert "went away" not in caplog.text


# ---------------------------------------------------------------- dying with the script


SCRIPT = """
import json
import sys

sys.path.insert(0, {integration_dir!r})
import servekit as serve
from processes import descendants, snapshot


def hello(request):
    return "hello"


client = serve.start(http_options={{"port": {port}}})
client.create_backend("hello", hello, config={{"num_replicas": 2}})
client.create_endpoint("hello", backend="hello", route="/hello")
assert client.get_handle("hello").remote().result(timeout=30) == "hello"
controller = client._instance.pid
print(json.dumps({{
    "instance_dir": client._instance.instance_dir,
    "processes": snapshot([controller, *descendants(controller)]),
}}), flush=True)
if {wait_for_stdin}:
    sys.stdin.read()  # stay alive until the test kills us (or goes away itself)
"""


def write_script(tmp_path: Any, port: int, wait_for_stdin: bool) -> str:
    path = tmp_path / "serve_script.py"
    path.write_text(textwrap.dedent(SCRIPT).format(
        integration_dir=INTEGRATION_DIR, port=port, wait_for_stdin=wait_for_stdin))
    return str(path)


def parse_report(line: str) -> tuple:
    report = json.loads(line)
    processes = {int(pid): started for pid, started in report["processes"].items()}
    return report["instance_dir"], processes


def test_instance_ends_when_its_script_exits_normally(tmp_path: Any) -> None:
    port = free_port()
    script = write_script(tmp_path, port, wait_for_stdin=False)

    result = subprocess.run([sys.executable, script], capture_output=True, text=True,
                            timeout=90, cwd=str(tmp_path))

    assert result.returncode == 0, result.stderr
    instance_dir, processes = parse_report(result.stdout.strip().splitlines()[-1])
    try:
        assert len(processes) >= 4, processes  # controller, proxy, two replicas
        wait_for(lambda: still_alive(processes) == [], timeout=5,
                 message="every process of the instance to exit")
        assert not os.path.exists(instance_dir)
        with pytest.raises(httpx.ConnectError):
            healthz(port)
    finally:
        kill_leftovers(processes)


def test_instance_ends_within_seconds_when_its_script_is_sigkilled(tmp_path: Any) -> None:
    port = free_port()
    script = write_script(tmp_path, port, wait_for_stdin=True)
    proc = subprocess.Popen([sys.executable, script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(tmp_path))
    processes: Dict[int, int] = {}
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=30)
            pytest.fail(f"the script printed nothing; stderr: {proc.communicate()[1]}")
        instance_dir, processes = parse_report(line)
        assert len(processes) >= 4, processes
        assert all(is_worker(pid) for pid in processes)
        assert healthz(port).status_code == 200

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

        wait_for(lambda: still_alive(processes) == [], timeout=10,
                 message="every process of the instance to exit after SIGKILL of its script")
        wait_for(lambda: not os.path.exists(instance_dir), timeout=5,
                 message="the instance directory to be removed")
        with pytest.raises(httpx.ConnectError):
            healthz(port)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        kill_leftovers(processes)


DETACHED_START = """
import servekit as serve
client = serve.start(detached=True, http_options={{"port": {port}}})
def hello(request):
    return "detached ok"
client.create_backend("hello", hello)
client.create_endpoint("hello", backend="hello", route="/hello")
"""

DETACHED_USE = """
import httpx, servekit as serve
print(httpx.get("http://127.0.0.1:{port}/hello").text)
try:
    serve.start(detached=True, http_options={{"port": {port}}})
except serve.ServeError as exc:
    print("second start refused:", "already running" in str(exc))
client = serve.connect()
print(sorted(client.list_endpoints()))
client.shutdown()
try:
    serve.connect()
except serve.ServeError:
    print("gone")
"""


def test_detached_instance_outlives_its_script_until_shut_down(tmp_path):
    port = free_port()
    env = {**os.environ, "SERVEKIT_HOME": str(tmp_path / "home")}
    started = subprocess.run([sys.executable, "-c", DETACHED_START.format(port=port)],
                             env=env, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    used = subprocess.run([sys.executable, "-c", DETACHED_USE.format(port=port)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert used.returncode == 0, used.stderr
    assert used.stdout.splitlines() == [
        "detached ok", "second start refused: True", "['hello']", "gone"]
    with socket.socket() as sock:  # the port is free again: the proxy is gone
        sock.bind(("127.0.0.1", port))


CONNECT_PREFERS_DETACHED = """
import servekit as serve
own = serve.start(http_options={{"port": {own_port}}})  # this script's, not detached
print(sorted(serve.connect().list_endpoints()))  # the detached instance, as in 1.x
serve.connect().shutdown()
print(serve.connect()._controller_address == own._controller_address)  # none detached now
own.shutdown()
"""


def test_connect_reaches_the_detached_instance_before_the_scripts_own(tmp_path):
    env = {**os.environ, "SERVEKIT_HOME": str(tmp_path / "home")}
    started = subprocess.run([sys.executable, "-c", DETACHED_START.format(port=free_port())],
                             env=env, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    used = subprocess.run(
        [sys.executable, "-c", CONNECT_PREFERS_DETACHED.format(own_port=free_port())],
        env=env, capture_output=True, text=True, timeout=60)
    assert used.returncode == 0, used.stderr
    assert used.stdout.splitlines() == ["['hello']", "True"]


# ---------------------------------------------------------------- the client is not the instance


DROPPED_CLIENT = """
import gc
import json
import sys

sys.path.insert(0, {integration_dir!r})
import httpx
import servekit as serve
from processes import descendants, snapshot


def hello(request):
    return "hello"


serve.start(http_options={{"port": {port}}})  # the returned client is dropped at once
gc.collect()
client = serve.connect()
client.create_backend("hello", hello)
client.create_endpoint("hello", backend="hello", route="/hello")
print(httpx.get("http://127.0.0.1:{port}/hello", timeout=30).text, flush=True)
controller = client._instance.pid
del client
gc.collect()
print(httpx.get("http://127.0.0.1:{port}/hello", timeout=30).text, flush=True)
print(json.dumps(snapshot([controller, *descendants(controller)])), flush=True)
"""


def test_instance_outlives_its_dropped_client_until_the_script_ends(tmp_path: Any) -> None:
    """As in 1.x, a non-detached instance lives until the script exits, not until the
    Client returned by start() is garbage-collected; serve.connect() reaches it."""
    port = free_port()
    script = tmp_path / "dropped_client.py"
    script.write_text(textwrap.dedent(DROPPED_CLIENT).format(
        integration_dir=INTEGRATION_DIR, port=port))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=90, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    first, second, report = result.stdout.strip().splitlines()[-3:]
    assert (first, second) == ("hello", "hello")
    processes = {int(pid): started for pid, started in json.loads(report).items()}
    try:
        assert len(processes) >= 3, processes  # controller, proxy, replica
        wait_for(lambda: still_alive(processes) == [], timeout=5,
                 message="every process of the instance to exit with the script")
    finally:
        kill_leftovers(processes)


# ---------------------------------------------------------------- SERVEKIT_HOME is private


@pytest.fixture
def servekit_home(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    from servekit._private import constants

    home = tmp_path / "home"
    monkeypatch.setattr(constants, "SERVEKIT_HOME", str(home))
    return home


def test_detached_start_refuses_a_home_others_can_write(servekit_home: Any) -> None:
    servekit_home.mkdir()
    servekit_home.chmod(0o777)
    with pytest.raises(serve.ServeError, match="other users can write") as info:
        serve.start(detached=True, http_options={"port": free_port()})
    assert str(servekit_home) in str(info.value)
    assert list(servekit_home.iterdir()) == []  # nothing was started or written


def test_connect_refuses_a_record_others_can_write(servekit_home: Any) -> None:
    servekit_home.mkdir(mode=0o700)
    record = servekit_home / "detached-instance.json"
    # A record naming this very process: connecting to it would be obeying a stranger.
    record.write_text(json.dumps({"address": "/tmp/elsewhere.sock", "pid": os.getpid(),
                                  "started": process_start_time(os.getpid())}))
    record.chmod(0o666)
    with pytest.raises(serve.ServeError, match="other users can write"):
        serve.connect()
    record.chmod(0o600)
    assert serve.connect()._controller_address == "/tmp/elsewhere.sock"


def test_home_is_created_owner_only(servekit_home: Any) -> None:
    client = serve.start(detached=True, http_options={"port": free_port()})
    try:
        assert servekit_home.stat().st_mode & 0o777 == 0o700
        for path in servekit_home.iterdir():
            assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
    finally:
        client.shutdown()


def test_a_client_of_another_servekit_version_is_told_so(start_instance: Callable,
                                                         monkeypatch: Any) -> None:
    """An instance may outlive an upgrade (a detached one, say): a client of another
    servekit gets an error naming both versions and the fix before it sends anything the
    instance would misread; a client of the same version goes on."""
    client = start_instance(http_options={"port": free_port()})
    client.create_backend("echo", Echo, "x")
    running = versions.SERVEKIT
    monkeypatch.setattr(versions, "SERVEKIT", "9.9.9")  # this process "upgraded"
    with pytest.raises(serve.ServeError) as info:
        serve.connect().list_backends()
    message = str(info.value)
    assert f"runs servekit {running} on Python" in message and "servekit 9.9.9" in message
    assert "servekit shutdown" in message
    monkeypatch.undo()
    assert list(serve.connect().list_backends()) == ["echo"]


def test_non_detached_instances_run_side_by_side(start_instance: Callable) -> None:
    ports = free_port(), free_port()
    first = start_instance(http_options={"port": ports[0]})
    second = start_instance(http_options={"port": ports[1]})
    for client, prefix in ((first, "one"), (second, "two")):
        client.create_backend("echo", Echo, prefix)
        client.create_endpoint("echo", backend="echo", route="/echo")
    assert serve.connect()._controller_address == second._controller_address  # the latest
    answers = [httpx.get(f"http://127.0.0.1:{port}/echo", params={"x": 1}, timeout=10).text
               for port in ports]
    assert answers == ["one:1", "two:1"]
    first.shutdown()
    with pytest.raises(httpx.TransportError):
        healthz(ports[0])
    assert second.get_handle("echo").remote(2).result(timeout=10) == "two:2"


SELF_STARTING_MODULE = '''
import servekit as serve


def hello(request):
    return "hello"


client = serve.start(http_options={"host": None})  # when imported: no __main__ guard
'''


def test_a_module_that_starts_servekit_when_imported_is_refused_inside_its_replica(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend defined in such a module is sent by its import path; its replica imports
    the module, whose serve.start() must fail there with an error saying what to change
    (it used to start an instance whose replica imported the module again, without end)."""
    (tmp_path / "self_starting.py").write_text(SELF_STARTING_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import self_starting  # type: ignore[import-not-found]

    client = self_starting.client
    try:
        with pytest.raises(serve.ServeError) as failed:
            client.create_backend("hello", self_starting.hello)
        message = str(failed.value)
        assert "serve.start() was called inside replica" in message, message
        assert '`if __name__ == "__main__":`' in message
        supervisors = [pid for pid in descendants(os.getpid())
                       if cmdline(pid).startswith("servekit supervisor")]
        assert len(supervisors) == 1, supervisors  # this test's instance; none nested
    finally:
        client.shutdown()
        sys.modules.pop("self_starting", None)
