"""A Ray cluster in simulation, under the real ``RayRuntime`` (for the control plane's world).

``RayRuntime`` runs as it is: its launch, adopt, stop, the watch of each actor's end, and
its sweep of unrecorded actors. What it calls as the ``ray`` module, and its actor class, are
a ``SimCluster``: named detached actors placed on nodes, a GCS that lists and finds them by
name, ``ray.kill``, and nodes that are lost with every actor on them.

Each actor's process is a ``FakeWorker`` whose replica the world makes. A call to a killed or
lost one fails at once; the GCS notices the death a while later (soon for a kill, later for
a lost node), and until then it still lists and finds the actor. The listing, a call the
runtime makes on a thread, takes a while (see ``ControlLoop``): actors are created and start
while it runs.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any, Callable, Dict, List, Optional, Set

import cloudpickle
import ray
from fake_runtime import FakeConnection, FakeWorker
from scenarios import InvariantBroken

from servekit._private.runtime import ray as ray_runtime
from servekit._private.runtime.base import Connection
from servekit.exceptions import BackendUnavailableError

# A pid no process has (above Linux's largest): the runtime's checks of a process on its own
# node find none.
NO_PID = 1 << 23
_ADDRESS_PREFIX = "sim-ray://"
NODES = 3


class _Ref:
    """What ``actor.method.remote()`` returns: its ``future()`` is the call's outcome."""

    def __init__(self, future: asyncio.Future) -> None:
        self._future = future

    def future(self) -> asyncio.Future:
        return self._future


class _Method:
    def __init__(self, call: Callable[..., asyncio.Future]) -> None:
        self.remote = lambda *args: _Ref(call(*args))


class SimActor:
    """A named actor: its process (a ``FakeWorker``) on a node."""

    def __init__(self, cluster: "SimCluster", name: str, node: str, worker: FakeWorker) -> None:
        self.name = name
        self.node = node
        self.worker = worker
        self.gone = False  # the GCS noticed it ended
        self._cluster = cluster
        self.started = cluster.loop.create_future()  # what ``info`` answers
        self._exits: List[asyncio.Future] = []
        self.info = _Method(lambda: self.started)
        self.wait_for_exit = _Method(self._exit)
        self.stop = _Method(self._stop)

    def _exit(self) -> asyncio.Future:
        future = self._cluster.loop.create_future()
        self._exits.append(future)
        if self.gone:
            self.noticed()
        return future

    def _stop(self, timeout: float) -> asyncio.Future:
        self._cluster.end(self, "exited with code 0")
        future = self._cluster.loop.create_future()
        future.set_result(None)
        return future

    def noticed(self) -> None:
        """The GCS knows it ended: the calls waiting on it fail (those nobody waits for
        any more, without a word)."""
        self.gone = True
        for future in [self.started, *self._exits]:
            if not future.done():
                future.set_exception(ray.exceptions.ActorDiedError())
                future.exception()
        self._exits.clear()


