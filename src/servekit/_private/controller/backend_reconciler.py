"""The replicas of one backend: start, stop, replace, health, config push and scaling.

A ``BackendReconciler`` makes the replicas of its backend match what the backend asks for:
its number of replicas (fixed, or what the autoscaler decided), its config, and its
definition (a redeploy rolls the replicas over to a new one, ``max_surge`` at a time). It
works under the controller's lock and reaches the rest of the controller only through
``Services``. It logs each replica's start, stop and replacement, and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any, List, Optional, Protocol, Tuple

from servekit._private import constants, metrics
from servekit._private.backend_metadata import BackendMetadata
from servekit._private.backend_settings import BackendSettings
from servekit._private.config_checks import validate_backend_against_config
from servekit._private.controller.autoscaling import AutoscalingPolicy, Decision, LoadBook
from servekit._private.controller.goals import GoalManager
from servekit._private.controller.rollout import rollout_step, surge_replicas
from servekit._private.controller.state import (
    RUNNING,
    STARTING,
    STOPPING,
    BackendState,
    ReplicaRecord,
)
from servekit._private.routing.long_poll import LongPollHost
from servekit._private.runtime.base import Runtime
from servekit._private.specs import ReplicaSpec
from servekit.exceptions import BackendUnavailableError, ServeError

logger = logging.getLogger("servekit.controller")

# A replica whose constructor runs this long gets a warning, and again each time as long.
SLOW_START_WARNING_S = 30.0


class Services(Protocol):
    """What a backend reconciler needs of the controller."""

    runtime: Runtime
    lock: asyncio.Lock
    goals: GoalManager
    long_poll: LongPollHost
    loads: LoadBook

    def spawn(self, coro: Any) -> None: ...
    def save(self) -> "asyncio.Future[None]": ...
    async def save_under_lock(self) -> None: ...
    def settle_goal(self, goal: Optional[str],
                    error: Optional[BaseException] = None) -> None: ...
    async def publish_replicas(self) -> int: ...
    async def publish_backends(self) -> int: ...
    async def publish_models(self) -> int: ...
    def is_registered(self, backend: BackendState) -> bool: ...
    def forget(self, backend: BackendState) -> None: ...
    def replicas_that_fit(self, backend: BackendState) -> int: ...
    def user_of(self, backend: str) -> Optional[str]: ...


class BackendReconciler:
    """Keeps one backend's replicas as its state asks (call ``reconcile`` under the lock)."""

    def __init__(self, state: BackendState, services: Services) -> None:
        self.state = state
        self._services = services
        self._runtime = services.runtime
        self._policy: Optional[AutoscalingPolicy] = None
        self._autoscale_task: Optional[asyncio.Task] = None
        self._demand = asyncio.Event()  # requests wait while scaled to zero

    # ------------------------------------------------------------- replica count

    def reconcile(self) -> None:
        """Start or stop replicas towards the target number of the current definition (at
        most ``MAX_STARTING_REPLICAS`` starting at once).

        While a redeploy is under way, up to ``max_surge`` new replicas start beyond the
        target and an old one leaves for each new one that runs, so as many serve as
        before throughout (``rollout``).
        """
        backend = self.state
        self._follow_autoscaling()
        target = backend.target_replicas
        current = backend.current(STARTING, RUNNING)
        old = [r for r in backend.in_state(STARTING, RUNNING) if r.version != backend.version]
        for record in [r for r in old if r.state == STARTING]:
            # an old one that never served: not needed
            self._begin_stop(record, f"it runs revision {record.revision}, not "
                                     f"{backend.revision}, and never served")
        old_running = [r for r in old if r.state == RUNNING]
        room = constants.MAX_STARTING_REPLICAS - len(backend.in_state(STARTING))
        if old_running:
            new_running = len(backend.current(RUNNING))
            step = rollout_step(target, self._surge(target), len(old_running), new_running,
                                len(current) - new_running, room)
            for record in old_running[len(old_running) - step.stop_old:]:
                self._begin_stop(record, f"replaced by revision {backend.revision} "
                                         f"({new_running}/{target} new replicas ready)")
            if step.start_new:
                logger.info("Rollout of backend %s to revision %d: starting %d new "
                            "replica(s); %d/%d new replicas ready, %d of the old revision "
                            "serve.", backend.tag, backend.revision, step.start_new,
                            new_running, target, len(old_running) - step.stop_old)
            for _ in range(step.start_new):
                self._start_replica()
        else:
            # In batches: each start that ends calls this again, so a big scale-up neither
            # floods the runtime nor holds the event loop.
            for _ in range(min(target - len(current), room)):
                self._start_replica()
        if len(current) > target:
            # (Also while another definition's replicas run: a delete or scale-down in the
            # middle of a redeploy, or after one went back.) Newest first, and replicas
            # still starting before running ones.
            ordered = list(reversed(list(backend.replicas)))
            victims = sorted(current, key=lambda r: (r.state == RUNNING,
                                                     ordered.index(r.tag)))
            why = "the backend is being deleted" if backend.deleting else \
                f"the backend scales down to {target} replica(s)"
            for record in victims[:len(current) - target]:
                self._begin_stop(record, why)
        self.check_goal()

    def _surge(self, target: int) -> int:
        """Replicas a rollout may start beyond ``target``: ``max_surge``, within what the
        resources left allow (but always one, as a rollout needs)."""
        surge = surge_replicas(self.state.config.max_surge, target)
        return max(1, min(surge, self._services.replicas_that_fit(self.state) - target))

    def _start_replica(self) -> None:
        backend = self.state
        tag = f"{backend.tag}#{secrets.token_hex(3)}"
        record = ReplicaRecord(tag=tag, backend=backend.tag, version=backend.version)
        backend.replicas[tag] = record
        logger.info("Starting replica %s of backend %s (revision %d).", tag, backend.tag,
                    backend.revision)
        record.task = asyncio.ensure_future(self.run_start(record))

    def check_goal(self) -> None:
        """Complete the backend's goal once its replicas are as wanted (or it is gone), and
        once that is saved: a restarted controller then never rolls back a change whose
        call returned."""
        backend = self.state
        if backend.deleting:
            if not backend.replicas and self._services.is_registered(backend):
                self.stop_autoscaling()
                self._services.forget(backend)
                self._services.settle_goal(backend.goal)
            return
        running = [r for r in backend.current(RUNNING) if not r.unhealthy.is_set()]
        if len(running) == backend.target_replicas == len(backend.replicas) and \
                not backend.config_unconfirmed:
            settled = backend.goal is not None or not backend.created or \
                backend.config_before_update is not None or \
                backend.definition_before is not None
            if backend.definition_before is not None:
                logger.info("Rollout of backend %s to revision %d is complete: %d replicas "
                            "run it.", backend.tag, backend.revision, len(running))
            backend.created = True
            backend.start_failures = 0
            backend.replacing = None
            backend.config_before_update = None
            backend.definition_before = backend.metadata_before = None
            goal, backend.goal = backend.goal, None
            if settled:
                self._services.settle_goal(goal)

    def retry_if_due(self) -> None:
        """Start again the replacements that failed to start, once their backoff passed."""
        backend = self.state
        if backend.created and not backend.deleting and backend.goal is None and \
                time.monotonic() >= backend.retry_at and \
                len(backend.current(STARTING, RUNNING)) < backend.target_replicas:
            self.reconcile()

    def dead_replicas(self) -> List[Tuple[ReplicaRecord, str]]:
        """Running replicas whose process is gone, each with how it ended."""
        return [(r, self._runtime.exit_description(r.tag))
                for r in self.state.in_state(RUNNING) if not self._runtime.is_alive(r.tag)]

    # ------------------------------------------------------------- starting

    async def run_start(self, record: ReplicaRecord, launched: bool = False) -> None:
        """Launch a replica (unless ``launched``: adopted while it started), wait for its
        constructor, give it the current config, then put it into routing."""
        backend = self.state
        services = self._services
        started_with = backend.config
        spec = ReplicaSpec(backend.tag, record.tag, backend.replica_config,
                           started_with.replica_settings(), backend.metadata)
        try:
            if not launched:
                record.address = await self._runtime.launch(
                    record.tag, "replica", spec,
                    resources=spec.replica_config.actor_options,
                    python=spec.replica_config.python)
                record.process = self._runtime.identity(record.tag)
                # A restarted controller can adopt it from now on. (If the store refuses
                # the write, the next save that succeeds makes up for it; until then a
                # restarted controller would stop the process as unrecorded.)
                with contextlib.suppress(Exception):
                    await services.save_under_lock()
                record.connection = await self._runtime.connect(record.address)
            connection = record.connection
            assert connection is not None
            metadata = await self._constructed(
                record, asyncio.ensure_future(connection.call("ready")))
            record.config = started_with if not launched else None
            if record.version == backend.version:
                # (A redeployed definition may be another kind of callable.)
                validate_backend_against_config(metadata, backend.config.replica_settings())
                backend.metadata = metadata
            while True:
                # The config may have changed while the replica started: it takes traffic
                # only once it runs the current one.
                async with services.lock:
                    config = backend.config
                    if record.state != STARTING or record.config is not None and \
                            record.config.replica_settings() == config.replica_settings():
                        if record.state == STARTING:
                            await self._start_serving(record)
                        self.reconcile()  # a redeploy moves on
                        return
                await connection.call("update_config", config.replica_settings())
                record.config = config
        except asyncio.CancelledError:
            raise
        except BackendUnavailableError:
            error: Exception = ServeError(
                f"Replica {record.tag} {self._runtime.exit_description(record.tag)} before "
                "its constructor finished; see its output above.")
            await self._start_failed(record, error)
        except Exception as exc:
            await self._start_failed(record, exc)

    async def _constructed(self, record: ReplicaRecord,
                           ready: "asyncio.Future[Any]") -> BackendMetadata:
        """The replica's answer to ``ready`` (its constructor has returned); a warning every
        ``SLOW_START_WARNING_S`` until then, so a start that hangs is seen."""
        started = time.monotonic()
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(ready), SLOW_START_WARNING_S)
            except asyncio.TimeoutError:
                logger.warning("Replica %s has been starting for %.0fs: its constructor has "
                               "not returned yet.", record.tag, time.monotonic() - started)
            except asyncio.CancelledError:
                ready.cancel()
                raise

    async def _start_serving(self, record: ReplicaRecord) -> None:
        """Put a started replica into routing and begin its health pings (under the lock)."""
        backend = self.state
        record.state = RUNNING
        metrics.REPLICA_STARTS.labels(backend.tag).inc()
        logger.info("Replica %s of backend %s is running (revision %d, started in %.1fs); "
                    "%d/%d replicas of this revision run.", record.tag, backend.tag,
                    record.revision, time.monotonic() - record.created_at,
                    len(backend.current(RUNNING)), backend.target_replicas)
        backend.last_start_error = None
        await self._services.publish_replicas()
        if backend.metadata is not None and self._services.is_registered(backend):
            await self._services.publish_backends()
        record.health_task = asyncio.ensure_future(self.watch_health(record))

    async def _start_failed(self, record: ReplicaRecord, error: Exception) -> None:
        backend = self.state
        services = self._services
        await self._runtime.stop(record.tag, timeout=0)
        async with services.lock:
            backend.replicas.pop(record.tag, None)
            if record.state == STOPPING or not services.is_registered(backend):
                self.check_goal()
                return
            logger.warning("Replica %s failed to start: %r", record.tag, error)
            backend.last_start_error = f"{type(error).__name__}: {error}"
            backend.start_failures += 1
            backend.retry_at = time.monotonic() + min(
                constants.MAX_RESTART_BACKOFF_S, 0.5 * 2 ** backend.start_failures)
            user = services.user_of(backend.tag)
            if not backend.created and user is not None:
                # An endpoint sends it traffic already (``deploy --no-wait`` made both):
                # removed, it would leave that endpoint sending traffic nowhere. It stays
                # (UNHEALTHY, its replicas retried with backoff); its create call fails.
                logger.warning("Backend %s failed to start its first replicas, but endpoint "
                               "%s sends it traffic: it stays, and its replicas are tried "
                               "again.", backend.tag, user)
                backend.created = True
                goal, backend.goal = backend.goal, None
                services.settle_goal(goal, error)
                return
            if not backend.created:
                # The create call fails as a whole (once that is saved): the tag is free.
                goal, backend.goal = backend.goal, None
                backend.deleting = True
                backend.force_delete = True
                services.settle_goal(goal, error)
                await services.publish_backends()
                self.reconcile()
                return
            if backend.goal is None:
                return  # a replacement failed: it is retried with backoff
            # A scale-up, update or redeploy failed: go back to what ran before it, and only
            # then (once that is saved) fail the call, so it returns with the old state in
            # force.
            goal, backend.goal = backend.goal, None
            if backend.definition_before is not None:
                logger.warning("Rollout of backend %s to revision %d failed; going back to "
                               "revision %d, whose replicas kept serving.", backend.tag,
                               backend.revision, backend.previous_version + 1)
                backend.undefine()
            push = False
            if backend.config_before_update is not None:
                pushed = backend.config
                backend.config = backend.config_before_update
                backend.config_before_update = None
                push = pushed.replica_settings() != backend.config.replica_settings()
            if not push:
                services.settle_goal(goal, error)
            else:  # (its failure saved with the config it goes back to)
                services.goals.will_fail(goal, error)
                services.save()
            await services.publish_backends()
            self.reconcile()
            if not push:
                return
        # Running replicas may have applied the new config: give them the old one back
        # (without the lock: reconfigure may wait for the requests they run).
        try:
            async with backend.updating:
                await self.push_config(raise_errors=False)
        finally:
            async with services.lock:
                services.settle_goal(goal, error)

    def resume(self, record: ReplicaRecord) -> None:
        """Carry on with a replica an earlier controller left (adopted, connected)."""
        if record.state == STARTING:
            record.task = asyncio.ensure_future(self.run_start(record, launched=True))
        elif record.state == RUNNING:
            record.config = self.state.config
            record.health_task = asyncio.ensure_future(self.watch_health(record))
            if not self.state.config_unconfirmed:  # (else the controller pushes it, and
                # undoes the update if a replica refuses it)
                self._services.spawn(self.apply_config(record, self.state.config))
        else:  # it was being stopped: finish that
            self._services.spawn(self._run_stop(record, graceful=True))

    # ------------------------------------------------------------- stopping

    def _begin_stop(self, record: ReplicaRecord, why: str) -> None:
        was_running = record.state == RUNNING
        logger.info("Stopping replica %s of backend %s: %s.", record.tag, self.state.tag, why)
        record.state = STOPPING
        if record.health_task is not None:
            record.health_task.cancel()
        if not was_running and record.task is not None:
            record.task.cancel()
        self._services.spawn(self._run_stop(record, graceful=was_running))

    async def _run_stop(self, record: ReplicaRecord, graceful: bool) -> None:
        """Take a replica out of routing, let it finish what it holds (if ``graceful``),
        then stop its process."""
        backend = self.state
        services = self._services
        config = backend.config
        try:
            if graceful and not backend.force_delete:
                # Routers stop sending first, then the replica finishes what it holds.
                version = await services.publish_replicas()
                for role in ("proxy", "router"):
                    await services.long_poll.wait_until_applied(
                        role, constants.KEY_REPLICAS, version,
                        timeout=config.experimental_graceful_shutdown_wait_loop_s)
                await self.drain(record)
            else:
                await services.publish_replicas()
            await self._runtime.stop(record.tag, timeout=0 if backend.force_delete else
                                     constants.PROCESS_STOP_TIMEOUT_S)
        finally:
            if record.connection is not None:
                record.connection.close()
            async with services.lock:
                backend.replicas.pop(record.tag, None)
                logger.info("Replica %s of backend %s stopped.", record.tag, backend.tag)
                self.check_goal()

    async def drain(self, record: ReplicaRecord) -> None:
        """Let a replica finish the requests it holds, up to its graceful timeout."""
        backend = self.state
        timeout = backend.config.experimental_graceful_shutdown_timeout_s
        if record.connection is None or backend.force_delete:
            return
        try:
            await asyncio.wait_for(record.connection.call("drain"), timeout)
        except (asyncio.TimeoutError, BackendUnavailableError):
            logger.warning("Replica %s did not finish its requests within %ss; stopping it.",
                           record.tag, timeout)

    async def replace(self, failed: List[Tuple[ReplicaRecord, str]]) -> None:
        """Take replicas out of routing at once, kill them, and start new ones (under the
        lock); each comes with why. Requests in flight on them fail naming the replica."""
        backend = self.state
        metrics.REPLICA_RESTARTS.labels(backend.tag).inc(len(failed))
        for record, reason in failed:
            logger.warning("Replica %s %s; replacing it.", record.tag, reason)
            backend.replacing = f"replica {record.tag} {reason}"
            backend.replicas.pop(record.tag, None)
            record.state = STOPPING
            record.cancel_tasks()
        await self._services.publish_replicas()
        for record, _ in failed:
            if record.connection is not None:
                record.connection.close()
            await self._runtime.stop(record.tag, timeout=0)
        self.reconcile()

    # ------------------------------------------------------------- health

    async def watch_health(self, record: ReplicaRecord) -> None:
        """Ping a running replica every period; replace it when ``check_health()`` raises
        or it misses ``health_check_failure_threshold`` pings in a row. A ping answers
        with the multiplexed models the replica holds: a change is published."""
        backend = self.state
        failures = 0
        while record.state == RUNNING and record.connection is not None:
            config = backend.config
            if failures == 0:
                await asyncio.sleep(config.health_check_period_s)
            try:
                held = await asyncio.wait_for(record.connection.call("ping"),
                                              config.health_check_timeout_s)
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
            else:
                failures = 0
                models = tuple(held) if isinstance(held, (tuple, list)) else ()
                if models != record.models:
                    record.models = models
                    await self._services.publish_models()
                continue
            record.unhealthy.set()  # a config push stops waiting for it
            async with self._services.lock:
                if record.state == RUNNING and backend.replicas.get(record.tag) is record:
                    await self.replace([(record, reason)])
            return

    # ------------------------------------------------------------- config

    async def push_config(self, raise_errors: bool = True) -> None:
        """Send the backend's config to every running replica and wait until each applied
        it. A replica found unhealthy meanwhile is not waited for: it is being replaced,
        and its replacement starts with the new config."""
        config = self.state.config
        records = [r for r in self.state.in_state(RUNNING) if r.connection]
        results = await asyncio.gather(
            *(self.apply_config(record, config) for record in records),
            return_exceptions=True)
        for record, result in zip(records, results, strict=True):
            if result is None:
                record.config = config
        errors = [e for e in results if isinstance(e, Exception)
                  and not isinstance(e, BackendUnavailableError)]
        if errors and raise_errors:
            raise errors[0]

    async def apply_config(self, record: ReplicaRecord, config: BackendSettings) -> None:
        """``update_config`` on one replica, given up if the replica turns unhealthy."""
        assert record.connection is not None
        call = asyncio.ensure_future(record.connection.call("update_config",
                                                            config.replica_settings()))
        unhealthy = asyncio.ensure_future(record.unhealthy.wait())
        try:
            await asyncio.wait([call, unhealthy], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Given up (the controller stops): the replica may still apply the config,
            # and what it answers is nobody's to read (nor to log as never retrieved).
            call.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        finally:
            unhealthy.cancel()
        if not call.done():
            call.cancel()
            raise BackendUnavailableError(f"Replica {record.tag} became unhealthy before it "
                                          "applied the config.")
        call.result()

    # ------------------------------------------------------------- autoscaling

    def _follow_autoscaling(self) -> None:
        """Start, retune or stop the autoscaling loop as the config asks."""
        backend = self.state
        autoscaling = None if backend.deleting else backend.config.autoscaling_config
        if autoscaling is None:
            backend.autoscaled_replicas = None
            self.stop_autoscaling()
            return
        if self._policy is None:
            self._policy = AutoscalingPolicy(autoscaling)
        self._policy.config = autoscaling
        if backend.autoscaled_replicas is None:
            # A new backend starts with initial_replicas; one that had a fixed number
            # keeps its replicas (within the bounds) until its load says otherwise.
            backend.autoscaled_replicas = len(backend.current(STARTING, RUNNING)) \
                if backend.created else autoscaling.start_replicas
            backend.scaling_reason = "starting" if backend.created else "initial_replicas"
        low, high = autoscaling.min_replicas, autoscaling.max_replicas
        backend.autoscaled_replicas = min(max(backend.autoscaled_replicas, low), high)
        if self._autoscale_task is None:
            self._autoscale_task = asyncio.ensure_future(self._autoscale())

    def stop_autoscaling(self) -> None:
        self._policy = None
        if self._autoscale_task is not None:
            self._autoscale_task.cancel()
            self._autoscale_task = None

    def demand(self) -> None:
        """A router has requests waiting for this backend while none of its replicas
        runs (scaled to zero, or coming out of it)."""
        self._demand.set()

    async def _autoscale(self) -> None:
        """Every ``metrics_interval_s`` (at once when requests wait on a backend without a
        running replica): sample the load, ask the policy, apply what it decides."""
        backend = self.state
        while self._policy is not None:
            interval = self._policy.config.metrics_interval_s
            try:
                await asyncio.wait_for(self._demand.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self._demand.clear()
            policy = self._policy
            if policy is None:
                return
            now = time.monotonic()
            policy.record(now, self._services.loads.total(
                backend.tag, now, stale_after=2.5 * interval + 1.0))
            async with self._services.lock:
                current = backend.autoscaled_replicas
                if self._policy is not policy or current is None:
                    continue
                if current > 0 and not backend.in_state(RUNNING):
                    # Still coming out of zero: what waits meanwhile adds replicas at once.
                    decision = policy.decide(now, 0)
                    if decision.replicas <= current:
                        continue
                else:
                    decision = policy.decide(now, current)
                self._scale_to(decision)

    def _scale_to(self, decision: Decision) -> None:
        backend = self.state
        replicas = decision.replicas
        reason = decision.reason
        if replicas > len(backend.current(STARTING, RUNNING)):
            fits = self._services.replicas_that_fit(backend)
            if replicas > fits:
                reason = (f"{reason}; only {fits} fit the resources (capacity), so "
                          f"{fits}")
                replicas = max(fits, backend.autoscaled_replicas or 0)
        backend.scaling_reason = reason
        if replicas == backend.autoscaled_replicas:
            return
        logger.info("Autoscaling backend %s from %s to %d replicas: %s", backend.tag,
                    backend.autoscaled_replicas, replicas, reason)
        backend.autoscaled_replicas = replicas
        self._services.save()
        self.reconcile()
