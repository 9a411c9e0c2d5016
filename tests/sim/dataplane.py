"""The data plane in simulation: the real router and real replicas over a seeded network.

One world is one backend behind one endpoint: a ``Router`` (the one handles and proxies
use, fed routes and replica sets as the controller's long poll would) sends to replicas
that are real ``Replica`` objects behind real ``RpcServer``s, over ``simnet``. The seed
draws the backend (how its method runs: async, sync on the thread lane, a stream of either
kind, batched; its cap, queue bound and timeout), the network's faults, the callers (when
they come, what they call, when they give up: before their request is written, while it is
connecting, at its first chunk, mid-stream, never) and the faults of the replicas (killed,
frozen for a while, connections reset, a generator whose close raises). A stand-in for the
controller replaces replicas that died.

After every run the invariants of DESIGN.md §6 are checked: every request ended (answered,
or failed with a clear error) within its bound; every replica place came back; nothing ran
for a caller that left before its request was written; no replica ran more than its
``max_concurrent_queries``; every healthy replica is reachable by the router; an ended
request holds no payload. A last probe fills every healthy replica to its cap at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import random
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Optional, Set, Tuple

import cloudpickle
from scenarios import check, scenario
from simloop import TICK, SimLoop, SimThreads, run, sim_threads
from simnet import ConnectFaults, ListeningSocket, SimNet

from servekit._private import constants
from servekit._private.backend_metadata import ReplicaConfig
from servekit._private.context import MODEL_ID_HEADER, current_model_id
from servekit._private.replica.replica import Replica
from servekit._private.routing.routed_request import ENDED, QUEUED, RoutedRequest
from servekit._private.routing.router import Router
from servekit._private.specs import BackendLimits, EndpointInfo, ReplicaSpec
from servekit._private.wire import transport
from servekit._private.wire.transport import RpcClient, RpcServer, encode_call
from servekit.api import accept_batch
from servekit.config import BackendConfig
from servekit.exceptions import ServeError
from servekit.handle import (
    HandleOptions,
    ServeResponse,
    ServeSyncHandle,
    _Pacing,
    _SyncCall,
    routers,
)
from servekit.request import ServeRequest

BACKEND = "b"
ENDPOINT = "ep"
CONTROLLER = "/sim/controller"
METHODS = ("async_call", "sync_call", "async_stream", "sync_stream", "batched")
# Seconds after the last caller before the places and queues are checked: long enough for
# every timeout, retry and replacement of a world to have played out.
QUIET_S = 2 * constants.NO_REPLICA_TIMEOUT_S
# An invariant: what user code sees is what servekit promises.
USER_CODE = "user code runs where and while servekit says"
WINDOW = "a stream's reader holds at most a window of what was sent"
# The bytes of a stream's window: as shipped, or small enough for the chunks of the
# simulated streams to fill it (and a chunk larger than it, which goes alone).
WINDOW_BYTES = (transport.STREAM_WINDOW_BYTES, 40_000)
# Virtual seconds within which a config change is applied on every replica (it waits for
# the calls running to end, which take less than a second, not for requests held open),
# and within which an app's request starts once it reached its replica.
CONFIG_BOUND_S = 5.0
# Virtual seconds within which the user's work for a caller that left ends: past a freeze
# of its replica (which delays the cancel), well short of a long stream's natural end.
LEAVE_BOUND_S = 10.0

_world: Optional["World"] = None  # the world whose replicas the simulated model reports to
# When the request the user code runs for reached its replica (an ASGI app's request).
reached_at: contextvars.ContextVar[Optional[float]] = contextvars.ContextVar(
    "reached_at", default=None)


class SimModel:
    """The user's code in a simulated replica: each method takes as long as the world says
    and reports the work it runs (``World.started`` / ``World.stopped``)."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.user_config: Any = None

    def reconfigure(self, user_config: Any) -> None:
        self.user_config = user_config

    async def async_call(self, request: Any) -> Any:
        world = _current()
        caller = _caller_of(request)
        world.started(self.replica, caller)
        try:
            await asyncio.sleep(world.work_s())
        finally:
            world.stopped(self.replica, caller)
        return caller

    def sync_call(self, request: Any) -> Any:
        world = _current()
        caller = _caller_of(request)
        world.started(self.replica, caller)
        world.threads.busy(world.work_s(), lambda: world.stopped(self.replica, caller))
        return caller

    async def async_stream(self, request: Any) -> Any:
        world = _current()
        caller = _caller_of(request)
        chunks, size, raise_in_close = world.stream_shape()
        world.started(self.replica, caller)
        try:
            for index in range(chunks):
                await asyncio.sleep(world.work_s() / 4)
                yield f"{caller}:{index}:" + "x" * size
        finally:
            world.stopped(self.replica, caller)
            if raise_in_close:
                raise RuntimeError("simulated: the generator's close raised")

    def sync_stream(self, request: Any) -> Any:
        world = _current()
        caller = _caller_of(request)
        chunks, size, raise_in_close = world.stream_shape()
        world.started(self.replica, caller)
        try:
            for index in range(chunks):
                yield f"{caller}:{index}:" + "x" * size
        finally:
            if not world.threads.on_thread:
                world.breaks(USER_CODE, f"caller {caller}'s sync generator was closed off "
                             "its thread (dropped unclosed, closed by the collector)")
            world.stopped(self.replica, caller)
            if raise_in_close:
                raise RuntimeError("simulated: the generator's close raised")

    @accept_batch
    async def batched(self, requests: List[Any]) -> List[Any]:
        world = _current()
        callers = [_caller_of(request) for request in requests]
        model_id = current_model_id.get()
        named = {request.headers.get(MODEL_ID_HEADER, "") for request in requests}
        if named != {model_id}:
            world.breaks("a batch holds the requests of one model, and runs with its id",
                         f"a batch of callers {callers} naming models {sorted(named)} ran "
                         f"with model id {model_id!r}")
        for caller in callers:
            world.started(self.replica, caller)
        try:
            await asyncio.sleep(world.work_s())
        finally:
            for caller in callers:
                world.stopped(self.replica, caller)
        return callers


