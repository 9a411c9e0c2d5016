"""The router: picks a backend by traffic policy and a replica with room, per request.

A router lives in every process that sends requests (the driver's handles, the HTTP proxy,
replicas that call other endpoints), bound to one event loop. It learns endpoints, backend
caps and replica addresses by long poll, so no request ever asks the controller anything.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import logging
import math
import random
import time
import uuid
from typing import Any, Awaitable, Callable, Deque, Dict, List, Optional, Tuple

from servekit._private import constants, metrics
from servekit._private.discovery import current_controller
from servekit._private.specs import BackendLimits, EndpointInfo
from servekit._private.transport import (
    Busy,
    ConnectFailed,
    ReplyStream,
    RpcClient,
    encode_call,
    is_remote_error,
    parse_tcp_address,
)
from servekit.exceptions import (
    BackendOverloadedError,
    BackendUnavailableError,
    EndpointNotFoundError,
)

logger = logging.getLogger("servekit.router")


ConnectReplica = Callable[[str, str], Awaitable[RpcClient]]

# Deleted endpoint names a router remembers (the oldest are forgotten first).
_MAX_REMOVED_ENDPOINTS = 10_000

# What became of a request sent to a replica (see ``ReplicaSet.settle``).
ANSWERED, REFUSED, UNSENT, LOST = "answered", "refused", "unsent", "lost"


# Seconds a process has to send its metrics for a scrape.
_METRICS_TIMEOUT_S = 2.0


class ReplicaSlot:
    """One replica as a router sees it: its connection and requests this router has on it.

    A replica this router could not connect to, or whose connection was lost, is ``dead``:
    it is never picked again, even while the controller still lists it.
    """

    __slots__ = ("tag", "address", "in_flight", "connection", "_connecting", "_connect",
                 "removed", "full", "dead", "on_room", "on_lost")

    def __init__(self, tag: str, address: str, connect: ConnectReplica,
                 on_room: Callable[[], None], on_lost: Callable[["ReplicaSlot"], None]) -> None:
        self.tag = tag
        self.address = address
        self.in_flight = 0
        self.connection: Optional[RpcClient] = None
        self._connecting: Optional[asyncio.Future] = None
        self._connect = connect
        self.removed = False
        self.full = False  # the replica refused a request; wait for it to say it has room
        self.dead = False
        self.on_room = on_room
        self.on_lost = on_lost

    async def connected(self) -> RpcClient:
        """The connection, opened once; ``ConnectFailed`` if the replica cannot be reached."""
        if self.connection is not None:
            if self.connection.is_closed:
                # Its loss may not have been handled yet: never pick it again from here on
                # (a caller that retries at once would otherwise pick it forever).
                self.on_lost(self)
                raise ConnectFailed(f"The connection to replica {self.tag} is closed.")
            return self.connection
        connecting = self._connecting
        if connecting is None:
            connecting = self._connecting = asyncio.ensure_future(self._open())
        return await asyncio.shield(connecting)

    async def _open(self) -> RpcClient:
        try:
            connection = await self._connect(self.address, f"replica {self.tag}")
        except ConnectFailed:
            self.on_lost(self)
            raise
        connection.on_notify = self._room
        assert connection.closed is not None
        connection.closed.add_done_callback(lambda _: self.on_lost(self))
        self.connection = connection
        return connection

    def _room(self) -> None:
        self.full = False
        self.on_room()

    def close(self) -> None:
        """Close the connection on purpose: the slot is not used again."""
        self.dead = True
        if self.connection is not None:
            self.connection.close()
        elif self._connecting is not None:
            self._connecting.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() else f.result().close())


class ReplicaSet:
    """The replicas of one backend; requests wait here, in order, when none has room."""

    def __init__(self, backend: str, connect: ConnectReplica,
                 process: str = "router") -> None:
        """``process``: the label of this process in the metrics."""
        self.backend = backend
        self._queued_gauge = metrics.QUEUED.labels(backend, process)
        self._shed = metrics.SHED.labels(backend, process)
        self.requests = metrics.ROUTER_REQUESTS.labels(backend, process)
        self.cap = 8
        self.max_queued = -1
        self.queued = 0  # requests waiting in acquire() (not those put back first in line)
        self.slots: Dict[str, ReplicaSlot] = {}
        self._connect = connect
        self._order: List[ReplicaSlot] = []
        self._turn = 0
        self._waiters: Deque[asyncio.Future] = collections.deque()
        self._expiries: Dict[asyncio.Future, asyncio.TimerHandle] = {}

    def update(self, replicas: List[Tuple[str, str]]) -> None:
        current = dict(replicas)
        for tag in list(self.slots):
            if tag not in current:
                slot = self.slots.pop(tag)
                slot.removed = True
                if slot.in_flight == 0:
                    slot.close()
        for tag, address in current.items():
            if tag not in self.slots:
                self.slots[tag] = ReplicaSlot(tag, address, self._connect, self._wake,
                                              self._lost)
        self._order = [slot for slot in self.slots.values() if not slot.dead]
        self._wake()
        self._arm_expiry()

    def set_limits(self, limits: BackendLimits) -> None:
        self.cap = limits.cap
        self.max_queued = limits.max_queued
        self._wake()

    def _lost(self, slot: ReplicaSlot) -> None:
        """The replica cannot be reached: never pick it again."""
        if slot.dead:
            return  # closed on purpose, or already known
        logger.warning("Replica %s of backend %s is unreachable; no longer sending to it.",
                       slot.tag, self.backend)
        self._order = [s for s in self._order if s is not slot]
        slot.close()
        self._arm_expiry()

    def _pick(self) -> Optional[ReplicaSlot]:
        """The least busy replica with room; ties go round-robin so idle replicas share."""
        order = self._order
        count = len(order)
        if not count:
            return None
        self._turn = start = (self._turn + 1) % count
        best: Optional[ReplicaSlot] = None
        for i in range(count):
            slot = order[(start + i) % count]
            if slot.in_flight < self.cap and not slot.full and (
                    best is None or slot.in_flight < best.in_flight):
                best = slot
        return best

    def try_acquire(self) -> Optional[ReplicaSlot]:
        """A replica with room now, without queueing behind anyone (for shadow copies)."""
        if self._waiters:
            return None
        slot = self._pick()
        if slot is not None:
            slot.in_flight += 1
        return slot

    async def acquire(self, first: bool = False) -> ReplicaSlot:
        """A replica with room, waiting in arrival order (``first``: ahead of the queue, for
        a request accepted before, which is never shed).

        Raises:
            BackendOverloadedError: every replica is full and ``max_queued`` requests wait.
        """
        if not self._waiters:
            slot = self._pick()
            if slot is not None:
                slot.in_flight += 1
                return slot
        if not first and 0 <= self.max_queued <= self.queued:
            self._shed.inc()
            raise BackendOverloadedError(
                f"Backend '{self.backend}' is overloaded: every replica is at its "
                f"max_concurrent_queries and {self.queued} requests already wait for one here "
                f"(max_queued_requests={self.max_queued}). Retry later, or add replicas.")
        waiter = asyncio.get_running_loop().create_future()
        if first:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
            self.queued += 1
            self._queued_gauge.inc()
        if not self._order:
            self._arm_expiry([waiter])
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result(), completed=False)
            raise
        finally:
            if not first:
                self.queued -= 1
                self._queued_gauge.dec()

    def _arm_expiry(self, waiters: Optional[List[asyncio.Future]] = None) -> None:
        """While no replica is routable, waiting requests fail NO_REPLICA_TIMEOUT_S after
        the last one was lost (or after they arrived, if later); a replica coming back
        disarms them."""
        if self._order:
            for handle in self._expiries.values():
                handle.cancel()
            self._expiries.clear()
            return
        waiters = list(self._waiters) if waiters is None else waiters
        if not waiters:
            return
        loop = asyncio.get_running_loop()
        for waiter in waiters:
            if not waiter.done() and waiter not in self._expiries:
                self._expiries[waiter] = loop.call_later(
                    constants.NO_REPLICA_TIMEOUT_S, self._expire, waiter)

    def _expire(self, waiter: asyncio.Future) -> None:
        self._expiries.pop(waiter, None)
        if not waiter.done() and not self._order:
            waiter.set_exception(BackendUnavailableError(
                f"No replica of backend '{self.backend}' could take the request within "
                f"{constants.NO_REPLICA_TIMEOUT_S}s (SERVEKIT_NO_REPLICA_TIMEOUT_S): its "
                "replicas died or are being replaced. Try again later."))

    def release(self, slot: ReplicaSlot, completed: bool) -> None:
        """Give back a slot; ``completed``: the replica finished a request of ours."""
        slot.in_flight -= 1
        if completed:
            slot.full = False  # the replica just finished one of ours: it has room
        if slot.removed:
            if slot.in_flight == 0:
                slot.close()
            return
        self._wake()

    def settle(self, slot: ReplicaSlot, reply: asyncio.Future) -> str:
        """Account for the reply of a request sent to ``slot``; say what became of it.

        ``REFUSED``: the replica was full (marked so unless it said it has room since);
        ``UNSENT``: the connection failed before the request was written; both may be sent
        again. ``LOST``: the replica went away while it held the request. ``ANSWERED``:
        anything else (a result, an error from the replica, a cancellation).
        """
        error = None if reply.cancelled() else reply.exception()
        if isinstance(error, Busy):
            connection = slot.connection
            if connection is not None and connection.notices == error.notices:
                slot.full = True
            self.release(slot, completed=False)
            return REFUSED
        if isinstance(error, BackendUnavailableError) and not is_remote_error(error):
            self._lost(slot)
            self.release(slot, completed=False)
            return UNSENT if isinstance(error, ConnectFailed) else LOST
        self.release(slot, completed=True)
        return ANSWERED

    def _wake(self) -> None:
        while self._waiters:
            if self._waiters[0].done():
                self._waiters.popleft()
                continue
            slot = self._pick()
            if slot is None:
                return
            slot.in_flight += 1
            self._waiters.popleft().set_result(slot)


async def _drain(stream: ReplyStream, kind: str) -> Optional[str]:
    """Read a shadow copy's streamed reply to its end and drop it, as a client that reads
    everything would; what went wrong, if anything."""
    status = None
    try:
        async for item in stream:
            if kind == "http" and status is None:
                status = item[0]  # an HTTP stream starts with (status, headers)
    except asyncio.CancelledError:
        stream.cancel()
        raise
    except Exception as exc:
        return repr(exc)
    return f"status {status}" if status is not None and status >= 500 else None


def _cancel_with(reply: asyncio.Future, result: asyncio.Future) -> None:
    """The caller cancelled ``result``: cancel the request it waits for (the replica stops
    it)."""
    if result.cancelled():
        reply.cancel()


def pick_backend(traffic: Dict[str, float], shard_key: Optional[str]) -> str:
    """Weighted random choice, or weighted rendezvous hashing of ``shard_key``.

    Rendezvous hashing gives each (key, backend) pair a score ``-weight / ln(u)`` with ``u``
    a uniform hash of the pair, and sends the key to the highest score. A key's choice
    changes only if the backend it moves to or from had its weight changed, so changing one
    weight moves the fewest keys possible, unlike slicing the cumulative weights.
    """
    if shard_key is None:
        draw = random.random()
        cumulative = 0.0
        last = ""
        for backend, weight in traffic.items():
            cumulative += weight
            last = backend if weight > 0 else last
            if draw < cumulative:
                return backend
        return last
    best, best_score = "", -math.inf
    for backend, weight in traffic.items():
        if weight <= 0:
            continue
        digest = hashlib.blake2b(f"{shard_key}\x00{backend}".encode(), digest_size=8).digest()
        u = (int.from_bytes(digest, "big") + 0.5) / 2.0 ** 64
        score = -weight / math.log(u)
        if score > best_score:
            best, best_score = backend, score
    return best


class ShadowStats:
    """Counts of shadow copies per (endpoint, backend).

    ``sent``: delivered to a replica; ``failed``: of those, the ones that raised or got a 5xx;
    ``dropped``: not sent because every replica of the shadow backend was full.
    """

    def __init__(self, process: str = "router") -> None:
        self.counts: Dict[Tuple[str, str], Dict[str, int]] = collections.defaultdict(
            lambda: {"sent": 0, "dropped": 0, "failed": 0})
        self._process = process

    def add(self, endpoint: str, backend: str, outcome: str) -> None:
        self.counts[(endpoint, backend)][outcome] += 1
        metrics.SHADOWS.labels(endpoint, backend, outcome, self._process).inc()


class Router:
    """Routes the requests of one event loop; created by ``Router.start``.

    ``send`` ends every request it accepts: its future gets the reply, the replica's error,
    or a ``BackendUnavailableError`` naming the replica that died with it. A request that
    provably never reached a replica (refused as full, or its connection failed) is sent to
    another one; a request that may have started running is never sent twice.
    """

    def __init__(self, controller_address: str, role: str,
                 connect_replica: ConnectReplica = RpcClient.connect) -> None:
        self._controller_address = controller_address
        self._role = role
        self.process = metrics.process_label(role)
        self._id = f"{role}-{uuid.uuid4().hex[:12]}"
        self._connect_replica = connect_replica
        self.endpoints: Dict[str, EndpointInfo] = {}
        # Deleted endpoints (name -> when), so later calls to them fail at once.
        self._removed_endpoints: Dict[str, float] = {}
        self._replica_sets: Dict[str, ReplicaSet] = {}
        self._limits: Dict[str, BackendLimits] = {}
        self._versions = {constants.KEY_ENDPOINTS: -1, constants.KEY_BACKENDS: -1,
                          constants.KEY_REPLICAS: -1}
        self._changed = asyncio.Event()
        self._controller: Optional[RpcClient] = None
        self._poll_task: Optional[asyncio.Task] = None
        self._tasks: set = set()  # shadow copies and re-deliveries in progress
        self.shadow_stats = ShadowStats()
        self.on_update: List[Any] = []

    @classmethod
    async def start(cls, controller_address: str, role: str = "router") -> "Router":
        router = cls(controller_address, role)
        router._controller = await router._connect_controller()
        await router._poll_once()
        router._poll_task = asyncio.ensure_future(router._poll_forever())
        return router

    def close(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
        if self._controller is not None:
            self._controller.close()
        for replica_set in self._replica_sets.values():
            for slot in replica_set.slots.values():
                slot.close()

    async def replica_metrics(self) -> List[str]:
        """The metrics of every replica this router knows that answers within 2 s."""
        async def of(slot: ReplicaSlot) -> Optional[str]:
            try:
                connection = await slot.connected()
                return await asyncio.wait_for(connection.call("metrics"), _METRICS_TIMEOUT_S)
            except (Exception, asyncio.TimeoutError):
                return None  # gone or frozen: its metrics are missing from this scrape

        texts = await asyncio.gather(*(of(slot) for replica_set in self._replica_sets.values()
                                       for slot in replica_set.slots.values() if not slot.dead))
        return [text for text in texts if text is not None]

    async def controller_metrics(self) -> Optional[str]:
        """The controller's own metrics (replica starts, restarts, failed health checks)."""
        if self._controller is None:
            return None
        try:
            return await asyncio.wait_for(self._controller.call("metrics"), _METRICS_TIMEOUT_S)
        except (Exception, asyncio.TimeoutError):
            return None

    # ------------------------------------------------------------- long poll

    async def _poll_once(self) -> None:
        assert self._controller is not None
        updates = await self._controller.call("listen", self._id, self._role, self._versions)
        self.apply(updates)

    def apply(self, updates: Dict[str, Tuple[int, Any]]) -> None:
        """Take long-poll updates ``{key: (version, value)}`` and wake who waits on them."""
        for key, (version, value) in updates.items():
            self._versions[key] = version
            self._apply(key, value)
        self._changed.set()
        self._changed = asyncio.Event()
        for callback in self.on_update:
            callback(self)

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self._poll_once()
            except asyncio.CancelledError:
                # The router closed, or its event loop is ending (asyncio.run cancels every
                # task): release the sockets while the loop still runs.
                self.close()
                raise
            except ConnectFailed:
                return  # nothing serves the controller's socket: the instance is gone
            except BackendUnavailableError:
                # The controller died; a new one will serve the same address. Meanwhile
                # requests go on with the routes and replicas this router knows.
                logger.warning("Lost the servekit controller; waiting for it to come back.")
                try:
                    self._controller = await self._connect_controller()
                except ConnectFailed:
                    return  # the instance is gone
            except Exception:
                logger.exception("Long poll failed; retrying")
                await asyncio.sleep(0.5)

    async def _connect_controller(self) -> RpcClient:
        """Connect to the controller. A Unix socket stays bound while its controller
        restarts, so a refusal means the instance is gone; on TCP (Ray) nothing listens
        until the restarted controller does, perhaps at another address, so the address is
        looked up again and refusals are retried for the startup timeout.

        Raises:
            ConnectFailed: nothing serves the address (for that long, on TCP).
        """
        deadline = time.monotonic() + constants.STARTUP_TIMEOUT_S
        delay = 0.05
        while True:
            address = await current_controller(self._controller_address)
            try:
                return await RpcClient.connect(address, "servekit controller")
            except ConnectFailed:
                if parse_tcp_address(self._controller_address) is None or \
                        time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    def _apply(self, key: str, value: Any) -> None:
        if key == constants.KEY_ENDPOINTS:
            now = time.monotonic()
            for name in self.endpoints.keys() - value.keys():
                self._removed_endpoints[name] = now
            for name in value.keys() & self._removed_endpoints.keys():
                del self._removed_endpoints[name]  # re-created
            while len(self._removed_endpoints) > _MAX_REMOVED_ENDPOINTS:
                del self._removed_endpoints[next(iter(self._removed_endpoints))]  # oldest
            self.endpoints = value
        elif key == constants.KEY_BACKENDS:
            self._limits = value
            for backend, limits in value.items():
                self._replica_set(backend).set_limits(limits)
        elif key == constants.KEY_REPLICAS:
            for backend, replicas in value.items():
                self._replica_set(backend).update(replicas)
            for backend in set(self._replica_sets) - set(value):
                self._replica_sets[backend].update([])

    def _replica_set(self, backend: str) -> ReplicaSet:
        replica_set = self._replica_sets.get(backend)
        if replica_set is None:
            replica_set = ReplicaSet(backend, self._connect_replica, self.process)
            self._replica_sets[backend] = replica_set
            limits = self._limits.get(backend)
            if limits is not None:
                replica_set.set_limits(limits)
        return replica_set

    # ------------------------------------------------------------- requests

    async def _endpoint(self, endpoint: str, missing_ok: bool) -> EndpointInfo:
        """The endpoint's record, waiting a bounded time for one this router lacks.

        One deleted moments ago gets the route grace period to come back (it is being
        re-created); one deleted longer ago fails at once. An unknown one gets the grace
        period to reach this router (it may have just been created), or with
        ``missing_ok`` (a handle made before its endpoint) ``MISSING_ENDPOINT_TIMEOUT_S``.
        """
        info = self.endpoints.get(endpoint)
        if info is not None:
            return info
        removed_at = self._removed_endpoints.get(endpoint)
        if removed_at is not None:
            deadline = removed_at + constants.ROUTE_GRACE_S
            problem = "was deleted"
        elif missing_ok:
            deadline = time.monotonic() + constants.MISSING_ENDPOINT_TIMEOUT_S
            problem = (f"does not exist: it was not created within "
                       f"{constants.MISSING_ENDPOINT_TIMEOUT_S}s "
                       "(SERVEKIT_MISSING_ENDPOINT_TIMEOUT_S)")
        else:
            deadline = time.monotonic() + constants.ROUTE_GRACE_S
            problem = "does not exist (it was deleted)"
        while info is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EndpointNotFoundError(
                    f"Endpoint '{endpoint}' {problem}. Registered endpoints: "
                    f"{sorted(self.endpoints)}.")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
            info = self.endpoints.get(endpoint)
        return info

    async def send(self, endpoint: str, kind: str, shard_key: Optional[str],
                   args: tuple, missing_ok: bool = False,
                   trace: Optional[Dict[str, str]] = None) -> asyncio.Future:
        """Assign the request to a replica and return the future of its reply.

        Returns once a replica was chosen and the request written to it; waits while the
        endpoint is about to exist or every replica of the chosen backend is at its cap.
        ``missing_ok``: the endpoint may not have been created yet (see ``_endpoint``).
        ``trace``: filled with the "backend" and "replica" the request went to.

        Raises:
            TypeError: the arguments cannot be pickled (nothing was sent).
            EndpointNotFoundError: the endpoint was deleted, or never created in time.
        """
        payload = encode_call(kind, args)
        info = await self._endpoint(endpoint, missing_ok)
        if info.shadows:
            self._send_shadows(info, kind, payload)
        replica_set = self._replica_set(pick_backend(info.traffic, shard_key))
        result = asyncio.get_running_loop().create_future()
        if trace is not None:
            trace["backend"] = replica_set.backend
        await self._deliver(replica_set, payload, result, trace=trace)
        return result

    async def _deliver(self, replica_set: ReplicaSet, payload: bytes, result: asyncio.Future,
                       first: bool = False, trace: Optional[Dict[str, str]] = None) -> None:
        """Write the request to a replica with room; its reply will settle ``result``."""
        while True:
            slot = await replica_set.acquire(first)
            if result.done():  # the caller gave up while it waited: send nothing
                replica_set.release(slot, completed=False)
                return
            try:
                connection = await slot.connected()
            except ConnectFailed:
                replica_set.release(slot, completed=False)  # never reached it: try another
                first = True
                continue
            except BaseException:
                replica_set.release(slot, completed=False)
                raise
            reply = connection.send(payload)
            replica_set.requests.inc()
            if trace is not None:
                trace["replica"] = slot.tag
            reply.add_done_callback(functools.partial(
                self._on_reply, replica_set, slot, payload, result, trace))
            result.add_done_callback(functools.partial(_cancel_with, reply))
            return

    def _on_reply(self, replica_set: ReplicaSet, slot: ReplicaSlot, payload: bytes,
                  result: asyncio.Future, trace: Optional[Dict[str, str]],
                  reply: asyncio.Future) -> None:
        if not reply.cancelled() and reply.exception() is None and \
                isinstance(reply.result(), ReplyStream):
            # A streamed reply: the request holds its place on the replica until it ends.
            stream: ReplyStream = reply.result()
            stream.on_end(functools.partial(replica_set.release, slot, True))
            if result.done():
                stream.cancel()
            else:
                result.set_result(stream)
            return
        outcome = replica_set.settle(slot, reply)
        if result.done():
            return
        if outcome in (REFUSED, UNSENT):
            self._spawn(self._redeliver(replica_set, payload, result, trace))
        elif reply.cancelled():
            result.cancel()
        elif reply.exception() is not None:
            result.set_exception(reply.exception())  # type: ignore[arg-type]
        else:
            result.set_result(reply.result())

    async def _redeliver(self, replica_set: ReplicaSet, payload: bytes,
                         result: asyncio.Future, trace: Optional[Dict[str, str]]) -> None:
        """Send a request that never ran again, first in line; its failure ends ``result``."""
        try:
            await self._deliver(replica_set, payload, result, first=True, trace=trace)
        except asyncio.CancelledError:
            if not result.done():
                result.cancel()
            raise
        except BaseException as exc:
            if not result.done():
                result.set_exception(exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_shadows(self, info: EndpointInfo, kind: str, payload: bytes) -> None:
        for backend, proportion in info.shadows.items():
            if random.random() >= proportion:
                continue
            replica_set = self._replica_set(backend)
            slot = replica_set.try_acquire()
            if slot is None:
                self.shadow_stats.add(info.name, backend, "dropped")
                continue
            self._spawn(self._shadow(info.name, replica_set, slot, kind, payload))

    async def _shadow(self, endpoint: str, replica_set: ReplicaSet, slot: ReplicaSlot,
                      kind: str, payload: bytes) -> None:
        """Send one shadow copy; count it, log its failure, never raise."""
        try:
            connection = await slot.connected()
        except ConnectFailed:
            replica_set.release(slot, completed=False)
            self.shadow_stats.add(endpoint, replica_set.backend, "dropped")
            return
        reply = connection.send(payload)
        try:
            await asyncio.wait([reply])
        except asyncio.CancelledError:
            reply.cancel()  # the router is closing; a late reply is ignored
            replica_set.release(slot, completed=False)
            raise
        outcome = replica_set.settle(slot, reply)
        if outcome in (REFUSED, UNSENT):
            self.shadow_stats.add(endpoint, replica_set.backend, "dropped")
            return
        self.shadow_stats.add(endpoint, replica_set.backend, "sent")
        error = None
        if reply.cancelled():
            error = "cancelled"
        elif reply.exception() is not None:
            error = repr(reply.exception())
        elif isinstance(reply.result(), ReplyStream):
            error = await _drain(reply.result(), kind)
        elif kind == "http" and reply.result().status >= 500:
            error = f"status {reply.result().status}"
        if error is not None:
            logger.warning("Shadow copy of a request to endpoint %s failed on backend %s: %s",
                           endpoint, replica_set.backend, error)
            self.shadow_stats.add(endpoint, replica_set.backend, "failed")
