"""``FakeRuntime``: an in-memory runtime for unit tests of the controller; no processes.

Workers are records in a dict and their RPC calls run in-process. A replica worker is the
real ``Replica`` running in this process (constructor, ``update_config``, ``reconfigure``,
``drain`` and ``check_health`` as in a replica process), so a raising constructor raises its
own exception, as it would through a real connection. Tests can hold a launch until they
release it, kill a worker, and read which workers live and which calls each one got::

    runtime = FakeRuntime()
    runtime.hold_launches()            # every launch now waits for release()
    ...
    runtime.release()                  # let them all go
    runtime.kill(name)                 # is_alive(name) is now False; its calls fail
    runtime.freeze(name)               # its calls hang until thaw(name), as under SIGSTOP
    runtime.fail_health(name, error)   # its pings raise error, as a failing check_health()
    runtime.fail_launches(name, error) # launches of name raise error until given None
    runtime.calls(name)                # ["ready", "update_config", "drain", ...]
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Dict, List, Optional, Set, Tuple

from servekit._private.controller.store import MemoryStore
from servekit._private.replica.replica import Replica
from servekit._private.runtime.base import Connection, Runtime
from servekit.config import BackendConfig
from servekit.exceptions import BackendUnavailableError, ServeError

_ADDRESS_PREFIX = "fake://"


@dataclasses.dataclass
class FakeWorker:
    """One fake worker: what it was launched with, whether it lives, what it was asked."""

    name: str
    role: str
    payload: Any
    resources: Optional[dict] = None
    python: Optional[str] = None
    alive: bool = True
    exit: str = "is not running"
    calls: List[Tuple[str, tuple]] = dataclasses.field(default_factory=list)
    stop_timeout: Optional[float] = None  # the timeout ``stop`` got, None if never stopped
    replica: Optional[Replica] = None  # the in-process replica of a replica worker
    frozen: Optional[asyncio.Event] = None  # set while frozen: calls wait until it is thawed
    health_error: Optional[Exception] = None  # what its pings raise, if anything

    @property
    def address(self) -> str:
        return f"{_ADDRESS_PREFIX}{self.name}"

    @property
    def instance(self) -> Any:
        """The constructed backend (the class instance, or the function itself)."""
        assert self.replica is not None
        return self.replica._callable

    @property
    def config(self) -> BackendConfig:
        """The config the replica applied last."""
        assert self.replica is not None
        return self.replica.config


class FakeConnection:
    """A connection whose calls run against a ``FakeWorker`` in this process.

    Like a real connection to a dead process, every call on a killed or stopped worker, or
    on a closed connection, raises ``BackendUnavailableError``.
    """

    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self._closed = False

    @property
    def is_closed(self) -> bool:
        return self._closed or not self.worker.alive

    def close(self) -> None:
        self._closed = True

    async def call(self, name: str, *args: Any) -> Any:
        """Run RPC ``name`` on the worker (recorded first, so failed calls show too)."""
        worker = self.worker
        worker.calls.append((name, args))
        if self.is_closed:
            raise BackendUnavailableError(f"The connection to {worker.address} is closed.")
        if worker.frozen is not None:
            await worker.frozen.wait()
            if self.is_closed:
                raise BackendUnavailableError(f"{worker.address} was killed while frozen.")
        if name == "ping" and worker.health_error is not None:
            raise worker.health_error
        if worker.role == "proxy":
            if name in ("ready", "ping"):
                return True
            raise ServeError(f"Unknown RPC method {name!r}.")
        replica = worker.replica
        assert replica is not None
        if name == "ping":
            return await replica.ping()
        if name in ("ready", "drain", "update_config"):
            return await getattr(replica, name)(*args)
        raise ServeError(f"Unknown RPC method {name!r}.")


class FakeRuntime(Runtime):
    """Workers are in-memory records; the store is a ``MemoryStore``.

    Attributes:
        workers: Every worker ever launched by name, including dead ones (a relaunch under
            the same name replaces the record).
        launch_order: Names in the order ``launch`` was called.
        http_bound: The ``(host, port)`` ``bind_http`` was called with, if it was.
        is_shut_down: Whether ``shutdown`` ran.
        nodes: The nodes an EveryNode location puts a proxy on (change it to add or
            remove nodes).
        launched_on: The node each worker was launched on (None: the runtime's pick).
    """

    def __init__(self, capacity: Optional[Dict[str, float]] = None) -> None:
        """``capacity``: the resources replicas may reserve, default 8 CPUs and no GPU."""
        self.store = MemoryStore()
        self._capacity = dict(capacity) if capacity is not None else {"CPU": 8.0, "GPU": 0.0}
        self.workers: Dict[str, FakeWorker] = {}
        self.launch_order: List[str] = []
        self.http_bound: Optional[Tuple[str, int]] = None
        self._holds: Dict[str, asyncio.Event] = {}
        self._hold_all = False
        self._held: Set[str] = set()
        self._launch_errors: Dict[str, Exception] = {}
        self.is_shut_down = False
        self.nodes: List[str] = ["head"]
        self.launched_on: Dict[str, Optional[str]] = {}

    # ------------------------------------------------------------- test controls

    def hold_launches(self, hold: bool = True) -> None:
        """Make every later ``launch`` wait until ``release`` lets it go (or stop doing so)."""
        self._hold_all = hold

    def hold(self, name: str) -> None:
        """Make the next ``launch`` of ``name`` wait until ``release(name)``."""
        self._holds.setdefault(name, asyncio.Event())

    def release(self, name: Optional[str] = None) -> None:
        """Let the held launch of ``name`` (default: every held launch) return."""
        names = list(self._holds) if name is None else [name]
        for held in names:
            event = self._holds.get(held)
            if event is not None:
                event.set()

    def held(self) -> List[str]:
        """Names whose ``launch`` is waiting for ``release`` right now."""
        return [name for name in self.launch_order if name in self._held]

    def kill(self, name: str) -> None:
        """Make worker ``name`` die as if killed: ``is_alive`` turns False, its calls fail."""
        worker = self.workers[name]
        worker.alive = False
        worker.exit = "was killed by signal SIGKILL"
        self.thaw(name)

    def freeze(self, name: str) -> None:
        """Make every call to worker ``name`` hang, as if it were SIGSTOPped."""
        self.workers[name].frozen = asyncio.Event()

    def thaw(self, name: str) -> None:
        """Let the calls of a frozen worker go on."""
        worker = self.workers[name]
        if worker.frozen is not None:
            worker.frozen.set()
            worker.frozen = None

    def fail_health(self, name: str, error: Optional[Exception]) -> None:
        """Make the pings of worker ``name`` raise ``error`` (None: answer again)."""
        self.workers[name].health_error = error

    def fail_launches(self, name: str, error: Optional[Exception]) -> None:
        """Make every launch of ``name`` raise ``error`` (None: launch again)."""
        if error is None:
            self._launch_errors.pop(name, None)
        else:
            self._launch_errors[name] = error

    def alive(self, role: Optional[str] = None) -> List[str]:
        """Names of living workers (of ``role``, if given), in launch order."""
        return [w.name for w in self.workers.values()
                if w.alive and (role is None or w.role == role)]

    def calls(self, name: str) -> List[str]:
        """Names of the RPCs worker ``name`` received, in order."""
        return [call for call, _ in self.workers[name].calls]

    # ------------------------------------------------------------- Runtime

    def capacity(self) -> Dict[str, float]:
        return dict(self._capacity)

    def bind_http(self, host: str, port: int) -> Tuple[str, int]:
        """Pretend to bind the HTTP port: remember and return ``(host, port)``."""
        self.http_bound = (host, port)
        return host, port

    async def proxy_nodes(self, location: str) -> Dict[str, Optional[str]]:
        """HeadOnly: one proxy "proxy"; EveryNode: "proxy-<node>" on each of ``nodes``."""
        if location == "EveryNode":
            return {f"proxy-{node}": node for node in self.nodes}
        return {"proxy": None}

    def instance_processes(self) -> List[dict]:
        return []

    async def launch(self, name: str, role: str, payload: Any, *,
                     resources: Optional[dict] = None, python: Optional[str] = None,
                     node: Optional[str] = None) -> str:
        self.launch_order.append(name)
        self.launched_on[name] = node
        if name in self._launch_errors:
            raise self._launch_errors[name]
        worker = FakeWorker(name, role, payload, resources=resources, python=python)
        self.workers[name] = worker
        if role == "replica":
            worker.replica = Replica(payload)
            worker.replica.start()
        if self._hold_all:
            self.hold(name)
        event = self._holds.get(name)
        if event is not None:
            self._held.add(name)
            try:
                await event.wait()
            finally:
                self._held.discard(name)
                self._holds.pop(name, None)
        return worker.address

    async def connect(self, address: str) -> Connection:
        name = address[len(_ADDRESS_PREFIX):] if address.startswith(_ADDRESS_PREFIX) else None
        worker = self.workers.get(name) if name is not None else None
        if worker is None:
            raise BackendUnavailableError(f"Could not connect to servekit process at {address}: "
                                          "no such fake worker.")
        return FakeConnection(worker)

    async def stop(self, name: str, timeout: float) -> None:
        worker = self.workers.get(name)
        if worker is not None and worker.alive:
            worker.alive = False
            worker.stop_timeout = timeout
            worker.exit = "exited with code 0"
            if worker.replica is not None:
                worker.replica.close()
            self.thaw(name)  # a frozen process dies too (its calls fail)

    def is_alive(self, name: str) -> bool:
        worker = self.workers.get(name)
        return worker is not None and worker.alive

    def identity(self, name: str) -> Optional[dict]:
        worker = self.workers.get(name)
        return None if worker is None else {"fake": id(worker)}

    def adopt(self, name: str, role: str, address: str, identity: dict) -> bool:
        """Adopt a worker a previous controller over this runtime launched, if it lives."""
        worker = self.workers.get(name)
        return worker is not None and worker.alive and identity == {"fake": id(worker)}

    async def reap_unrecorded(self) -> List[str]:
        return []  # (one fake runtime serves every controller of a test: all are its own)

    def store_description(self) -> str:
        return "the in-memory store"

    def exit_description(self, name: str) -> str:
        worker = self.workers.get(name)
        return "is not running" if worker is None or worker.alive else worker.exit

    async def shutdown(self, discard_state: bool = True) -> None:
        """Stop every worker and let held launches go; empty the store if asked."""
        for name in self.alive():
            await self.stop(name, timeout=0)
        self.release()
        if discard_state:
            self.store.write({}, list(self.store.read_all()))
        self.is_shut_down = True