def _current() -> "World":
    assert _world is not None
    return _world


def current_world() -> "World":
    """The world being run (what its simulated user code reports to)."""
    return _current()


def set_world(world: Optional["World"]) -> None:
    """The world whose replicas ``SimModel`` reports to (None once it is over)."""
    global _world
    _world = world


def _caller_of(request: Any) -> Any:
    """The caller a request comes from: a handle call's argument, an HTTP request's ``c``
    (whose body, when it sends one, must arrive whole: ``n`` bytes)."""
    if isinstance(request, ServeRequest):
        return request.data
    caller = int(request.query_params["c"])
    sent = int(request.query_params.get("n", "0"))
    received = len(request._receive._body or b"")  # (the body the replica was handed)
    if received != sent:
        _current().breaks(USER_CODE, f"HTTP caller {caller} sent {sent} bytes of body, "
                          f"its backend received {received}")
    return caller


@dataclasses.dataclass
class Caller:
    """One request and what its caller does; ``outcome`` is what it saw."""

    index: int
    method: str
    timeout_s: Optional[float]
    start_at: float
    leave_after: Optional[float]  # gives up this long after sending (None: never)
    read_chunks: Optional[int]  # for a stream: leaves after this many chunks (None: all)
    read_pause_s: float = 0.0  # for a stream: waits this long before each read
    request: Optional[RoutedRequest] = None
    outcome: Any = None
    ended_at: Optional[float] = None
    left_unwritten: bool = False  # gave up before its request was written to a replica
    by_handle: bool = False  # called through a sync handle (its loop side: ``_SyncCall``)
    model_id: Optional[str] = None  # the multiplexed model it names (batched calls only)
    placing: Optional[_SyncCall] = None


@dataclasses.dataclass
class Settings:
    """What the seed chose for a world."""

    method: str
    replicas: int
    cap: int
    max_queued: int
    request_timeout_s: Optional[float]
    batch_size: int
    connect_faults: ConnectFaults
    callers: int
    faults: int
    drop_after_leave: float  # how often a caller's connection drops just after it leaves
    window_bytes: int  # transport.STREAM_WINDOW_BYTES in this world


def ticks(rng: random.Random, low_s: float, high_s: float) -> float:
    """A duration on the simulator's grid (``SimLoop.ticks``), before the loop exists."""
    return rng.randint(round(low_s / TICK), round(high_s / TICK)) * TICK


