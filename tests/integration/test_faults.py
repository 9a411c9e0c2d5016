"""Randomized fault injection: every request ends, answered or failed with a clear error.

Replicas of two backends (one sync, one async) are SIGKILLed, frozen (SIGSTOP) and thawed
(SIGCONT) in time, or left frozen, at random, while four routers send to them at once: the
driver's sync handles (one router on servekit's background loop), two threads that each run
their own event loop with an async handle (a router each), and the HTTP proxy's router.

What must hold:

1. every request ends before its deadline, and no traffic thread hangs;
2. every failure is the ``TypeError`` of an unpicklable argument (raised at once), or a
   ``BackendUnavailableError`` (over HTTP a 503 with its text) that names a replica of the
   right backend which this test SIGKILLed or left frozen, ending soon after the fault;
   a replica thawed before the controller could detect it finishes its requests and keeps
   running;
3. after the chaos, every backend serves again over every path and runs its target number
   of replicas; replicas left frozen were replaced by the controller.

The seed is printed; ``SERVEKIT_FAULT_SEED=<seed>`` replays its choices (of backend shapes,
requests and faults; the timing, and so which replica a fault hits, still varies).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import random
import re
import signal
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import httpx
import pytest
from fault_backends import async_echo, sync_echo
from processes import descendants, is_worker, start_time

import servekit as serve
from conftest import free_port
from servekit.exceptions import BackendUnavailableError

pytestmark = pytest.mark.integration

TRAFFIC_S = 40.0  # traffic runs this long
CHAOS_WINDOW_S = (1.0, 37.0)  # faults happen in this window of the traffic
CHAOS_PAUSE_S = (0.5, 2.0)  # between two faults
DEADLINE_S = 30.0  # every request must end within this
UNPICKLABLE_SHARE = 0.03
BACKEND_SLEEP_S = (0.002, 0.02)  # how long a request holds its replica
TYPE_ERROR_WITHIN_S = 2.0  # an unpicklable argument fails "at once" (a loaded machine)
HEALTH = {"health_check_period_s": 0.2, "health_check_timeout_s": 0.3,
          "health_check_failure_threshold": 2}
# The controller gives up on a frozen replica after `threshold` pings in a row time out:
# no sooner than threshold * timeout = 0.6 s after the freeze. A replica thawed well before
# that must come back unharmed; one thawed later (the test process was slow) may be gone.
THAW_AFTER_S = (0.03, 0.2)
THAWED_IN_TIME_S = 0.35
KILL_FAILS_WITHIN_S = 5.0  # requests held by a SIGKILLed replica fail this soon after
FREEZE_FAILS_WITHIN_S = 10.0  # ... by a frozen one: detection, then its kill
FROZEN_REPLACED_WITHIN_S = 10.0
RECOVERY_S = 30.0
CONSECUTIVE_OK = 20
SYNC_THREADS = 3
ASYNC_THREADS = 2
TASKS_PER_LOOP = 2
HTTP_THREADS = 2

BACKENDS: Dict[str, Tuple[Callable, str]] = {
    "faults-sync": (sync_echo, "/faults-sync"),
    "faults-async": (async_echo, "/faults-async"),
}
SYNC, ASYNC, HTTP = "sync handle", "async handle", "HTTP"
PATHS = (SYNC, ASYNC, HTTP)
ACTIONS = ["kill", "freeze-thaw", "freeze"]
TAG_RE = re.compile(r"The replica (\S+#[0-9a-f]+) went away")


# --------------------------------------------------------------------------- bookkeeping


class HTTPFailure(Exception):
    """A non-200 answer of the proxy."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text}")
        self.status = status


@dataclasses.dataclass
class Failure:
    path: str
    backend: str
    unpicklable: bool
    kind: str  # "type-error", "unavailable", "deadline", "wrong-answer", "over-cap", "other"
    error: str
    ended: float  # time.monotonic()
    elapsed: float


