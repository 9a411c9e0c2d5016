"""The seam between servekit's logic and where its processes run.

The controller starts, stops and watches replicas and proxies only through a ``Runtime``.
``LocalRuntime`` runs them as child processes of the controller; ``RayRuntime`` as Ray
actors; a fake in-memory one (``tests/unit/fake_runtime.py``) tests the controller's logic
without processes.
On the script's side, an ``Instance`` is what a ``Client`` needs of the runtime it talks to.
Which runtime runs is decided in ``runtime.choice``.
"""

from __future__ import annotations

import abc
from typing import Any, Dict, Iterable, List, Mapping, Optional, Protocol, Tuple


class Store(Protocol):
    """Durable ``key -> bytes``; ``write`` is one transaction (``controller/store.py``)."""

    def read_all(self) -> Dict[str, bytes]: ...
    def write(self, puts: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None: ...
    def close(self) -> None: ...


class Connection(Protocol):
    """A persistent RPC connection to a worker (see ``transport.RpcClient``)."""

    @property
    def is_closed(self) -> bool: ...
    async def call(self, name: str, *args: Any) -> Any: ...
    def close(self) -> None: ...


class Instance(abc.ABC):
    """A running instance of some runtime, as a ``Client`` of it needs it."""

    controller_address: str
    detached: bool

    def started(self, pid: int) -> None:  # noqa: B027 (most instances need nothing)
        """The instance answered ``ready`` with ``pid`` (its first process)."""

    @abc.abstractmethod
    def stop(self, keep_state: bool) -> None:
        """After the controller was asked to shut down (or could not start): make sure the
        instance's processes are gone, and its state too unless ``keep_state``."""

    def controller_returns(self) -> bool:
        """The controller's socket refused a connection: whether a controller will serve
        it again (waiting for it, if it is restarting)."""
        return False


class Runtime(abc.ABC):
    """Launches workers, stops them, tells whether they live, and keeps durable state."""

    store: Store

    @abc.abstractmethod
    async def launch(self, name: str, role: str, payload: Any, *,
                     resources: Optional[dict] = None, python: Optional[str] = None,
                     node: Optional[str] = None) -> str:
        """Start worker ``name`` and return the address its RPC server listens on.

        ``node``: where it must run (one of the places ``proxy_nodes`` names), else the
        runtime picks. The worker may still be initialising; callers ``connect`` and call
        ``ready``.
        """

    @abc.abstractmethod
    async def proxy_nodes(self, location: str) -> Dict[str, Optional[str]]:
        """The HTTP proxies ``location`` ("HeadOnly", "EveryNode") asks for now: worker name
        -> the node it runs on."""

    @abc.abstractmethod
    def instance_processes(self) -> List[dict]:
        """The instance's own processes, for the status view: role, name, pid, state."""

    @abc.abstractmethod
    async def connect(self, address: str) -> Connection:
        """Open a connection to the worker listening at ``address``."""

    @abc.abstractmethod
    async def stop(self, name: str, timeout: float) -> None:
        """Stop worker ``name`` (asking first, killing after ``timeout`` s); wait for its exit."""

    @abc.abstractmethod
    def is_alive(self, name: str) -> bool:
        """Whether worker ``name`` is still running."""

    @abc.abstractmethod
    def identity(self, name: str) -> Optional[dict]:
        """What identifies worker ``name``'s process for ``adopt`` (JSON-encodable)."""

    @abc.abstractmethod
    def adopt(self, name: str, role: str, address: str, identity: dict) -> bool:
        """Take over a worker an earlier controller launched, if that very process still
        runs; from then on it is stopped and watched like the workers launched here."""

    @abc.abstractmethod
    async def reap_unrecorded(self) -> List[str]:
        """Stop every worker of the instance this runtime neither launched nor adopted: one
        an earlier controller launched and died before it saved its record, so that no
        worker is ever left running unowned. Called once adoption is done; the names (or
        addresses) of what it stopped."""

    @abc.abstractmethod
    def store_description(self) -> str:
        """Where ``store`` keeps its data, for error messages."""

    @abc.abstractmethod
    def exit_description(self, name: str) -> str:
        """A short human description of how a dead worker ended (exit code, signal)."""

    @abc.abstractmethod
    def bind_http(self, host: str, port: int) -> Tuple[str, int]:
        """Reserve the HTTP address proxies will serve; return the address bound."""

    @abc.abstractmethod
    def capacity(self) -> Dict[str, float]:
        """Resources replicas can reserve: "CPU", "GPU" and custom ones."""

    @abc.abstractmethod
    async def shutdown(self, discard_state: bool = True) -> None:
        """Stop every worker this runtime started and release what it holds; with
        ``discard_state``, delete what ``store`` holds too."""