def draw_settings(rng: random.Random) -> Settings:
    emfile = rng.choice([0.0, 0.0, 0.05, 0.3])
    unexpected = rng.choice([0.0, 0.0, 0.0, 0.1])
    return Settings(
        method=rng.choice(METHODS),
        replicas=rng.randint(1, 3),
        cap=rng.randint(1, 4),
        max_queued=rng.choice([-1, rng.randint(1, 20)]),
        request_timeout_s=rng.choice([None, ticks(rng, 0.2, 3.0)]),
        batch_size=rng.randint(2, 4),
        connect_faults=ConnectFaults(refused=rng.choice([0.0, 0.05]), emfile=emfile,
                                     unexpected=unexpected),
        callers=rng.randint(1, 30),
        faults=rng.choice([0, 0, 1, 2, 4]),
        drop_after_leave=rng.choice([0.0, 0.0, 0.5]),
        window_bytes=rng.choice(WINDOW_BYTES),
    )


class SimReplica:
    """One replica "process": a real ``Replica`` behind a real ``RpcServer``."""

    def __init__(self, world: "World", number: int) -> None:
        self.tag = f"{BACKEND}#{number}"
        self.address = f"/sim/{self.tag}"
        self.alive = True
        config = world.backend_config()
        spec = ReplicaSpec(
            backend_tag=BACKEND, replica_tag=self.tag,
            replica_config=ReplicaConfig(serialized=cloudpickle.dumps(world.target(self.tag)),
                                         actor_options={}, description="simulated model"),
            config=config.replica_settings(), metadata=None)
        self.replica = Replica(spec)
        self.server = RpcServer({
            "ready": self.replica.ready, "call": self.replica.handle_call,
            "http": self.replica.handle_http, "asgi": self.handle_asgi,
            "update_config": self.replica.update_config, "drain": self.replica.drain,
            "ping": self.replica.ping,
        }, streaming=("asgi",))

    async def handle_asgi(self, inbound: Any, scope: Dict[str, Any],
                          first: Dict[str, Any]) -> Any:
        """The replica's ``handle_asgi``; the app's work for the request knows when it came
        (``reached_at``)."""
        reached_at.set(asyncio.get_running_loop().time())
        return await self.replica.handle_asgi(inbound, scope, first)

    async def start(self) -> None:
        self.replica.start()
        await self.server.start(ListeningSocket(self.address))  # type: ignore[arg-type]
        await self.replica.ready()


