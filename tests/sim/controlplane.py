"""The control plane in simulation: the real ``Controller`` under seeded calls, store
failures, replica faults and controller crashes.

One world is one store and one runtime and a controller over them. Embedded, the runtime is
``FakeRuntime`` of the unit tests (its workers are in-memory records, and they outlive a
controller, as processes do); on Ray (half the seeds), each controller has the real
``RayRuntime`` over a simulated cluster (``simray``), whose nodes are lost. A client makes a
seeded sequence of calls, one at a time, as ``Client`` makes them: create, update (scale,
user_config, a user_config the replicas refuse, one the store cannot hold), redeploy and
delete backends; create and delete endpoints, set traffic and shadows. Now and then a call
asks for more replicas than a backend may have (up to 10**9, as a number or as autoscaling's
bounds), made through the client's checks or around them, as another client's version
would.
A call that returns a goal is acknowledged when the goal ends. When the controller dies
under a call, the call is made again (a create with the same call id) and its goal waited on
again, once a new controller runs.

The seed draws the faults: writes the store refuses (now and then, or for a while, as a
full disk), constructors that raise, replicas that die, and controller crashes at any point
(its tasks cancelled and its pending writes lost, a new controller built over the same store
and runtime); on Ray, the loss of the controller's node, with the replicas on it. Each write
takes a while, one at a time in call order, as on the controller's writer thread.

Invariants, checked after every call and at the end of every run:

- a call that failed left nothing applied (the controller lists what it listed before);
- a call that succeeded is in force (the controller lists it);
- every acknowledged change is what a restarted controller restores (after a crash or the
  loss of its node), and stays restored when every replica is gone and new ones fail to
  start (nothing acknowledged is rolled back), and a restarted controller starts (the state
  it reads is never damaged);
- a call asking for more replicas than a backend may have is refused;
- every call is answered (a goal returned, not reached), a controller starts and shuts down,
  within a bound of virtual time; the controller's loop is never starved by a scale-up, and
  no more replicas of a backend than the bound start at once;
- on Ray, the sweep of unrecorded actors never stops a replica its controller started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import sys
import types
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import cloudpickle
import simloop
from scenarios import InvariantBroken, check, scenario
from simloop import SimLoop

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "unit"))

from fake_runtime import FakeRuntime, FakeWorker
from simray import SimCluster, SimRayRuntime

from servekit._private import constants
from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig
from servekit._private.backend_settings import given_fields
from servekit._private.controller import backend_reconciler, goals
from servekit._private.controller.controller import Controller
from servekit._private.controller.state import STARTING
from servekit._private.controller.store import MemoryStore
from servekit._private.runtime import ray as ray_runtime
from servekit._private.specs import HTTPSettings
from servekit.config import AutoscalingConfig, BackendConfig, HTTPOptions
from servekit.exceptions import ServeError

TAGS = ("a", "b", "c")
ENDPOINTS = ("e1", "e2")
ROUTES = ("/r1", "/r2", "/r3")
REFUSED = "refused"  # a user_config the replicas' reconfigure (and constructor) refuse
UNSAVABLE = lambda: None  # noqa: E731 (a user_config that neither JSON nor pickle carries)
# Virtual seconds the world runs after the last call with every replica gone and new ones
# failing: long enough for any roll-back a restarted controller would make.
AFTERMATH_S = 5.0

# Virtual seconds all the client's calls may take: a call still waiting then never ends.
CALLS_DEADLINE_S = 600.0
# Virtual seconds a controller has to answer a call (to return a goal, not to reach it), to
# start, and to shut down.
CALL_BOUND_S = 30.0
# The replicas a call asks for now and then: far more than a backend may have.
HUGE = 10**9
# Replica names the controller may draw in one turn of its loop: more, and it is starving
# the loop (calls wait, health checks stop) as it starts them.
STARVED_NAMES = 1000


class ModelError(Exception):
    """What a simulated constructor raises."""


class SimModel:
    """The user's class (never built: ``SimReplica`` stands in for its replica)."""

    def __init__(self, version: int) -> None:
        self.version = version

    def reconfigure(self, user_config: Any) -> None:
        pass

    def __call__(self, request: Any) -> Any:
        return self.version


METADATA = BackendMetadata.inspect(SimModel)


def definition(version: int) -> ReplicaConfig:
    return ReplicaConfig(cloudpickle.dumps((SimModel, (version,))), {}, f"SimModel v{version}")


