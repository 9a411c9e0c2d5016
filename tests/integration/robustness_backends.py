"""Backends and a middleware for test_robustness.py and test_supervision.py.

This directory is on the workers' sys.path, so replicas unpickle these by reference and the
HTTP proxy can import ``FlakyMiddleware``. Tests talk to blocked backends through files in a
directory they pass as an init argument: a file is a signal that crosses processes.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any, List

from starlette.requests import Request

import servekit as serve

# The longest any backend blocks on a file that never appears (teardown also creates them).
MAX_BLOCK_S = 30.0


def value(request: Any) -> Any:
    """The data of a handle call, or the ``x`` query parameter of an HTTP call."""
    if isinstance(request, Request):
        return request.query_params.get("x")
    return request.data


def whoami() -> dict:
    return {"tag": serve.get_current_replica_tag(), "pid": os.getpid()}


def touch(path: str, text: str = "") -> None:
    """Create ``path`` atomically (it appears complete or not at all)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def append_line(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def wait_for_file(path: str, timeout: float = MAX_BLOCK_S) -> bool:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


async def async_wait_for_file(path: str, timeout: float = MAX_BLOCK_S) -> bool:
    deadline = time.monotonic() + timeout
    # Polling a file another process creates: a stat is quick enough for a test backend.
    while not os.path.exists(path):  # noqa: ASYNC240
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


# --------------------------------------------------------------------------- errors


class PipelineError(Exception):
    """Raised by ``double`` for the data "bad"; must reach the end of a pipeline as is."""


class StartError(Exception):
    """Raised by ``SlowStart.__init__`` while its ``fail`` flag file exists."""


def _base_exception(kind: str) -> BaseException:
    if kind == "SystemExit":
        return SystemExit(3)
    if kind == "KeyboardInterrupt":
        return KeyboardInterrupt("user pressed nothing")
    if kind == "CancelledError":
        return asyncio.CancelledError("cancelled by user code")
    raise AssertionError(f"unknown kind {kind!r}")


# --------------------------------------------------------------------------- simple functions


def echo_function(request: Any) -> str:
    return f"fn:{value(request)}"


def cap_one(request: Any) -> Any:
    """Echo; "give-lock" returns something that cannot be pickled, "pid" the process id."""
    data = value(request)
    if data == "give-lock":
        return {"lock": threading.Lock()}
    if data == "pid":
        return os.getpid()
    return f"cap1:{data}"


def double(request: Any) -> Any:
    data = request.data
    if data == "bad":
        raise PipelineError("double refused 'bad'")
    return data * 2


def add_one(request: Any) -> list:
    """[type name of what arrived, that + 1]; the data, else the keyword argument ``y``."""
    data = request.data if request.data is not None else request.query_params["y"]
    return [type(data).__name__, data + 1]


# --------------------------------------------------------------------------- classes


class Robust:
    """Raises what it is asked to; has methods and attributes requests must not call."""

    model_name = "a class attribute, not a method"

    def __init__(self) -> None:
        self.model = "x"  # an instance attribute, not a method
        self.config: Any = None

    def __call__(self, request: Any) -> dict:
        return {"method": "__call__", **whoami()}

    def predict(self, request: Any) -> str:
        return f"predicted:{value(request)}"

    async def apredict(self, request: Any) -> str:
        return f"apredicted:{value(request)}"

    def pid(self, request: Any) -> int:
        return os.getpid()

    def raise_sync(self, request: Any) -> None:
        raise _base_exception(value(request))

    async def raise_async(self, request: Any) -> None:
        await asyncio.sleep(0)
        raise _base_exception(value(request))

    @serve.accept_batch
    def batch(self, requests: List[Any]) -> list:
        values = [value(request) for request in requests]
        if "exit" in values:
            raise SystemExit(4)
        return [[len(values), v] for v in values]

    def reconfigure(self, config: Any) -> None:
        self.config = config

    def check_health(self) -> None:
        pass

    def _private(self, request: Any) -> str:
        return "private"


class Recorder:
    """Appends "<id> <body length>" to ``path`` for every request it runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def __call__(self, request: Any) -> str:
        body = await request.body()
        append_line(self.path, f"{request.query_params.get('id')} {len(body)}")
        return f"recorded {request.query_params.get('id')}"


class Doomed:
    """A replica a test kills: ``block`` waits for ``<dir>/release``; ``exit_now`` exits."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    async def __call__(self, request: Any) -> dict:
        return whoami()

    async def block(self, request: Any) -> str:
        name = value(request)
        touch(os.path.join(self.directory, f"blocked-{name}"), serve.get_current_replica_tag())
        await async_wait_for_file(os.path.join(self.directory, "release"))
        return f"released {name}"

    def exit_now(self, request: Any) -> None:
        os._exit(1)


class Freezable:
    """Two ways to stop answering: ``hold`` waits politely, ``freeze`` blocks the event loop.

    Both write ``<dir>/<method>-<id>`` holding "<replica tag> <pid>" first, and end when
    ``<dir>/release`` exists (at most ``MAX_BLOCK_S`` seconds).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _mark(self, method: str, request: Any) -> str:
        me = whoami()
        touch(os.path.join(self.directory, f"{method}-{value(request)}"),
              f"{me['tag']} {me['pid']}")
        return os.path.join(self.directory, "release")

    async def __call__(self, request: Any) -> dict:
        hold = value(request)
        if hold:
            await asyncio.sleep(hold)
        return whoami()

    async def hold(self, request: Any) -> str:
        await async_wait_for_file(self._mark("hold", request))
        return "released"

    async def freeze(self, request: Any) -> str:
        release = self._mark("freeze", request)
        deadline = time.monotonic() + MAX_BLOCK_S
        while not os.path.exists(release) and time.monotonic() < deadline:  # noqa: ASYNC240
            time.sleep(0.05)  # noqa: ASYNC251 (blocking the event loop is the point)
        return "thawed"


class HealthFlag:
    """``check_health()`` raises once ``<dir>/unhealthy-<replica tag>`` exists."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.tag = serve.get_current_replica_tag()

    def __call__(self, request: Any) -> dict:
        return whoami()

    def check_health(self) -> None:
        if os.path.exists(os.path.join(self.directory, f"unhealthy-{self.tag}")):
            raise RuntimeError(f"replica {self.tag} was flagged unhealthy")


class Concurrency:
    """Not thread-safe by design; counts how many calls run at once.

    ``work`` sleeps ``data`` seconds; ``gated`` touches ``<dir>/started-<id>`` and waits for
    ``<dir>/release``. Both return the most calls seen running at once so far. The count
    is kept under a lock only so that the measurement itself cannot lose an update.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.active = 0
        self.max_active = 0
        self._count_lock = threading.Lock()

    def _enter(self) -> None:
        with self._count_lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)

    def _leave(self) -> None:
        with self._count_lock:
            self.active -= 1

    def work(self, request: Any) -> int:
        self._enter()
        try:
            time.sleep(request.data)
        finally:
            self._leave()
        return self.max_active

    def gated(self, request: Any) -> int:
        self._enter()
        try:
            touch(os.path.join(self.directory, f"started-{request.data}"))
            wait_for_file(os.path.join(self.directory, "release"))
        finally:
            self._leave()
        return self.max_active

    def __call__(self, request: Any) -> int:
        return self.max_active


class GatedConfig:
    """Logs "call-start" / "call-end" around a call (which waits for ``<dir>/release``) and
    "reconfigure-start <v>" / "reconfigure-end <v>" around ``reconfigure``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.events = os.path.join(directory, "events")
        self.config: Any = None

    def reconfigure(self, config: Any) -> None:
        append_line(self.events, f"reconfigure-start {config['v']}")
        self.config = config
        append_line(self.events, f"reconfigure-end {config['v']}")

    def __call__(self, request: Any) -> Any:
        if request.data == "block":
            append_line(self.events, "call-start")
            wait_for_file(os.path.join(self.directory, "release"))
            append_line(self.events, "call-end")
        return self.config


class SlowStart:
    """A constructor that blocks while ``<dir>/hold`` exists (after touching
    ``<dir>/ctor-waiting-<tag>``) until ``<dir>/release`` exists, and raises ``StartError``
    while ``<dir>/fail`` exists. Replies report the user_config the replica runs with."""

    def __init__(self, directory: str) -> None:
        tag = serve.get_current_replica_tag()
        if os.path.exists(os.path.join(directory, "fail")):
            raise StartError(f"constructor of {tag} refused to start: the fail flag is set")
        if os.path.exists(os.path.join(directory, "hold")):
            touch(os.path.join(directory, f"ctor-waiting-{tag}"))
            wait_for_file(os.path.join(directory, "release"))
        self.config: Any = None

    def reconfigure(self, config: Any) -> None:
        self.config = config

    def __call__(self, request: Any) -> dict:
        if request.data:
            time.sleep(request.data)
        return {"config": self.config, **whoami()}


# --------------------------------------------------------------------------- middleware


class FlakyMiddleware:
    """A pass-through ASGI middleware whose constructor fails while ``flag`` exists."""

    def __init__(self, app: Any, flag: str) -> None:
        if os.path.exists(flag):
            raise RuntimeError(f"FlakyMiddleware refuses to start: {flag} exists")
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
