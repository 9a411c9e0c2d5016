"""A backend's status in Ray Serve's words, with a message saying why.

``UPDATING``: being created, rolled over to a new revision, or given a new config.
``UPSCALING`` / ``DOWNSCALING``: replicas start or stop towards a new count.
``UNHEALTHY``: fewer replicas run than wanted because they fail (a constructor raises,
replicas die or fail their health checks). ``HEALTHY``: every replica wanted runs.
"""

from __future__ import annotations

from typing import Tuple

from servekit._private.controller.state import RUNNING, STARTING, STOPPING, BackendState

UPDATING, HEALTHY, UNHEALTHY = "UPDATING", "HEALTHY", "UNHEALTHY"
UPSCALING, DOWNSCALING = "UPSCALING", "DOWNSCALING"


def backend_status(backend: BackendState) -> Tuple[str, str]:
    """The status of ``backend`` and its message."""
    target = backend.target_replicas
    new_running = len(backend.current(RUNNING))
    old_running = len(backend.in_state(RUNNING)) - new_running
    ready = f"{new_running}/{target}"
    error = f"; last start error: {backend.last_start_error}" \
        if backend.last_start_error else ""
    if not backend.created:
        return UPDATING, f"starting: {ready} replicas ready{error}"
    if old_running or backend.definition_before is not None:
        return UPDATING, (f"rolling out revision {backend.revision}: {ready} new replicas "
                          f"ready, {old_running} of the old revision running{error}")
    unhealthy = sum(1 for r in backend.in_state(RUNNING) if r.unhealthy.is_set())
    if new_running - unhealthy < target:
        if backend.last_start_error:
            return UNHEALTHY, (f"{ready} replicas running; starting replicas fails: "
                               f"{backend.last_start_error}")
        if unhealthy or backend.replacing:
            why = backend.replacing or f"{unhealthy} failed their health checks"
            return UNHEALTHY, f"{ready} replicas running; replacing: {why}"
        starting = len(backend.current(STARTING))
        return UPSCALING, f"{ready} replicas running, {starting} starting{_why(backend)}"
    stopping = len(backend.in_state(STOPPING))
    if new_running > target or stopping:
        return DOWNSCALING, (f"{min(new_running, target)}/{target} replicas running, "
                             f"{stopping or new_running - target} stopping{_why(backend)}")
    if backend.updating.locked():  # (held while replicas apply a config in place)
        return UPDATING, f"{ready} replicas running; applying a config change"
    return HEALTHY, f"{ready} replicas running{_why(backend)}"


def _why(backend: BackendState) -> str:
    """The autoscaler's last decision, for an autoscaled backend."""
    if backend.autoscaled_replicas is None or not backend.scaling_reason:
        return ""
    return f" (autoscaling: {backend.scaling_reason})"