class SimReplica:
    """A replica process: its constructor and reconfigure take a while and fail as the
    world says."""

    def __init__(self, world: "World", spec: Any) -> None:
        self._world = world
        self.config: BackendConfig = spec.config

    def start(self) -> None:
        pass

    async def ready(self) -> BackendMetadata:
        world = self._world
        await asyncio.sleep(world.loop.ticks(0.005, 0.1))
        if world.constructors_fail or world.rng.random() < world.p_constructor_fails:
            raise ModelError("the constructor raised")
        if self.config.user_config == REFUSED:
            raise ModelError(f"the constructor refused user_config {REFUSED!r}")
        return METADATA

    async def update_config(self, config: BackendConfig) -> None:
        await asyncio.sleep(self._world.loop.ticks(0, 0.02))
        if config.user_config == REFUSED:
            raise ValueError(f"reconfigure refused user_config {REFUSED!r}")
        self.config = config

    async def drain(self) -> None:
        await asyncio.sleep(self._world.loop.ticks(0, 0.02))

    async def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass


class SimRuntime(FakeRuntime):
    """``FakeRuntime`` whose replicas are ``SimReplica``s that take a while to launch (the
    embedded runtime: one machine, its processes outlive a controller)."""

    def __init__(self, world: "World") -> None:
        super().__init__()
        self._world = world
        self.controller: Optional[Controller] = None  # the one running now

    async def launch(self, name: str, role: str, payload: Any, *,
                     resources: Optional[dict] = None, python: Optional[str] = None,
                     node: Optional[str] = None) -> str:
        self._world.launching(self.controller, role, payload)
        self.launch_order.append(name)
        await asyncio.sleep(self._world.loop.ticks(0, 0.02))
        worker = FakeWorker(name, role, payload, resources=resources, python=python)
        self.workers[name] = worker
        if role == "replica":
            worker.replica = self._world.make_replica(payload)
        return worker.address