class Ledger:
    """What became of every request; shared by the traffic threads."""

    def __init__(self, caps: Dict[str, int]) -> None:
        self.caps = caps  # backend -> max_concurrent_queries
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # path -> requests
        self.ok: collections.Counter = collections.Counter()
        self.slowest: Dict[str, float] = collections.defaultdict(float)
        self.failures: List[Failure] = []
        self.replicas: Dict[int, Tuple[str, int]] = {}  # pid -> (replica tag, start time)
        self.crashes: List[str] = []  # traffic threads that died of an exception

    def record(self, path: str, backend: str, x: Optional[str], started: float,
               value: Any = None, error: Optional[BaseException] = None) -> bool:
        """Account for one request (``x`` None: its argument was unpicklable); ok or not."""
        ended = time.monotonic()
        elapsed = ended - started
        failure = None
        if error is not None:
            failure = self._classify(x is None, error)
        elif x is None:
            failure = ("other", f"an unpicklable argument was answered: {value!r}")
        elif not (isinstance(value, list) and len(value) == 4 and value[2] == x
                  and isinstance(value[1], str) and value[1].startswith(backend + "#")):
            failure = ("wrong-answer", f"sent x={x!r} to {backend}, got {value!r}")
        elif value[3] > self.caps[backend]:
            failure = ("over-cap", f"{value[3]} requests ran at once on replica {value[1]}, "
                                   f"max_concurrent_queries is {self.caps[backend]}")
        if failure is None and elapsed > DEADLINE_S:
            failure = ("deadline", f"answered after {elapsed:.1f}s")
        with self.lock:
            self.requests[path] += 1
            self.slowest[path] = max(self.slowest[path], elapsed)
            if failure is None:
                self.ok[path] += 1
                pid, tag = value[0], value[1]
                if pid not in self.replicas:
                    started_at = start_time(pid)
                    if started_at is not None:
                        self.replicas[pid] = (tag, started_at)
                return True
            self.failures.append(Failure(path, backend, x is None, failure[0], failure[1],
                                         ended, elapsed))
            return False

    @staticmethod
    def _classify(unpicklable: bool, error: BaseException) -> Tuple[str, str]:
        text = f"{type(error).__name__}: {error}"
        if isinstance(error, (TimeoutError, httpx.TimeoutException)):
            return "deadline", text
        if unpicklable:
            return ("type-error" if isinstance(error, TypeError) else "other"), text
        if isinstance(error, BackendUnavailableError):
            return "unavailable", text
        if isinstance(error, HTTPFailure):
            if error.status == 503 and str(error).startswith(
                    "HTTP 503: BackendUnavailableError: "):
                return "unavailable", text
        return "other", text


# --------------------------------------------------------------------------- one request


def new_request(rng: random.Random, prefix: str, n: int) -> Tuple[str, Optional[str], Any]:
    """(backend, x, handle argument); x None and a lock as argument for an unpicklable one."""
    backend = rng.choice(sorted(BACKENDS))
    if rng.random() < UNPICKLABLE_SHARE:
        return backend, None, threading.Lock()
    x = f"{prefix}-{n}"
    return backend, x, {"x": x, "sleep": round(rng.uniform(*BACKEND_SLEEP_S), 4)}


def sync_call(handle: Any, argument: Any, started: float) -> Any:
    response = handle.remote(argument)  # blocks until a replica took it
    return response.result(timeout=max(0.01, DEADLINE_S - (time.monotonic() - started)))


async def async_call(handle: Any, argument: Any) -> Any:
    async def call() -> Any:
        response = await handle.remote(argument)
        return await response

    return await asyncio.wait_for(call(), DEADLINE_S)


def http_call(http: httpx.Client, backend: str, argument: dict) -> Any:
    response = http.get(BACKENDS[backend][1], params=argument)
    if response.status_code != 200:
        raise HTTPFailure(response.status_code, response.text)
    return response.json()


# --------------------------------------------------------------------------- traffic


