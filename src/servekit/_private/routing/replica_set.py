"""The replicas of one backend as a router sees them, and the queue of its requests.

A ``ReplicaSet`` hands each ``RoutedRequest`` a replica with room under the backend's cap
(``max_concurrent_queries``), least busy first, in arrival order; when none has room the
request waits in a bounded queue. The places requests hold are counted here and given back
only by the requests themselves (``routed_request``).

A request that names a multiplexed model goes to the least busy replica that holds it and
has room; when every holder is full, to the least busy other replica with room, which loads
it too (so a hot model spreads over replicas instead of queueing behind one). A replica
holds what it last reported (its health pings, long-polled) and the models this router
sent it since, for ``MODEL_REPORT_GRACE_S`` (a report made before the request reached it
does not hide it).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Awaitable, Callable, Deque, Dict, Iterable, List, Optional, Tuple

from servekit._private import constants, metrics
from servekit._private.routing.routed_request import CONNECTING, QUEUED, RoutedRequest
from servekit._private.specs import BackendLimits
from servekit._private.wire.transport import ConnectFailed, RpcClient
from servekit.exceptions import BackendOverloadedError, BackendUnavailableError

logger = logging.getLogger("servekit.router")

ConnectReplica = Callable[[str, str], Awaitable[RpcClient]]

# Seconds a model this router sent to a replica counts as held there without a report
# saying so (the replica loads it once the request runs; its next ping reports it).
MODEL_REPORT_GRACE_S = 5.0


def _seen(future: asyncio.Future) -> None:
    """Mark a future's outcome as seen (its failure was handled where it happened)."""
    if not future.cancelled():
        future.exception()