class SimStore(MemoryStore):
    """The durable store: a write is one transaction, refused (changing nothing) when the
    world says the disk is full or fails it by chance."""

    def __init__(self, world: "World") -> None:
        super().__init__()
        self._world = world

    def write(self, puts: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None:
        world = self._world
        if world.disk_full or world.rng.random() < world.p_write_fails:
            raise OSError(28, "No space left on device")
        super().write(puts, deletes)


class ControlLoop(SimLoop):
    """A ``SimLoop`` on which a single-thread executor (the controller's writer) runs its
    jobs one at a time in call order, each taking a while; the jobs of a dead controller's
    executor never run. A job of the default executor (a read of the store, a call to Ray's
    GCS) runs a while after it is handed over.

    What breaks inside the code under test (where an exception may be caught) is ``found``:
    the run ends with it after the turn of the loop it was found in (once: the run's
    tasks are then cancelled and ended).
    """

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        # By executor (held, so that no other one can take its id while the run lasts).
        self._queues: Dict[Any, List[Tuple[asyncio.Future, Callable, tuple]]] = {}
        self.dead: set = set()
        self.finding: Optional[InvariantBroken] = None
        self._told = False
        self.names_this_turn = 0

    def found(self, error: InvariantBroken) -> None:
        if self.finding is None:
            self.finding = error

    def _run_once(self) -> None:
        self.names_this_turn = 0
        super()._run_once()
        if self.finding is not None and not self._told:
            self._told = True
            raise self.finding

    def run_in_executor(self, executor: Any, func: Callable, *args: Any) -> asyncio.Future:
        if executor is None:
            future = self.create_future()

            def run() -> None:
                if not future.cancelled():
                    try:
                        future.set_result(func(*args))
                    except Exception as exc:
                        future.set_exception(exc)

            self.call_later(self.ticks(0, 0.1), run)
            return future
        future = self.create_future()
        if executor in self.dead:
            return future  # its process is gone: the write never happens
        queue = self._queues.setdefault(executor, [])
        queue.append((future, func, args))
        if len(queue) == 1:
            self.call_later(self.ticks(0, 0.01), self._next, executor)
        return future

    def _next(self, executor: Any) -> None:
        queue = self._queues[executor]
        if executor in self.dead:
            queue.clear()
            return
        future, func, args = queue.pop(0)
        if not future.cancelled():
            try:
                result = func(*args)
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
        if queue:
            self.call_later(self.ticks(0, 0.01), self._next, executor)


@dataclasses.dataclass
class Model:
    """What the client was told: each backend's (replicas, user_config, definition), its
    replicas a number or ``("auto", min_replicas, max_replicas)``, and each endpoint as
    ``list_endpoints`` describes it."""

    backends: Dict[str, Tuple[int, Any, str]] = dataclasses.field(default_factory=dict)
    endpoints: Dict[str, dict] = dataclasses.field(default_factory=dict)

    def view(self) -> Tuple[dict, dict]:
        return dict(self.backends), {name: dict(e) for name, e in self.endpoints.items()}


def view(controller: Controller) -> Tuple[dict, dict]:
    """What a controller holds, in the model's terms."""
    backends = {}
    for tag, config in controller.list_backends().items():
        replica_config, _ = controller.get_backend_definition(tag)
        backends[tag] = (_replicas(config), config.user_config, replica_config.description)
    return backends, controller.list_endpoints()


def _replicas(config: BackendConfig) -> Any:
    scaling = config.autoscaling_config
    return config.num_replicas if scaling is None else \
        ("auto", scaling.min_replicas, scaling.max_replicas)


@dataclasses.dataclass
class Call:
    """One call of the client: its name, what it does to a controller, and what it does to
    the model if it succeeds."""

    name: str
    make: Callable[[Controller], Any]
    apply: Callable[[Model], None]
    waits: bool = False  # it returns a goal to wait on
    refused: bool = False  # it must fail (it asks for more replicas than a backend may have)


class World:
    def __init__(self, loop: ControlLoop, seed: int) -> None:
        self.loop = loop
        self.rng = random.Random(seed * 7919 + 17)
        rng = self.rng
        self.p_write_fails = rng.choice([0.0, 0.0, 0.05, 0.2, 0.4])
        self.p_constructor_fails = rng.choice([0.0, 0.0, 0.1, 0.3])
        self.p_crash = rng.choice([0.0, 0.2, 0.4])
        self.p_kill = rng.choice([0.0, 0.1])
        self.steps = rng.randint(4, 14)
        # The bounds the controller runs with (SERVEKIT_MAX_REPLICAS_PER_BACKEND and
        # SERVEKIT_MAX_STARTING_REPLICAS; small, so that a run reaches them quickly).
        self.replica_bound = rng.choice([5, 8])
        self.starting_bound = rng.choice([2, 3])
        constants.MAX_REPLICAS_PER_BACKEND = self.replica_bound
        constants.MAX_STARTING_REPLICAS = self.starting_bound
        self.disk_full = False
        self.constructors_fail = False
        self.store = SimStore(self)
        # On Ray (half the runs) each controller has a runtime of its own, over a cluster
        # whose nodes are lost (the controller's too); else they share the one machine's.
        self.cluster: Optional[SimCluster] = None
        self.runtime: Any = SimRuntime(self)
        self.runtime.store = self.store
        if rng.random() < 0.5:
            self.cluster = SimCluster(loop, rng, self.make_replica)
        self.controller: Optional[Controller] = None
        self.up = asyncio.Event()
        self.model = Model()
        self.versions: Dict[str, int] = {}
        self.world_tasks: set = set()
        self.calls = 0
        self.calls_done = False  # the client made its last call: the faults stop
        self.crashes = 0
        self.history: List[str] = []

    # ------------------------------------------------------------- the controller

    def found(self, error: InvariantBroken) -> None:
        self.loop.found(error)

    def make_replica(self, spec: Any) -> Any:
        return SimReplica(self, spec)

    def launching(self, controller: Optional[Controller], role: str, spec: Any) -> None:
        """A controller launches a process: of a replica's backend, no more than the bound
        may be starting at once (the replicas ``status`` shows as STARTING)."""
        reconciler = None if controller is None or role != "replica" else \
            controller.backends.get(spec.backend_tag)
        if reconciler is None:
            return
        starting = [record.tag for record in reconciler.state.in_state(STARTING)]
        if len(starting) > self.starting_bound:
            error = InvariantBroken(
                f"at most {self.starting_bound} replicas of a backend start at once: "
                f"{len(starting)} of {spec.backend_tag!r} are starting ({starting}); "
                f"history: {self.history}")
            self.found(error)
            raise error

    async def start_controller(self) -> None:
        if self.cluster is not None:
            self.runtime = SimRayRuntime(self.cluster, self)
        controller = Controller(self.runtime, HTTPSettings.of(HTTPOptions(host=None)))
        self.runtime.controller = controller
        starting = asyncio.ensure_future(controller.start())
        await asyncio.wait([starting], timeout=CALL_BOUND_S)
        check(starting.done(), "a controller starts within its bound",
              f"a controller still starting after {CALL_BOUND_S} virtual seconds; history: "
              f"{self.history}")
        try:
            starting.result()
        except ServeError as exc:
            raise InvariantBroken(f"a restarted controller starts: it refused ({exc}); "
                                  f"history: {self.history}") from None
        self.controller = controller
        self.up.set()

    async def crash(self) -> None:
        """The controller's process dies: its tasks stop, its pending writes are lost;
        the workers (processes) and the store stay."""
        controller = self.controller
        assert controller is not None
        self.crashes += 1
        self.history.append("CRASH")
        self.up.clear()
        self.controller = None
        self.loop.dead.add(controller._durable._writer)
        for _ in range(10):  # (what its tasks do as they are cancelled may start more)
            tasks = sorted((t for t in asyncio.all_tasks() if t not in self.world_tasks
                            and not t.done()), key=_task_number)
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=1.0)
        await asyncio.sleep(self.loop.ticks(0, 0.3))  # the supervisor starts a new one

    async def restart(self) -> None:
        await self.crash()
        await self.start_controller()

    async def lose_node(self) -> None:
        """On Ray, the node of the controller is lost: the controller and the replicas on
        that node are gone together; Ray starts the controller again on another node."""
        assert self.cluster is not None
        node = self.cluster.controller_node
        lost = self.cluster.lose_node(node)
        self.history.append(f"LOSE {node} (the controller, {lost})")
        self.cluster.controller_node = self.rng.choice(self.cluster.nodes)
        await self.restart()

    def kill_replica(self) -> None:
        """A replica's process dies (SIGKILL)."""
        if self.cluster is not None:
            actors = self.cluster.alive("replica")
            if actors:
                actor = self.rng.choice(actors)
                self.history.append(f"kill {actor.worker.name}")
                self.cluster.kill(actor)
            return
        alive = self.runtime.alive("replica")
        if alive:
            name = self.rng.choice(alive)
            self.history.append(f"kill {name}")
            self.runtime.kill(name)

    async def rpc(self, name: str, make: Callable[[Controller], Any],
                  bound: Optional[float] = CALL_BOUND_S) -> Any:
        """A call to the controller, made again on the next controller if this one dies
        under it (as ``Client._call_async`` does); each controller answers it within
        ``bound`` virtual seconds (None: no bound, waiting on a goal)."""
        while True:
            await self.up.wait()
            assert self.controller is not None
            task = asyncio.ensure_future(make(self.controller))
            await asyncio.wait([task], timeout=bound)
            check(task.done(), "every control call is answered within its bound",
                  f"{name} not answered after {bound} virtual seconds; history: "
                  f"{self.history}")
            if not task.cancelled():
                return task.result()
            self.history.append("(made again)")

    # ------------------------------------------------------------- the client

    async def client(self) -> None:
        for _ in range(self.steps):
            call = self.draw_call()
            self.history.append(call.name)
            before = self.model.view()
            try:
                goal = await self.rpc(call.name, call.make)
                check(not call.refused, "a call asking for more replicas than a backend may "
                      "have is refused", f"{call.name} was taken; history: {self.history}")
                if call.waits and goal is not None:
                    await self.rpc(call.name, lambda c, g=goal: c.goals.wait(g), bound=None)
            except InvariantBroken:
                raise
            except Exception as exc:
                self.history[-1] += f" -> {type(exc).__name__}"
                await self.up.wait()
                assert self.controller is not None
                check(view(self.controller) == before,
                      "a failed call leaves nothing applied",
                      f"{call.name} raised {type(exc).__name__}: {exc}; the controller "
                      f"holds {view(self.controller)}, before the call it held {before}; "
                      f"history: {self.history}")
            else:
                call.apply(self.model)
                await self.up.wait()
                assert self.controller is not None
                check(view(self.controller) == self.model.view(),
                      "an acknowledged change is in force",
                      f"{call.name} returned; the controller holds {view(self.controller)}, "
                      f"the client was told {self.model.view()}; history: {self.history}")
            self.calls += 1
            await asyncio.sleep(self.loop.ticks(0, 0.3))

    def draw_call(self) -> Call:
        rng = self.rng
        model = self.model
        backends = sorted(model.backends)
        kind = rng.choice(["create_backend"] * 3 + ["update_backend_config"] * 3 +
                          ["redeploy_backend", "delete_backend", "create_endpoint",
                           "create_endpoint", "set_traffic", "shadow_traffic",
                           "delete_endpoint"])
        if not backends or kind == "create_backend":
            free = [tag for tag in TAGS if tag not in model.backends]
            # (Now and then a tag that exists: refused, changing nothing.)
            return self._create_backend(rng.choice(free if free and rng.random() < 0.9
                                                   else TAGS))
        tag = rng.choice(backends)
        if kind == "update_backend_config":
            return self._update_backend(tag)
        call_id = f"call-{self.calls}"
        if kind == "redeploy_backend":
            version = self.versions[tag] = self.versions.get(tag, 0) + 1
            return Call(f"redeploy_backend({tag!r}, v{version})",
                        lambda c: c.redeploy_backend(tag, definition(version), METADATA,
                                                     call_id),
                        lambda m: m.backends.__setitem__(
                            tag, (*m.backends[tag][:2], f"SimModel v{version}")),
                        waits=True)
        if kind == "delete_backend":
            force = rng.random() < 0.5
            return Call(f"delete_backend({tag!r}, force={force})",
                        lambda c: c.delete_backend(tag, force),
                        lambda m: m.backends.pop(tag), waits=True)
        existing = sorted(model.endpoints)
        if kind == "create_endpoint" or not existing:
            kind = "create_endpoint"
            free = [name for name in ENDPOINTS if name not in model.endpoints]
            name = rng.choice(free if free and rng.random() < 0.9 else ENDPOINTS)
        else:
            name = rng.choice(existing)
        if kind == "create_endpoint":
            route = rng.choice(ROUTES)
            def create(m: Model) -> None:
                endpoint = m.endpoints.get(name)
                if endpoint is None or (endpoint["route"], endpoint["traffic"]) != (
                        route, {tag: 1.0}):  # (else taken for the same call made again)
                    m.endpoints[name] = {"route": route, "methods": ["GET"],
                                         "traffic": {tag: 1.0}, "shadows": {}}

            return Call(f"create_endpoint({name!r}, {tag!r}, {route!r})",
                        lambda c: c.create_endpoint(name, tag, route, ["GET"]), create)
        if kind == "set_traffic":
            other = rng.choice(backends)
            traffic = {tag: 1.0} if other == tag else {tag: 0.5, other: 0.5}
            return Call(f"set_traffic({name!r}, {traffic})",
                        lambda c: c.set_traffic(name, traffic),
                        lambda m: m.endpoints[name].__setitem__("traffic", dict(traffic)))
        if kind == "shadow_traffic":
            proportion = rng.choice([0.0, 0.25])

            def shadow(m: Model) -> None:
                shadows = m.endpoints[name]["shadows"]
                if proportion:
                    shadows[tag] = proportion
                else:
                    shadows.pop(tag, None)

            return Call(f"shadow_traffic({name!r}, {tag!r}, {proportion})",
                        lambda c: c.shadow_traffic(name, tag, proportion), shadow)
        return Call(f"delete_endpoint({name!r})", lambda c: c.delete_endpoint(name),
                    lambda m: m.endpoints.pop(name, None))

    def _user_config(self) -> Any:
        roll = self.rng.random()
        if roll < 0.06:
            return UNSAVABLE
        if roll < 0.12:
            return REFUSED
        return {"v": self.rng.randint(1, 3)}

    def _scale(self, fields: Dict[str, Any]) -> Tuple[str, Callable[[], Any], Any, bool]:
        """The replicas a call asks for, with the config's other ``fields``: mostly a few;
        now and then the most a backend may have, or more (to be refused), as a number or
        as autoscaling's bounds. A config is checked as ``Client`` makes it, or not at all,
        as a call made another way (another client's version) sends it: as plain data, or as
        a model (as clients sent it before configs were plain data). What it is called,
        how it is made, what the model holds if it is taken, whether it must be refused."""
        rng = self.rng
        bound = self.replica_bound
        count = rng.randint(1, 3) if rng.random() < 0.92 else \
            rng.choice([bound, bound + 1, HUGE])
        unchecked = rng.random() < 0.5
        as_model = unchecked and rng.random() < 0.5  # as clients before plain configs sent it
        if rng.random() < 0.15:
            scaling = {"min_replicas": 1, "max_replicas": count, "initial_replicas": count}
            shown, told = f"autoscaling 1..{count}", ("auto", 1, count)
            given: Dict[str, Any] = {"autoscaling_config": AutoscalingConfig.model_construct(
                **scaling) if as_model else scaling}
        else:
            shown, told, given = f"{count}", count, {"num_replicas": count}
        if rng.random() < 0.5:  # redeploys roll over more than one replica at once
            given["max_surge"] = rng.choice([2, 3, "50%", "100%"])
            shown += f", max_surge={given['max_surge']}"
        given.update(fields)

        def make() -> Any:
            if as_model:
                return BackendConfig.model_construct(**given)
            return dict(given) if unchecked else given_fields(BackendConfig(**given))

        return (f"{shown}{' unchecked' if unchecked else ''}{' model' if as_model else ''}",
                make, told, count > bound)

    def _create_backend(self, tag: str) -> Call:
        rng = self.rng
        user_config = self._user_config() if rng.random() < 0.6 else None
        shown, config, replicas, refused = self._scale(
            {} if user_config is None else {"user_config": user_config})
        version = self.versions[tag] = self.versions.get(tag, 0) + 1
        call_id = f"call-{self.calls}"
        return Call(f"create_backend({tag!r}, {shown}, {_shown(user_config)}, v{version})",
                    lambda c: c.create_backend(tag, definition(version), config(), METADATA,
                                               call_id),
                    lambda m: m.backends.__setitem__(
                        tag, (replicas, user_config, f"SimModel v{version}")), waits=True,
                    refused=refused)

    def _update_backend(self, tag: str) -> Call:
        call_id = f"call-{self.calls}"
        if self.rng.random() < 0.5:
            shown, config, replicas, refused = self._scale({})
            return Call(f"update_backend_config({tag!r}, replicas={shown})",
                        lambda c: c.update_backend_config(tag, config(), call_id),
                        lambda m: m.backends.__setitem__(
                            tag, (replicas, *m.backends[tag][1:])), waits=True,
                        refused=refused)
        user_config = self._user_config()
        return Call(f"update_backend_config({tag!r}, user_config={_shown(user_config)})",
                    lambda c: c.update_backend_config(
                        tag, given_fields(BackendConfig(user_config=user_config)), call_id),
                    lambda m: m.backends.__setitem__(
                        tag, (m.backends[tag][0], user_config, m.backends[tag][2])),
                    waits=True)

    # ------------------------------------------------------------- faults

    async def faults(self) -> None:
        """Crashes of the controller (on Ray, with its node), replicas that die, spells of
        a full disk."""
        rng = self.rng
        while not self.calls_done:
            await asyncio.sleep(self.loop.ticks(0.01, 0.4))
            await self.up.wait()
            roll = rng.random()
            if roll < self.p_crash * 0.3 and self.crashes < 4:
                if self.cluster is not None and rng.random() < 0.5:
                    await self.lose_node()
                else:
                    await self.restart()
            elif roll < 0.5 and rng.random() < self.p_kill:
                self.kill_replica()
            elif roll > 0.97 and self.p_write_fails:
                self.disk_full = True
                await asyncio.sleep(self.loop.ticks(0.1, 2.0))
                self.disk_full = False