class SimCluster:
    """What ``RayRuntime`` sees as the ``ray`` module (``actor_class`` as its actor class).

    ``make_replica(spec)`` makes the process of a replica actor.
    """

    exceptions = ray.exceptions

    def __init__(self, loop: Any, rng: Any, make_replica: Callable[[Any], Any]) -> None:
        self.loop = loop
        self.rng = rng
        self._make_replica = make_replica
        self.nodes = [f"node-{i}" for i in range(NODES)]
        self._nodes_made = NODES
        self.controller_node = self.nodes[0]
        self.named: Dict[str, SimActor] = {}  # what the GCS holds, by actor name
        self.actors: Dict[str, SimActor] = {}  # every actor ever made, by actor name
        self.specs: Dict[str, Any] = {}  # worker name -> what its launch was handed
        self.util = types.SimpleNamespace(list_named_actors=self.list_named_actors)
        self.actor_class = types.SimpleNamespace(options=self._options)

    # ------------------------------------------------------------- the ray module

    def get_runtime_context(self) -> Any:
        return types.SimpleNamespace(get_node_id=lambda: self.controller_node)

    def get_actor(self, name: str, namespace: Optional[str] = None) -> SimActor:
        actor = self.named.get(name)
        if actor is None:
            raise ValueError(f"Failed to look up actor with name {name!r}.")
        return actor

    def kill(self, actor: SimActor, no_restart: bool = True) -> None:
        self.end(actor, "was killed")

    def list_named_actors(self, all_namespaces: bool = False) -> List[dict]:
        return [{"name": name, "namespace": ray_runtime.NAMESPACE} for name in self.named]

    def _options(self, name: str, **options: Any) -> Any:
        return types.SimpleNamespace(
            remote=lambda role, worker, payload, *rest: self._create(name, role, worker,
                                                                     payload))

    # ------------------------------------------------------------- actors and nodes

    def _create(self, name: str, role: str, worker_name: str, payload: bytes) -> SimActor:
        # (What the runtime pickled, as it handed it over: not unpickled again.)
        spec = self.specs.pop(worker_name, None) or cloudpickle.loads(payload)
        worker = FakeWorker(worker_name, role, spec)
        actor = SimActor(self, name, self.rng.choice(self.nodes), worker)
        self.named[name] = self.actors[name] = actor
        if role == "replica":
            worker.replica = self._make_replica(spec)
        self.loop.call_later(self.loop.ticks(0, 0.02), self._started, actor)
        return actor

    def _started(self, actor: SimActor) -> None:
        if actor.worker.alive and not actor.started.done():
            actor.started.set_result({"address": f"{_ADDRESS_PREFIX}{actor.name}",
                                      "pid": NO_PID, "node": actor.node, "http": None})

    def end(self, actor: SimActor, how: str, notice_s: float = 0.01) -> None:
        """The actor's process ends now (its calls fail); the GCS notices within
        ``notice_s``."""
        worker = actor.worker
        if not worker.alive:
            return
        worker.alive = False
        worker.exit = how
        self.loop.call_later(self.loop.ticks(0, notice_s), self._noticed, actor)

    def _noticed(self, actor: SimActor) -> None:
        if self.named.get(actor.name) is actor:
            del self.named[actor.name]
        actor.noticed()

    def alive(self, role: str) -> List[SimActor]:
        return [a for a in self.actors.values() if a.worker.alive and a.worker.role == role]

    def lose_node(self, node: str) -> List[str]:
        """``node`` is gone with every actor on it (the GCS notices within a second); a new
        node joins. The names of the actors lost."""
        self.nodes.remove(node)
        self.nodes.append(f"node-{self._nodes_made}")
        self._nodes_made += 1
        lost = [a for a in self.actors.values() if a.node == node and a.worker.alive]
        for actor in lost:
            self.end(actor, "was lost with its node", notice_s=1.0)
        return [actor.worker.name for actor in lost]

    def connect(self, address: str) -> Connection:
        actor = self.actors.get(address[len(_ADDRESS_PREFIX):])
        if actor is None or not actor.worker.alive:
            raise BackendUnavailableError(f"Could not connect to servekit process at {address}.")
        return FakeConnection(actor.worker)  # type: ignore[return-value]


class SimRayRuntime(ray_runtime.RayRuntime):
    """The real ``RayRuntime`` of one controller's process, on a ``SimCluster``.

    It checks that its sweep of unrecorded actors never stops a worker it launched or
    adopted and has not stopped: one its controller started and still wants. ``world``
    gives the store, is told of each launch (``launching``) and of what breaks (``found``).
    """

    def __init__(self, cluster: SimCluster, world: Any) -> None:
        super().__init__(f"{_ADDRESS_PREFIX}controller", [], None)
        self.store = world.store
        self._cluster = cluster
        self._world = world
        self._own: Set[str] = set()  # launched or adopted here, and not stopped since
        self.controller: Any = None  # the controller whose process this runtime is in

    def capacity(self) -> Dict[str, float]:
        return {"CPU": 8.0, "GPU": 0.0}

    async def connect(self, address: str) -> Connection:
        return self._cluster.connect(address)

    async def launch(self, name: str, role: str, payload: Any, **options: Any) -> str:
        self._world.launching(self.controller, role, payload)
        self._cluster.specs[name] = payload
        self._own.add(name)
        return await super().launch(name, role, payload, **options)

    def adopt(self, name: str, role: str, address: str, identity: dict) -> bool:
        adopted = super().adopt(name, role, address, identity)
        if adopted:
            self._own.add(name)
        return adopted

    async def stop(self, name: str, timeout: float) -> None:
        self._own.discard(name)
        await super().stop(name, timeout)

    async def reap_unrecorded(self) -> List[str]:
        reaped = await super().reap_unrecorded()
        own = [name for name in reaped if name.split(":")[1] in self._own]
        if own:
            error = InvariantBroken(
                f"the sweep of unrecorded actors never stops a replica its controller "
                f"started: it stopped {own}, which this controller launched or adopted")
            self._world.found(error)
            raise error
        return reaped