class ReplicaSlot:
    """One replica as a router sees it: its connection and the places this router's
    requests hold on it.

    A replica this router could not reach (its connect failed, or its connection was lost)
    is ``down``: it is not picked until ``RECONNECT_BACKOFF_S`` later (doubled at each failure
    in a row, up to ``MAX_RECONNECT_BACKOFF_S``), then tried again, so a replica that failed
    one connect (``EMFILE``, a timeout) is not lost to this router while the controller
    lists it. A slot closed on purpose (its replica was removed) is ``dead`` for good.
    """

    __slots__ = ("tag", "address", "in_flight", "connection", "_connecting", "_connect",
                 "removed", "full", "dead", "down", "reached", "_backoff_s", "_on_room",
                 "_on_lost", "_on_reached", "models")

    def __init__(self, tag: str, address: str, connect: ConnectReplica,
                 on_room: Callable[[], None], on_lost: Callable[["ReplicaSlot"], None],
                 on_reached: Callable[[], None]) -> None:
        self.tag = tag
        self.address = address
        self.in_flight = 0
        self.connection: Optional[RpcClient] = None
        self._connecting: Optional[asyncio.Future] = None
        self._connect = connect
        self.removed = False
        self.full = False  # the replica refused a request; wait for it to say it has room
        self.dead = False
        self.down = False  # unreachable: not picked until it is retried
        self.reached = False  # connected since it was listed or last lost
        self._backoff_s = constants.RECONNECT_BACKOFF_S
        self._on_room = on_room
        self._on_lost = on_lost
        self._on_reached = on_reached
        # The multiplexed models it holds -> when this router sent it the model (0: the
        # replica reported it).
        self.models: Dict[str, float] = {}

    def connecting(self) -> asyncio.Future:
        """The future of the connection, opened once; it fails (and the replica is down)
        if the replica cannot be reached."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(_seen)  # its failure is handled in _open
        return self._connecting

    async def connected(self) -> RpcClient:
        """The open connection; ``ConnectFailed`` if the replica cannot be reached."""
        connection = self.connection
        if connection is not None and not connection.is_closed:
            return connection
        if connection is not None:
            self.lost()
            raise ConnectFailed(f"The connection to replica {self.tag} is closed.")
        return await asyncio.shield(self.connecting())

    async def _open(self) -> RpcClient:
        try:
            connection = await self._connect(self.address, f"replica {self.tag}")
        except BaseException as exc:
            # Whatever the failure (ConnectFailed, or anything the connect did not expect),
            # the replica is down until it is retried: never picked again meanwhile.
            if not isinstance(exc, ConnectFailed | asyncio.CancelledError):
                logger.warning("Connecting to replica %s failed unexpectedly: %r.",
                               self.tag, exc)
            self.lost()
            raise
        if self.dead:  # closed on purpose while it connected
            connection.close()
            raise ConnectFailed(f"Replica {self.tag} was removed.")
        self._backoff_s = constants.RECONNECT_BACKOFF_S  # the failures in a row are over
        connection.on_notify = self._room
        assert connection.closed is not None
        connection.closed.add_done_callback(lambda _: self._closed(connection))
        self.connection = connection
        if not self.reached:
            self.reached = True
            self._on_reached()
        return connection

    def _room(self) -> None:
        self.full = False
        self._on_room()

    def _closed(self, connection: RpcClient) -> None:
        if connection is self.connection:
            self.lost()

    def release(self, completed: bool) -> None:
        """A request gives its place back; ``completed``: the replica finished it (so it
        has room, whatever it said before)."""
        self.in_flight -= 1
        if completed:
            self.full = False
        if self.removed:
            if self.in_flight == 0:
                self.close()
            return
        self._on_room()

    def refused(self) -> None:
        """The replica refused a request as full: skip it until it says it has room."""
        self.full = True

    def lost(self) -> None:
        """The replica cannot be reached (its connect failed, or its connection closed): it
        is down until ``retry_in()`` seconds from now."""
        if self.dead or self.down:
            return
        self.down = True
        self.reached = False
        self.full = False  # (its room notice would have come on the connection now lost)
        connection, self.connection, self._connecting = self.connection, None, None
        if connection is not None:
            connection.close()
        self._on_lost(self)

    def retry_in(self) -> float:
        """Seconds until a down replica is tried again (doubling at each failure in a row)."""
        backoff = self._backoff_s
        self._backoff_s = min(2 * backoff, constants.MAX_RECONNECT_BACKOFF_S)
        return backoff

    def up(self) -> None:
        """A down replica may be picked again: the next request connects anew."""
        self.down = False

    def close(self) -> None:
        """Close the connection on purpose: the slot is not used again."""
        self.dead = True
        if self.connection is not None:
            self.connection.close()
        # (a connection still being opened is closed by ``_open`` once it is)


class ReplicaSet:
    """The replicas of one backend; requests wait here, in order, when none has room."""

    def __init__(self, backend: str, connect: ConnectReplica,
                 process: str = "router",
                 on_starved: Callable[[], None] = lambda: None) -> None:
        """``process``: the label of this process in the metrics. ``on_starved``: called
        when a request waits and no replica is routable (the backend may be scaled to
        zero)."""
        self.backend = backend
        self._labels = (backend, process)
        self._queued_gauge = metrics.QUEUED.labels(backend, process)
        self._shed = metrics.SHED.labels(backend, process)
        self.requests = metrics.ROUTER_REQUESTS.labels(backend, process)
        self.cap = 8
        self.max_queued = -1
        self.request_timeout_s: Optional[float] = None
        self.queued = 0  # requests waiting for a first placement (not those put back)
        self.slots: Dict[str, ReplicaSlot] = {}
        self._connect = connect
        self._order: List[ReplicaSlot] = []
        self._turn = 0
        self._waiting: Deque[RoutedRequest] = collections.deque()
        self._stale = 0  # entries of _waiting whose request left it (cancelled or failed)
        self._waking = False
        self._on_starved = on_starved
        self._copies_dropped = False  # shadow copies found no replica since the last one
        self._held: Dict[str, Iterable[str]] = {}  # the models each replica last reported

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
                slot = self.slots[tag] = ReplicaSlot(tag, address, self._connect, self._wake,
                                                     self._lost, self._arm_expiry)
                slot.models = dict.fromkeys(self._held.get(tag, ()), 0.0)
        self._order = [slot for slot in self.slots.values() if not slot.dead and not slot.down]
        if self._order:
            self._copies_dropped = False
        self._wake()
        self._arm_expiry()

    def set_limits(self, limits: BackendLimits) -> None:
        self.cap = limits.cap
        self.max_queued = limits.max_queued
        self.request_timeout_s = limits.request_timeout_s
        self._wake()

    @property
    def load(self) -> int:
        """Requests of this router waiting here plus those it has on the replicas; at least
        1 while shadow copies were dropped for want of any replica (so a shadow backend
        scaled to zero is started: its copies never wait, so they never count otherwise)."""
        load = self.queued + sum(slot.in_flight for slot in self.slots.values())
        return max(load, 1) if self._copies_dropped else load

    @property
    def idle(self) -> bool:
        """No request of this router waits here or holds a place on a replica."""
        return not self._waiting and all(slot.in_flight == 0 for slot in self.slots.values())

    def forget(self) -> None:
        """The backend was deleted: close its connections and drop its metric series."""
        for slot in self.slots.values():
            slot.close()
        for family in (metrics.QUEUED, metrics.SHED, metrics.ROUTER_REQUESTS):
            try:
                family.remove(*self._labels)
            except KeyError:
                pass  # never used

    def _lost(self, slot: ReplicaSlot) -> None:
        """The replica cannot be reached: skip it, and try it again after a backoff."""
        delay = slot.retry_in()
        logger.warning("Replica %s of backend %s is unreachable; trying it again in %.2f s.",
                       slot.tag, self.backend, delay)
        self._order = [s for s in self._order if s is not slot]
        asyncio.get_running_loop().call_later(delay, self._retry, slot)
        self._arm_expiry()

    def _retry(self, slot: ReplicaSlot) -> None:
        """A down replica's backoff is over: pick it again while the controller lists it."""
        if slot.dead or self.slots.get(slot.tag) is not slot:
            return
        slot.up()
        self._order.append(slot)
        self._wake()
        self._arm_expiry()

    def held_models(self, held: Dict[str, Iterable[str]]) -> None:
        """The multiplexed models each replica reported (``{replica tag: ids}``); a model
        this router sent a replica in the last ``MODEL_REPORT_GRACE_S`` stays with it."""
        self._held = held
        since = time.monotonic() - MODEL_REPORT_GRACE_S
        for tag, slot in self.slots.items():
            models = dict.fromkeys(held.get(tag, ()), 0.0)
            for model_id, sent_at in slot.models.items():
                if sent_at > since and model_id not in models:
                    models[model_id] = sent_at
            slot.models = models

    def _pick(self, model_id: Optional[str] = None) -> Optional[ReplicaSlot]:
        """The least busy replica with room; ties go round-robin so idle replicas share.
        ``model_id``: prefer replicas that hold that model (``_pick_holder``)."""
        if model_id is not None:
            return self._pick_holder(model_id)
        order = self._order
        count = len(order)
        if not count:
            return None
        self._turn = start = (self._turn + 1) % count
        best: Optional[ReplicaSlot] = None
        cap = self.cap
        for i in range(count):
            slot = order[(start + i) % count]
            if slot.in_flight < cap and not slot.full and (
                    best is None or slot.in_flight < best.in_flight):
                best = slot
        return best

    def _pick_holder(self, model_id: str) -> Optional[ReplicaSlot]:
        """The least busy replica with room that holds ``model_id``; else the least busy
        other one with room (the fewest models among equals), which then holds it too."""
        order = self._order
        count = len(order)
        if not count:
            return None
        self._turn = start = (self._turn + 1) % count
        holder: Optional[ReplicaSlot] = None
        other: Optional[ReplicaSlot] = None
        cap = self.cap
        for i in range(count):
            slot = order[(start + i) % count]
            if slot.in_flight >= cap or slot.full:
                continue
            if model_id in slot.models:
                if holder is None or slot.in_flight < holder.in_flight:
                    holder = slot
            elif other is None or (slot.in_flight, len(slot.models)) < (
                    other.in_flight, len(other.models)):
                other = slot
        if holder is not None:
            return holder
        if other is not None:
            other.models[model_id] = time.monotonic()
        return other

    # ------------------------------------------------------------- placing requests

    def submit(self, request: RoutedRequest) -> None:
        """Place a new request on a replica with room, or queue it.

        Raises:
            BackendOverloadedError: every replica is full and ``max_queued`` requests wait
                (nothing is held).
        """
        if not self._waiting:
            slot = self._pick(request.model_id)
            if slot is not None:
                slot.in_flight += 1
                request.granted(slot)
                return
        if 0 <= self.max_queued <= self.queued:
            self._shed.inc()
            raise BackendOverloadedError(
                f"Backend '{self.backend}' is overloaded: every replica is at its "
                f"max_concurrent_queries and {self.queued} requests already wait for one here "
                f"(max_queued_requests={self.max_queued}). Retry later, or add replicas.")
        request.counted = True
        self.queued += 1
        self._queued_gauge.inc()
        self._waiting.append(request)
        if not self._reachable():
            self._arm_expiry()
        if not self._order:
            self._on_starved()

    def try_submit(self, request: RoutedRequest) -> bool:
        """Place a request on a replica with room now, without queueing behind anyone (for
        shadow copies); False if none has room."""
        if self._waiting:
            return False
        slot = self._pick(request.model_id)
        if slot is None:
            if not self._order:  # scaled to zero: a copy that would have come asks for one
                self._copies_dropped = True
                self._on_starved()
            return False
        slot.in_flight += 1
        request.granted(slot)
        return True

    def requeue(self, request: RoutedRequest) -> None:
        """A request that never ran goes back, first in line (it is never shed)."""
        self._waiting.appendleft(request)
        self._wake()
        if not self._reachable():
            self._arm_expiry()

    def dequeued(self, request: RoutedRequest) -> None:
        """``request`` left the queue (placed, cancelled or failed)."""
        if request.counted:
            request.counted = False
            self.queued -= 1
            self._queued_gauge.dec()
        if request.expiry is not None and request.state != CONNECTING:
            request.expiry.cancel()  # (one connecting keeps it until it is written)
            request.expiry = None
        if request.state != CONNECTING:
            # It left the line without a replica: its entry is stale. The line is rebuilt
            # once stale entries outnumber the live ones, so a backend that takes nothing
            # while callers give up does not pile up requests that ended.
            self._stale += 1
            if 2 * self._stale > len(self._waiting):
                self._waiting = collections.deque(
                    r for r in self._waiting if r.state == QUEUED)
                self._stale = 0

    def _wake(self) -> None:
        """Place waiting requests, in order, while replicas have room."""
        if self._waking:
            return  # a request placed below was put back: the loop below takes it
        self._waking = True
        try:
            while self._waiting:
                request = self._waiting[0]
                if request.state != QUEUED:
                    self._waiting.popleft()  # cancelled or failed while it waited
                    self._stale -= 1
                    continue
                slot = self._pick(request.model_id)
                if slot is None:
                    return
                self._waiting.popleft()
                slot.in_flight += 1
                request.granted(slot)
        finally:
            self._waking = False

    # ------------------------------------------------------------- no replica at all

    def _reachable(self) -> bool:
        """Some replica may be picked and was reached since it was listed or last lost (one
        tried again after a failure does not count until its connect succeeds)."""
        return any(slot.reached for slot in self._order)

    def _arm_expiry(self) -> None:
        """While no replica is reachable, waiting requests fail NO_REPLICA_TIMEOUT_S after
        the last one was lost (or after they arrived, if later), however often the replicas
        are tried again meanwhile; a replica reached again disarms them."""
        if self._reachable():
            for request in self._waiting:
                if request.expiry is not None:
                    request.expiry.cancel()
                    request.expiry = None
            return
        loop = asyncio.get_running_loop()
        for request in self._waiting:
            if request.state == QUEUED and request.expiry is None:
                request.expiry = loop.call_later(constants.NO_REPLICA_TIMEOUT_S,
                                                 self._expire, request)

    def _expire(self, request: RoutedRequest) -> None:
        request.expiry = None
        if request.state == CONNECTING:  # on a replica tried again: see how that ends
            request.expiry = asyncio.get_running_loop().call_later(
                constants.RECONNECT_BACKOFF_S, self._expire, request)
        elif request.state == QUEUED and not self._reachable():
            request.fail(BackendUnavailableError(
                f"No replica of backend '{self.backend}' could take the request within "
                f"{constants.NO_REPLICA_TIMEOUT_S}s (SERVEKIT_NO_REPLICA_TIMEOUT_S): its "
                "replicas died or are being replaced. Try again later."))