def _shown(value: Any) -> str:
    return "UNSAVABLE" if value is UNSAVABLE else repr(value)


def _task_number(task: asyncio.Task) -> int:
    """The order tasks were made in (asyncio names them Task-N)."""
    name = task.get_name()
    return int(name[5:]) if name.startswith("Task-") and name[5:].isdigit() else -1


class _Clock:
    """What the reconcilers see as the ``time`` module: the loop's virtual clock."""

    def __init__(self, loop: SimLoop) -> None:
        self.monotonic = loop.time


class _Names:
    """What the controller and the Ray runtime see as ``secrets`` and ``uuid``: names drawn
    from the seed. A controller that draws more than ``STARVED_NAMES`` in one turn of its
    loop is starting replicas without end and answers nothing meanwhile: that is found (and
    the drawing stops it)."""

    def __init__(self, rng: random.Random, loop: ControlLoop) -> None:
        self._rng = rng
        self._loop = loop

    def token_hex(self, nbytes: int = 16) -> str:
        loop = self._loop
        loop.names_this_turn += 1
        if loop.names_this_turn > STARVED_NAMES:
            error = InvariantBroken(
                f"the controller's loop is never starved (a status call made meanwhile is "
                f"answered): it drew {loop.names_this_turn} replica names in one turn")
            loop.found(error)
            raise error
        return "".join(self._rng.choice("0123456789abcdef") for _ in range(2 * nbytes))

    def uuid4(self) -> Any:
        return types.SimpleNamespace(hex=self.token_hex(16))


