"""Fault soak: the real processes under load while a seeded injector breaks them, then checks.

    python benchmarks/soak.py                  # 10 minutes of load and faults
    python benchmarks/soak.py --quick          # 2 minutes (for CI)
    python benchmarks/soak.py --seed 1234 --duration 300

An embedded instance (127.0.0.1 only) serves three backends, two replicas each at the start,
an endpoint each: ``sync`` (a sync class, one call at a time per replica), ``async`` (an
async class) and ``stream`` (an async generator). Every backend has ``request_timeout_s``, so
every request has a bound. Closed-loop clients drive them over HTTP (httpx, one connection
each) and through sync and async handles; every request is recorded with its outcome and
latency. Meanwhile an injector, seeded by ``--seed`` (printed first: the same seed replays the
same sequence of actions), SIGKILLs replicas, SIGSTOPs one for a few seconds then SIGCONTs
it, SIGKILLs the HTTP proxy and the controller (the supervisor restarts it), resets
connections (HTTP clients that vanish mid-request with a TCP RST; this script's own
data-plane connections to a replica or to the controller, shut down under the routers that
use them) and changes backend configs (``num_replicas`` up and down, ``user_config``,
``max_concurrent_queries``). Processes are found among this script's own descendants in
/proc, by the titles servekit gives them; nothing outside the instance is signalled.

Then the load stops, the instance settles and, after a quiet period, the real processes are
checked: every request ended, answered or failed with an error that names its cause, within
its bound (timeout + margin); every acknowledged config change is in force (read back, and
reported by the replicas themselves); the capacity is whole (``replicas x
max_concurrent_queries`` requests at once, over HTTP and through handles: for the async and
stream backends all of them must run at the same moment, seen from inside the replicas; for
the sync backend, which runs one call at a time, every replica must take exactly its share);
no replica or router holds a place; no process's RSS is more than 10 % over its warm
baseline, no file descriptor leaked, no socket file or process is left over. Prints a table
of outcomes, latencies against bounds, faults by kind and checks; exits 1 if a check fails.
Numbers of throughput are printed, never asserted: this is a correctness soak.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import httpx
from suite import free_port  # (benchmarks/ is on the path of a script run from it)

import servekit as serve
from servekit.exceptions import ServeError

# --------------------------------------------------------------------------- settings

REQUEST_TIMEOUT_S = 3.0  # every backend's request_timeout_s: a reply (a stream: its first chunk)
HTTP_TIMEOUT_S = 5.0  # HTTPOptions.request_timeout_s, the proxy's own backstop
MARGIN_S = 3.0  # allowed beyond a timeout: a proxy restart, a busy 2-core machine
STREAM_CHUNKS = 8
STREAM_DELAY_S = 0.02
# A frozen replica is found by health checks (3 pings 1 s apart, 1 s each) and replaced;
# until then a stream it serves, past its first chunk, has no other bound.
FREEZE_DETECT_S = 5.0
HANG_S = 30.0  # a request still open this long past its bound counts as hung (no end)
# A capacity probe's requests are all held in their replicas until the same moment, this
# long after the first is sent; each then reports how many of them its replica held at once.
PROBE_HOLD_S = 1.5
SYNC_PROBE_HOLD_S = 0.2
RSS_GROWTH = 0.10
FD_SLACK = 2
# Descriptors a process holds per replica of the instance (connections, and the controller's
# handles on its children): the allowance when the soak ends with more replicas than at the
# baseline.
FDS_PER_REPLICA = {"controller": 4, "proxy": 1, "driver": 2}
CONFIG_CALL_BOUND_S = 90.0  # an update_backend_config that takes longer counts as hung
SETTLE_S = 60.0  # after the load: time for the instance to reach its target again
QUIET_S = 5.0
SAMPLE_EVERY_S = 2.0
HTTP_WORKERS, ASYNC_HANDLE_WORKERS, SYNC_HANDLE_WORKERS = 6, 4, 2

# name -> (initial config, the values max_concurrent_queries takes)
BACKENDS: Dict[str, Tuple[Dict[str, Any], Tuple[int, ...]]] = {
    "sync": ({"num_replicas": 2, "max_concurrent_queries": 4}, (2, 4, 6)),
    "async": ({"num_replicas": 2, "max_concurrent_queries": 8}, (4, 8, 12)),
    "stream": ({"num_replicas": 2, "max_concurrent_queries": 8}, (4, 8, 12)),
}
NAMES = tuple(BACKENDS)
REPLICA_COUNTS = (1, 2, 3)
FAULT_KINDS = ("kill-replica", "stop-replica", "kill-proxy", "kill-controller",
               "reset-connections")
CONFIG_KINDS = ("num_replicas", "user_config", "max_concurrent_queries")
# One shuffled deck after another, so that every kind comes up in a short run.
DECK = ["kill-replica"] * 3 + ["stop-replica"] * 2 + ["kill-proxy", "kill-controller"] + \
    ["reset-connections"] * 2 + ["num_replicas"] * 2 + ["user_config"] * 2 + \
    ["max_concurrent_queries"]


def bound_s(backend: str) -> float:
    """How long a request to ``backend`` may take, answered or failed."""
    if backend == "stream":
        return REQUEST_TIMEOUT_S + STREAM_CHUNKS * STREAM_DELAY_S + FREEZE_DETECT_S + MARGIN_S
    return REQUEST_TIMEOUT_S + MARGIN_S


# --------------------------------------------------------------------------- backends


async def _held(probes: Dict[str, List[int]], token: str, release_at: float) -> Dict[str, Any]:
    """Hold a request of capacity probe ``token`` until ``release_at`` (wall clock); then
    say how many of the probe's requests this replica held at once, and whether this one
    came only after the release (it waited for a place)."""
    entry = probes.setdefault(token, [0, 0])  # held now, most held at once
    entry[0] += 1
    entry[1] = max(entry[1], entry[0])
    late = time.time() >= release_at
    try:
        await asyncio.sleep(max(0.0, release_at - time.time()))
        return {"pid": os.getpid(), "peak": entry[1], "late": late}
    finally:
        entry[0] -= 1
        if entry[0] == 0:
            probes.pop(token, None)


class SyncModel:
    """Sync: one call at a time per replica, on its worker thread."""

    def __init__(self) -> None:
        self.version = 0

    def reconfigure(self, config: Dict[str, Any]) -> None:
        self.version = config["version"]

    def __call__(self, request: Any) -> Dict[str, Any]:
        params = request.query_params
        time.sleep(float(params.get("hold", 0.005)))
        return {"n": int(params.get("n", -1)), "pid": os.getpid(), "version": self.version}


class AsyncModel:
    """Async: concurrent on the replica's event loop."""

    def __init__(self) -> None:
        self.version = 0
        self.probes: Dict[str, List[int]] = {}

    def reconfigure(self, config: Dict[str, Any]) -> None:
        self.version = config["version"]

    async def __call__(self, request: Any) -> Dict[str, Any]:
        params = request.query_params
        if "probe" in params:
            held = await _held(self.probes, str(params["probe"]), float(params["release"]))
            return {**held, "version": self.version}
        await asyncio.sleep(float(params.get("hold", 0.01)))
        return {"n": int(params.get("n", -1)), "pid": os.getpid(), "version": self.version}