class Traffic(threading.Thread):
    """One thread sending requests one after another (or an event loop of several tasks)
    on ``path`` until ``until``."""

    def __init__(self, path: str, index: int, seed: int, until: float, abort: threading.Event,
                 ledger: Ledger, client: serve.Client, url: str) -> None:
        super().__init__(name=f"traffic-{path}-{index}", daemon=True)
        self.path, self.index, self.seed = path, index, seed
        self.until, self.abort, self.ledger = until, abort, ledger
        self.client, self.url = client, url

    def going(self) -> bool:
        return time.monotonic() < self.until and not self.abort.is_set()

    def run(self) -> None:
        try:
            if self.path == SYNC:
                self.run_sync()
            elif self.path == ASYNC:
                handles = {b: self.client.get_handle(b, sync=False) for b in BACKENDS}
                asyncio.run(self.run_loop(handles))
            else:
                self.run_http()
        except BaseException as exc:  # recorded, and fails the test
            with self.ledger.lock:
                self.ledger.crashes.append(f"{self.name}: {type(exc).__name__}: {exc}")

    def rng(self, task: int = 0) -> random.Random:
        return random.Random(f"{self.seed}-{self.path}-{self.index}-{task}")

    def run_sync(self) -> None:
        rng = self.rng()
        handles = {b: self.client.get_handle(b) for b in BACKENDS}
        n = 0
        while self.going():
            n += 1
            backend, x, argument = new_request(rng, f"s{self.index}", n)
            started = time.monotonic()
            try:
                value = sync_call(handles[backend], argument, started)
            except Exception as exc:
                self.ledger.record(SYNC, backend, x, started, error=exc)
            else:
                self.ledger.record(SYNC, backend, x, started, value=value)

    async def run_loop(self, handles: Dict[str, Any]) -> None:
        async def task(j: int) -> None:
            rng = self.rng(j)
            n = 0
            while self.going():
                n += 1
                backend, x, argument = new_request(rng, f"a{self.index}.{j}", n)
                started = time.monotonic()
                try:
                    value = await async_call(handles[backend], argument)
                except Exception as exc:
                    self.ledger.record(ASYNC, backend, x, started, error=exc)
                else:
                    self.ledger.record(ASYNC, backend, x, started, value=value)

        await asyncio.gather(*(task(j) for j in range(TASKS_PER_LOOP)))

    def run_http(self) -> None:
        rng = self.rng()
        n = 0
        with httpx.Client(base_url=self.url, timeout=DEADLINE_S) as http:
            while self.going():
                n += 1
                backend, x, argument = new_request(rng, f"h{self.index}", n)
                if x is None:
                    continue  # nothing unpicklable travels over HTTP
                started = time.monotonic()
                try:
                    value = http_call(http, backend, argument)
                except Exception as exc:
                    self.ledger.record(HTTP, backend, x, started, error=exc)
                else:
                    self.ledger.record(HTTP, backend, x, started, value=value)


# --------------------------------------------------------------------------- chaos


@dataclasses.dataclass
class Fault:
    action: str  # "kill", "freeze-thaw" (SIGSTOP, then SIGCONT soon), "freeze" (left frozen)
    pid: int
    started: int  # the process's start time, to tell it from a recycled pid
    tag: str
    at: float  # time.monotonic() just before the first signal
    frozen_for: Optional[float] = None  # freeze-thaw: seconds from SIGSTOP to SIGCONT

    @property
    def harmful(self) -> bool:
        """Whether requests held by the replica may fail: it was killed, left frozen, or
        thawed too late to be sure the controller had not given up on it."""
        return self.action != "freeze-thaw" or (
            self.frozen_for is None or self.frozen_for > THAWED_IN_TIME_S)


