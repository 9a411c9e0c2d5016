"""Where a process reaches its instance's controller now.

A process is told the controller's address once. On the embedded runtime it never changes
(the supervisor holds the socket). On Ray, a controller that Ray restarts where its old port
cannot be had (another node, or the port taken) serves at a new address; the runtime
registers a resolver for the address it handed out, and routers and clients resolve it
before each connect. Nothing here knows which runtime runs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Dict, Optional

logger = logging.getLogger("servekit")

Resolver = Callable[[], Optional[str]]

_resolvers: Dict[str, Resolver] = {}


def register_controller_resolver(given: str, resolver: Resolver) -> None:
    """``resolver()`` says where the controller first reached at ``given`` serves now
    (None: unknown). It may block briefly; it is called before connecting, never per
    request."""
    _resolvers[given] = resolver


def resolve_controller(given: str) -> str:
    """The controller's current address (``given`` if nothing says otherwise)."""
    resolver = _resolvers.get(given)
    if resolver is None:
        return given
    try:
        return resolver() or given
    except Exception as exc:  # the resolver's store is unreachable: try the old address
        logger.warning("Could not look up where the servekit controller serves now (%r); "
                       "trying %s.", exc, given)
        return given


async def current_controller(given: str) -> str:
    """``resolve_controller`` without blocking the event loop."""
    if given not in _resolvers:
        return given
    return await asyncio.get_running_loop().run_in_executor(None, resolve_controller, given)