class StreamModel:
    """Streaming: an async generator of STREAM_CHUNKS lines ``n:i:version``."""

    def __init__(self) -> None:
        self.version = 0
        self.probes: Dict[str, List[int]] = {}

    def reconfigure(self, config: Dict[str, Any]) -> None:
        self.version = config["version"]

    async def __call__(self, request: Any) -> Any:
        params = request.query_params
        if "probe" in params:
            held = await _held(self.probes, str(params["probe"]), float(params["release"]))
            yield json.dumps({**held, "version": self.version}) + "\n"
            return
        n = int(params.get("n", -1))
        for i in range(STREAM_CHUNKS):
            await asyncio.sleep(STREAM_DELAY_S)
            yield f"{n}:{i}:{self.version}\n"


MODELS = {"sync": SyncModel, "async": AsyncModel, "stream": StreamModel}

# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Proc:
    """A live process of the instance: a descendant of this script, by /proc."""

    pid: int
    start: int  # clock ticks after boot: (pid, start) names a process even if pids recycle
    state: str
    role: str  # supervisor, controller, proxy, replica ("" while it has no title yet)
    name: str

    @property
    def key(self) -> Tuple[int, int]:
        return self.pid, self.start


def _stat(pid: int) -> Optional[Tuple[str, int, int]]:
    """(state, ppid, start time) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    return " ".join(part for part in raw.decode("utf-8", "replace").split("\0") if part)


def instance_tree() -> List[Proc]:
    """Every descendant of this script (the supervisor adopts the orphans of a dead
    controller, so the whole instance stays in this tree), zombies included."""
    parents: Dict[int, List[Tuple[int, str, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                parents.setdefault(stat[1], []).append((int(entry), stat[0], stat[2]))
    found: List[Proc] = []
    stack = [os.getpid()]
    while stack:
        for pid, state, start in parents.get(stack.pop(), []):
            words = _title(pid).split(" ", 2)
            role, name = (words[1], words[2]) if len(words) == 3 and \
                words[0] == "servekit" else ("", "")
            found.append(Proc(pid, start, state, role, name))
            stack.append(pid)
    return found


def send_signal(proc: Proc, sig: signal.Signals) -> bool:
    """Signal ``proc`` if it is still that very process of this instance."""
    if not any(p.key == proc.key and p.role for p in instance_tree()):
        return False
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        return False
    return True


def rss_kib(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def fd_count(pid: int) -> Optional[int]:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def unix_peers() -> Dict[int, str]:
    """fd -> the path a connected Unix socket of this process talks to."""
    peers = {}
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.family == socket.AF_UNIX:
                peer = sock.getpeername()
                if isinstance(peer, str) and peer:
                    peers[fd] = peer
        except OSError:
            pass
        finally:
            sock.close()  # (the duplicate only)
    return peers


def listener(path: str) -> str:
    """The name of the replica of this instance that listens on Unix socket ``path``."""
    try:
        with open("/proc/net/unix") as f:
            links = {f"socket:[{fields[6]}]" for fields in map(str.split, f)
                     if len(fields) >= 8 and fields[7] == path}
    except OSError:
        return "?"
    for proc in instance_tree():
        if proc.role == "replica":
            try:
                if any(os.readlink(f"/proc/{proc.pid}/fd/{fd}") in links
                       for fd in os.listdir(f"/proc/{proc.pid}/fd")):
                    return proc.name
            except OSError:
                continue
    return "?"


def shut_down_fd(fd: int, peer: str) -> bool:
    """Shut a socket of this process down under whoever uses it (both directions), if it
    still talks to ``peer``."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        if sock.family != socket.AF_UNIX or sock.getpeername() != peer:
            return False  # closed and reused meanwhile
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def bounded(fn: Callable[..., Any], timeout: float, *args: Any) -> Any:
    """``fn(*args)`` on a daemon thread; its value, or TimeoutError after ``timeout`` s (a
    call that hangs must not hang the soak)."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: B036 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not return within {timeout}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# --------------------------------------------------------------------------- the ledger


@dataclass
class Record:
    source: str  # http, handle-sync, handle-async
    backend: str
    started: float
    ended: float
    outcome: str  # "answered" or what the failure was
    detail: str = ""


class Ledger:
    """Every request: open ones by id, ended ones as records."""

    def __init__(self) -> None:
        self.open: Dict[int, Tuple[str, str, float]] = {}
        self.records: List[Record] = []
        self._ids = itertools.count()

    def begin(self, source: str, backend: str) -> int:
        rid = next(self._ids)
        self.open[rid] = (source, backend, time.monotonic())
        return rid

    def end(self, rid: int, outcome: str, detail: str = "") -> None:
        opened = self.open.pop(rid, None)
        if opened is not None:  # (None: declared hung already)
            self.records.append(Record(*opened, time.monotonic(), outcome, detail[:300]))

    def close_hung(self) -> None:
        """What is still open has no end: record it as such."""
        now = time.monotonic()
        for rid in list(self.open):
            opened = self.open.pop(rid, None)
            if opened is not None:
                self.records.append(Record(*opened, now, "no end"))


def _cause(text: str) -> str:
    """The error an HTTP error body names (``ExcType: message``), or its first words."""
    head = text.strip().split(":", 1)[0].strip()
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", head):
        return head
    return " ".join(text.split()[:3]) or "(empty body)"


def judge_value(backend: str, n: int, value: Any) -> Tuple[str, str]:
    if isinstance(value, dict) and value.get("n") == n:
        return "answered", ""
    return "wrong answer", repr(value)


def judge_stream(n: int, text: str) -> Tuple[str, str]:
    lines = text.splitlines()
    if len(lines) == STREAM_CHUNKS and all(
            line.startswith(f"{n}:{i}:") for i, line in enumerate(lines)):
        return "answered", ""
    return "wrong answer", text


def judge_http(backend: str, n: int, status: int, body: bytes) -> Tuple[str, str]:
    text = body.decode("utf-8", "replace")
    if status == 200:
        if backend == "stream":
            return judge_stream(n, text)
        try:
            return judge_value(backend, n, json.loads(text))
        except ValueError:
            return "wrong answer", text
    return f"HTTP {status} {_cause(text)}", text


def judge_exception(exc: BaseException) -> Tuple[str, str]:
    if isinstance(exc, ServeError):
        return type(exc).__name__, str(exc)
    if isinstance(exc, TimeoutError):  # result(timeout) gave up: the request never ended
        return "no end", str(exc)
    return f"unexpected {type(exc).__name__}", str(exc)


# --------------------------------------------------------------------------- the load


class Load:
    """Closed-loop clients over HTTP and handles, started and stopped by phase; HTTP and
    async handles on one event loop thread that lives across phases (so that no router of
    this process is left on a closed loop), sync handles on threads."""

    def __init__(self, client: serve.Client, base: str, seed: int, ledger: Ledger) -> None:
        self.client = client
        self.base = base
        self.seed = seed
        self.ledger = ledger
        self.numbers = itertools.count(1)
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, name="soak-loop",
                                            daemon=True)
        self.loop_thread.start()
        self.sync_handles = {name: client.get_handle(name) for name in NAMES}
        self.sync_handles["stream"] = self.sync_handles["stream"].options(stream=True)
        self.async_handles: Dict[str, Any] = {}
        self.stopping = threading.Event()
        self.phase = 0
        self.threads: List[threading.Thread] = []
        self.workers: Optional[Any] = None

    def call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.phase += 1
        self.stopping = threading.Event()
        self.workers = asyncio.run_coroutine_threadsafe(self._async_workers(self.stopping),
                                                        self.loop)
        self.threads = [threading.Thread(target=self._sync_worker, args=(i, self.stopping),
                                         name=f"soak-sync-{i}", daemon=True)
                        for i in range(SYNC_HANDLE_WORKERS)]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        """Stop issuing requests; wait for the open ones to end (each is bounded by its
        client-side deadline); what does not end is recorded as hung."""
        self.stopping.set()
        deadline = time.monotonic() + max(bound_s(b) for b in NAMES) + HANG_S + 5
        while self.ledger.open and time.monotonic() < deadline:
            time.sleep(0.1)
        self.ledger.close_hung()
        for thread in self.threads:
            thread.join(1.0)
        if self.workers is not None:
            try:
                self.workers.result(5.0)
            except Exception:  # hung workers were recorded above
                self.workers.cancel()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join(5.0)

    def _rng(self, what: str, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{self.phase}:{what}:{index}")

    @staticmethod
    def _hold(rng: random.Random, backend: str) -> float:
        return rng.uniform(0.002, 0.02) if backend == "sync" else rng.uniform(0.005, 0.05)

    # ------------------------------------------------------------- HTTP and async handles

    async def _async_workers(self, stopping: threading.Event) -> None:
        if not self.async_handles:
            for name in NAMES:
                handle = self.client.get_handle(name, sync=False)
                self.async_handles[name] = handle.options(stream=True) \
                    if name == "stream" else handle
        await asyncio.gather(
            *(self._http_worker(i, stopping) for i in range(HTTP_WORKERS)),
            *(self._async_handle_worker(i, stopping) for i in range(ASYNC_HANDLE_WORKERS)))

    async def _http_worker(self, index: int, stopping: threading.Event) -> None:
        rng = self._rng("http", index)
        timeout = httpx.Timeout(max(bound_s(b) for b in NAMES) + HANG_S + 5)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as session:
            while not stopping.is_set():
                backend = rng.choice(NAMES)
                n = next(self.numbers)
                params = {"n": n, "hold": f"{self._hold(rng, backend):.4f}"}
                rid = self.ledger.begin("http", backend)
                try:
                    outcome = await asyncio.wait_for(
                        self._http_once(session, backend, params), bound_s(backend) + HANG_S)
                except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
                    outcome = ("no end", str(exc))
                except httpx.TransportError as exc:
                    outcome = (type(exc).__name__, str(exc))
                except Exception as exc:  # recorded as unexpected
                    outcome = (f"unexpected {type(exc).__name__}", str(exc))
                self.ledger.end(rid, *outcome)

    async def _http_once(self, session: httpx.AsyncClient, backend: str,
                         params: Dict[str, Any]) -> Tuple[str, str]:
        url = f"{self.base}/{backend}"
        async with session.stream("GET", url, params=params) as response:
            body = b"".join([chunk async for chunk in response.aiter_bytes()])
        return judge_http(backend, params["n"], response.status_code, body)

    async def _async_handle_worker(self, index: int, stopping: threading.Event) -> None:
        rng = self._rng("async-handle", index)
        while not stopping.is_set():
            backend = rng.choice(NAMES)
            n = next(self.numbers)
            rid = self.ledger.begin("handle-async", backend)
            try:
                outcome = await asyncio.wait_for(
                    self._async_once(backend, n, self._hold(rng, backend)),
                    bound_s(backend) + HANG_S)
            except ServeError as exc:  # (RequestTimeoutError is a TimeoutError too)
                outcome = judge_exception(exc)
            except asyncio.TimeoutError:
                outcome = ("no end", "")
            except Exception as exc:  # judged
                outcome = judge_exception(exc)
            self.ledger.end(rid, *outcome)

    async def _async_once(self, backend: str, n: int, hold: float) -> Tuple[str, str]:
        handle = self.async_handles[backend]
        if backend == "stream":
            stream = await handle.remote(n=n)
            return judge_stream(n, "".join([chunk async for chunk in stream]))
        return judge_value(backend, n, await (await handle.remote(n=n, hold=hold)))

    # ------------------------------------------------------------- sync handles

    def _sync_worker(self, index: int, stopping: threading.Event) -> None:
        rng = self._rng("sync-handle", index)
        while not stopping.is_set():
            backend = rng.choice(NAMES)
            n = next(self.numbers)
            rid = self.ledger.begin("handle-sync", backend)
            try:
                handle = self.sync_handles[backend]
                if backend == "stream":  # (no deadline per chunk: a hang shows as open)
                    outcome = judge_stream(n, "".join(handle.remote(n=n)))
                else:
                    value = handle.remote(n=n, hold=self._hold(rng, backend)).result(
                        timeout=bound_s(backend) + HANG_S)
                    outcome = judge_value(backend, n, value)
            except Exception as exc:  # judged
                outcome = judge_exception(exc)
            self.ledger.end(rid, *outcome)


# --------------------------------------------------------------------------- the injector


@dataclass
class Action:
    at: float  # seconds after the soak began
    kind: str
    backend: str
    pick: float  # which replica, socket or endpoint: a fraction of the sorted candidates
    value: Any = None  # seconds stopped, reset variant, or the new config value


@dataclass
class Done:
    at: float
    took: float
    kind: str
    target: str
    ok: bool
    note: str = ""


def schedule(seed: int, duration: float) -> List[Action]:
    """The whole sequence of actions a seed makes, decided up front (config values from a
    simulation of the configs, so each change is a real one)."""
    rng = random.Random(seed)
    config = {name: {"num_replicas": initial["num_replicas"],
                     "max_concurrent_queries": initial["max_concurrent_queries"]}
              for name, (initial, _) in BACKENDS.items()}
    version = 0
    actions: List[Action] = []
    deck: List[str] = []
    at = rng.uniform(1.0, 3.0)
    while at < duration - 3.0:
        if not deck:
            deck = list(DECK)
            rng.shuffle(deck)
        kind = deck.pop()
        backend = rng.choice(NAMES)
        pick = rng.random()
        value: Any = None
        if kind == "stop-replica":
            value = round(rng.uniform(1.0, 5.0), 2)
        elif kind == "reset-connections":
            value = rng.choice(("http-clients", "driver-replica", "driver-controller"))
        elif kind == "num_replicas":
            value = rng.choice([c for c in REPLICA_COUNTS if c != config[backend][kind]])
            config[backend][kind] = value
        elif kind == "max_concurrent_queries":
            value = rng.choice([c for c in BACKENDS[backend][1] if c != config[backend][kind]])
            config[backend][kind] = value
        elif kind == "user_config":
            version += 1
            value = {"version": version}
        actions.append(Action(round(at, 2), kind, backend, pick, value))
        at += rng.uniform(1.5, 5.5)
    return actions


class Injector:
    """Carries out the schedule: faults on one thread, config changes on another (one
    after another, each waited for), every action logged with its time."""

    def __init__(self, client: serve.Client, base_port: int, instance_dir: str,
                 actions: List[Action], t0: float) -> None:
        self.client = client
        self.port = base_port
        self.instance_dir = instance_dir
        self.actions = actions
        self.t0 = t0
        self.done: List[Done] = []
        self.stop_event = threading.Event()
        self.stopped: Dict[Tuple[int, int], Tuple[Proc, threading.Timer]] = {}
        self.lock = threading.Lock()
        # What the config should be: from the calls that returned; a field whose call
        # failed or hung may hold either value.
        self.expected: Dict[str, Dict[str, Any]] = {
            name: {"num_replicas": initial["num_replicas"],
                   "max_concurrent_queries": initial["max_concurrent_queries"],
                   "user_config": {"version": 0}}
            for name, (initial, _) in BACKENDS.items()}
        self.either: Dict[str, Dict[str, List[Any]]] = {name: {} for name in NAMES}
        self.config_failures: List[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(FAULT_KINDS,), name="soak-faults",
                             daemon=True),
            threading.Thread(target=self._run, args=(CONFIG_KINDS,), name="soak-config",
                             daemon=True)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        """No new action; wait for the one under way (a config call is bounded)."""
        self.stop_event.set()
        for thread in self.threads:
            thread.join(CONFIG_CALL_BOUND_S + 5)
        self.thaw_all()

    def thaw_all(self) -> None:
        """SIGCONT every process still stopped (also from the finally of main)."""
        with self.lock:
            stopped, self.stopped = self.stopped, {}
        for proc, timer in stopped.values():
            timer.cancel()
            send_signal(proc, signal.SIGCONT)

    def _log(self, started: float, kind: str, target: str, ok: bool, note: str = "") -> None:
        done = Done(started - self.t0, time.monotonic() - started, kind, target, ok, note)
        self.done.append(done)
        print(f"  +{done.at:6.1f}s {kind:29} {target:28} "
              f"{'' if ok else 'FAILED '}{note}{f' ({done.took:.1f}s)' if done.took > 0.5 else ''}",
              flush=True)

    def _run(self, kinds: Tuple[str, ...]) -> None:
        for action in self.actions:
            if action.kind not in kinds:
                continue
            delay = self.t0 + action.at - time.monotonic()
            if self.stop_event.wait(max(0.0, delay)):
                return
            if action.kind in CONFIG_KINDS and self.config_failures and \
                    any("hung" in failure for failure in self.config_failures):
                return  # the desired state is unknown from here on
            started = time.monotonic()
            try:
                getattr(self, "_" + action.kind.replace("-", "_"))(action, started)
            except Exception as exc:  # a failed action is logged, not fatal
                self._log(started, action.kind, action.backend, False, repr(exc)[:120])

    # ------------------------------------------------------------- faults

    @staticmethod
    def _pick(candidates: List[Any], pick: float) -> Any:
        return candidates[min(len(candidates) - 1, int(pick * len(candidates)))]

    def _replicas(self, backend: str) -> List[Proc]:
        return sorted((p for p in instance_tree() if p.role == "replica" and
                       p.name.startswith(backend + "#") and p.state not in "ZTX"),
                      key=lambda p: p.name)

    def _kill_replica(self, action: Action, started: float) -> None:
        replicas = self._replicas(action.backend)
        if not replicas:
            self._log(started, action.kind, action.backend, True, "skipped: none runs")
            return
        proc = self._pick(replicas, action.pick)
        ok = send_signal(proc, signal.SIGKILL)
        self._log(started, action.kind, f"{proc.name} pid {proc.pid}", ok)

    def _stop_replica(self, action: Action, started: float) -> None:
        replicas = self._replicas(action.backend)
        if not replicas:
            self._log(started, action.kind, action.backend, True, "skipped: none runs")
            return
        proc = self._pick(replicas, action.pick)

        def thaw() -> None:
            with self.lock:
                self.stopped.pop(proc.key, None)
            send_signal(proc, signal.SIGCONT)

        timer = threading.Timer(action.value, thaw)
        timer.daemon = True
        with self.lock:
            ok = send_signal(proc, signal.SIGSTOP)
            if ok:
                self.stopped[proc.key] = (proc, timer)
                timer.start()
        self._log(started, action.kind, f"{proc.name} pid {proc.pid}", ok,
                  f"SIGCONT after {action.value}s")

    def _kill_role(self, action: Action, started: float, role: str) -> None:
        procs = [p for p in instance_tree() if p.role == role and p.state not in "ZX"]
        if not procs:
            self._log(started, action.kind, role, True, "skipped: none runs")
            return
        proc = self._pick(sorted(procs, key=lambda p: p.name), action.pick)
        self._log(started, action.kind, f"{proc.name} pid {proc.pid}",
                  send_signal(proc, signal.SIGKILL))

    def _kill_proxy(self, action: Action, started: float) -> None:
        self._kill_role(action, started, "proxy")

    def _kill_controller(self, action: Action, started: float) -> None:
        self._kill_role(action, started, "controller")

    def _reset_connections(self, action: Action, started: float) -> None:
        if action.value == "http-clients":
            self._reset_http_clients(action, started)
            return
        peers = unix_peers()
        if action.value == "driver-controller":
            wanted = os.path.join(self.instance_dir, "controller.sock")
            fds = [fd for fd, peer in peers.items() if peer == wanted]
            target = "driver <-> controller"
        else:
            replicas = sorted({peer for peer in peers.values() if
                               os.path.dirname(peer) == self.instance_dir and
                               os.path.basename(peer).startswith("r-")})
            if not replicas:
                self._log(started, f"reset-{action.value}", "-", True, "skipped: none")
                return
            wanted = self._pick(replicas, action.pick)
            fds = [fd for fd, peer in peers.items() if peer == wanted]
            target = f"driver <-> {listener(wanted)}"
        shut = sum(shut_down_fd(fd, wanted) for fd in fds)
        self._log(started, f"reset-{action.value}", target, True,
                  f"{shut} connection(s) shut down")

    def _reset_http_clients(self, action: Action, started: float) -> None:
        """HTTP clients that send a slow request and vanish with a TCP RST mid-request."""
        socks = []
        try:
            for i in range(4):
                backend = NAMES[(int(action.pick * 3) + i) % 3]
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=2.0)
                socks.append(sock)
                sock.sendall(f"GET /{backend}?n=0&hold=0.5 HTTP/1.1\r\nHost: 127.0.0.1"
                             "\r\n\r\n".encode())
            time.sleep(0.2)
        finally:
            for sock in socks:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        self._log(started, f"reset-{action.value}", "4 HTTP clients", True,
                  "RST mid-request")

    # ------------------------------------------------------------- config changes

    def _config(self, action: Action, started: float) -> None:
        backend, name = action.backend, action.kind
        try:
            bounded(self.client.update_backend_config, CONFIG_CALL_BOUND_S, backend,
                    {name: action.value})
        except TimeoutError:
            self.either[backend].setdefault(name, [self.expected[backend][name]]).append(
                action.value)
            self.config_failures.append(f"{backend}.{name}={action.value}: hung")
            self._log(started, f"config {name}", f"{backend} -> {action.value}", False,
                      f"hung (no return within {CONFIG_CALL_BOUND_S}s)")
            return
        except Exception as exc:  # the change may or may not be in force
            self.either[backend].setdefault(name, [self.expected[backend][name]]).append(
                action.value)
            self.config_failures.append(f"{backend}.{name}={action.value}: {exc!r}"[:200])
            self._log(started, f"config {name}", f"{backend} -> {action.value}", False,
                      repr(exc)[:120])
            return
        self.expected[backend][name] = action.value
        self.either[backend].pop(name, None)
        self._log(started, f"config {name}", f"{backend} -> {action.value}", True)

    _num_replicas = _user_config = _max_concurrent_queries = _config


# --------------------------------------------------------------------------- resources


@dataclass
class Tracked:
    proc: Proc
    first_seen: float
    base_rss: Optional[int] = None
    base_fds: Optional[int] = None
    base_replicas: int = 0
    end_rss: Optional[int] = None
    end_fds: Optional[int] = None


class Sampler:
    """RSS and fd counts of every process of the instance (and this script's fds): a warm
    baseline per process — for those that ran through the warm-up, taken after it; for
    those started later, once they have run ``warm_s`` under load — and a final sample."""

    def __init__(self, warm_s: float) -> None:
        self.warm_s = warm_s
        self.tracked: Dict[Tuple[int, int], Tracked] = {}
        self.driver_base: Optional[int] = None
        self.driver_base_replicas = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    @staticmethod
    def _replica_count(tree: List[Proc]) -> int:
        return sum(p.role == "replica" for p in tree)

    def sample(self, baseline_all: bool = False, final: bool = False) -> None:
        now = time.monotonic()
        tree = [p for p in instance_tree() if p.role and p.state not in "ZX"]
        replicas = self._replica_count(tree)
        for proc in tree:
            tracked = self.tracked.setdefault(proc.key, Tracked(proc, now))
            if tracked.base_rss is None and (baseline_all or
                                             now - tracked.first_seen >= self.warm_s):
                tracked.base_rss, tracked.base_fds = rss_kib(proc.pid), fd_count(proc.pid)
                tracked.base_replicas = replicas
            if final:
                tracked.end_rss, tracked.end_fds = rss_kib(proc.pid), fd_count(proc.pid)
        if baseline_all:
            self.driver_base, self.driver_base_replicas = fd_count(os.getpid()), replicas

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)

    def _run(self) -> None:
        while not self.stop_event.wait(SAMPLE_EVERY_S):
            self.sample()


# --------------------------------------------------------------------------- checks


@dataclass
class Check:
    name: str
    passed: bool
    number: str
    notes: List[str] = field(default_factory=list)


TRANSPORT_ERRORS = {name for name in dir(httpx) if isinstance(getattr(httpx, name), type)
                    and issubclass(getattr(httpx, name), httpx.TransportError)
                    and not issubclass(getattr(httpx, name), httpx.TimeoutException)}


def classify(record: Record, faults: List[Done], t0: float) -> str:
    """answered, clear (a failure that names its cause), hung, or unclear."""
    if record.outcome == "answered":
        return "answered"
    if record.outcome == "no end":
        return "hung"
    if record.outcome.startswith("HTTP "):
        status = int(record.outcome.split()[1])
        return "clear" if status in (503, 504) and record.detail.strip() else "unclear"
    if record.outcome in TRANSPORT_ERRORS:
        # A connection can only break when something holding it died: the proxy, or (a
        # stream whose head was sent) its replica.
        kinds = {"kill-proxy"} | ({"kill-replica", "stop-replica"}
                                  if record.backend == "stream" else set())
        start, end = record.started - t0 - 2.0, record.ended - t0 + 0.5
        explained = any(f.kind in kinds and start <= f.at <= end for f in faults)
        return "clear" if explained else "unclear"
    if record.outcome.startswith(("wrong answer", "unexpected")):
        return "unclear"
    return "clear" if record.detail.strip() else "unclear"  # a ServeError with its message


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def gauge_lines(text: str, metric: str) -> List[Tuple[str, float]]:
    found = []
    for line in text.splitlines():
        if line.startswith(metric + "{") or line.startswith(metric + " "):
            labels, value = line.rsplit(" ", 1)
            found.append((labels, float(value)))
    return found


def probe_params(backend: str) -> Dict[str, Any]:
    """The arguments of one capacity probe's requests: held together until a release time
    (a sync replica runs one at a time, so those are only held a while each)."""
    if backend == "sync":
        return {"n": 0, "hold": SYNC_PROBE_HOLD_S}
    return {"probe": uuid.uuid4().hex, "release": round(time.time() + PROBE_HOLD_S, 3)}


def probe_http(load: Load, backend: str, count: int) -> List[Any]:
    """``count`` requests at once over HTTP; their replies (or errors)."""
    async def all_at_once() -> List[Any]:
        limits = httpx.Limits(max_connections=count + 4, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S + 10, limits=limits) as http:
            params = probe_params(backend)

            async def one() -> Any:
                response = await http.get(f"{load.base}/{backend}", params=params)
                if response.status_code != 200:
                    return f"HTTP {response.status_code} {_cause(response.text)}"
                return json.loads(response.text.splitlines()[0])
            return await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    return load.call(all_at_once(), REQUEST_TIMEOUT_S + 30)


def probe_handles(load: Load, backend: str, count: int) -> List[Any]:
    """``count`` requests at once through a sync handle; their replies (or errors)."""
    handle = load.sync_handles[backend]

    def all_at_once() -> List[Any]:
        kwargs = probe_params(backend)
        sent = []
        for _ in range(count):
            try:
                sent.append(handle.remote(**kwargs))
            except Exception as exc:  # reported
                sent.append(exc)
        replies: List[Any] = []
        for reply in sent:
            try:
                if isinstance(reply, Exception):
                    raise reply
                if backend == "stream":
                    replies.append(json.loads("".join(reply).splitlines()[0]))
                else:
                    replies.append(reply.result(timeout=REQUEST_TIMEOUT_S + 10))
            except Exception as exc:  # reported
                replies.append(exc)
        return replies

    return bounded(all_at_once, REQUEST_TIMEOUT_S + 40)


def capacity_verdict(backend: str, replies: List[Any], pids: Set[int], mcq: int,
                     version: int) -> Tuple[bool, str]:
    good = [r for r in replies if isinstance(r, dict)]
    errors = [r for r in replies if not isinstance(r, dict)]
    per_pid: Dict[int, int] = {}
    for reply in good:
        per_pid[reply["pid"]] = per_pid.get(reply["pid"], 0) + 1
    # (a sync backend's replies say nothing of this: each replica runs one at a time)
    at_once = sum(1 for r in good if not r.get("late") and r.get("peak", mcq) == mcq)
    versions = {r.get("version") for r in good}
    passed = not errors and set(per_pid) == pids and all(
        count == mcq for count in per_pid.values()) and at_once == len(replies) and \
        versions == {version}
    number = (f"{len(good)}/{len(replies)} ok" +
              (f", {at_once}/{len(replies)} held at once" if backend != "sync" else "") +
              f", per replica {sorted(per_pid.values())} of {mcq}, {len(per_pid)}/{len(pids)} "
              f"replicas, version {sorted(versions, key=str)}")
    if errors:
        number += f", errors: {sorted({str(e)[:60] for e in errors})[:2]}"
    return passed, number


def run_checks(client: serve.Client, load: Load, injector: Injector, sampler: Sampler,
               instance_dir: str, settle_s: float) -> List[Check]:
    checks: List[Check] = []
    records = load.ledger.records
    t0 = injector.t0
    kinds = [classify(r, injector.done, t0) for r in records]
    hung = [r for r, k in zip(records, kinds, strict=True) if k == "hung"]
    unclear = [r for r, k in zip(records, kinds, strict=True) if k == "unclear"]
    late = [r for r, k in zip(records, kinds, strict=True)
            if k != "hung" and r.ended - r.started > bound_s(r.backend)]
    checks.append(Check("every request ended", not hung, f"{len(hung)} of {len(records)} "
                        "with no end", [f"{r.source} {r.backend} open "
                                        f"{r.ended - r.started:.1f}s from "
                                        f"+{r.started - t0:.1f}s" for r in hung[:5]]))
    worst = max(((r.ended - r.started) / bound_s(r.backend) for r in records), default=0.0)
    checks.append(Check("within bound (timeout + margin)", not late,
                        f"{len(late)} over, worst {worst:.2f} x bound",
                        [f"{r.source} {r.backend} {r.outcome} took {r.ended - r.started:.1f}s "
                         f"(bound {bound_s(r.backend):.1f}s) from +{r.started - t0:.1f}s"
                         for r in late[:5]]))
    checks.append(Check("failures name their cause", not unclear,
                        f"{len(unclear)} unclear of {sum(k != 'answered' for k in kinds)} "
                        "failed", [f"{r.source} {r.backend} {r.outcome} at +"
                                   f"{r.started - t0:.1f}s: {r.detail[:100]}"
                                   for r in unclear[:5]]))
    failures = injector.config_failures
    checks.append(Check("config calls returned", not failures,
                        f"{len(failures)} of "
                        f"{sum(d.kind.startswith('config') for d in injector.done)} failed",
                        failures[:5]))

    # The config read back, and in force on the replicas.
    status: Dict[str, Any] = bounded(client._call, 30, "status")
    configs = bounded(client.list_backends, 30)
    wrong = []
    for name in NAMES:
        read = bounded(client.get_backend_config, 30, name)
        if configs.get(name) != read:
            wrong.append(f"{name}: list_backends and get_backend_config differ")
        for key, want in injector.expected[name].items():
            allowed = injector.either[name].get(key, [want])
            if getattr(read, key) not in allowed:
                wrong.append(f"{name}.{key} = {getattr(read, key)}, acknowledged {want}")
        backend = status["backends"].get(name, {})
        replicas = read.num_replicas
        if (backend.get("running"), backend.get("target")) != (replicas, replicas):
            wrong.append(f"{name}: {backend.get('running')} running, target "
                         f"{backend.get('target')}, config {replicas}")
    checks.append(Check("acknowledged configs in force", not wrong,
                        f"{len(wrong)} differ of {len(NAMES) * 3} fields "
                        f"(settled in {settle_s:.1f}s)", wrong[:6]))

    # Nothing left behind: places, processes, socket files, fds, memory.
    text = bounded(serve.metrics_text, 30)
    held = [(labels, value) for metric in ("serve_replica_processing_queries",
                                           "serve_deployment_queued_queries")
            for labels, value in gauge_lines(text, metric) if value]
    checks.append(Check("no place held after the load", not held,
                        f"{sum(v for _, v in held):g} held or queued",
                        [f"{labels} {value:g}" for labels, value in held[:5]]))

    tree = instance_tree()
    status_replicas = {p["pid"] for p in status["processes"] if p["role"] == "replica"}
    live = [p for p in tree if p.state not in "ZX"]
    tree_replicas = {p.pid for p in live if p.role == "replica"}
    odd = [f"pid {p.pid} {p.role or '?'} {p.name} state {p.state}" for p in tree
           if p.state in "TZ" or not p.role]
    if tree_replicas != status_replicas:
        odd.append(f"replica pids running {sorted(tree_replicas)}, status lists "
                   f"{sorted(status_replicas)}")
    roles = {role: sum(p.role == role for p in live) for role in ("supervisor", "controller",
                                                                  "proxy")}
    if roles != {"supervisor": 1, "controller": 1, "proxy": 1}:
        odd.append(f"processes by role {roles}")
    checks.append(Check("no stray process", not odd, f"{len(live)} processes, "
                        f"{len(tree_replicas)} replicas", odd[:5]))

    sockets = sorted(e for e in os.listdir(instance_dir) if e.endswith(".sock"))
    want = {"r": len(tree_replicas), "p": roles["proxy"], "controller.sock": 1}
    have = {"r": sum(s.startswith("r-") for s in sockets),
            "p": sum(s.startswith("p-") for s in sockets),
            "controller.sock": sockets.count("controller.sock")}
    extra = [s for s in sockets if not s.startswith(("r-", "p-")) and s != "controller.sock"]
    checks.append(Check("no leftover socket file", have == want and not extra,
                        f"{len(sockets)} files for {sum(want.values())} processes",
                        [f"have {have}, want {want}", *extra][:3] if have != want or extra
                        else []))

    replicas_now = sum(p.role == "replica" for p in live)
    grown, leaked, judged, young = [], [], 0, 0
    for tracked in sampler.tracked.values():
        if tracked.end_rss is None:
            continue  # gone before the end
        if tracked.base_rss is None:
            young += 1
            continue
        judged += 1
        proc = tracked.proc
        if tracked.end_rss > tracked.base_rss * (1 + RSS_GROWTH):
            grown.append(f"{proc.role} {proc.name} pid {proc.pid}: {tracked.base_rss // 1024}"
                         f" -> {tracked.end_rss // 1024} MiB")
        more_replicas = max(0, replicas_now - tracked.base_replicas)
        allowed = tracked.base_fds + FD_SLACK + more_replicas * FDS_PER_REPLICA.get(proc.role, 0)
        if tracked.end_fds is not None and tracked.end_fds > allowed:
            leaked.append(f"{proc.role} {proc.name} pid {proc.pid}: {tracked.base_fds} -> "
                          f"{tracked.end_fds} fds (allowed {allowed})")
    worst = max((t.end_rss / t.base_rss for t in sampler.tracked.values()
                 if t.end_rss and t.base_rss), default=1.0)
    checks.append(Check(f"RSS within {RSS_GROWTH:.0%} of warm baseline", not grown,
                        f"worst {worst - 1:+.1%}, {judged} processes ({young} too young)",
                        grown[:5]))
    driver_end = fd_count(os.getpid())
    driver_allowed = (sampler.driver_base or 0) + FD_SLACK + FDS_PER_REPLICA["driver"] * max(
        0, replicas_now - sampler.driver_base_replicas)
    if driver_end is not None and driver_end > driver_allowed:
        leaked.append(f"this script: {sampler.driver_base} -> {driver_end} fds "
                      f"(allowed {driver_allowed})")
    checks.append(Check("no leaked file descriptor", not leaked,
                        f"{len(leaked)} leaking of {judged + 1} processes "
                        f"(this script {sampler.driver_base} -> {driver_end})", leaked[:5]))

    # Capacity: replicas x max_concurrent_queries at once, over HTTP and through handles.
    for name in NAMES:
        read = bounded(client.get_backend_config, 30, name)
        pids = {p.pid for p in live if p.role == "replica" and p.name.startswith(name + "#")}
        mcq = read.max_concurrent_queries
        version = (read.user_config or {}).get("version")
        count = len(pids) * mcq
        for path, probe in (("HTTP", probe_http), ("handle", probe_handles)):
            try:
                idle = wait_idle(name)
                if idle:
                    raise RuntimeError(f"places still held before the probe: {idle}")
                replies = probe(load, name, count)
                passed, number = capacity_verdict(name, replies, pids, mcq, version)
            except Exception as exc:  # a probe that fails is a failed check
                passed, number = False, f"probe failed: {exc!r}"[:150]
            checks.append(Check(f"capacity {name} via {path} ({len(pids)}x{mcq})", passed,
                                number))
    return checks


def wait_idle(backend: str, timeout: float = 10.0) -> List[str]:
    """Wait until no replica or router holds a place of ``backend`` (a probe's places are
    given back just after its replies went out); what is still held after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        text = bounded(serve.metrics_text, 30)
        held = [f"{labels} {value:g}" for metric in ("serve_replica_processing_queries",
                                                     "serve_deployment_queued_queries")
                for labels, value in gauge_lines(text, metric)
                if value and f'backend="{backend}"' in labels]
        if not held or time.monotonic() > deadline:
            return held
        time.sleep(0.2)


def settle(client: serve.Client, injector: Injector) -> float:
    """Wait until every backend runs its target, nothing more, and one proxy; seconds."""
    started = time.monotonic()
    while time.monotonic() - started < SETTLE_S:
        try:
            status = bounded(client._call, 10, "status")
        except Exception:  # the controller may be restarting
            time.sleep(0.5)
            continue
        tree = [p for p in instance_tree() if p.state not in "ZXT"]
        ready = all(
            (status["backends"].get(name, {}).get("running"),
             status["backends"].get(name, {}).get("target")) ==
            (want, want) and sum(p.role == "replica" and p.name.startswith(name + "#")
                                 for p in tree) == want
            for name in NAMES
            for want in [injector.expected[name]["num_replicas"]]
            if "num_replicas" not in injector.either[name])
        if ready and sum(p.role == "proxy" for p in tree) == 1:
            return time.monotonic() - started
        time.sleep(0.5)
    return time.monotonic() - started


# --------------------------------------------------------------------------- the report


def report(records: List[Record], injector: Injector, checks: List[Check],
           soak_s: float) -> str:
    t0 = injector.t0
    lines = ["", "requests by path and backend (latency of every request, answered or failed)",
             f"  {'path':13} {'backend':7} {'requests':>8} {'answered':>8} {'failed':>6} "
             f"{'req/s':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'bound ms':>8}"]
    groups: Dict[Tuple[str, str], List[Record]] = {}
    for record in records:
        groups.setdefault((record.source, record.backend), []).append(record)
    for (source, backend), group in sorted(groups.items()):
        took = [(r.ended - r.started) * 1e3 for r in group]
        answered = sum(r.outcome == "answered" for r in group)
        lines.append(f"  {source:13} {backend:7} {len(group):8} {answered:8} "
                     f"{len(group) - answered:6} {len(group) / soak_s:6.1f} "
                     f"{percentile(took, 0.5):8.1f} {percentile(took, 0.99):8.1f} "
                     f"{max(took):8.1f} {bound_s(backend) * 1e3:8.0f}")
    lines += ["", "requests by outcome",
              f"  {'outcome':44} {'kind':9} {'count':>7} {'p50 ms':>8} {'max ms':>8}"]
    outcomes: Dict[str, List[Record]] = {}
    for record in records:
        outcomes.setdefault(record.outcome, []).append(record)
    for outcome, group in sorted(outcomes.items(), key=lambda item: -len(item[1])):
        took = [(r.ended - r.started) * 1e3 for r in group]
        kinds = sorted({classify(r, injector.done, t0) for r in group})
        lines.append(f"  {outcome[:44]:44} {'/'.join(kinds):9} {len(group):7} "
                     f"{percentile(took, 0.5):8.1f} {max(took):8.1f}")
    examples = [group[0] for outcome, group in outcomes.items() if outcome != "answered"]
    if examples:
        lines += ["", "a failure of each outcome (the first)"]
    for record in sorted(examples, key=lambda r: r.started):
        lines.append(f"  +{record.started - t0:6.1f}s {record.source:12} {record.backend:6} "
                     f"{record.outcome[:36]:36} {(record.ended - record.started) * 1e3:7.0f} ms "
                     f"{' '.join(record.detail.split())[:110]}")
    lines += ["", "injected",
              f"  {'kind':28} {'count':>5} {'failed':>6} {'max s':>6}"]
    by_kind: Dict[str, List[Done]] = {}
    for done in injector.done:
        by_kind.setdefault(done.kind, []).append(done)
    for kind, group in sorted(by_kind.items()):
        lines.append(f"  {kind:28} {len(group):5} {sum(not d.ok for d in group):6} "
                     f"{max(d.took for d in group):6.1f}")
    lines += ["", "checks"]
    for check in checks:
        lines.append(f"  {'PASS' if check.passed else 'FAIL'}  {check.name:44} {check.number}")
        for note in check.notes:
            lines.append(f"        {note}")
    return "\n".join(lines)


def commit() -> str:
    """The commit under test, marked when src/ has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--", "../src")
        return git("rev-parse", "--short", "HEAD") + (" + uncommitted src/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def wait_http(url: str, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {deadline_s}s")
        time.sleep(0.1)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0,
                        help="seconds of load and faults (default 600)")
    parser.add_argument("--quick", action="store_true", help="120 s of load and faults")
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds of load before the baselines (default 30, quick 15)")
    parser.add_argument("--logs", default=None, help="where the instance's processes write "
                        "their stderr (default: soak-SEED.log in the temp directory)")
    args = parser.parse_args(argv)
    duration = 120.0 if args.quick else args.duration
    warm_s = args.warmup if args.warmup is not None else (15.0 if args.quick else 30.0)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10 ** 6)
    actions = schedule(seed, duration)
    logs = args.logs or os.path.join(tempfile.gettempdir(), f"soak-{seed}.log")
    print(f"servekit fault soak at {commit()}: seed {seed} (repeat: python benchmarks/soak.py "
          f"--seed {seed} --duration {duration:g}), {duration:g}s of load and faults after "
          f"{warm_s:g}s of warm-up, {len(actions)} actions, {os.cpu_count()} cores; the "
          f"processes' logs go to {logs}", flush=True)
    # The instance's processes inherit stderr: their warnings (expected under faults) go to
    # the log file, and this script's own output stays readable.
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    log_fd = os.open(logs, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        return soak(seed, duration, warm_s, actions, logs)
    finally:
        sys.stderr.flush()
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)


def soak(seed: int, duration: float, warm_s: float, actions: List[Action], logs: str) -> int:
    """Start, warm up, load and break, settle, check, report; stop everything started."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    client = serve.start(http_options={"host": "127.0.0.1", "port": port,
                                       "request_timeout_s": HTTP_TIMEOUT_S})
    injector: Optional[Injector] = None
    load: Optional[Load] = None
    sampler: Optional[Sampler] = None
    try:
        instance_dir = os.path.dirname(client._controller_address)
        for name, (initial, _) in BACKENDS.items():
            client.create_backend(name, MODELS[name], config={
                **initial, "request_timeout_s": REQUEST_TIMEOUT_S,
                "user_config": {"version": 0}})
            client.create_endpoint(name, backend=name, route=f"/{name}")
        for name in NAMES:
            wait_http(f"{base}/{name}?n=0")
        ledger = Ledger()
        load = Load(client, base, seed, ledger)
        sampler = Sampler(warm_s)

        print(f"warm-up: {warm_s:g}s of load, no faults", flush=True)
        load.start()
        time.sleep(warm_s)
        load.stop()
        warm_records = len(ledger.records)
        time.sleep(3.0)
        sampler.sample(baseline_all=True)
        ledger.records.clear()

        print(f"soak: {duration:g}s of load with faults ({warm_records} warm-up requests "
              "not counted)", flush=True)
        t0 = time.monotonic()
        injector = Injector(client, port, instance_dir, actions, t0)
        load.start()
        injector.start()
        sampler.start()
        time.sleep(duration)
        soak_s = time.monotonic() - t0
        print("stopping the load; waiting for every request to end", flush=True)
        load.stop()
        injector.stop()
        sampler.stop()
        settled = settle(client, injector)
        print(f"settled in {settled:.1f}s; quiet for {QUIET_S:g}s, then checks", flush=True)
        time.sleep(QUIET_S)
        sampler.sample(final=True)
        checks = run_checks(client, load, injector, sampler, instance_dir, settled)
        print(report(ledger.records, injector, checks, soak_s))
        failed = [check.name for check in checks if not check.passed]
        print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed; seed {seed}; "
              f"the processes' logs: {logs}"
              + (f"; FAILED: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0
    finally:
        if injector is not None:
            injector.stop_event.set()
            injector.thaw_all()
        if sampler is not None:
            sampler.stop_event.set()
        if load is not None:
            load.stopping.set()
        try:
            bounded(client.shutdown, 120)
        except Exception as exc:
            print(f"shutdown failed: {exc!r}", flush=True)
        if load is not None:
            load.close()
        stop_leftovers()


def stop_leftovers() -> None:
    """SIGKILL, by pid, any process this script started that outlived the shutdown."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        leftovers = [p for p in instance_tree() if p.state not in "ZX"]
        if not leftovers:
            return
        time.sleep(0.2)
    for proc in leftovers:
        print(f"still running after shutdown, killed: pid {proc.pid} {proc.role} {proc.name}",
              flush=True)
        send_signal(proc, signal.SIGCONT)
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    sys.exit(main())
