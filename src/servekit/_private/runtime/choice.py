"""The one place that decides which runtime an instance runs on.

Ray, when the script already initialized it (``ray.init(...)``) or gave an ``address`` to
pass to ``ray.init``; the embedded runtime otherwise. Deciding never imports Ray: a script
that did not import it has not initialized it.
"""

from __future__ import annotations

import sys
from typing import Dict, Optional

from servekit._private.runtime.base import Instance
from servekit._private.runtime.local_instance import DetachedLocalInstance, LocalInstance
from servekit._private.wire.transport import parse_tcp_address
from servekit._private.workers import home
from servekit.config import HTTPOptions


def uses_ray(address: Optional[str]) -> bool:
    if address is not None:
        return True
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def start_instance(http_options: HTTPOptions, detached: bool,
                   custom_resources: Dict[str, float], address: Optional[str]) -> Instance:
    """Start an instance on the chosen runtime (it may still be starting up)."""
    if uses_ray(address):
        from servekit._private.runtime.ray import RayInstance

        return RayInstance.start(http_options, detached, custom_resources, address)
    return LocalInstance(http_options, detached, custom_resources)


def find_detached(address: Optional[str]) -> Optional[Instance]:
    """The running instance ``connect`` reaches when the script started none itself: the
    one of the Ray cluster, or this user's detached embedded one. None if there is none."""
    if uses_ray(address):
        from servekit._private.runtime.ray import RayInstance

        return RayInstance.find(address)
    record = home.read_record()
    return None if record is None else DetachedLocalInstance(record["address"])


def instance_at(controller_address: str) -> Optional[Instance]:
    """The instance whose controller serves ``controller_address`` (code inside a replica
    knows only that); None for a non-detached embedded one, which needs nothing more."""
    if parse_tcp_address(controller_address) is None:
        record = home.read_record()
        if record is None or record["address"] != controller_address:
            return None
        return DetachedLocalInstance(controller_address)
    from servekit._private.runtime.ray import RayInstance

    return RayInstance.find(None)


def detached_running(address: Optional[str]) -> bool:
    """Whether a detached instance already runs where ``start(detached=True)`` would go."""
    if uses_ray(address):
        return False  # RayInstance.start refuses a second controller by its name
    return home.read_record() is not None
