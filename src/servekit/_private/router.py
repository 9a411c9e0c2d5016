"""The router: picks a backend by traffic policy and a replica with room, per request.

A router lives in every process that sends requests (the driver's handles, the HTTP proxy,
replicas that call other endpoints), bound to one event loop. It learns endpoints, backend
caps and replica addresses by long poll, so no request ever asks the controller anything.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import random
import uuid
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from servekit._private import constants
from servekit._private.specs import EndpointInfo
from servekit._private.transport import Busy, RpcClient
from servekit.exceptions import BackendUnavailableError

logger = logging.getLogger("servekit.router")


class ReplicaSlot:
    """One replica as a router sees it: its connection and requests this router has on it."""

    __slots__ = ("tag", "address", "in_flight", "connection", "_connecting", "removed", "full",
                 "on_room")

    def __init__(self, tag: str, address: str, on_room: Callable[[], None]) -> None:
        self.tag = tag
        self.address = address
        self.in_flight = 0
        self.connection: Optional[RpcClient] = None
        self._connecting: Optional[asyncio.Future] = None
        self.removed = False
        self.full = False  # the replica refused a request; wait for it to say it has room
        self.on_room = on_room

    async def connected(self) -> RpcClient:
        if self.connection is not None and not self.connection.is_closed:
            return self.connection
        connecting = self._connecting
        if connecting is None or connecting.done():
            connecting = self._connecting = asyncio.ensure_future(self._connect())
        return await asyncio.shield(connecting)

    async def _connect(self) -> RpcClient:
        connection = await RpcClient.connect(self.address)
        connection.on_notify = self._room
        self.connection = connection
        return connection

    def _room(self) -> None:
        self.full = False
        self.on_room()

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


class ReplicaSet:
    """The replicas of one backend; requests wait here, in order, when all are at the cap."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.cap = 8
        self.slots: Dict[str, ReplicaSlot] = {}
        self._order: List[ReplicaSlot] = []
        self._turn = 0
        self._waiters: Deque[asyncio.Future] = collections.deque()

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
                self.slots[tag] = ReplicaSlot(tag, address, self._wake)
        self._order = list(self.slots.values())
        self._wake()

    def set_cap(self, cap: int) -> None:
        self.cap = cap
        self._wake()

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
        """A replica with room, waiting in arrival order (``first``: ahead of the queue)."""
        if not self._waiters:
            slot = self._pick()
            if slot is not None:
                slot.in_flight += 1
                return slot
        waiter = asyncio.get_running_loop().create_future()
        if first:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())
            raise

    def release(self, slot: ReplicaSlot, completed: bool = True) -> None:
        slot.in_flight -= 1
        if completed:
            slot.full = False  # the replica just finished one of ours: it has room
        if slot.removed:
            if slot.in_flight == 0:
                slot.close()
            return
        self._wake()

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

    def __init__(self) -> None:
        self.counts: Dict[Tuple[str, str], Dict[str, int]] = collections.defaultdict(
            lambda: {"sent": 0, "dropped": 0, "failed": 0})

    def add(self, endpoint: str, backend: str, outcome: str) -> None:
        self.counts[(endpoint, backend)][outcome] += 1


