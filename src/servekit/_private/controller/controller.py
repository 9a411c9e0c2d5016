"""The controller: the only writer of desired state, and the loop that makes it real.

Every mutating call takes one lock, checks its arguments against the current state, writes
a checkpoint, then publishes the change over long poll. Calls that start or stop replicas
return a goal id; the client waits on it until the replicas are ready or gone, or until the
goal fails (a constructor raised), in which case nothing the call created is left behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import secrets
import time
from typing import Any, Dict, List, Optional, Tuple

from servekit._private import constants, metrics, resources
from servekit._private.controller.durable import DurableState, LoadedState, load, snapshot
from servekit._private.controller.goals import GoalManager
from servekit._private.controller.state import (
    RUNNING,
    STARTING,
    STOPPING,
    BackendState,
    ReplicaRecord,
)
from servekit._private.long_poll import LongPollHost
from servekit._private.runtime.base import Connection, Runtime
from servekit._private.specs import BackendLimits, EndpointInfo, ProxySpec, ReplicaSpec
from servekit._private.transport import current_peer
from servekit.config import (
    BackendConfig,
    BackendMetadata,
    HTTPOptions,
    ReplicaConfig,
    validate_backend_against_config,
)
from servekit.exceptions import BackendUnavailableError, ServeError

logger = logging.getLogger("servekit.controller")

# Seconds a process has to send its metrics for a scrape.
_METRICS_TIMEOUT_S = 2.0
# Seconds a worker left by an earlier controller has to answer a ping to be adopted.
_ADOPT_TIMEOUT_S = 5.0
# A replica whose constructor runs this long gets a warning, and again each time as long.
_SLOW_START_WARNING_S = 30.0


class Controller:
    """Holds desired state and reconciles the runtime's processes towards it."""

    def __init__(self, runtime: Runtime, http_options: HTTPOptions) -> None:
        self.runtime = runtime
        self.http_options = http_options
        self.http_address: Optional[tuple] = None
        self.long_poll = LongPollHost()
        self.goals = GoalManager()
        self.backends: Dict[str, BackendState] = {}
        self.endpoints: Dict[str, EndpointInfo] = {}
        self._lock = asyncio.Lock()
        self._proxies: Dict[str, ProxyRecord] = {}  # by worker name
        self._durable = DurableState(runtime.store)
        self._subscribers: Dict[Any, set] = {}  # connection -> long-poll subscriber ids
        self._health_task: Optional[asyncio.Task] = None
        self._proxy_task: Optional[asyncio.Task] = None
        self._shutting_down = False
        self._background: set = set()  # tasks nobody awaits, kept from the GC

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Load the saved state (adopting the processes that still run it), publish it,
        start the HTTP proxy if none runs, begin health checks, finish what was under way.

        Raises:
            ServeError: the saved state cannot be read, or the HTTP proxy cannot start.
        """
        records = await asyncio.get_running_loop().run_in_executor(None, self._durable.read)
        state = load(records, self.runtime.store_description()) if records else None
        if state is not None:
            await self._adopt(state)
        # A worker launched just before a controller died, before its record was saved:
        # nothing names it, so nothing would ever stop it.
        await self.runtime.reap_unrecorded()
        await self._publish_all()
        if self._serves_http:
            self.http_address = self.runtime.bind_http(
                self.http_options.host, self.http_options.port)  # type: ignore[arg-type]
            await self._reconcile_proxies()
            self._proxy_task = asyncio.ensure_future(self._supervise_proxies())
        for backend in list(self.backends.values()):
            self._reconcile(backend)
        await self._save()
        self._health_task = asyncio.ensure_future(self._health_loop())

    async def _adopt(self, state: LoadedState) -> None:
        """Take over the state a previous controller saved, and the processes it left
        running: same replica tags, same processes. What no longer runs is started anew."""
        self.backends, self.endpoints = state.backends, state.endpoints
        records = [(backend, record) for backend in self.backends.values()
                   for record in backend.replicas.values()]
        connections = await asyncio.gather(*(
            self._reattach(record.tag, "replica", record.address, record.process)
            for _, record in records))
        for backend in self.backends.values():
            if backend.goal is not None:
                self.goals.restore(backend.goal)
        for (backend, record), connection in zip(records, connections, strict=True):
            if connection is None:
                logger.warning("Replica %s did not survive; starting a new one.",
                               record.tag)
                backend.replicas.pop(record.tag)
                continue
            record.connection = connection
            if record.state == STARTING:
                record.task = asyncio.ensure_future(
                    self._run_start(backend, record, launched=True))
            elif record.state == RUNNING:
                record.config = backend.config
                record.health_task = asyncio.ensure_future(
                    self._watch_health(backend, record))
                self._spawn(self._apply_config(record, backend.config))
            else:  # it was being stopped: finish that
                self._spawn(self._run_stop(backend, record, graceful=True))
        proxies = list(state.proxies.items())
        proxy_connections = await asyncio.gather(*(
            self._reattach(name, "proxy", doc["address"], doc["process"])
            for name, doc in proxies))
        for (name, doc), connection in zip(proxies, proxy_connections, strict=True):
            if connection is not None:
                self._proxies[name] = ProxyRecord(name, doc.get("node"), doc["address"],
                                                  doc["process"], connection)
        logger.warning("Recovered the saved state: %d backends, %d endpoints.",
                       len(self.backends), len(self.endpoints))

    async def _reattach(self, name: str, role: str, address: Optional[str],
                        process: Optional[dict]) -> Optional[Connection]:
        """A connection to a worker an earlier controller started, if it still answers."""
        if address is None or process is None or not self.runtime.adopt(
                name, role, address, process):
            return None
        try:
            connection = await self.runtime.connect(address)
            await asyncio.wait_for(connection.call("ping"), _ADOPT_TIMEOUT_S)
            return connection
        except (Exception, asyncio.TimeoutError):
            await self.runtime.stop(name, timeout=0)
            return None

    async def shutdown(self, keep_state: bool = False) -> None:
        """Stop gracefully; the controller process exits afterwards. Idempotent.

        The proxy stops taking connections and finishes the requests it holds; routers are
        told the replicas are gone; each replica finishes what it holds (up to its
        ``experimental_graceful_shutdown_timeout_s``); then every process stops. The saved
        state is removed unless ``keep_state`` (a later start then brings it back).
        """
        if self._shutting_down:
            return
        self._shutting_down = True
        for task in (self._health_task, self._proxy_task):
            if task is not None:
                task.cancel()
        for backend in self.backends.values():
            for record in backend.replicas.values():
                record.cancel_tasks()
        await asyncio.gather(*(self.runtime.stop(name, timeout=constants.SHUTDOWN_TIMEOUT_S)
                               for name in self._proxies))
        await self.long_poll.publish(constants.KEY_REPLICAS, {})
        await asyncio.gather(*(
            self._drain(backend, record) for backend in self.backends.values()
            for record in backend.in_state(RUNNING)))
        self._durable.close()
        await self.runtime.shutdown(discard_state=not keep_state)

    async def _drain(self, backend: BackendState, record: ReplicaRecord) -> None:
        """Let a replica finish the requests it holds, up to its graceful timeout."""
        timeout = backend.config.experimental_graceful_shutdown_timeout_s
        if record.connection is None or backend.force_delete:
            return
        try:
            await asyncio.wait_for(record.connection.call("drain"), timeout)
        except (asyncio.TimeoutError, BackendUnavailableError):
            logger.warning("Replica %s did not finish its requests within %ss; stopping it.",
                           record.tag, timeout)

    @property
    def _serves_http(self) -> bool:
        return self.http_options.location != "NoServer" and self.http_options.host is not None

    async def _reconcile_proxies(self) -> None:
        """Run ``num_proxies`` HTTP proxies at each place the runtime names for the location
        (HeadOnly: one; EveryNode: one per node): start the missing ones, stop those of
        places that are gone, forget the dead ones (the next round starts them again).

        Raises:
            ServeError: a proxy could not start (the others are still started).
        """
        location = self.http_options.location
        assert location is not None  # HTTPOptions sets NoServer for None
        places = await self.runtime.proxy_nodes(location.value)
        wanted = {name if i == 0 else f"{name}-{i + 1}": node for name, node in places.items()
                  for i in range(self.http_options.num_proxies)}
        for name, record in list(self._proxies.items()):
            if name not in wanted or not self.runtime.is_alive(name):
                self._proxies.pop(name)
                if record.connection is not None:
                    record.connection.close()
                if name in wanted:
                    logger.warning("The HTTP proxy %s %s; starting a new one.", name,
                                   self.runtime.exit_description(name))
                await self.runtime.stop(name, timeout=0)
                await self._save()
        results = await asyncio.gather(*(
            self._start_proxy(name, node) for name, node in wanted.items()
            if name not in self._proxies), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _start_proxy(self, name: str, node: Optional[str]) -> None:
        await self.runtime.stop(name, timeout=0)  # what is left of an earlier one
        address = await self.runtime.launch(
            name, "proxy", ProxySpec(self.http_options), node=node)
        connection = await self.runtime.connect(address)
        try:
            await connection.call("ready")
        except BackendUnavailableError:
            raise ServeError(f"The HTTP proxy {name} {self.runtime.exit_description(name)} "
                             "while starting; see its output above.") from None
        self._proxies[name] = ProxyRecord(name, node, address, self.runtime.identity(name),
                                          connection)
        await self._save()

    async def _supervise_proxies(self) -> None:
        """Keep the proxies reconciled: restart dead ones, follow nodes as they join and
        leave; a failed start is retried with backoff until it succeeds."""
        failures = 0
        while True:
            await asyncio.sleep(constants.HEALTH_CHECK_PERIOD_S if not failures else
                                min(constants.MAX_RESTART_BACKOFF_S, 0.5 * 2 ** failures))
            try:
                await self._reconcile_proxies()
                failures = 0
            except Exception as exc:
                failures += 1
                logger.warning("An HTTP proxy could not be restarted (%s); retrying.", exc)

    # ----------------------------------------------------------------- backends

    async def create_backend(self, tag: str, replica_config: ReplicaConfig,
                             config: BackendConfig,
                             metadata: Optional[BackendMetadata],
                             call_id: Optional[str] = None) -> Optional[str]:
        """Create a backend; return the goal to wait on. ``call_id``: the client's id of
        this call, the same when it calls again after a controller crash (that call then
        succeeds; any other with an existing tag raises ``ValueError``, as in 1.x)."""
        async with self._lock:
            existing = self.backends.get(tag)
            if existing is not None and not existing.deleting:
                if call_id is not None and existing.created_by == call_id:
                    return existing.goal  # a retried call
                raise ValueError(f"Cannot create backend. Backend '{tag}' is already "
                                 "registered. Delete it first, or pick another tag.")
            if metadata is not None:
                validate_backend_against_config(metadata, config)
            self._check_resources(tag, replica_config, config.num_replicas,
                                  config.num_replicas)
            backend = BackendState(tag, replica_config, config, metadata, created_by=call_id)
            backend.goal = self.goals.create()
            self.backends[tag] = backend
            await self._save()
            await self._publish_backends()
            self._reconcile(backend)
            return backend.goal

    async def update_backend_config(self, tag: str, update: BackendConfig) -> Optional[str]:
        """Change a backend's config; return the goal to wait on.

        The replicas apply a new config (``reconfigure`` waits for the requests they run)
        without the controller's lock held, so a slow one holds up neither other calls nor
        the replacement of dead replicas; updates of one backend are applied one at a time.
        """
        while True:
            backend = self._backend(tag)
            async with backend.updating:
                if self._backend(tag) is backend:
                    return await self._update_backend_config(backend, update)
            # Deleted and created again while this waited: update the new one.

    async def _update_backend_config(self, backend: BackendState,
                                     update: BackendConfig) -> Optional[str]:
        async with self._lock:
            new_config = backend.config.merged(update)
            if backend.metadata is not None:
                validate_backend_against_config(backend.metadata, new_config)
            self._check_resources(
                backend.tag, backend.replica_config,
                new_config.num_replicas - len(backend.in_state(STARTING, RUNNING)),
                new_config.num_replicas)
            old_config = backend.config
            backend.config = new_config
            self._replace_goal(backend)
            goal = backend.goal
            backend.config_before_update = old_config
            await self._save()
            await self._publish_backends()
        if _replica_visible_fields(old_config) != _replica_visible_fields(new_config):
            try:
                await self._push_config(backend)
            except Exception:
                # A replica refused the change (reconfigure raised): undo it everywhere.
                async with self._lock:
                    backend.config = old_config
                    backend.config_before_update = None
                    await self._save()
                    await self._publish_backends()
                await self._push_config(backend, raise_errors=False)
                async with self._lock:
                    if backend.goal == goal:
                        self.goals.complete(goal)
                        backend.goal = None
                raise
        async with self._lock:
            self._reconcile(backend)
        return goal

    async def delete_backend(self, tag: str, force: bool) -> Optional[str]:
        async with self._lock:
            backend = self.backends.get(tag)
            if backend is None:
                return None
            for endpoint in self.endpoints.values():
                if endpoint.uses(tag):
                    raise ValueError(
                        f"Backend '{tag}' is used by endpoint '{endpoint.name}' and cannot be "
                        "deleted. Remove it from that endpoint's traffic and shadows "
                        "(set_traffic / shadow_traffic(..., 0)) or delete the endpoint first.")
            backend.deleting = True
            backend.force_delete = backend.force_delete or force
            self._replace_goal(backend)
            await self._save()
            self._reconcile(backend)
            return backend.goal

    def get_backend_config(self, tag: str) -> BackendConfig:
        return self._backend(tag).config

    def list_backends(self) -> Dict[str, BackendConfig]:
        return {tag: b.config for tag, b in self.backends.items() if not b.deleting}

    def status(self) -> dict:
        """What runs: per backend its config, replicas running and wanted, and why the last
        replica start failed (None once one started since); the endpoints; and the processes
        (role, name, pid, state) of the proxy and the replicas."""
        backends = {tag: {"config": b.config.model_dump(mode="json", exclude={"user_config"}),
                          "running": len(b.in_state(RUNNING)), "target": b.target_replicas,
                          "last_start_error": b.last_start_error}
                    for tag, b in self.backends.items() if not b.deleting}
        processes = []
        for proxy in self._proxies.values():
            process = proxy.process or {}
            processes.append({"role": "proxy", "name": proxy.name, "state": RUNNING,
                              "pid": process.get("pid"), "node": process.get("node"),
                              "http": process.get("http")})
        for backend in self.backends.values():
            for record in backend.replicas.values():
                process = record.process or {}
                processes.append({"role": "replica", "name": record.tag, "state": record.state,
                                  "pid": process.get("pid"), "node": process.get("node")})
        return {"backends": backends, "endpoints": self.list_endpoints(),
                "processes": processes}

    async def metrics_of_every_process(self) -> List[str]:
        """The metrics of this controller, its proxies and every running replica (those
        that answer within 2 s)."""
        async def of(connection: Optional[Connection]) -> Optional[str]:
            if connection is None:
                return None
            try:
                return await asyncio.wait_for(connection.call("metrics"), _METRICS_TIMEOUT_S)
            except (Exception, asyncio.TimeoutError):
                return None

        connections = [proxy.connection for proxy in self._proxies.values()] + [
            record.connection for backend in self.backends.values()
            for record in backend.in_state(RUNNING)]
        texts = await asyncio.gather(*(of(connection) for connection in connections))
        return [metrics.exposition(), *(text for text in texts if text is not None)]

    def _backend(self, tag: str) -> BackendState:
        backend = self.backends.get(tag)
        if backend is None or backend.deleting:
            raise ValueError(f"Backend '{tag}' is not registered. Registered backends: "
                             f"{sorted(self.list_backends())}.")
        return backend

    def _replace_goal(self, backend: BackendState) -> None:
        """A newer operation on a backend supersedes the goal of an older one."""
        self.goals.complete(backend.goal)
        backend.goal = self.goals.create()

    def _check_resources(self, tag: str, replica_config: ReplicaConfig, new: int,
                         target: int) -> None:
        """Refuse to start ``new`` replicas that would not all fit the runtime's capacity."""
        per_replica = resources.demand(replica_config.actor_options)
        if new <= 0 or not per_replica:
            return
        used = resources.add_up(
            resources.demand(b.replica_config.actor_options)
            for b in self.backends.values() for _ in b.in_state(STARTING, RUNNING))
        capacity = self.runtime.capacity()
        fits = resources.replicas_that_fit(capacity, used, per_replica)
        if new > fits:
            raise ServeError(
                f"Cannot scale backend {tag} to {target} replicas: {new} more are needed, "
                f"each asking for {per_replica}, but only {fits} fit (capacity {capacity}, in "
                f"use {used}). Lower num_replicas or the replica's ray_actor_options, or "
                "declare more resources in serve.start(resources=...).")

    async def _push_config(self, backend: BackendState, raise_errors: bool = True) -> None:
        """Send the new config to every running replica and wait until each applied it.

        A replica found unhealthy meanwhile is not waited for: it is being replaced, and
        its replacement starts with the new config.
        """
        config = backend.config
        records = [r for r in backend.in_state(RUNNING) if r.connection]
        results = await asyncio.gather(
            *(self._apply_config(record, config) for record in records),
            return_exceptions=True)
        for record, result in zip(records, results, strict=True):
            if result is None:
                record.config = config
        errors = [e for e in results if isinstance(e, Exception)
                  and not isinstance(e, BackendUnavailableError)]
        if errors and raise_errors:
            raise errors[0]

    async def _apply_config(self, record: ReplicaRecord, config: BackendConfig) -> None:
        """``update_config`` on one replica, given up if the replica turns unhealthy."""
        assert record.connection is not None
        call = asyncio.ensure_future(record.connection.call("update_config", config))
        unhealthy = asyncio.ensure_future(record.unhealthy.wait())
        try:
            await asyncio.wait([call, unhealthy], return_when=asyncio.FIRST_COMPLETED)
        finally:
            unhealthy.cancel()
        if not call.done():
            call.cancel()
            raise BackendUnavailableError(f"Replica {record.tag} became unhealthy before it "
                                          "applied the config.")
        call.result()

    # ----------------------------------------------------------------- reconciliation

    def _reconcile(self, backend: BackendState) -> None:
        """Start or stop replicas so that the backend has its target number."""
        active = backend.in_state(STARTING, RUNNING)
        missing = backend.target_replicas - len(active)
        for _ in range(missing):
            tag = f"{backend.tag}#{secrets.token_hex(3)}"
            record = ReplicaRecord(tag=tag, backend=backend.tag)
            backend.replicas[tag] = record
            record.task = asyncio.ensure_future(self._run_start(backend, record))
        if missing < 0:
            # Newest first, and replicas still starting before running ones.
            ordered = list(reversed(list(backend.replicas)))
            victims = sorted(active, key=lambda r: (r.state == RUNNING, ordered.index(r.tag)))
            for record in victims[:-missing]:
                self._begin_stop(backend, record)
        self._check_goal(backend)

    async def _run_start(self, backend: BackendState, record: ReplicaRecord,
                         launched: bool = False) -> None:
        """Launch a replica (unless ``launched``: adopted while it started), wait for its
        constructor, give it the current config, then put it into routing."""
        spec = ReplicaSpec(backend.tag, record.tag, backend.replica_config, backend.config,
                           backend.metadata)
        try:
            if not launched:
                record.address = await self.runtime.launch(
                    record.tag, "replica", spec,
                    resources=backend.replica_config.actor_options,
                    python=backend.replica_config.python)
                record.process = self.runtime.identity(record.tag)
                await self._save()  # a restarted controller can adopt it from now on
                record.connection = await self.runtime.connect(record.address)
            connection = record.connection
            assert connection is not None
            metadata = await self._constructed(
                record, asyncio.ensure_future(connection.call("ready")))
            record.config = spec.config if not launched else None
            if backend.metadata is None:
                validate_backend_against_config(metadata, backend.config)
                backend.metadata = metadata
            while True:
                # The config may have changed while the replica started: it takes traffic
                # only once it runs the current one.
                async with self._lock:
                    config = backend.config
                    if record.state != STARTING or record.config is not None and \
                            _replica_visible_fields(record.config) == \
                            _replica_visible_fields(config):
                        if record.state == STARTING:
                            await self._start_serving(backend, record)
                        self._check_goal(backend)
                        return
                await connection.call("update_config", config)
                record.config = config
        except asyncio.CancelledError:
            raise
        except BackendUnavailableError:
            error: Exception = ServeError(
                f"Replica {record.tag} {self.runtime.exit_description(record.tag)} before its "
                "constructor finished; see its output above.")
            await self._start_failed(backend, record, error)
        except Exception as exc:
            await self._start_failed(backend, record, exc)

    async def _constructed(self, record: ReplicaRecord,
                           ready: "asyncio.Future[Any]") -> BackendMetadata:
        """The replica's answer to ``ready`` (its constructor has returned); a warning every
        ``_SLOW_START_WARNING_S`` until then, so a start that hangs is seen."""
        started = time.monotonic()
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(ready), _SLOW_START_WARNING_S)
            except asyncio.TimeoutError:
                logger.warning("Replica %s has been starting for %.0fs: its constructor has "
                               "not returned yet.", record.tag, time.monotonic() - started)
            except asyncio.CancelledError:
                ready.cancel()
                raise

    async def _start_serving(self, backend: BackendState, record: ReplicaRecord) -> None:
        """Put a started replica into routing and begin its health pings (under the lock)."""
        record.state = RUNNING
        metrics.REPLICA_STARTS.labels(backend.tag).inc()
        backend.last_start_error = None
        await self._publish_replicas()
        if backend.metadata is not None and self.backends.get(backend.tag) is backend:
            await self._publish_backends()
        record.health_task = asyncio.ensure_future(self._watch_health(backend, record))

    async def _watch_health(self, backend: BackendState, record: ReplicaRecord) -> None:
        """Ping a running replica every period; replace it when ``check_health()`` raises
        or it misses ``health_check_failure_threshold`` pings in a row."""
        failures = 0
        while record.state == RUNNING and record.connection is not None:
            config = backend.config
            if failures == 0:
                await asyncio.sleep(config.health_check_period_s)
            try:
                await asyncio.wait_for(record.connection.call("ping"),
                                       config.health_check_timeout_s)
                failures = 0
                continue
            except asyncio.TimeoutError:
                failures += 1
                metrics.HEALTH_CHECK_FAILURES.labels(backend.tag).inc()
                if failures < config.health_check_failure_threshold:
                    continue
                reason = (f"did not answer {failures} health pings in a row within "
                          f"{config.health_check_timeout_s}s each (is its event loop blocked?)")
            except BackendUnavailableError:
                return  # it died: the liveness check replaces it
            except Exception as exc:
                metrics.HEALTH_CHECK_FAILURES.labels(backend.tag).inc()
                reason = f"failed its health check: {type(exc).__name__}: {exc}"
            record.unhealthy.set()  # a config push stops waiting for it
            async with self._lock:
                if record.state == RUNNING and backend.replicas.get(record.tag) is record:
                    await self._replace(backend, [(record, reason)])
            return

    async def _replace(self, backend: BackendState,
                       failed: List[Tuple[ReplicaRecord, str]]) -> None:
        """Take replicas out of routing at once, kill them, and start new ones (under the
        lock); each comes with why. Requests in flight on them fail naming the replica."""
        records = [record for record, _ in failed]
        metrics.REPLICA_RESTARTS.labels(backend.tag).inc(len(failed))
        for record, reason in failed:
            logger.warning("Replica %s %s; replacing it.", record.tag, reason)
            backend.replicas.pop(record.tag, None)
            record.state = STOPPING
            record.cancel_tasks()
        await self._publish_replicas()
        for record in records:
            if record.connection is not None:
                record.connection.close()
            await self.runtime.stop(record.tag, timeout=0)
        self._reconcile(backend)

    async def _start_failed(self, backend: BackendState, record: ReplicaRecord,
                            error: Exception) -> None:
        await self.runtime.stop(record.tag, timeout=0)
        async with self._lock:
            backend.replicas.pop(record.tag, None)
            if record.state == STOPPING or self.backends.get(backend.tag) is not backend:
                self._check_goal(backend)
                return
            logger.warning("Replica %s failed to start: %r", record.tag, error)
            backend.last_start_error = f"{type(error).__name__}: {error}"
            backend.start_failures += 1
            backend.retry_at = time.monotonic() + min(
                constants.MAX_RESTART_BACKOFF_S, 0.5 * 2 ** backend.start_failures)
            if not backend.created:
                # The create call fails as a whole: the tag is free again.
                self.goals.fail(backend.goal, error)
                backend.goal = None
                backend.deleting = True
                backend.force_delete = True
                await self._save()
                await self._publish_backends()
                self._reconcile(backend)
                return
            if backend.goal is None:
                return  # a replacement failed: it is retried with backoff
            # A scale-up or update failed: go back to the config before it, and only then
            # fail the call, so it returns with the old config in force.
            goal, backend.goal = backend.goal, None
            push = False
            if backend.config_before_update is not None:
                pushed = backend.config
                backend.config = backend.config_before_update
                backend.config_before_update = None
                push = _replica_visible_fields(pushed) != _replica_visible_fields(
                    backend.config)
            await self._save()
            await self._publish_backends()
            self._reconcile(backend)
            if not push:
                self.goals.fail(goal, error)
                return
        # Running replicas may have applied the new config: give them the old one back
        # (without the lock: reconfigure may wait for the requests they run).
        try:
            async with backend.updating:
                await self._push_config(backend, raise_errors=False)
        finally:
            self.goals.fail(goal, error)

    def _begin_stop(self, backend: BackendState, record: ReplicaRecord) -> None:
        was_running = record.state == RUNNING
        record.state = STOPPING
        if record.health_task is not None:
            record.health_task.cancel()
        if not was_running and record.task is not None:
            record.task.cancel()
        self._spawn(self._run_stop(backend, record, graceful=was_running))

    async def _run_stop(self, backend: BackendState, record: ReplicaRecord,
                        graceful: bool) -> None:
        config = backend.config
        try:
            if graceful and not backend.force_delete:
                # Routers stop sending first, then the replica finishes what it holds.
                version = await self._publish_replicas()
                for role in ("proxy", "router"):
                    await self.long_poll.wait_until_applied(
                        role, constants.KEY_REPLICAS, version,
                        timeout=config.experimental_graceful_shutdown_wait_loop_s)
                await self._drain(backend, record)
            else:
                await self._publish_replicas()
            await self.runtime.stop(record.tag, timeout=0 if backend.force_delete else
                                    constants.PROCESS_STOP_TIMEOUT_S)
        finally:
            if record.connection is not None:
                record.connection.close()
            async with self._lock:
                backend.replicas.pop(record.tag, None)
                self._check_goal(backend)

    def _check_goal(self, backend: BackendState) -> None:
        if backend.deleting:
            if not backend.replicas and self.backends.get(backend.tag) is backend:
                del self.backends[backend.tag]
                self._save()
                self._spawn(self._publish_backends())
                self.goals.complete(backend.goal)
            return
        running = [r for r in backend.in_state(RUNNING) if not r.unhealthy.is_set()]
        if len(running) == backend.target_replicas == len(backend.replicas):
            backend.created = True
            backend.start_failures = 0
            backend.config_before_update = None
            self.goals.complete(backend.goal)
            backend.goal = None

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(constants.HEALTH_CHECK_PERIOD_S)
            try:
                await self._check_health()
            except Exception:
                logger.exception("Health check failed")

    async def _check_health(self) -> None:
        async with self._lock:
            if self._shutting_down:
                return
            for backend in list(self.backends.values()):
                dead = [r for r in backend.in_state(RUNNING)
                        if not self.runtime.is_alive(r.tag)]
                if dead:
                    await self._replace(backend, [
                        (r, self.runtime.exit_description(r.tag)) for r in dead])
                elif backend.created and not backend.deleting and backend.goal is None and \
                        time.monotonic() >= backend.retry_at and \
                        len(backend.in_state(STARTING, RUNNING)) < backend.target_replicas:
                    self._reconcile(backend)  # retry replacements that failed to start

    # ----------------------------------------------------------------- endpoints

    async def create_endpoint(self, name: str, backend: str, route: Optional[str],
                              methods: List[str]) -> None:
        async with self._lock:
            if backend not in self.list_backends():
                raise ValueError(f"Attempted to assign traffic to a backend '{backend}' that "
                                 "is not registered. Create it first with create_backend().")
            existing = self.endpoints.get(name)
            if existing is not None:
                if existing.route == route and existing.methods == methods:
                    return  # a retried call
                raise ValueError(f"Cannot create endpoint. Endpoint '{name}' is already "
                                 "registered. Delete it first, or pick another name.")
            if route is not None:
                for other in self.endpoints.values():
                    if other.route == route:
                        raise ValueError(
                            f"Cannot create endpoint. Route '{route}' is already registered "
                            f"to endpoint '{other.name}'.")
            self.endpoints[name] = EndpointInfo(name, route, methods, {backend: 1.0})
            version = await self._commit_endpoints()
        if route is not None:
            await self._wait_for_proxy(version)

    async def delete_endpoint(self, name: str) -> None:
        async with self._lock:
            if self.endpoints.pop(name, None) is None:
                return
            version = await self._commit_endpoints()
        await self._wait_for_proxy(version)

    def list_endpoints(self) -> Dict[str, dict]:
        return {name: info.describe() for name, info in self.endpoints.items()}

    def endpoint_exists(self, name: str) -> bool:
        return name in self.endpoints

    async def set_traffic(self, name: str, traffic: Dict[str, float]) -> None:
        async with self._lock:
            endpoint = self._endpoint(name, "assign traffic for")
            self._check_backends_exist(traffic, "assign traffic to")
            for tag, weight in traffic.items():
                if weight < 0:
                    raise ValueError(f"Attempted to assign a weight of {weight} to backend "
                                     f"'{tag}'. Weights cannot be negative.")
            total = math.fsum(traffic.values())
            if not math.isclose(total, 1.0, rel_tol=0.0, abs_tol=1e-8):
                raise ValueError(f"Traffic dictionary weights must sum to 1, currently they "
                                 f"sum to {total}. Got {traffic}.")
            endpoint.traffic = dict(traffic)
            version = await self._commit_endpoints()
        await self._wait_for_proxy(version)

    async def shadow_traffic(self, name: str, backend: str, proportion: float) -> None:
        async with self._lock:
            self._check_backends_exist({backend: proportion}, "shadow traffic to")
            endpoint = self._endpoint(name, "shadow traffic from")
            if proportion == 0:
                endpoint.shadows.pop(backend, None)
            else:
                endpoint.shadows[backend] = float(proportion)
            version = await self._commit_endpoints()
        await self._wait_for_proxy(version)

    def _endpoint(self, name: str, action: str) -> EndpointInfo:
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            raise ValueError(f"Attempted to {action} an endpoint '{name}' that is not "
                             f"registered. Registered endpoints: {sorted(self.endpoints)}.")
        return endpoint

    def _check_backends_exist(self, tags: Dict[str, float], action: str) -> None:
        registered = self.list_backends()
        for tag in tags:
            if tag not in registered:
                raise ValueError(f"Attempted to {action} a backend '{tag}' that is not "
                                 f"registered. Registered backends: {sorted(registered)}.")

    async def _commit_endpoints(self) -> int:
        """Save and publish the endpoints (under the lock); the version published."""
        await self._save()
        return await self.long_poll.publish(constants.KEY_ENDPOINTS, self._endpoints_view())

    async def _wait_for_proxy(self, version: int) -> None:
        """Wait (not under the lock) until the proxies that are connected serve ``version``
        of the endpoints. A proxy that is gone is not waited for; one that starts later
        reads the whole route table before it serves."""
        applied = await self.long_poll.wait_until_applied(
            "proxy", constants.KEY_ENDPOINTS, version, timeout=constants.STARTUP_TIMEOUT_S)
        if not applied:
            raise TimeoutError(f"The HTTP proxy did not apply the change within "
                               f"{constants.STARTUP_TIMEOUT_S}s.")

    # ----------------------------------------------------------------- long poll

    def _endpoints_view(self) -> Dict[str, EndpointInfo]:
        return {name: EndpointInfo(**vars(info)) for name, info in self.endpoints.items()}

    async def _publish_backends(self) -> int:
        view = {}
        for tag, backend in self.backends.items():
            if backend.metadata is not None and not backend.deleting:
                view[tag] = BackendLimits(
                    backend.config.effective_max_concurrent_queries(backend.metadata.is_async),
                    backend.config.max_queued_requests, backend.config.request_timeout_s)
        return await self.long_poll.publish(constants.KEY_BACKENDS, view)

    async def _publish_replicas(self) -> int:
        view = {tag: [(r.tag, r.address) for r in backend.in_state(RUNNING)]
                for tag, backend in self.backends.items()}
        return await self.long_poll.publish(constants.KEY_REPLICAS, view)

    async def _publish_all(self) -> None:
        await self.long_poll.publish(constants.KEY_ENDPOINTS, self._endpoints_view())
        await self._publish_backends()
        await self._publish_replicas()

    async def listen(self, subscriber_id: str, role: str, known: Dict[str, int]) -> dict:
        peer = current_peer.get(None)
        if peer is not None:
            self._subscribers.setdefault(peer, set()).add(subscriber_id)
        try:
            return await self.long_poll.listen(subscriber_id, role, known)
        except asyncio.CancelledError:
            self.long_poll.forget(subscriber_id)
            raise

    def disconnected(self, peer: Any) -> None:
        """A connection closed: its subscribers are gone, never wait for them again."""
        for subscriber_id in self._subscribers.pop(peer, ()):
            self.long_poll.forget(subscriber_id)

    # ----------------------------------------------------------------- durable state

    def _save(self) -> "asyncio.Future[None]":
        """Write the desired state (what changed of it) to the store; await to be sure."""
        proxies = {name: {"address": p.address, "process": p.process, "node": p.node}
                   for name, p in self._proxies.items()}
        future = self._durable.save(snapshot(self.backends, self.endpoints, proxies))
        future.add_done_callback(_log_save_failure)
        return future


@dataclasses.dataclass
class ProxyRecord:
    """An HTTP proxy the controller runs: where (the runtime's node), and how to reach it."""

    name: str
    node: Optional[str]
    address: Optional[str]
    process: Optional[dict]  # the runtime's identity of its process
    connection: Optional[Connection]


def _log_save_failure(future: "asyncio.Future[None]") -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("Could not save the controller's state: %r", future.exception())


def _replica_visible_fields(config: BackendConfig) -> tuple:
    """The config fields a running replica applies itself (no restart needed)."""
    return (config.max_batch_size, config.batch_wait_timeout, config.max_concurrent_queries,
            config.user_config)
