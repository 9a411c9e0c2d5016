"""Model multiplexing in simulation: the real router and real replicas whose backend loads
models with ``@serve.multiplexed``, over a seeded network.

One world is one backend of 1 to 3 replicas behind one endpoint. The seed draws the cap,
``max_num_models_per_replica``, how many models there are and how hot the hottest is, how
long a load, a request's work and a model's cleanup take, which loads fail, when callers
come and which give up (while the model loads, while it is used, never), and when the
replicas report the models they hold (their health pings, long-polled to the router).

After every run: every request ended, with its model's answer, the loader's error or its
cancellation; no replica ran two loads of one model at once; no model was closed while a
request used it, nor twice; every model a replica dropped was closed; once quiet, no
replica holds more than its limit; every place came back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from typing import Any, Dict, List, Optional, Set, Tuple

import cloudpickle
from scenarios import check, scenario
from simloop import SimLoop, run, sim_threads
from simnet import ConnectFaults, ListeningSocket, SimNet

import servekit as serve
from servekit._private import constants, context
from servekit._private.backend_metadata import ReplicaConfig
from servekit._private.context import MODEL_ID_HEADER, ReplicaContext
from servekit._private.replica.multiplexed import ModelCache
from servekit._private.replica.replica import Replica
from servekit._private.routing.router import Router
from servekit._private.specs import BackendLimits, EndpointInfo, ReplicaSpec
from servekit._private.wire.transport import RpcClient, RpcServer, encode_call
from servekit.config import BackendConfig

BACKEND = "b"
ENDPOINT = "ep"
QUIET_S = 10.0  # virtual seconds after the last caller: every load, cleanup and call ended

_world: Optional["World"] = None


class SimLoadError(Exception):
    """What a failing load raises."""


class SimLoaded:
    """A loaded model: reports its cleanup to the world."""

    def __init__(self, replica: str, model_id: str) -> None:
        self.replica = replica
        self.model_id = model_id

    async def aclose(self) -> None:
        world = _current()
        world.closing(self)
        await asyncio.sleep(world.loop.ticks(0, 0.05))


class SimModels:
    """The backend: each request gets its model from the loader (``get_model``: ``load``
    decorated with the world's ``max_num_models_per_replica``, ``models_class``) and uses
    it a while."""

    def __init__(self, replica: str) -> None:
        self.replica = replica

    async def get_model(self, model_id: str) -> SimLoaded:
        raise NotImplementedError  # (see models_class)

    async def load(self, model_id: str) -> SimLoaded:
        world = _current()
        key = (self.replica, model_id)
        if key in world.loading:
            world.broken.append(f"{self.replica} loads {model_id} twice at once")
        world.loading.add(key)
        try:
            await asyncio.sleep(world.loop.ticks(0, world.settings.load_s))
            if world.rng.random() < world.settings.load_failures:
                raise SimLoadError(f"simulated: loading {model_id} failed")
        finally:
            world.loading.discard(key)
        model = SimLoaded(self.replica, model_id)
        world.loaded.append(model)
        return model

    async def __call__(self, request: Any) -> Tuple[str, str]:
        world = _current()
        model = await self.get_model(serve.get_multiplexed_model_id())
        world.in_use[id(model)] = world.in_use.get(id(model), 0) + 1
        try:
            await asyncio.sleep(world.loop.ticks(0, world.settings.work_s))
        finally:
            world.in_use[id(model)] -= 1
        return self.replica, model.model_id


def models_class(capacity: int) -> type:
    """``SimModels`` whose ``get_model`` keeps ``capacity`` models per replica."""
    loader = serve.multiplexed(max_num_models_per_replica=capacity)(SimModels.load)
    return type("SimModels", (SimModels,), {"get_model": loader})


def _current() -> "World":
    assert _world is not None
    return _world


@dataclasses.dataclass
class Settings:
    replicas: int
    cap: int
    capacity: int
    models: int
    hot: float  # the share of callers that ask for the hottest model
    load_s: float
    work_s: float
    load_failures: float
    callers: int
    report_every_s: float


def draw_settings(rng: random.Random) -> Settings:
    return Settings(replicas=rng.randint(1, 3), cap=rng.randint(1, 4),
                    capacity=rng.randint(1, 3), models=rng.randint(1, 6),
                    hot=rng.choice([0.0, 0.5, 0.9]), load_s=rng.choice([0.0, 0.05, 0.5]),
                    work_s=rng.choice([0.0, 0.01, 0.3]),
                    load_failures=rng.choice([0.0, 0.0, 0.2, 0.6]),
                    callers=rng.randint(1, 40), report_every_s=rng.choice([0.05, 0.5, 5.0]))


@dataclasses.dataclass
class Caller:
    index: int
    model_id: str
    start_at: float
    leave_after: Optional[float]
    outcome: Any = None


class World:
    def __init__(self, loop: SimLoop, settings: Settings) -> None:
        self.loop = loop
        self.rng = loop.rng
        self.settings = settings
        self.net = loop.net = SimNet(loop, ConnectFaults(refused=0.0, emfile=0.0,
                                                         unexpected=0.0))
        self.router = Router("/sim/controller", "router", connect_replica=RpcClient.connect)
        self.replicas: List[Tuple[str, Replica]] = []
        self.loading: Set[Tuple[str, str]] = set()
        self.loaded: List[SimLoaded] = []
        self.in_use: Dict[int, int] = {}
        self.closed: Dict[int, int] = {}
        self.broken: List[str] = []
        self.callers: List[Caller] = []
        self._reports = 0

    def closing(self, model: SimLoaded) -> None:
        if self.in_use.get(id(model)):
            self.broken.append(f"{model.replica} closed {model.model_id} while a request "
                               "used it")
        self.closed[id(model)] = self.closed.get(id(model), 0) + 1

    async def start(self) -> None:
        s = self.settings
        self.router.apply({
            constants.KEY_ENDPOINTS: (1, {ENDPOINT: EndpointInfo(ENDPOINT, None, [],
                                                                  {BACKEND: 1.0})}),
            constants.KEY_BACKENDS: (1, {BACKEND: BackendLimits(s.cap, -1, None)}),
        })
        models = models_class(s.capacity)
        for number in range(s.replicas):
            tag = f"{BACKEND}#{number}"
            spec = ReplicaSpec(
                backend_tag=BACKEND, replica_tag=tag,
                replica_config=ReplicaConfig(serialized=cloudpickle.dumps((models, (tag,))),
                                             actor_options={}, description="models"),
                config=BackendConfig(max_concurrent_queries=s.cap).replica_settings(),
                metadata=None)
            replica = Replica(spec)
            server = RpcServer({"ready": replica.ready, "call": replica.handle_call})
            replica.start()
            await server.start(ListeningSocket(f"/sim/{tag}"))  # type: ignore[arg-type]
            await replica.ready()
            self.replicas.append((tag, replica))
        self.router.apply({constants.KEY_REPLICAS: (1, {BACKEND: [
            (tag, f"/sim/{tag}") for tag, _ in self.replicas]})})

    def caches(self, replica: Replica) -> List[ModelCache]:
        return [value for value in vars(replica._callable).values()
                if isinstance(value, ModelCache)]

    def report(self) -> None:
        """What the replicas' health pings would tell the router."""
        self._reports += 1
        held = {tag: [m for cache in self.caches(replica) for m in cache.ids()]
                for tag, replica in self.replicas}
        self.router.apply({constants.KEY_MODELS: (self._reports, {BACKEND: held})})

    async def reports(self, until: asyncio.Future) -> None:
        while not until.done():
            await asyncio.sleep(self.loop.ticks(0.01, self.settings.report_every_s))
            self.report()

    def draw_caller(self, index: int) -> Caller:
        rng, s = self.rng, self.settings
        hot = rng.random() < s.hot
        model_id = "m0" if hot else f"m{rng.randrange(s.models)}"
        leave_after = rng.choice([None, None, None, self.loop.ticks(0, 0.05),
                                  self.loop.ticks(0, 1.0)])
        return Caller(index, model_id, self.loop.ticks(0, 2.0), leave_after)

    async def call(self, caller: Caller) -> None:
        await asyncio.sleep(caller.start_at)
        call = ("__call__", (caller.index,), {}, "GET", {MODEL_ID_HEADER: caller.model_id},
                False, f"req-{caller.index}")
        reply = await self.router.send(ENDPOINT, "call", None, (), payload=encode_call(
            "call", call), model_id=caller.model_id)
        if caller.leave_after is not None:
            self.loop.call_later(caller.leave_after, reply.cancel)
        try:
            caller.outcome = await reply
        except (Exception, asyncio.CancelledError) as exc:
            caller.outcome = exc

    def check(self) -> None:
        s = self.settings
        check(not self.broken, "a model loads once and is closed only when unused",
              "; ".join(self.broken))
        for caller in self.callers:
            outcome = caller.outcome
            if isinstance(outcome, tuple):
                check(outcome[1] == caller.model_id, "a request gets the model it names",
                      f"caller {caller.index} asked for {caller.model_id}, got {outcome}")
            else:
                check(isinstance(outcome, (SimLoadError, asyncio.CancelledError)),
                      "a request ends with its answer, its load's error or its leaving",
                      f"caller {caller.index} ended with {outcome!r}")
                check(not isinstance(outcome, asyncio.CancelledError) or
                      caller.leave_after is not None,
                      "only a caller that left is cancelled", f"caller {caller.index}")
        for tag, replica in self.replicas:
            held = {id(cache): set(cache.ids()) for cache in self.caches(replica)}
            count = sum(len(ids) for ids in held.values())
            check(count <= s.capacity, "a quiet replica holds at most its limit",
                  f"{tag} holds {count} models, max_num_models_per_replica={s.capacity}")
            check(replica._in_flight == 0, "every place came back", f"{tag} holds places")
        kept = {id(entry.model) for _, replica in self.replicas
                for cache in self.caches(replica) for entry in cache._entries.values()}
        for model in self.loaded:
            times = self.closed.get(id(model), 0)
            expected = 0 if id(model) in kept else 1
            check(times == expected, "every model dropped is closed once, no kept one",
                  f"{model.replica}'s {model.model_id} closed {times} times")
        for slot in self.router._replica_sets[BACKEND].slots.values():
            check(slot.in_flight == 0, "every place came back", f"router's {slot.tag}")


async def _story(loop: SimLoop) -> None:
    global _world
    world = _world = World(loop, draw_settings(loop.rng))
    before = context.current_replica_context()
    # (the replicas of a world share this process: one context, as of one backend)
    context.set_replica_context(ReplicaContext(BACKEND, f"{BACKEND}#sim", "/sim/controller"))
    with sim_threads(loop):
        try:
            await world.start()
            world.callers = [world.draw_caller(i) for i in range(world.settings.callers)]
            done = loop.create_future()
            reporting = asyncio.ensure_future(world.reports(done))
            await asyncio.gather(*(world.call(c) for c in world.callers))
            await asyncio.sleep(QUIET_S)
            done.set_result(None)
            await reporting
            world.check()
        finally:
            world.router.close()
            for _, replica in world.replicas:
                replica.close()
            _world = None
            context._current = before


@scenario("multiplexing")
def multiplexing(seed: int) -> None:
    """Router and replicas of a multiplexed backend under seeded callers and loads."""
    logging.getLogger("servekit").setLevel(logging.CRITICAL)
    run(_story, seed)