class World:
    """One seed's backend, replicas, router, callers and faults."""

    def __init__(self, loop: SimLoop, threads: SimThreads, settings: Settings) -> None:
        self.loop = loop
        self.rng = loop.rng
        self.threads = threads
        self.settings = settings
        self.net = loop.net = SimNet(loop, settings.connect_faults)
        self.replicas: List[SimReplica] = []
        self._numbers = 0
        self._replica_version = 0
        self.router = Router(CONTROLLER, "router", connect_replica=RpcClient.connect)
        self.pacing = _Pacing()  # shared by the callers that call through a sync handle
        self.callers: List[Caller] = []
        self.running: Dict[str, Set[Any]] = {}
        self.most_running: Dict[str, int] = {}
        self.cap = settings.cap
        self.highest_cap = settings.cap  # requests admitted under an older, higher cap count
        self.user_config: Any = None
        self.is_app = False  # the backend is an ASGI app (no batches)
        self.has_reconfigure = True  # the backend takes a user_config
        self.ran: Set[Any] = set()
        self.work: Dict[Tuple[str, Any], List[float]] = {}  # (replica, caller): [began, ended]
        self.left_at: Dict[Any, float] = {}  # callers that left, and when
        self.injected: List[str] = []
        self.broken: List[Tuple[str, str]] = []  # (invariant, detail): see ``breaks``

    # ------------------------------------------------------------- what the model asks

    def work_s(self) -> float:
        return self.rng.choice([0.0, self.loop.ticks(0, 0.005), self.loop.ticks(0, 0.3)])

    def stream_shape(self) -> Tuple[int, int, bool]:
        """(chunks, bytes per chunk, whether its close raises): short streams and ones
        longer than the window a reader grants without reading; chunks small, or big enough
        to fill what a connection buffers for a reader that stopped reading."""
        chunks = self.rng.choice([self.rng.randint(0, 3), self.rng.randint(9, 20)])
        size = self.rng.choice([0, 0, 16 * 1024, 48 * 1024])
        return chunks, size, self.rng.random() < 0.1

    def started(self, replica: str, caller: Any) -> None:
        running = self.running.setdefault(replica, set())
        running.add(caller)
        self.ran.add(caller)
        self.most_running[replica] = max(self.most_running.get(replica, 0), len(running))
        now = self.loop.time()
        self.work[(replica, caller)] = [now, float("inf")]
        reached = reached_at.get()
        if reached is not None and now - reached > CONFIG_BOUND_S:
            self.breaks("a request is not held behind requests still open",
                        f"caller {caller}'s request reached {replica} at {reached:.3f} s, its "
                        f"app started only at {now:.3f} s")

    def stopped(self, replica: str, caller: Any) -> None:
        self.running[replica].discard(caller)
        self.work[(replica, caller)][1] = self.loop.time()

    def breaks(self, invariant: str, detail: str) -> None:
        """``invariant`` broke where raising cannot report it (in user code, in a fault
        whose failure would leave the world running): ``check_user_code`` reports it once
        the run is over."""
        self.broken.append((invariant, detail))

    def left(self, caller: Any) -> None:
        """``caller`` gives up on its request (the user's work for it must stop soon)."""
        self.left_at.setdefault(caller, self.loop.time())

    # ------------------------------------------------------------- the controller's part

    def target(self, replica: str) -> Tuple[Any, Tuple[Any, ...]]:
        """What a replica runs, and its init args."""
        return SimModel, (replica,)

    def backend_config(self) -> BackendConfig:
        s = self.settings
        batching = {"max_batch_size": s.batch_size, "batch_wait_timeout": 0.01} \
            if s.method == "batched" and not self.is_app else {}
        return BackendConfig(num_replicas=s.replicas, max_concurrent_queries=self.cap,
                             max_queued_requests=s.max_queued, user_config=self.user_config,
                             request_timeout_s=s.request_timeout_s, **batching)

    def limits(self) -> Dict[str, BackendLimits]:
        s = self.settings
        return {BACKEND: BackendLimits(self.cap, s.max_queued, s.request_timeout_s)}

    async def start(self) -> None:
        s = self.settings
        self.router.apply({
            constants.KEY_ENDPOINTS: (1, {ENDPOINT: EndpointInfo(ENDPOINT, None, [],
                                                                  {BACKEND: 1.0})}),
            constants.KEY_BACKENDS: (1, {BACKEND: BackendLimits(
                s.cap, s.max_queued, s.request_timeout_s)}),
        })
        for _ in range(s.replicas):
            await self.add_replica()

    async def add_replica(self) -> None:
        replica = SimReplica(self, self._numbers)
        self._numbers += 1
        await replica.start()
        self.replicas.append(replica)
        self.publish()

    def publish(self) -> None:
        self._replica_version += 1
        listed = [(r.tag, r.address) for r in self.replicas if r.alive]
        self.router.apply({constants.KEY_REPLICAS: (self._replica_version, {BACKEND: listed})})

    async def kill(self, replica: SimReplica) -> None:
        """The replica's process dies; the controller notices a little later and starts a
        new one."""
        replica.alive = False
        self.net.kill(replica.address)
        await asyncio.sleep(self.loop.ticks(0.05, 1.0))  # the health check's period
        self.publish()
        await self.add_replica()

    # ------------------------------------------------------------- callers

    def draw_caller(self, index: int) -> Caller:
        rng = self.rng
        method = self.settings.method
        timeout_s = rng.choice([None, self.loop.ticks(0.001, 0.05), self.loop.ticks(0.05, 2.0)])
        if timeout_s is None and self.settings.request_timeout_s is None:
            timeout_s = self.loop.ticks(0.5, 3.0)  # every request has a bound
        leave_after = rng.choice([None, None, 0.0, self.loop.ticks(0.0, 0.01),
                                  self.loop.ticks(0.0, 0.5)])
        read_chunks = rng.choice([None, 0, 1, 2]) if method.endswith("stream") else None
        caller = Caller(index, method, timeout_s, self.loop.ticks(0.0, 2.0), leave_after,
                        read_chunks)
        caller.by_handle = not method.endswith("stream") and rng.random() < 0.3
        if method.endswith("stream"):
            caller.read_pause_s = rng.choice([0.0, 0.0, self.loop.ticks(0.01, 0.1)])
        if method == "batched":
            caller.model_id = rng.choice([None, "m1", "m2"])
        return caller

    async def call(self, caller: Caller) -> None:
        await asyncio.sleep(caller.start_at)
        stream = caller.method.endswith("stream")
        headers = {} if caller.model_id is None else {MODEL_ID_HEADER: caller.model_id}
        call = (caller.method, (caller.index,), {}, "GET", headers, stream,
                f"req-{caller.index}")
        started = self.loop.time()
        if caller.by_handle:
            await self._call_by_handle(caller, call, started)
            return
        try:
            request = self.router.place(ENDPOINT, "call", None, encode_call("call", call),
                                        timeout_s=caller.timeout_s, model_id=caller.model_id)
        except ServeError as exc:
            caller.outcome, caller.ended_at = exc, 0.0
            return
        assert request is not None
        caller.request = request

        async def reply() -> Any:
            await request.written()
            value = await request.reply
            return (await self._read(caller, value)) if stream else value

        await self._outcome(caller, started, self._leave, reply)

    async def _outcome(self, caller: Caller, started: float, leave: Callable[[Caller], None],
                       reply: Callable[[], Awaitable[Any]]) -> None:
        """The caller's outcome: what ``reply()`` gives or raises; it leaves (``leave``)
        after its ``leave_after``."""
        leaving = None
        if caller.leave_after is not None:
            leaving = self.loop.call_later(caller.leave_after, leave, caller)
        try:
            caller.outcome = await reply()
        except (Exception, asyncio.CancelledError) as exc:
            caller.outcome = exc
        finally:
            if leaving is not None:
                leaving.cancel()
            caller.ended_at = self.loop.time() - started

    async def _call_by_handle(self, caller: Caller, call: tuple, started: float) -> None:
        """A sync handle's call: the loop's side is the handle's own (``_SyncCall``, one
        ``_Pacing`` for all such callers); this task plays the caller's thread, waiting for
        the placement when the pacing says so, then for the reply."""
        handle = ServeSyncHandle(CONTROLLER, ENDPOINT, HandleOptions(
            timeout_s=caller.timeout_s, multiplexed_model_id=caller.model_id))
        handle._pacing = self.pacing
        placing = caller.placing = _SyncCall(handle, encode_call("call", call), self.loop,
                                             waits=not self.pacing.go_ahead())
        self.loop.call_soon_threadsafe(placing.start)

        async def reply() -> Any:
            if placing.waits:
                assert placing.placed is not None
                while not placing.placed.acquire(blocking=False):  # noqa: ASYNC110 (a lock)
                    await asyncio.sleep(TICK)
                if placing.error is not None:
                    raise placing.error
            return await asyncio.wrap_future(placing.mirror)

        await self._outcome(caller, started, self._leave_handle, reply)
        if placing.reply is not None:
            caller.request = placing.reply.request  # type: ignore[attr-defined]

    def _leave_handle(self, caller: Caller) -> None:
        """A sync handle's caller cancels its response (one still blocked in ``remote()``
        has none yet, and stays). Whether its request was written is read on the loop just
        before the cancel lands there (both go through ``call_soon_threadsafe``)."""
        placing = caller.placing
        assert placing is not None
        if placing.waits and placing.reply is None:
            return

        def observe() -> None:
            reply = placing.reply
            request = placing.request if reply is None else reply.request  # type: ignore
            if (reply is None and request is None) or (
                    request is not None and request.state in (QUEUED, "connecting")):
                caller.left_unwritten = True

        self.loop.call_soon_threadsafe(observe)
        if not placing.mirror.done():
            self.left(caller.index)
        ServeResponse(placing.reply if placing.waits else None, self.loop,
                      placing.mirror).cancel()

    def _leave(self, caller: Caller) -> None:
        request = caller.request
        assert request is not None
        if request.state in (QUEUED, "connecting"):
            caller.left_unwritten = True
        connection = request.connection
        if request.reply.cancel():
            self.left(caller.index)
        if connection is not None and self.rng.random() < self.settings.drop_after_leave:
            # Its connection drops right after (the caller's process died with it): the
            # replica sees the cancel, then the loss, in the turns the seed picks.
            self.injected.append(f"drop the connection of caller {caller.index} after it left")
            self.loop.call_later(self.loop.ticks(0, 0.003), self._drop, connection)

    def _drop(self, connection: RpcClient) -> None:
        protocol = connection._protocol
        if protocol is not None and protocol.transport is not None:
            self.net.reset(protocol.transport._connection)  # type: ignore[attr-defined]

    async def _read(self, caller: Caller, stream: Any) -> List[Any]:
        chunks: List[Any] = []
        try:
            while caller.read_chunks is None or len(chunks) < caller.read_chunks:
                if caller.read_pause_s:
                    await asyncio.sleep(caller.read_pause_s)
                try:
                    chunks.append(await asyncio.wait_for(stream.__anext__(), 5.0))
                except StopAsyncIteration:
                    return chunks
        except BaseException:
            self.left(caller.index)
            stream.cancel()
            raise
        self.left(caller.index)
        stream.cancel()  # the caller leaves before the end
        return chunks

    # ------------------------------------------------------------- faults

    async def inject(self) -> None:
        rng = self.rng
        await asyncio.sleep(self.loop.ticks(0.0, 2.0))
        live = [r for r in self.replicas if r.alive]
        kind = rng.choice(["kill", "freeze", "reset", "reset", "scale_down", "scale_up",
                           "cap", "user_config"])
        if kind == "kill" and live:
            victim = rng.choice(live)
            self.injected.append(f"kill {victim.tag} at {self.loop.time():.3f}")
            await self.kill(victim)
        elif kind == "freeze" and live:
            victim = rng.choice(live)
            until = self.loop.time() + rng.choice([self.loop.ticks(0.05, 2.0),
                                                   self.loop.ticks(2.0, 8.0)])
            self.injected.append(f"freeze {victim.tag} until {until:.3f}")
            self.net.stall(victim.address, until)
        elif kind == "reset" and self.net.connections:
            connection = rng.choice(list(self.net.connections))
            self.injected.append(f"reset a connection to {connection.address} at "
                                 f"{self.loop.time():.3f}")
            self.net.reset(connection)
        elif kind == "scale_down" and len(live) > 1:
            victim = rng.choice(live)
            self.injected.append(f"scale down: drain {victim.tag} at {self.loop.time():.3f}")
            await self.retire(victim)
        elif kind == "scale_up":
            self.injected.append(f"scale up at {self.loop.time():.3f}")
            await self.add_replica()
        elif kind == "cap" or (kind == "user_config" and self.has_reconfigure):
            if kind == "cap":
                self.cap = rng.randint(1, 4)
                self.highest_cap = max(self.highest_cap, self.cap)
            else:
                self.user_config = self.loop.time()
            self.injected.append(f"config: cap {self.cap}, user_config {self.user_config} at "
                                 f"{self.loop.time():.3f}")
            await self.update_config(publish_first=rng.random() < 0.5)

    async def retire(self, replica: SimReplica) -> None:
        """Scale down as the controller does: unlisted first, drained, then stopped."""
        replica.alive = False
        self.publish()
        try:
            await asyncio.wait_for(replica.replica.drain(), 5.0)
        except asyncio.TimeoutError:
            pass  # (the controller stops it anyway)
        self.net.kill(replica.address)

    async def update_config(self, publish_first: bool) -> None:
        """A config change pushed to every replica and published to routers, in either
        order; it must be applied within ``CONFIG_BOUND_S``, however long the requests
        open on the replicas last."""
        if publish_first:
            self.router.apply({constants.KEY_BACKENDS: (self._next_version(), self.limits())})
        config = self.backend_config()
        updates = [asyncio.ensure_future(r.replica.update_config(config.replica_settings()))
                   for r in self.replicas if r.alive]
        if updates:
            began = self.loop.time()
            _, pending = await asyncio.wait(updates, timeout=CONFIG_BOUND_S)
            if pending:  # (left to end as they may: the run goes on to its checks)
                self.breaks("a config change is applied within its bound",
                            f"the config change begun at {began:.3f} s (user_config "
                            f"{config.user_config}) was still not applied on {len(pending)} "
                            f"of {len(updates)} replicas {CONFIG_BOUND_S} s later")
            else:
                await asyncio.gather(*updates)  # (what they raised)
        if not publish_first:
            self.router.apply({constants.KEY_BACKENDS: (self._next_version(), self.limits())})

    def _next_version(self) -> int:
        self._replica_version += 1
        return self._replica_version

    # ------------------------------------------------------------- the invariants

    def check_line(self) -> None:
        """Once every caller has its answer, no request is left in a router's line, even
        while the replicas are stuck (those that left must not pile up there)."""
        for replica_set in self.router._replica_sets.values():
            check(not replica_set._waiting, "an ended request holds nothing",
                  f"every caller has ended, but the router's line still holds "
                  f"{len(replica_set._waiting)} requests")

    def check_user_code(self) -> None:
        for invariant, detail in self.broken:
            check(False, invariant, detail)
        for replica in self.replicas:
            if replica.alive:
                running = self.running.get(replica.tag, set())
                check(not running, "the user's work for every request ends",
                      f"replica {replica.tag} still runs the work of callers "
                      f"{sorted(running, key=str)[:5]}")

    def check_requests(self) -> None:
        for caller in self.callers:
            check(caller.ended_at is not None, "every request ends",
                  f"caller {caller.index} ({caller.method}) never got an answer")
            bound = _bound(caller, self.settings)
            if bound is not None and caller.ended_at is not None:
                check(caller.ended_at <= bound, "every request ends within its bound",
                      f"caller {caller.index} waited {caller.ended_at:.3f} s, bound "
                      f"{bound:.3f} s ({caller.outcome!r})")
            outcome = caller.outcome
            if isinstance(outcome, BaseException):
                check(isinstance(outcome, (ServeError, asyncio.CancelledError,
                                           asyncio.TimeoutError, RuntimeError)),
                      "a failed request fails with a clear error",
                      f"caller {caller.index} got {outcome!r}")
                if isinstance(outcome, RuntimeError):
                    check("simulated" in str(outcome) or "raised" in str(outcome),
                          "a failed request fails with a clear error",
                          f"caller {caller.index} got {outcome!r}")
            if caller.left_unwritten:
                check(caller.index not in self.ran,
                      "nothing runs for a caller that left before its request was written",
                      f"caller {caller.index} left first, yet a replica ran it")
            request = caller.request
            if request is not None:
                check(request.state == ENDED, "every request ends",
                      f"caller {caller.index}'s request is still {request.state}")
                check(request.payload is None, "an ended request holds no payload",
                      f"caller {caller.index}'s request still holds its payload")

    def check_left_work(self) -> None:
        """The user's work for a caller that left ends within ``LEAVE_BOUND_S`` of its
        leaving (its request cancelled on the replica), not at its natural end for nobody;
        on a replica still alive (a dead one's work is nobody's)."""
        alive = {r.tag for r in self.replicas if r.alive}
        for (replica, caller), (began, ended) in self.work.items():
            left = self.left_at.get(caller)
            if left is None or replica not in alive:
                continue
            check(ended - max(began, left) <= LEAVE_BOUND_S,
                  "the user's work for a caller that left stops",
                  f"caller {caller} left at {left:.3f} s, its work on {replica} (begun at "
                  f"{began:.3f} s) ended only at {ended:.3f} s")

    def check_places(self) -> None:
        for tag, most in self.most_running.items():
            check(most <= self.highest_cap, "no replica runs more than its cap",
                  f"replica {tag} ran {most} requests at once, cap {self.highest_cap}")
        for replica in self.replicas:
            if replica.alive:
                check(replica.replica._in_flight == 0, "every replica place comes back",
                      f"replica {replica.tag} still counts {replica.replica._in_flight} "
                      "requests in flight")
        for replica_set in self.router._replica_sets.values():
            for slot in replica_set.slots.values():
                check(slot.in_flight == 0, "every replica place comes back",
                      f"the router still holds {slot.in_flight} places on {slot.tag}")
            check(not replica_set._waiting and replica_set.queued == 0,
                  "every request ends",
                  f"the router's queue still holds {len(replica_set._waiting)} requests "
                  f"({replica_set.queued} counted)")
            routable = {slot.tag for slot in replica_set._order}
            for replica in self.replicas:
                if replica.alive:
                    check(replica.tag in routable, "a healthy replica is reachable",
                          f"replica {replica.tag} is alive and listed, but the router "
                          "no longer sends to it")

    async def probe(self) -> None:
        """Every healthy replica takes its cap at once."""
        live = sum(1 for r in self.replicas if r.alive)
        count = live * self.cap
        calls = [("async_call", (f"probe-{i}",), {}, "GET", {}, False, None)
                 for i in range(count)]
        self.net.connect_faults = ConnectFaults()
        replies = []
        for call in calls:
            request = self.router.place(ENDPOINT, "call", None, encode_call("call", call),
                                        timeout_s=60.0)
            assert request is not None
            replies.append(request.reply)
        results = await asyncio.gather(*replies, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        check(not failed, "capacity is full once idle",
              f"{len(failed)} of {count} probe requests failed: {failed[:1]!r}")


def _bound(caller: Caller, settings: Settings) -> Optional[float]:
    """How long the caller may wait: its timeout (else the backend's), from placement; a
    stream's reader adds its own wait per chunk."""
    timeout = caller.timeout_s if caller.timeout_s is not None else settings.request_timeout_s
    if timeout is None:
        return None
    if caller.method.endswith("stream"):
        return None  # past the first chunk the reader's own deadline bounds it
    return timeout + 0.001


@contextlib.contextmanager
def windows_checked(window_bytes: int) -> Iterator[None]:
    """Streams' windows of ``window_bytes`` while the world runs, and a reader's stream
    (a caller's streamed reply, the replica's side of a request's own stream) checked each
    time a chunk arrives: what it holds unread is part of what its sender may have sent
    and not yet had back, so it never holds more than a window."""
    shipped, push = transport.STREAM_WINDOW_BYTES, transport.ReplyStream.push

    def checked_push(stream: transport.ReplyStream, chunk: bytes) -> None:
        push(stream, chunk)
        held = stream._chunks
        if len(held) > transport.STREAM_WINDOW or (
                len(held) > 1 and sum(map(len, held)) > window_bytes):
            _current().breaks(WINDOW, f"a reader holds {len(held)} chunks of "
                              f"{sum(map(len, held))} bytes unread (window: "
                              f"{transport.STREAM_WINDOW} chunks, {window_bytes} bytes)")

    transport.STREAM_WINDOW_BYTES = window_bytes
    transport.ReplyStream.push = checked_push  # type: ignore[method-assign]
    try:
        yield
    finally:
        transport.STREAM_WINDOW_BYTES = shipped
        transport.ReplyStream.push = push  # type: ignore[method-assign]


async def live(loop: SimLoop, make: Callable[[SimLoop, SimThreads, Settings], "World"],
               story: Callable[[Any], Awaitable[None]]) -> None:
    """Make a world from the seed, start it, play ``story(world)`` in it, then close it."""
    settings = draw_settings(loop.rng)
    with sim_threads(loop) as threads, windows_checked(settings.window_bytes):
        world = make(loop, threads, settings)
        set_world(world)
        ready = loop.create_future()
        ready.set_result(world.router)
        routers._routers[(CONTROLLER, id(loop))] = ready  # (the sync handles' router)
        try:
            await world.start()
            await story(world)
        finally:
            world.router.close()
            for replica in world.replicas:
                replica.replica.close()
            routers._routers.pop((CONTROLLER, id(loop)), None)
            set_world(None)


async def _callers_and_faults(world: World) -> None:
    """Seeded callers and faults; then, once all is quiet, the invariants."""
    world.callers = [world.draw_caller(i) for i in range(world.settings.callers)]
    tasks = [asyncio.ensure_future(world.call(c)) for c in world.callers]
    tasks += [asyncio.ensure_future(world.inject()) for _ in range(world.settings.faults)]
    await asyncio.gather(*tasks)
    world.check_line()
    await asyncio.sleep(QUIET_S)
    world.check_requests()
    world.check_user_code()
    world.check_left_work()
    world.check_places()
    await world.probe()
    await asyncio.sleep(1.0)
    world.check_places()


@scenario("dataplane")
def dataplane(seed: int) -> None:
    """Router, wire and replicas under seeded callers, faults and network."""
    logging.getLogger("servekit").setLevel(logging.CRITICAL)
    run(lambda loop: live(loop, World, _callers_and_faults), seed)