class Chaos(threading.Thread):
    """Signals a random live replica (learnt from the answers) every 0.5-2 s."""

    def __init__(self, rng: random.Random, ledger: Ledger, controller: int,
                 frozen: Dict[int, int], begin: float, end: float) -> None:
        super().__init__(name="chaos", daemon=True)
        self.rng, self.ledger, self.controller = rng, ledger, controller
        self.frozen = frozen  # pid -> start time of processes now stopped (thawed at the end)
        self.begin, self.end = begin, end
        self.faults: List[Fault] = []
        # The first faults are one of each kind (in a random order), the rest are random.
        self.first_actions = list(ACTIONS)
        rng.shuffle(self.first_actions)
        self.missed = 0  # picked replicas that had exited before the signal
        self.error: Optional[str] = None

    def run(self) -> None:
        try:
            at = self.begin
            while True:
                remaining = at - time.monotonic()
                if remaining > 0:
                    time.sleep(remaining)  # load shaping: the pause between faults
                if time.monotonic() >= self.end:
                    return
                self.strike()
                at = time.monotonic() + self.rng.uniform(*CHAOS_PAUSE_S)
        except BaseException as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def candidates(self) -> List[Tuple[int, str, int]]:
        """Replicas that answered, still run as the same process, and were not harmed."""
        with self.ledger.lock:
            known = dict(self.ledger.replicas)
        harmed = {fault.pid for fault in self.faults if fault.harmful}
        workers = set(descendants(self.controller))
        return [(pid, tag, started) for pid, (tag, started) in sorted(known.items())
                if pid not in harmed and pid in workers and start_time(pid) == started
                and is_worker(pid)]

    def strike(self) -> None:
        action = self.rng.choices(ACTIONS, weights=[4, 3, 3])[0]
        thaw_after = self.rng.uniform(*THAW_AFTER_S)
        candidates = self.candidates()
        if not candidates:
            return
        if self.first_actions:
            action = self.first_actions.pop()
        pid, tag, started = self.rng.choice(candidates)
        fault = Fault(action, pid, started, tag, time.monotonic())
        try:
            if action == "kill":
                os.kill(pid, signal.SIGKILL)
            else:
                self.frozen[pid] = started
                os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            self.frozen.pop(pid, None)
            self.missed += 1
            return
        self.faults.append(fault)
        if action == "freeze-thaw":
            time.sleep(thaw_after)  # how long it stays frozen: part of the fault
            if start_time(pid) == started:
                os.kill(pid, signal.SIGCONT)
            fault.frozen_for = time.monotonic() - fault.at
            self.frozen.pop(pid, None)

    def harmful_faults(self) -> Dict[str, Fault]:
        """Replica tag -> the first fault that may have failed its requests."""
        result: Dict[str, Fault] = {}
        for fault in self.faults:
            if fault.harmful:
                result.setdefault(fault.tag, fault)
        return result


def thaw(frozen: Dict[int, int]) -> None:
    """SIGCONT every process still stopped (only ever replicas this test stopped)."""
    for pid, started in list(frozen.items()):
        if start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        frozen.pop(pid, None)


# --------------------------------------------------------------------------- recovery


def streak(call: Callable[[int], bool], until: float) -> bool:
    """Call ``call(n)`` until CONSECUTIVE_OK answers in a row; False past ``until``."""
    in_a_row, n = 0, 0
    while in_a_row < CONSECUTIVE_OK:
        if time.monotonic() > until:
            return False
        n += 1
        in_a_row = in_a_row + 1 if call(n) else 0
    return True


