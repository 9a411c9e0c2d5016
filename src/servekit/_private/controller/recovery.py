"""Recovery: a new controller takes over the state an earlier one saved, and the processes
it left running (same replica tags, same processes). What no longer runs is started anew."""

from __future__ import annotations

import asyncio
import logging
from typing import Dict, Optional

from servekit._private.controller.backend_reconciler import BackendReconciler
from servekit._private.controller.durable import LoadedState
from servekit._private.controller.goals import GoalManager
from servekit._private.controller.proxies import ProxyReconciler, ProxyRecord
from servekit._private.runtime.base import Connection, Runtime

logger = logging.getLogger("servekit.controller")

# Seconds a worker left by an earlier controller has to answer a ping to be adopted.
ADOPT_TIMEOUT_S = 5.0


async def reattach(runtime: Runtime, name: str, role: str, address: Optional[str],
                   process: Optional[dict]) -> Optional[Connection]:
    """A connection to a worker an earlier controller started, if it still answers (else
    what is left of it is stopped)."""
    if address is None or process is None or not runtime.adopt(name, role, address, process):
        return None
    try:
        connection = await runtime.connect(address)
        await asyncio.wait_for(connection.call("ping"), ADOPT_TIMEOUT_S)
        return connection
    except (Exception, asyncio.TimeoutError):
        await runtime.stop(name, timeout=0)
        return None


async def adopt(state: LoadedState, runtime: Runtime, goals: GoalManager,
                backends: Dict[str, BackendReconciler], proxies: ProxyReconciler) -> None:
    """Resume what ``state`` describes: its goals, its replicas (each where it was: starting,
    running or stopping) and its proxies. ``backends`` holds a reconciler per backend."""
    records = [(reconciler, record) for reconciler in backends.values()
               for record in reconciler.state.replicas.values()]
    connections = await asyncio.gather(*(
        reattach(runtime, record.tag, "replica", record.address, record.process)
        for _, record in records))
    for reconciler in backends.values():
        if reconciler.state.goal is not None:
            goals.restore(reconciler.state.goal)
    for (reconciler, record), connection in zip(records, connections, strict=True):
        if connection is None:
            logger.warning("Replica %s did not survive; starting a new one.", record.tag)
            reconciler.state.replicas.pop(record.tag)
            continue
        record.connection = connection
        logger.info("Took over replica %s of backend %s (%s) from the previous controller.",
                    record.tag, record.backend, record.state.lower())
        reconciler.resume(record)
    saved = list(state.proxies.items())
    proxy_connections = await asyncio.gather(*(
        reattach(runtime, name, "proxy", doc["address"], doc["process"])
        for name, doc in saved))
    for (name, doc), connection in zip(saved, proxy_connections, strict=True):
        if connection is not None:
            proxies.adopt(ProxyRecord(name, doc.get("node"), doc["address"], doc["process"],
                                      connection))
    logger.warning("Recovered the saved state: %d backends, %d endpoints.",
                   len(backends), len(state.endpoints))