async def _run_world(loop: ControlLoop, seed: int) -> None:
    world = World(loop, seed)
    if world.cluster is not None:
        ray_runtime.ray = world.cluster  # type: ignore[assignment]
        ray_runtime.ServekitActor = world.cluster.actor_class
    world.world_tasks.add(asyncio.current_task())
    await world.start_controller()
    faults = asyncio.ensure_future(world.faults())
    world.world_tasks.add(faults)
    client = asyncio.ensure_future(world.client())
    world.world_tasks.add(client)
    await asyncio.wait([client], timeout=CALLS_DEADLINE_S)
    check(client.done(), "every call ends",
          f"the client's calls had not all ended after {CALLS_DEADLINE_S} virtual seconds; "
          f"history: {world.history}")
    client.result()
    world.calls_done = True
    await faults
    world.disk_full = False
    world.p_write_fails = 0.0
    # The last controller dies at once (its acknowledged changes must be saved already),
    # and so does every replica; the new replicas fail to start for a while.
    await asyncio.sleep(loop.ticks(0, 0.05))
    await world.crash()
    if world.cluster is not None:
        for actor in world.cluster.alive("replica"):
            world.cluster.kill(actor)
    else:
        for name in world.runtime.alive("replica"):
            world.runtime.kill(name)
    world.constructors_fail = True
    await world.start_controller()
    assert world.controller is not None
    told = world.model.view()
    check(view(world.controller) == told, "every acknowledged change survives a crash",
          f"a restarted controller holds {view(world.controller)}; the client was told "
          f"{told}; history: {world.history}")
    await asyncio.sleep(AFTERMATH_S)
    check(view(world.controller) == told,
          "no acknowledged change is rolled back after a crash",
          f"with the replicas gone and new ones failing, the controller came to hold "
          f"{view(world.controller)}; the client was told {told}; history: {world.history}")
    stopping = asyncio.ensure_future(world.controller.shutdown(keep_state=True))
    await asyncio.wait([stopping], timeout=CALL_BOUND_S)
    check(stopping.done(), "every control call is answered within its bound",
          f"shutdown not answered after {CALL_BOUND_S} virtual seconds; history: "
          f"{world.history}")
    stopping.result()
    await world.crash()  # (its tasks end here, not when the loop closes)