def recover(client: serve.Client, url: str, ledger: Ledger, until: float) -> List[str]:
    """Every backend answers CONSECUTIVE_OK requests in a row on every path by ``until``."""
    missing: List[str] = []
    with httpx.Client(base_url=url, timeout=DEADLINE_S) as http:
        for backend in sorted(BACKENDS):
            handle = client.get_handle(backend)

            def over_sync(n: int, backend: str = backend, handle: Any = handle) -> bool:
                x = f"rs-{n}"
                started = time.monotonic()
                try:
                    value = sync_call(handle, {"x": x, "sleep": 0.002}, started)
                except Exception as exc:
                    return ledger.record(SYNC, backend, x, started, error=exc)
                return ledger.record(SYNC, backend, x, started, value=value)

            def over_http(n: int, backend: str = backend) -> bool:
                x = f"rh-{n}"
                started = time.monotonic()
                try:
                    value = http_call(http, backend, {"x": x, "sleep": 0.002})
                except Exception as exc:
                    return ledger.record(HTTP, backend, x, started, error=exc)
                return ledger.record(HTTP, backend, x, started, value=value)

            async def over_async(backend: str = backend) -> bool:
                handle = client.get_handle(backend, sync=False)
                in_a_row, n = 0, 0
                while in_a_row < CONSECUTIVE_OK:
                    if time.monotonic() > until:
                        return False
                    n += 1
                    x = f"ra-{n}"
                    started = time.monotonic()
                    try:
                        value = await async_call(handle, {"x": x, "sleep": 0.002})
                    except Exception as exc:
                        ok = ledger.record(ASYNC, backend, x, started, error=exc)
                    else:
                        ok = ledger.record(ASYNC, backend, x, started, value=value)
                    in_a_row = in_a_row + 1 if ok else 0
                return True

            for path, done in ((SYNC, lambda f=over_sync: streak(f, until)),
                               (HTTP, lambda f=over_http: streak(f, until)),
                               (ASYNC, lambda f=over_async: asyncio.run(f()))):
                if not done():
                    missing.append(f"{backend} over {path}")
    return missing


# --------------------------------------------------------------------------- checks


