"""The controller: the only writer of desired state, wiring the reconcilers that make it real.

Every mutating call takes one lock, checks its arguments against the current state, writes
a checkpoint, then publishes the change over long poll. A call whose checkpoint cannot be
written (a full disk) undoes its change and fails: nothing it did is left, in memory or on
disk, and making it again works. Checkpoints are taken only under the lock, so none holds a
change whose own checkpoint has not been written yet. Calls that start or stop replicas
return a goal id; the client waits on it until the replicas are ready or gone, or until the
goal fails (a constructor raised), in which case nothing the call created is left behind.

The work is split by what is reconciled: ``BackendReconciler`` (the replicas of one backend),
``EndpointTable`` (routes, traffic, shadows), ``ProxyReconciler`` (the HTTP proxies),
``durable`` (the saved state) and ``recovery`` (taking over from an earlier controller).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Callable, Dict, List, Optional

from servekit._private import constants, metrics, resources
from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig
from servekit._private.backend_settings import BackendSettings
from servekit._private.config_checks import (
    check_name,
    checked,
    validate_backend_against_config,
)
from servekit._private.controller import recovery
from servekit._private.controller.autoscaling import LoadBook
from servekit._private.controller.backend_reconciler import (
    BackendReconciler,
)
from servekit._private.controller.backend_status import backend_status
from servekit._private.controller.durable import DurableState, load, snapshot
from servekit._private.controller.endpoint_table import EndpointTable
from servekit._private.controller.goals import GoalManager
from servekit._private.controller.proxies import ProxyReconciler
from servekit._private.controller.state import RUNNING, STARTING, BackendState
from servekit._private.routing.long_poll import LongPollHost
from servekit._private.runtime.base import Connection, Runtime
from servekit._private.specs import BackendLimits, EndpointInfo, HTTPSettings
from servekit._private.wire.transport import current_peer
from servekit.exceptions import ServeError

logger = logging.getLogger("servekit.controller")

# Seconds a process has to send its metrics for a scrape.
_METRICS_TIMEOUT_S = 2.0
# Seconds before a save that failed is tried again, doubling up to the second value.
_SAVE_RETRY_S = 0.05
_MAX_SAVE_RETRY_S = 2.0


class Controller:
    """Holds desired state and has the reconcilers make the runtime's processes match it."""

    def __init__(self, runtime: Runtime, http_options: HTTPSettings) -> None:
        self.runtime = runtime
        self.http_options = http_options
        self.http_address: Optional[tuple] = None
        self.long_poll = LongPollHost()
        self.goals = GoalManager()
        self.loads = LoadBook()
        self.lock = asyncio.Lock()
        self.backends: Dict[str, BackendReconciler] = {}
        self.endpoints = EndpointTable(self.list_backends, self._serves_asgi)
        self.proxies = ProxyReconciler(runtime, http_options, self.save_under_lock)
        self._durable = DurableState(runtime.store)
        self._subscribers: Dict[Any, set] = {}  # connection -> long-poll subscriber ids
        self._routers: Dict[Any, set] = {}  # connection -> ids of routers reporting load
        self._health_task: Optional[asyncio.Task] = None
        self._shutting_down = False
        self._background: set = set()  # tasks nobody awaits, kept from the GC
        self._apps: Dict[str, bool] = {}  # endpoint -> whether it serves an ASGI app, as published
        self._mixed: set = set()  # what mixes apps with other backends, as logged

    # ----------------------------------------------------------------- services

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_background_failure)

    def save(self) -> "asyncio.Future[None]":
        """Write the desired state (what changed of it) to the store; await to be sure.
        Call it under the lock (``save_under_lock`` takes it)."""
        proxies = {name: p.describe() for name, p in self.proxies.records.items()}
        try:
            records = snapshot({tag: r.state for tag, r in self.backends.items()},
                               self.endpoints.endpoints, proxies, self.goals.failures)
        except TypeError as exc:  # a user_config that cannot be saved
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        else:
            future = self._durable.save(records)
        future.add_done_callback(_log_save_failure)
        return future

    async def save_under_lock(self) -> None:
        """``save`` from outside the lock: the state is taken under it, written after."""
        async with self.lock:
            saving = self.save()
        await saving

    async def saved(self, saving: "Optional[asyncio.Future[None]]" = None) -> None:
        """Wait until the state is in the store: through ``saving`` (a save taken under the
        lock), else a save taken now. One that fails is tried again, with backoff, until
        one succeeds (or the controller shuts down)."""
        delay = _SAVE_RETRY_S
        while True:
            if saving is None:
                async with self.lock:
                    saving = self.save()
            try:
                await saving
                return
            except Exception:
                if self._shutting_down:
                    raise
            saving = None
            await asyncio.sleep(delay)
            delay = min(2 * delay, _MAX_SAVE_RETRY_S)

    def settle_goal(self, goal: Optional[str], error: Optional[BaseException] = None) -> None:
        """End ``goal`` (done, or failed with ``error``) once the state as it is now is in
        the store, so that what a client is told is what a restarted controller restores
        (a failure is saved too: a client waiting again after a restart is told it).
        Call it under the lock."""
        if goal is None:
            return
        if error is not None:
            self.goals.will_fail(goal, error)
        saving = self.save()

        async def settle() -> None:
            await self.saved(saving)
            if error is None:
                self.goals.complete(goal)
            else:
                self.goals.fail(goal, error)

        self.spawn(settle())

    async def _save_or_undo(self, undo: Callable[[], None]) -> None:
        """Save the change a call just made (under the lock). If it cannot be saved, undo
        it and raise, so that the failed call leaves nothing changed.

        Raises:
            TypeError: a user_config that cannot be saved (the message names it).
            ServeError: the store refused the write (the message says what it said).
        """
        try:
            await self.save()
        except TypeError:
            undo()
            raise
        except Exception as exc:
            undo()
            raise ServeError(
                f"The change could not be saved to {self.runtime.store_description()} "
                f"({type(exc).__name__}: {exc}). Nothing was changed: make room for the "
                "state (or repair its store) and make the call again.") from None

    def is_registered(self, backend: BackendState) -> bool:
        reconciler = self.backends.get(backend.tag)
        return reconciler is not None and reconciler.state is backend

    def forget(self, backend: BackendState) -> None:
        """A deleted backend's last replica is gone: drop it."""
        del self.backends[backend.tag]
        self.loads.forget_backend(backend.tag)
        for gauge in (metrics.TARGET_REPLICAS, metrics.RUNNING_REPLICAS):
            try:
                gauge.remove(backend.tag)
            except KeyError:
                pass
        self.save()
        self.spawn(self.publish_backends())

    def user_of(self, backend: str) -> Optional[str]:
        """An endpoint whose traffic or shadows use ``backend``, if any."""
        return self.endpoints.user_of(backend)

    def replicas_that_fit(self, backend: BackendState) -> int:
        """How many replicas ``backend`` can have with the resources left (its own count
        included)."""
        own = len(backend.in_state(STARTING, RUNNING))
        fits = resources.replicas_that_fit(
            self.runtime.capacity(), self._used(),
            resources.demand(backend.replica_config.actor_options))
        return own + int(min(fits, 1 << 30))

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Load the saved state (adopting the processes that still run it), publish it,
        start the HTTP proxy if none runs, begin health checks, finish what was under way.

        Raises:
            ServeError: the saved state cannot be read, or the HTTP proxy cannot start.
        """
        where = self.runtime.store_description()
        try:
            records = await asyncio.get_running_loop().run_in_executor(
                None, self._durable.read)
        except ServeError:
            raise
        except Exception as exc:
            raise ServeError(f"The saved state in {where} cannot be read ({type(exc).__name__}: "
                             f"{exc}). Move it away to start without it, or restore it from "
                             "a backup.") from None
        state = load(records, where) if records else None
        if state is not None:
            self.backends = {tag: BackendReconciler(backend, self)
                             for tag, backend in state.backends.items()}
            self.endpoints.endpoints = state.endpoints
            for goal, error in state.failed_goals.items():
                self.goals.restore_failed(goal, error)
            for reconciler in self.backends.values():
                backend = reconciler.state
                before = backend.config_before_update
                # An update whose push the earlier controller did not see through.
                backend.config_unconfirmed = backend.goal is not None and \
                    before is not None and \
                    before.replica_settings() != backend.config.replica_settings()
            await recovery.adopt(state, self.runtime, self.goals, self.backends, self.proxies)
            for reconciler in self.backends.values():
                if reconciler.state.config_unconfirmed:
                    self.spawn(self._confirm_update(reconciler))
        # A worker launched just before a controller died, before its record was saved:
        # nothing names it, so nothing would ever stop it.
        await self.runtime.reap_unrecorded()
        await self._publish_all()
        if self._serves_http:
            self.http_address = self.runtime.bind_http(
                self.http_options.host, self.http_options.port)  # type: ignore[arg-type]
            await self.proxies.start()
        async with self.lock:
            for reconciler in list(self.backends.values()):
                reconciler.reconcile()
            saving = self.save()
        with contextlib.suppress(Exception):
            # Nothing new is acknowledged by it: if the store refuses it (a full disk), the
            # health checks write it again, and the controller serves meanwhile.
            await saving
        self._health_task = asyncio.ensure_future(self._health_loop())

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
        if self._health_task is not None:
            self._health_task.cancel()
        for reconciler in self.backends.values():
            reconciler.stop_autoscaling()
            for record in reconciler.state.replicas.values():
                record.cancel_tasks()
        await self.proxies.stop_all()
        await self.long_poll.publish(constants.KEY_REPLICAS, {})
        await asyncio.gather(*(
            reconciler.drain(record) for reconciler in self.backends.values()
            for record in reconciler.state.in_state(RUNNING)))
        self._durable.close()
        await self.runtime.shutdown(discard_state=not keep_state)

    @property
    def _serves_http(self) -> bool:
        return self.http_options.location != "NoServer" and self.http_options.host is not None

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(constants.HEALTH_CHECK_PERIOD_S)
            try:
                await self._check_health()
            except Exception:
                logger.exception("Health check failed")

    async def _check_health(self) -> None:
        """Replace replicas whose process died; retry replacements that failed to start;
        write again what a failed save left out of the store."""
        async with self.lock:
            if self._shutting_down:
                return
            if self._durable.behind:
                self.save()
            for reconciler in list(self.backends.values()):
                dead = reconciler.dead_replicas()
                if dead:
                    await reconciler.replace(dead)
                else:
                    reconciler.retry_if_due()

    # ----------------------------------------------------------------- backends

    async def create_backend(self, tag: str, replica_config: ReplicaConfig, config: Any,
                             metadata: Optional[BackendMetadata],
                             call_id: Optional[str] = None) -> Optional[str]:
        """Create a backend; return the goal to wait on. ``config``: the fields its
        ``BackendConfig`` sets (``BackendSettings.check`` takes them). ``call_id``: the
        client's id of this call, the same when it calls again after a controller crash
        (that call then succeeds; any other with an existing tag raises ``ValueError``, as
        in 1.x)."""
        checked("backend_tag", check_name, tag)
        settings = BackendSettings.check(config)  # again: it may not come from a Client
        async with self.lock:
            existing = self.backends.get(tag)
            if existing is not None and not existing.state.deleting:
                if call_id is not None and existing.state.created_by == call_id:
                    return existing.state.goal  # a retried call
                raise ValueError(f"Cannot create backend. Backend '{tag}' is already "
                                 "registered. Delete it first, or pick another tag.")
            if metadata is not None:
                validate_backend_against_config(metadata, settings.replica_settings())
            wanted = settings.num_replicas if settings.autoscaling_config is None else \
                settings.autoscaling_config.start_replicas
            self._check_resources(tag, replica_config, wanted, wanted)
            backend = BackendState(tag, replica_config, settings, metadata, created_by=call_id)
            backend.goal = self.goals.create()
            reconciler = self.backends[tag] = BackendReconciler(backend, self)

            def undo() -> None:
                self.goals.discard(backend.goal)
                if existing is None:
                    del self.backends[tag]
                else:  # the one being deleted under that tag
                    self.backends[tag] = existing
                    existing.check_goal()  # its last replica may have gone meanwhile

            await self._save_or_undo(undo)
            await self.publish_backends()
            reconciler.reconcile()
            return backend.goal

    async def update_backend_config(self, tag: str, update: Any,
                                    call_id: Optional[str] = None) -> Optional[str]:
        """Change a backend's config; return the goal to wait on. ``update``: the fields to
        change (as ``create_backend`` takes a config). ``call_id``: the client's id of this
        call, the same when it calls again after a controller crash (answered
        with the first call's goal: its outcome, not a second change).

        The replicas apply a new config (``reconfigure`` waits for the requests they run)
        without the controller's lock held, so a slow one holds up neither other calls nor
        the replacement of dead replicas; updates of one backend are applied one at a time.
        """
        changes = BackendSettings.check(update)
        while True:
            reconciler = self._backend(tag)
            async with reconciler.state.updating:
                if self.backends.get(tag) is reconciler:
                    return await self._update_backend_config(reconciler, changes, call_id)
            # Deleted and created again while this waited: update the new one.

    async def _update_backend_config(self, reconciler: BackendReconciler,
                                     update: BackendSettings,
                                     call_id: Optional[str]) -> Optional[str]:
        backend = reconciler.state
        async with self.lock:
            retried = self._retried(backend, call_id)
            if retried is not None:
                return retried
            new_config = backend.config.merged(update)
            if backend.metadata is not None:
                validate_backend_against_config(backend.metadata, new_config.replica_settings())
            if new_config.autoscaling_config is None:
                self._check_resources(
                    backend.tag, backend.replica_config,
                    new_config.num_replicas - len(backend.in_state(STARTING, RUNNING)),
                    new_config.num_replicas)
            old_config = backend.config
            undo = self._undoer(backend, "config", "config_before_update", "goal",
                                "changed_by")
            superseded = backend.goal
            backend.config = new_config
            goal = backend.goal = self.goals.create()
            backend.config_before_update = old_config
            backend.changed_by = None if call_id is None else [call_id, goal]
            await self._save_or_undo(undo)
            self.goals.complete(superseded)
            await self.publish_backends()
            fixed = old_config.autoscaling_config is None and \
                new_config.autoscaling_config is None
            if fixed and new_config.num_replicas != old_config.num_replicas:
                logger.info("Scaling backend %s from %d to %d replicas (num_replicas).",
                            backend.tag, old_config.num_replicas, new_config.num_replicas)
        if old_config.replica_settings() != new_config.replica_settings():
            try:
                await reconciler.push_config()
            except Exception as exc:
                # A replica refused the change (reconfigure raised): undo it everywhere,
                # and fail the call once that is saved (its goal too: the same call made
                # again after a crash is told so).
                async with self.lock:
                    backend.config = old_config
                    backend.config_before_update = None
                    if backend.goal == goal:
                        backend.goal = None
                    self.goals.will_fail(goal, exc)
                    saving = self.save()
                    await self.publish_backends()
                await reconciler.push_config(raise_errors=False)
                await self.saved(saving)
                self.goals.fail(goal, exc)
                raise
        async with self.lock:
            reconciler.reconcile()
        return goal

    async def _confirm_update(self, reconciler: BackendReconciler) -> None:
        """Push again the config an earlier controller was pushing when it died; if a
        replica refuses it, go back to the config before it and fail the update's goal, as
        its call would have."""
        backend = reconciler.state
        async with backend.updating:
            try:
                await reconciler.push_config()
            except Exception as exc:
                async with self.lock:
                    backend.config_unconfirmed = False
                    if backend.config_before_update is None or \
                            not self.is_registered(backend):
                        return  # rolled back meanwhile (a replica failed to start), or gone
                    goal, backend.goal = backend.goal, None
                    backend.config = backend.config_before_update
                    backend.config_before_update = None
                    self.goals.will_fail(goal, exc)  # saved with the config it goes back to
                    self.save()
                    await self.publish_backends()
                await reconciler.push_config(raise_errors=False)
                async with self.lock:
                    self.settle_goal(goal, exc)
                    reconciler.reconcile()
                return
            async with self.lock:
                backend.config_unconfirmed = False
                reconciler.reconcile()

    async def redeploy_backend(self, tag: str, replica_config: ReplicaConfig,
                               metadata: Optional[BackendMetadata],
                               call_id: Optional[str] = None) -> Optional[str]:
        """Replace what a backend's replicas run (code, init args, resources, interpreter),
        rolling them over ``max_surge`` at a time; return the goal to wait on. If a new
        replica fails to start, the backend goes back to its old definition, whose replicas
        kept serving, and the goal fails with that error. The config is unchanged.
        ``call_id``: as for ``update_backend_config``."""
        async with self.lock:
            reconciler = self._backend(tag)
            backend = reconciler.state
            retried = self._retried(backend, call_id)
            if retried is not None:
                return retried
            if metadata is not None:
                validate_backend_against_config(metadata, backend.config.replica_settings())
            undo = self._undoer(backend, "replica_config", "metadata", "version",
                                "definition_before", "metadata_before", "previous_version",
                                "goal", "changed_by")
            superseded = backend.goal
            backend.redefine(replica_config, metadata)
            backend.goal = self.goals.create()
            backend.changed_by = None if call_id is None else [call_id, backend.goal]
            await self._save_or_undo(undo)
            self.goals.complete(superseded)
            await self.publish_backends()
            reconciler.reconcile()
            return backend.goal

    async def delete_backend(self, tag: str, force: bool) -> Optional[str]:
        async with self.lock:
            reconciler = self.backends.get(tag)
            if reconciler is None:
                return None
            user = self.endpoints.user_of(tag)
            if user is not None:
                raise ValueError(
                    f"Backend '{tag}' is used by endpoint '{user}' and cannot be "
                    "deleted. Remove it from that endpoint's traffic and shadows "
                    "(set_traffic / shadow_traffic(..., 0)) or delete the endpoint first.")
            backend = reconciler.state
            if backend.deleting and (backend.force_delete or not force):
                return backend.goal  # being deleted already (the same call made again)
            undo = self._undoer(backend, "deleting", "force_delete", "goal")
            superseded = backend.goal
            backend.deleting = True
            backend.force_delete = backend.force_delete or force
            backend.goal = self.goals.create()
            await self._save_or_undo(undo)
            self.goals.complete(superseded)
            reconciler.reconcile()
            return backend.goal

    def get_backend_config(self, tag: str) -> BackendSettings:
        return self._backend(tag).state.config

    def get_backend_definition(self, tag: str) -> tuple:
        """What a backend's replicas run: its ``ReplicaConfig`` and metadata (for a deploy
        file's apply to put back what it replaced, if a later step fails)."""
        backend = self._backend(tag).state
        return backend.replica_config, backend.metadata

    def _serves_asgi(self, tag: str) -> Optional[bool]:
        """Whether a backend is an ASGI app (None: not known until a replica loads it)."""
        reconciler = self.backends.get(tag)
        if reconciler is None or reconciler.state.metadata is None:
            return None
        return reconciler.state.metadata.asgi

    def list_backends(self) -> Dict[str, BackendSettings]:
        return {tag: r.state.config for tag, r in self.backends.items()
                if not r.state.deleting}

    def status(self) -> dict:
        """What runs (``Client.status`` documents it): per backend its status and message,
        config (its defaults resolved as replicas apply them), definition and revision,
        replicas running (of the current revision too) and wanted, the autoscaler's last
        decision, and why the last replica start failed (None once one started since);
        the endpoints; the processes (role, name, pid, state) of the proxies and the
        replicas; and the HTTP options the instance started with."""
        backends = {}
        for tag, reconciler in self.backends.items():
            b = reconciler.state
            if b.deleting:
                continue
            state, message = backend_status(b)
            config = b.config.describe()
            config["max_concurrent_queries"] = b.config.effective_max_concurrent_queries(
                b.metadata is not None and b.metadata.is_async)
            backends[tag] = {
                "status": state, "message": message, "config": config,
                "revision": b.revision, "revision_running": len(b.current(RUNNING)),
                "running": len(b.in_state(RUNNING)), "target": b.target_replicas,
                "autoscaling": b.scaling_reason if b.autoscaled_replicas is not None
                else None,
                "last_start_error": b.last_start_error,
                "description": b.replica_config.description,
                "source": b.replica_config.source}
        processes = []
        for proxy in self.proxies.records.values():
            process = proxy.process or {}
            processes.append({"role": "proxy", "name": proxy.name, "state": RUNNING,
                              "pid": process.get("pid"), "node": process.get("node"),
                              "http": process.get("http")})
        for reconciler in self.backends.values():
            for record in reconciler.state.replicas.values():
                process = record.process or {}
                processes.append({"role": "replica", "name": record.tag, "state": record.state,
                                  "pid": process.get("pid"), "node": process.get("node"),
                                  "backend": record.backend, "revision": record.revision,
                                  "models": list(record.models)})
        endpoints = {name: {**info.describe(), "managed": info.managed, "prefix": info.asgi}
                     for name, info in self.endpoints.endpoints.items()}
        return {"backends": backends, "endpoints": endpoints, "processes": processes,
                "http_options": dict(self.http_options.shown)}

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

        connections = [*self.proxies.connections(), *(
            record.connection for reconciler in self.backends.values()
            for record in reconciler.state.in_state(RUNNING))]
        texts = await asyncio.gather(*(of(connection) for connection in connections))
        return [metrics.exposition(), *(text for text in texts if text is not None)]

    def _backend(self, tag: str) -> BackendReconciler:
        reconciler = self.backends.get(tag)
        if reconciler is None or reconciler.state.deleting:
            raise ValueError(f"Backend '{tag}' is not registered. Registered backends: "
                             f"{sorted(self.list_backends())}.")
        return reconciler

    @staticmethod
    def _retried(backend: BackendState, call_id: Optional[str]) -> Optional[str]:
        """The goal of call ``call_id`` if it was made already (and is not forgotten): made
        again after a crash, it gets that goal (done, failed or under way) to wait on."""
        if call_id is not None and backend.changed_by is not None and \
                backend.changed_by[0] == call_id:
            return backend.changed_by[1]
        return None

    def _undoer(self, backend: BackendState, *fields: str) -> Callable[[], None]:
        """What puts ``fields`` of ``backend`` back as they are now; a ``goal`` made since
        is discarded (nobody was told of it)."""
        before = {name: getattr(backend, name) for name in fields}

        def undo() -> None:
            if "goal" in before and backend.goal != before["goal"]:
                self.goals.discard(backend.goal)
            for name, value in before.items():
                setattr(backend, name, value)

        return undo

    def _used(self) -> Dict[str, float]:
        return resources.add_up(
            resources.demand(r.state.replica_config.actor_options)
            for r in self.backends.values() for _ in r.state.in_state(STARTING, RUNNING))

    def _check_resources(self, tag: str, replica_config: ReplicaConfig, new: int,
                         target: int) -> None:
        """Refuse to start ``new`` replicas that would not all fit the runtime's capacity."""
        per_replica = resources.demand(replica_config.actor_options)
        if new <= 0 or not per_replica:
            return
        used = self._used()
        capacity = self.runtime.capacity()
        fits = resources.replicas_that_fit(capacity, used, per_replica)
        if new > fits:
            raise ServeError(
                f"Cannot scale backend {tag} to {target} replicas: {new} more are needed, "
                f"each asking for {per_replica}, but only {fits} fit (capacity {capacity}, in "
                f"use {used}). Lower num_replicas or the replica's ray_actor_options, or "
                "declare more resources in serve.start(resources=...).")

    # ----------------------------------------------------------------- endpoints

    async def create_endpoint(self, name: str, backend: str, route: Optional[str],
                              methods: List[str], managed: Optional[str] = None) -> None:
        async with self.lock:
            before = self.endpoints.copy()
            if not self.endpoints.create(name, backend, route, methods, managed):
                return  # a retried call
            version = await self._commit_endpoints(before)
        if route is not None:
            await self._wait_for_proxy(version)

    async def update_endpoint(self, name: str, route: Optional[str], methods: List[str],
                              managed: Optional[str]) -> None:
        """Change an endpoint's route and methods (and its mark: the name of the deploy file
        that made it, None for the Python API) in place."""
        async with self.lock:
            before = self.endpoints.copy()
            self.endpoints.update(name, route, methods, managed)
            version = await self._commit_endpoints(before)
        await self._wait_for_proxy(version)

    async def delete_endpoint(self, name: str) -> None:
        async with self.lock:
            before = self.endpoints.copy()
            if not self.endpoints.delete(name):
                return
            version = await self._commit_endpoints(before)
        await self._wait_for_proxy(version)

    def list_endpoints(self) -> Dict[str, dict]:
        return self.endpoints.describe()

    def endpoint_exists(self, name: str) -> bool:
        return name in self.endpoints.endpoints

    async def set_traffic(self, name: str, traffic: Dict[str, float]) -> None:
        async with self.lock:
            before = self.endpoints.copy()
            self.endpoints.set_traffic(name, traffic)
            version = await self._commit_endpoints(before)
        await self._wait_for_proxy(version)

    async def shadow_traffic(self, name: str, backend: str, proportion: float) -> None:
        async with self.lock:
            before = self.endpoints.copy()
            self.endpoints.shadow_traffic(name, backend, proportion)
            version = await self._commit_endpoints(before)
        await self._wait_for_proxy(version)

    async def _commit_endpoints(self, before: Dict[str, EndpointInfo]) -> int:
        """Save and publish the endpoints (under the lock); the version published. If they
        cannot be saved, the table goes back to ``before`` (a copy) and this raises."""
        await self._save_or_undo(lambda: self.endpoints.restore(before))
        return await self._publish_endpoints()

    async def _publish_endpoints(self) -> int:
        self._apps = self.endpoints.apps()
        return await self.long_poll.publish(constants.KEY_ENDPOINTS, self.endpoints.view())

    async def _wait_for_proxy(self, version: int) -> None:
        """Wait (not under the lock) until the proxies that are connected serve ``version``
        of the endpoints. A proxy that is gone is not waited for; one that starts later
        reads the whole route table before it serves."""
        applied = await self.long_poll.wait_until_applied(
            "proxy", constants.KEY_ENDPOINTS, version, timeout=constants.STARTUP_TIMEOUT_S)
        if not applied:
            raise TimeoutError(f"The HTTP proxy did not apply the change within "
                               f"{constants.STARTUP_TIMEOUT_S}s.")

    # ----------------------------------------------------------------- long poll, load

    async def publish_backends(self) -> int:
        view = {}
        for tag, reconciler in self.backends.items():
            backend = reconciler.state
            if backend.deleting:
                continue
            config = backend.config
            # Before a replica said whether the callable is async, the sync default: the
            # replica enforces its own cap anyway.
            is_async = backend.metadata is not None and backend.metadata.is_async
            autoscaling = config.autoscaling_config
            view[tag] = BackendLimits(
                config.effective_max_concurrent_queries(is_async), config.max_queued_requests,
                config.request_timeout_s,
                None if autoscaling is None else autoscaling.metrics_interval_s,
                scales_to_zero=autoscaling is not None and autoscaling.min_replicas == 0)
        version = await self.long_poll.publish(constants.KEY_BACKENDS, view)
        # A backend given by import path is known to be an ASGI app once a replica has
        # loaded it: the routes of its endpoints become prefixes then.
        if self.endpoints.apps() != self._apps:
            await self._publish_endpoints()
        mixed = set(self.endpoints.mixed())
        for problem in mixed - self._mixed:
            logger.error("%s", problem)
        self._mixed = mixed
        return version

    async def publish_replicas(self) -> int:
        view = {}
        for tag, reconciler in self.backends.items():
            running = reconciler.state.in_state(RUNNING)
            view[tag] = [(r.tag, r.address) for r in running]
            metrics.RUNNING_REPLICAS.labels(tag).set(len(running))
            metrics.TARGET_REPLICAS.labels(tag).set(reconciler.state.target_replicas)
        return await self.long_poll.publish(constants.KEY_REPLICAS, view)

    async def publish_models(self) -> int:
        """The multiplexed models each running replica holds, for routers to prefer it."""
        view = {}
        for tag, reconciler in self.backends.items():
            held = {r.tag: list(r.models) for r in reconciler.state.in_state(RUNNING)
                    if r.models}
            if held:
                view[tag] = held
        return await self.long_poll.publish(constants.KEY_MODELS, view)

    async def _publish_all(self) -> None:
        await self._publish_endpoints()
        await self.publish_backends()
        await self.publish_replicas()

    async def listen(self, subscriber_id: str, role: str, known: Dict[str, int]) -> dict:
        peer = current_peer.get(None)
        if peer is not None:
            self._subscribers.setdefault(peer, set()).add(subscriber_id)
        try:
            return await self.long_poll.listen(subscriber_id, role, known)
        except asyncio.CancelledError:
            self.long_poll.forget(subscriber_id)
            raise

    def report_load(self, router: str, loads: Dict[str, float]) -> None:
        """A router's load per autoscaled backend: requests waiting in it plus those it has
        on replicas. Requests waiting on a backend without a running replica (scaled to
        zero) start replicas at once."""
        peer = current_peer.get(None)
        if peer is not None:
            self._routers.setdefault(peer, set()).add(router)
        self.loads.report(router, loads, time.monotonic())
        for tag, waiting in loads.items():
            reconciler = self.backends.get(tag)
            if waiting > 0 and reconciler is not None and \
                    not reconciler.state.in_state(RUNNING):
                reconciler.demand()

    def disconnected(self, peer: Any) -> None:
        """A connection closed: its subscribers are gone, never wait for them again, and
        the load its routers reported is gone with them."""
        for subscriber_id in self._subscribers.pop(peer, ()):
            self.long_poll.forget(subscriber_id)
        for router in self._routers.pop(peer, ()):
            self.loads.forget(router)


def _log_background_failure(task: "asyncio.Task[Any]") -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("%s failed: %r", task.get_coro().__qualname__,  # type: ignore[union-attr]
                       task.exception())


def _log_save_failure(future: "asyncio.Future[None]") -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("Could not save the controller's state: %r", future.exception())