class Router:
    """Routes the requests of one event loop; created by ``Router.start``."""

    def __init__(self, controller_address: str, role: str) -> None:
        self._controller_address = controller_address
        self._role = role
        self._id = f"{role}-{uuid.uuid4().hex[:12]}"
        self.endpoints: Dict[str, EndpointInfo] = {}
        self._replica_sets: Dict[str, ReplicaSet] = {}
        self._caps: Dict[str, int] = {}
        self._versions = {constants.KEY_ENDPOINTS: -1, constants.KEY_BACKENDS: -1,
                          constants.KEY_REPLICAS: -1}
        self._changed = asyncio.Event()
        self._controller: Optional[RpcClient] = None
        self._poll_task: Optional[asyncio.Task] = None
        self._shadow_tasks: set = set()
        self._retries: set = set()
        self.shadow_stats = ShadowStats()
        self.on_update: List[Any] = []

    @classmethod
    async def start(cls, controller_address: str, role: str = "router") -> "Router":
        router = cls(controller_address, role)
        router._controller = await RpcClient.connect(controller_address)
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

    # ------------------------------------------------------------- long poll

    async def _poll_once(self) -> None:
        assert self._controller is not None
        updates = await self._controller.call("listen", self._id, self._role, self._versions)
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
            except BackendUnavailableError:
                return  # the controller is gone: the instance shut down
            except Exception:
                logger.exception("Long poll failed; retrying")
                await asyncio.sleep(0.5)

    def _apply(self, key: str, value: Any) -> None:
        if key == constants.KEY_ENDPOINTS:
            self.endpoints = value
        elif key == constants.KEY_BACKENDS:
            self._caps = value
            for backend, cap in value.items():
                self._replica_set(backend).set_cap(cap)
        elif key == constants.KEY_REPLICAS:
            for backend, replicas in value.items():
                self._replica_set(backend).update(replicas)
            for backend in set(self._replica_sets) - set(value):
                self._replica_sets[backend].update([])

    def _replica_set(self, backend: str) -> ReplicaSet:
        replica_set = self._replica_sets.get(backend)
        if replica_set is None:
            replica_set = self._replica_sets[backend] = ReplicaSet(backend)
            replica_set.cap = self._caps.get(backend, replica_set.cap)
        return replica_set

    # ------------------------------------------------------------- requests

    async def _endpoint(self, endpoint: str) -> EndpointInfo:
        while True:
            info = self.endpoints.get(endpoint)
            if info is not None:
                return info
            await self._changed.wait()

    async def send(self, endpoint: str, kind: str, shard_key: Optional[str],
                   args: tuple) -> asyncio.Future:
        """Assign the request to a replica and return the future of its reply.

        Returns once a replica was chosen and the request written to it; waits while the
        endpoint is unknown or every replica of the chosen backend is at its cap. A replica
        that refuses the request (full because of other routers) makes it wait again, first
        in line, for the next replica with room.
        """
        info = await self._endpoint(endpoint)
        if info.shadows:
            self._send_shadows(info, kind, args)
        replica_set = self._replica_set(pick_backend(info.traffic, shard_key))
        result = asyncio.get_running_loop().create_future()
        await self._deliver(replica_set, kind, args, result, first=False)
        return result

    async def _deliver(self, replica_set: ReplicaSet, kind: str, args: tuple,
                       result: asyncio.Future, first: bool) -> None:
        slot = await replica_set.acquire(first)
        try:
            connection = await slot.connected()
        except BaseException:
            replica_set.release(slot, completed=False)
            raise
        reply = connection.call_nowait(kind, *args)

        def on_reply(reply: asyncio.Future) -> None:
            refused = not reply.cancelled() and isinstance(reply.exception(), Busy)
            if refused:
                slot.full = True
            replica_set.release(slot, completed=not refused)
            if result.done():
                return
            if refused:
                task = asyncio.ensure_future(self._deliver(replica_set, kind, args, result, True))
                self._retries.add(task)
                task.add_done_callback(self._retried)
            elif reply.cancelled():
                result.cancel()
            elif reply.exception() is not None:
                result.set_exception(reply.exception())  # type: ignore[arg-type]
            else:
                result.set_result(reply.result())

        reply.add_done_callback(on_reply)

    def _retried(self, task: asyncio.Task) -> None:
        self._retries.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("Could not deliver a refused request again: %r", task.exception())

    def _send_shadows(self, info: EndpointInfo, kind: str, args: tuple) -> None:
        for backend, proportion in info.shadows.items():
            if random.random() >= proportion:
                continue
            replica_set = self._replica_set(backend)
            slot = replica_set.try_acquire()
            if slot is None:
                self.shadow_stats.add(info.name, backend, "dropped")
                continue
            task = asyncio.ensure_future(self._shadow(info.name, replica_set, slot, kind, args))
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, endpoint: str, replica_set: ReplicaSet, slot: ReplicaSlot,
                      kind: str, args: tuple) -> None:
        try:
            connection = await slot.connected()
            result = await connection.call(kind, *args)
            error = f"status {result.status}" if kind == "http" and result.status >= 500 else None
        except Busy:
            slot.full = True
            replica_set.release(slot, completed=False)
            self.shadow_stats.add(endpoint, replica_set.backend, "dropped")
            return
        except Exception as exc:
            error = repr(exc)
        replica_set.release(slot)
        self.shadow_stats.add(endpoint, replica_set.backend, "sent")
        if error is not None:
            logger.warning("Shadow copy of a request to endpoint %s failed on backend %s: %s",
                           endpoint, replica_set.backend, error)
            self.shadow_stats.add(endpoint, replica_set.backend, "failed")