def wait_until(condition: Callable[[], object], timeout: float) -> bool:
    """Poll ``condition`` until it is truthy (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def judge(failure: Failure, harmful: Dict[str, Fault]) -> str:
    """"killed" or "type-error" for a failure the guarantees allow; else what is wrong."""
    if failure.unpicklable:
        if failure.kind != "type-error":
            return "did not raise TypeError for an unpicklable argument"
        if failure.elapsed > TYPE_ERROR_WITHIN_S:
            return f"raised TypeError for an unpicklable argument after >{TYPE_ERROR_WITHIN_S}s"
        return "type-error"
    if failure.kind == "deadline":
        return f"did not end within their {DEADLINE_S}s deadline"
    if failure.kind in ("wrong-answer", "over-cap"):
        return f"were answered wrongly ({failure.kind})"
    if failure.kind != "unavailable":
        return "failed with an unexpected error"
    match = TAG_RE.search(failure.error)
    if match is None:
        return "failed unavailable without naming the replica"
    tag = match.group(1)
    fault = harmful.get(tag)
    if fault is None:
        return "failed naming a replica this test neither killed nor left frozen"
    if not tag.startswith(failure.backend + "#"):
        return "failed naming a replica of another backend"
    if failure.ended < fault.at:
        return "failed naming a replica before it was harmed"
    within = KILL_FAILS_WITHIN_S if fault.action == "kill" else FREEZE_FAILS_WITHIN_S
    if failure.ended - fault.at > within:
        return f"failed on a {fault.action} replica more than {within}s after the fault"
    return "killed"


def check_replicas(client: serve.Client, controller: int, configs: Dict[str, dict],
                   chaos: Chaos) -> List[str]:
    """Each backend runs its target number of replicas, none of them harmed; nothing else
    runs besides them, the controller and the proxy (``controller`` is the instance's pid:
    its supervisor's, the root of its process tree)."""
    target = sum(config["num_replicas"] for config in configs.values())
    harmed = {(f.pid, f.started) for f in chaos.faults if f.harmful}
    seen: Dict[str, set] = {}

    def ready() -> bool:
        workers = [pid for pid in descendants(controller) if is_worker(pid)]
        if len(workers) != 2 + target:  # the controller, the proxy and the replicas
            return False
        for backend, config in configs.items():
            # Requests sent together go to distinct replicas while one has none of ours.
            count = config["num_replicas"]
            handle = client.get_handle(backend)
            responses = [handle.remote({"x": f"count-{k}", "sleep": 0.3}) for k in range(count)]
            answers = [response.result(timeout=DEADLINE_S) for response in responses]
            seen[backend] = {(pid, tag) for pid, tag, *_ in answers}
            if len({tag for _, tag in seen[backend]}) != count:
                return False
            if any(pid not in workers or (pid, start_time(pid)) in harmed
                   for pid, _ in seen[backend]):
                return False
        return True

    try:
        if wait_until(ready, RECOVERY_S):
            return []
    except Exception as exc:
        return [f"a request to count the replicas after the chaos failed: "
                f"{type(exc).__name__}: {exc}"]
    workers = [pid for pid in descendants(controller) if is_worker(pid)]
    return [f"within {RECOVERY_S}s of the chaos the backends did not run their target "
            f"numbers of live, unharmed replicas ({configs}); the instance runs "
            f"{len(workers)} workers (expected {2 + target} with the controller and the "
            "proxy); the last "
            f"replicas answering: {seen}"]


# --------------------------------------------------------------------------- the test


@pytest.fixture
def fault_instance() -> Iterator[Tuple[serve.Client, str, Dict[int, int]]]:
    """An instance of its own; processes the test left stopped are thawed before shutdown."""
    port = free_port()
    client = serve.start(http_options={"port": port})
    frozen: Dict[int, int] = {}
    try:
        yield client, f"http://127.0.0.1:{port}", frozen
    finally:
        thaw(frozen)
        client.shutdown()


def table(ledger: Ledger, recovery: Ledger, verdicts: Dict[str, collections.Counter],
          chaos: Chaos) -> str:
    lines = [f"{'path':<14}{'requests':>10}{'ok':>9}{'failed-on-killed':>18}"
             f"{'TypeError':>11}{'other':>7}{'slowest':>9}"]
    for path in PATHS:
        v = verdicts[path]
        lines.append(f"{path:<14}{ledger.requests[path]:>10}{ledger.ok[path]:>9}"
                     f"{v['killed']:>18}{v['type-error']:>11}{v['bad']:>7}"
                     f"{ledger.slowest[path]:>8.2f}s")
    actions = collections.Counter(f.action for f in chaos.faults)
    late = sum(1 for f in chaos.faults if f.action == "freeze-thaw" and f.harmful)
    lines.append(f"faults: kills={actions['kill']} "
                 f"stops-continued={actions['freeze-thaw'] - late} "
                 f"(of them too late to count as in time: {late}) "
                 f"stops-left={actions['freeze']} missed={chaos.missed}")
    type_errors = [f.elapsed for f in ledger.failures if f.kind == "type-error"]
    lines.append(f"slowest TypeError: {max(type_errors, default=0.0) * 1000:.1f} ms")
    lines.append("after the chaos: " + ", ".join(
        f"{path} {recovery.ok[path]}/{recovery.requests[path]} ok" for path in PATHS))
    return "\n".join(lines)


def test_random_faults_every_request_ends(fault_instance):
    client, url, frozen = fault_instance
    seed = int(os.environ.get("SERVEKIT_FAULT_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nfault injection seed {seed}; replay with SERVEKIT_FAULT_SEED={seed}", flush=True)
    rng = random.Random(seed)
    began = time.monotonic()

    configs = {}
    for backend, (func, route) in BACKENDS.items():
        configs[backend] = {"num_replicas": rng.choice([2, 3]),
                            "max_concurrent_queries": rng.choice([1, 2]), **HEALTH}
        client.create_backend(backend, func, config=configs[backend])
        client.create_endpoint(backend, backend=backend, route=route)
    print("backends:", {b: {k: c[k] for k in ("num_replicas", "max_concurrent_queries")}
                        for b, c in configs.items()}, flush=True)
    assert client._instance is not None
    controller = client._instance.pid

    caps = {backend: config["max_concurrent_queries"] for backend, config in configs.items()}
    ledger = Ledger(caps)
    abort = threading.Event()
    start = time.monotonic()
    until = start + TRAFFIC_S
    threads = [Traffic(path, i, seed, until, abort, ledger, client, url)
               for path, count in ((SYNC, SYNC_THREADS), (ASYNC, ASYNC_THREADS),
                                   (HTTP, HTTP_THREADS))
               for i in range(count)]
    chaos = Chaos(random.Random(f"{seed}-chaos"), ledger, controller, frozen,
                  start + CHAOS_WINDOW_S[0], start + CHAOS_WINDOW_S[1])
    problems: List[str] = []
    recovery = Ledger(caps)
    verdicts: Dict[str, collections.Counter] = {p: collections.Counter() for p in PATHS}
    try:
        for thread in threads:
            thread.start()
        chaos.start()

        chaos.join(CHAOS_WINDOW_S[1] + 10)
        if chaos.is_alive() or chaos.error:
            problems.append(f"the chaos thread failed: {chaos.error or 'still running'}")
        # Replicas left frozen are the controller's to kill; thaw whatever it has not.
        left = [f for f in chaos.faults if f.action == "freeze"]
        if left and not wait_until(lambda: all(start_time(f.pid) != f.started for f in left),
                                   FROZEN_REPLACED_WITHIN_S):
            problems.append("replicas left frozen were not killed by the controller within "
                            f"{FROZEN_REPLACED_WITHIN_S}s: "
                            f"{[f.tag for f in left if start_time(f.pid) == f.started]}")
        thaw(frozen)

        # (1) Every request ends: each thread finishes its last one within the deadline.
        for thread in threads:
            thread.join(max(0.0, until + DEADLINE_S + 5 - time.monotonic()))
        hung = [thread.name for thread in threads if thread.is_alive()]
        if hung:
            problems.append(f"traffic threads still blocked {DEADLINE_S + 5}s after the "
                            f"traffic stopped: {hung}")
        problems.extend(f"traffic thread crashed: {crash}" for crash in ledger.crashes)
        traffic_s = time.monotonic() - start

        # (3) Every backend serves again, on every path, with its target number of replicas.
        if not hung:
            missing = recover(client, url, recovery, time.monotonic() + RECOVERY_S)
            if missing:
                problems.append(f"no {CONSECUTIVE_OK} answers in a row within {RECOVERY_S}s "
                                f"after the chaos from: {missing}")
            else:
                problems.extend(check_replicas(client, controller, configs, chaos))

        # (2) Every failure is one the guarantees allow.
        harmful = chaos.harmful_faults()
        bad: Dict[str, List[Failure]] = collections.defaultdict(list)
        for failure in ledger.failures + recovery.failures:
            verdict = judge(failure, harmful)
            verdicts[failure.path][verdict if verdict in ("killed", "type-error") else "bad"] += 1
            if verdict not in ("killed", "type-error"):
                bad[verdict].append(failure)
        for verdict, failures in sorted(bad.items()):
            sample = "\n    ".join(f"[{f.path} -> {f.backend}, {f.elapsed:.2f}s] {f.error}"
                                   for f in failures[:5])
            problems.append(f"{len(failures)} requests {verdict}, e.g.:\n    {sample}")
        # Only harmed replicas go away: a healthy one, or one thawed in time, keeps running.
        harmed = {(f.pid, f.started) for f in chaos.faults if f.harmful}
        for pid, (tag, started) in sorted({**ledger.replicas, **recovery.replicas}.items()):
            if (pid, started) not in harmed and start_time(pid) != started:
                thawed = [f"{f.frozen_for:.2f}s" for f in chaos.faults
                          if f.pid == pid and f.frozen_for is not None]
                problems.append(f"replica {tag} (pid {pid}) was never killed or left frozen "
                                f"(frozen and thawed after: {thawed or 'never'}) but is gone")

        for path in PATHS:
            if ledger.ok[path] < 50:
                problems.append(f"only {ledger.ok[path]} requests succeeded over {path}: the "
                                "traffic tested little")
        actions = {f.action for f in chaos.faults}
        if actions != set(ACTIONS):
            problems.append(f"the chaos did only {sorted(actions)} to replicas")

        print(table(ledger, recovery, verdicts, chaos), flush=True)
        print(f"traffic {traffic_s:.1f}s, test {time.monotonic() - began:.1f}s "
              f"(before shutdown)", flush=True)
    finally:
        abort.set()
        chaos.end = 0.0
        thaw(frozen)
    assert not problems, f"seed {seed} (SERVEKIT_FAULT_SEED={seed}):\n" + "\n".join(problems)

