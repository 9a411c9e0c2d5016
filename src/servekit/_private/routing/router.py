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
from typing import Any, Dict, List, Optional, Tuple

from servekit._private import constants, metrics
from servekit._private.routing.replica_set import ConnectReplica, ReplicaSet, ReplicaSlot
from servekit._private.routing.routed_request import RoutedRequest
from servekit._private.specs import BackendLimits, EndpointInfo
from servekit._private.wire.discovery import current_controller
from servekit._private.wire.transport import (
    ConnectFailed,
    ConnectionClosed,
    ReplyStream,
    RpcClient,
    encode_call,
    parse_tcp_address,
)
from servekit.exceptions import BackendUnavailableError, EndpointNotFoundError

logger = logging.getLogger("servekit.router")


# Deleted endpoint names a router remembers (the oldest are forgotten first).
_MAX_REMOVED_ENDPOINTS = 10_000

# Seconds a process has to send its metrics for a scrape.
_METRICS_TIMEOUT_S = 2.0
# Seconds between two load reports at least (requests that starve come in bursts).
_MIN_REPORT_SPACING_S = 0.05


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
                          constants.KEY_REPLICAS: -1, constants.KEY_MODELS: -1}
        self._changed = asyncio.Event()
        self._controller: Optional[RpcClient] = None
        self._poll_task: Optional[asyncio.Task] = None
        self._report_task: Optional[asyncio.Task] = None
        self._report_now = asyncio.Event()  # a backend's limits changed, or one starves
        self._tasks: set = set()  # shadow copies whose streamed reply is being drained
        self.shadow_stats = ShadowStats()
        self.on_update: List[Any] = []

    @classmethod
    async def start(cls, controller_address: str, role: str = "router") -> "Router":
        router = cls(controller_address, role)
        router._controller = await router._connect_controller()
        await router._poll_once()
        router._poll_task = asyncio.ensure_future(router._poll_forever())
        router._report_task = asyncio.ensure_future(router._report_forever())
        return router

    def close(self) -> None:
        for task in (self._poll_task, self._report_task):
            if task is not None:
                task.cancel()
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
            except (ConnectionClosed, BackendUnavailableError):
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
            self._report_now.set()
        elif key == constants.KEY_REPLICAS:
            for backend, replicas in value.items():
                self._replica_set(backend).update(replicas)
            for backend in set(self._replica_sets) - set(value):
                self._replica_sets[backend].update([])
        elif key == constants.KEY_MODELS:
            for backend in value:
                self._replica_set(backend).held_models(value[backend])
            for backend in set(self._replica_sets) - set(value):
                self._replica_sets[backend].held_models({})
        self._forget_deleted_backends()

    def _forget_deleted_backends(self) -> None:
        """Drop the replica sets (and metric series) of backends the controller no longer
        has, once no request of this router waits there or holds a place there."""
        for backend in [b for b in self._replica_sets if b not in self._limits]:
            replica_set = self._replica_sets[backend]
            if replica_set.idle and not replica_set.slots:
                del self._replica_sets[backend]
                replica_set.forget()

    def _replica_set(self, backend: str) -> ReplicaSet:
        replica_set = self._replica_sets.get(backend)
        if replica_set is None:
            replica_set = ReplicaSet(backend, self._connect_replica, self.process,
                                     on_starved=self._report_now.set)
            self._replica_sets[backend] = replica_set
            limits = self._limits.get(backend)
            if limits is not None:
                replica_set.set_limits(limits)
        return replica_set

    def cannot_serve(self, backend: str) -> bool:
        """Whether requests for ``backend`` cannot be served now: none of its replicas runs,
        and it does not start one on demand (as a backend that scales to zero does)."""
        replica_set = self._replica_sets.get(backend)
        if replica_set is not None and replica_set.slots:
            return False
        limits = self._limits.get(backend)
        return limits is None or not limits.scales_to_zero

    # ------------------------------------------------------------- load reports

    def loads(self) -> Tuple[Dict[str, float], Optional[float]]:
        """The load of each autoscaled backend here (requests waiting plus those on its
        replicas), and the shortest report interval among them (None: none is autoscaled)."""
        loads: Dict[str, float] = {}
        intervals = []
        for backend, limits in self._limits.items():
            if limits.load_report_interval_s is not None:
                intervals.append(limits.load_report_interval_s)
                replica_set = self._replica_sets.get(backend)
                loads[backend] = 0.0 if replica_set is None else replica_set.load
        return loads, min(intervals, default=None)

    async def _report_forever(self) -> None:
        """Send the controller the load of autoscaled backends every report interval, and
        at once when requests wait on a backend without replicas (scaled to zero). A load
        that stays zero is sent once."""
        sent: Dict[str, float] = {}
        while True:
            _, interval = self.loads()
            try:
                await asyncio.wait_for(self._report_now.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self._report_now.clear()
            loads, _ = self.loads()
            if loads and (loads != sent or any(loads.values())):
                try:
                    assert self._controller is not None
                    await self._controller.call("report_load", self._id, loads)
                    sent = loads
                except (ConnectionClosed, BackendUnavailableError, ConnectFailed):
                    pass  # the controller is away: the next report goes to the new one
            await asyncio.sleep(_MIN_REPORT_SPACING_S)

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
                async with asyncio.timeout(remaining):  # (3.11's wait_for can drop a cancel)
                    await self._changed.wait()
            except TimeoutError:
                pass
            info = self.endpoints.get(endpoint)
        return info

    async def send(self, endpoint: str, kind: str, shard_key: Optional[str],
                   args: tuple, missing_ok: bool = False,
                   trace: Optional[Dict[str, str]] = None,
                   payload: Optional[bytes] = None,
                   timeout_s: Optional[float] = None, shadows: bool = True,
                   model_id: Optional[str] = None) -> asyncio.Future:
        """Assign the request to a replica and return the future of its reply.

        Returns once a replica was chosen and the request written to it; waits while the
        endpoint is about to exist or every replica of the chosen backend is at its cap.
        Cancelling the future stops the request wherever it is. ``missing_ok``: the
        endpoint may not have been created yet (see ``_endpoint``). ``trace``: filled with
        the "backend" and "replica" the request went to. ``payload``: the request already
        encoded (``encode_call(kind, args)``; ``args`` is then not read). ``timeout_s``:
        the caller's bound on the wait for the reply, instead of the backend's
        ``request_timeout_s`` (past it the request is cancelled and the future fails with
        ``RequestTimeoutError``). ``shadows``: False for a request whose own stream follows
        it (a body still to come, a WebSocket): its copies are made by ``shadow``.
        ``model_id``: the multiplexed model the request names; replicas that hold it are
        preferred (``replica_set``).

        Raises:
            TypeError: the arguments cannot be pickled (nothing was sent).
            EndpointNotFoundError: the endpoint was deleted, or never created in time.
            BackendOverloadedError: the backend's queue here is full (nothing was sent).
            BackendUnavailableError: no replica of the backend came back in time.
        """
        if payload is None:
            payload = encode_call(kind, args)
        request = self.place(endpoint, kind, shard_key, payload, trace, timeout_s, shadows,
                             model_id)
        if request is None:
            await self._endpoint(endpoint, missing_ok)
            request = self.place(endpoint, kind, shard_key, payload, trace, timeout_s, shadows,
                                 model_id)
            assert request is not None  # known now, and nothing ran in between
        await request.written()
        return request.reply

    def place(self, endpoint: str, kind: str, shard_key: Optional[str], payload: bytes,
              trace: Optional[Dict[str, str]] = None,
              timeout_s: Optional[float] = None, shadows: bool = True,
              model_id: Optional[str] = None) -> Optional[RoutedRequest]:
        """Route an encoded request to an endpoint this router knows, without waiting: it is
        written to a replica now, or waits in its backend's queue (``written()`` says
        when). None if the endpoint is not known here (``send`` waits for it).
        ``timeout_s``, ``shadows``, ``model_id``: as in ``send``.

        Raises:
            BackendOverloadedError: the backend's queue here is full (nothing was sent).
        """
        info = self.endpoints.get(endpoint)
        if info is None:
            return None
        if info.shadows and shadows:
            self._send_shadows(info, kind, payload, model_id)
        replica_set = self._replica_set(pick_backend(info.traffic, shard_key))
        if trace is not None:
            trace["backend"] = replica_set.backend
        request = RoutedRequest(replica_set, payload, trace, model_id=model_id)
        replica_set.submit(request)
        request.time_out_after(timeout_s)
        return request

    def shadow(self, endpoint: str, kind: str, payload: bytes,
               model_id: Optional[str] = None) -> List[RoutedRequest]:
        """Shadow copies of a request whose own stream follows it (a body still to come,
        a WebSocket's messages), placed now; the caller feeds them (``offer_chunk``). None
        for an endpoint this router does not know."""
        info = self.endpoints.get(endpoint)
        return [] if info is None or not info.shadows else \
            self._send_shadows(info, kind, payload, model_id)

    def _send_shadows(self, info: EndpointInfo, kind: str, payload: bytes,
                      model_id: Optional[str]) -> List[RoutedRequest]:
        copies = []
        for backend, proportion in info.shadows.items():
            if random.random() >= proportion:
                continue
            replica_set = self._replica_set(backend)
            request = RoutedRequest(replica_set, payload, shadow=True, model_id=model_id)
            if not replica_set.try_submit(request):
                self.shadow_stats.add(info.name, backend, "dropped")
                continue
            request.time_out_after(None)
            request.reply.add_done_callback(
                functools.partial(self._shadow_replied, info.name, kind, request))
            copies.append(request)
        return copies

    def _shadow_replied(self, endpoint: str, kind: str, request: RoutedRequest,
                        reply: asyncio.Future) -> None:
        """Count a shadow copy's outcome; read a streamed reply to its end first."""
        backend = request.replica_set.backend
        if request.dropped:
            self.shadow_stats.add(endpoint, backend, "dropped")
            return
        self.shadow_stats.add(endpoint, backend, "sent")
        error = None
        if reply.cancelled():
            error = "cancelled"
        elif reply.exception() is not None:
            error = repr(reply.exception())
        elif isinstance(reply.result(), ReplyStream):
            task = asyncio.ensure_future(self._drain_shadow(endpoint, backend, kind,
                                                            reply.result()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        elif kind == "http" and reply.result()[0] >= 500:  # (a response's status, first
            error = f"status {reply.result()[0]}"  # in its plain tuple: http_wire.plain)
        self._shadow_failed(endpoint, backend, error)

    async def _drain_shadow(self, endpoint: str, backend: str, kind: str,
                            stream: ReplyStream) -> None:
        self._shadow_failed(endpoint, backend, await _drain(stream, kind))

    def _shadow_failed(self, endpoint: str, backend: str, error: Optional[str]) -> None:
        if error is not None:
            logger.warning("Shadow copy of a request to endpoint %s failed on backend %s: %s",
                           endpoint, backend, error)
            self.shadow_stats.add(endpoint, backend, "failed")