# What a run replaces while it runs: (module, name).
_REPLACED = ((backend_reconciler, "time"), (backend_reconciler, "secrets"), (goals, "uuid"),
             (ray_runtime, "secrets"), (ray_runtime, "ray"), (ray_runtime, "ServekitActor"),
             (constants, "MAX_REPLICAS_PER_BACKEND"), (constants, "MAX_STARTING_REPLICAS"))


def _run(seed: int) -> None:
    """``simloop.run`` on a ``ControlLoop``, with the reconcilers' clock, the names of
    replicas, goals and actors drawn from the loop and the seed, the Ray runtime's cluster
    the world's (if it has one), and the bounds the world sets."""
    loop = ControlLoop(seed)
    names = _Names(random.Random(seed * 31 + 7), loop)
    real = [getattr(module, name, None) for module, name in _REPLACED]
    backend_reconciler.time = _Clock(loop)  # type: ignore[assignment]
    backend_reconciler.secrets = names  # type: ignore[assignment]
    goals.uuid = names  # type: ignore[assignment]
    ray_runtime.secrets = names  # type: ignore[assignment]
    try:
        simloop.run(lambda _: _run_world(loop, seed), seed, loop)
    finally:
        for (module, name), value in zip(_REPLACED, real, strict=True):
            setattr(module, name, value)


@scenario("controlplane")
def controlplane(seed: int) -> None:
    """The controller under seeded calls, store failures, replica faults and crashes."""
    logging.getLogger("servekit").setLevel(logging.CRITICAL)
    _run(seed)
