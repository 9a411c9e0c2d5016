"""The HTTP proxies: ``num_proxies`` at each place the location names, kept running."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Callable, Dict, List, Optional

from servekit._private import constants
from servekit._private.runtime.base import Connection, Runtime
from servekit._private.specs import HTTPSettings, Pickled
from servekit.exceptions import BackendUnavailableError, ServeError

logger = logging.getLogger("servekit.controller")


@dataclasses.dataclass
class ProxyRecord:
    """An HTTP proxy the controller runs: where (the runtime's node), and how to reach it."""

    name: str
    node: Optional[str]
    address: Optional[str]
    process: Optional[dict]  # the runtime's identity of its process
    connection: Optional[Connection]

    def describe(self) -> dict:
        """Its durable record (what a later controller needs to adopt it)."""
        return {"address": self.address, "process": self.process, "node": self.node}


class ProxyReconciler:
    """Runs the HTTP proxies ``http_options`` asks for; ``save`` persists ``records``."""

    def __init__(self, runtime: Runtime, http_options: HTTPSettings,
                 save: Callable[[], Any]) -> None:
        self._runtime = runtime
        self._http_options = http_options
        self._save = save
        self.records: Dict[str, ProxyRecord] = {}  # by worker name
        self._task: Optional[asyncio.Task] = None

    def adopt(self, record: ProxyRecord) -> None:
        """Take over a proxy an earlier controller started (it answered)."""
        self.records[record.name] = record

    def connections(self) -> List[Connection]:
        return [p.connection for p in self.records.values() if p.connection is not None]

    async def start(self) -> None:
        """Start the missing proxies, then keep them running in the background.

        Raises:
            ServeError: a proxy could not start.
        """
        await self.reconcile()
        self._task = asyncio.ensure_future(self._supervise())

    async def stop_all(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*(self._runtime.stop(name, timeout=constants.SHUTDOWN_TIMEOUT_S)
                               for name in self.records))

    async def reconcile(self) -> None:
        """Run ``num_proxies`` HTTP proxies at each place the runtime names for the location
        (HeadOnly: one; EveryNode: one per node): start the missing ones, stop those of
        places that are gone, forget the dead ones (the next round starts them again).

        Raises:
            ServeError: a proxy could not start (the others are still started).
        """
        places = await self._runtime.proxy_nodes(self._http_options.location)
        wanted = {name if i == 0 else f"{name}-{i + 1}": node for name, node in places.items()
                  for i in range(self._http_options.num_proxies)}
        for name, record in list(self.records.items()):
            if name not in wanted or not self._runtime.is_alive(name):
                self.records.pop(name)
                if record.connection is not None:
                    record.connection.close()
                if name in wanted:
                    logger.warning("The HTTP proxy %s %s; starting a new one.", name,
                                   self._runtime.exit_description(name))
                await self._runtime.stop(name, timeout=0)
                await self._save()
        results = await asyncio.gather(*(
            self._start_proxy(name, node) for name, node in wanted.items()
            if name not in self.records), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _start_proxy(self, name: str, node: Optional[str]) -> None:
        await self._runtime.stop(name, timeout=0)  # what is left of an earlier one
        address = await self._runtime.launch(
            name, "proxy", Pickled(self._http_options.proxy_spec), node=node)
        connection = await self._runtime.connect(address)
        try:
            await connection.call("ready")
        except BackendUnavailableError:
            raise ServeError(f"The HTTP proxy {name} {self._runtime.exit_description(name)} "
                             "while starting; see its output above.") from None
        self.records[name] = ProxyRecord(name, node, address, self._runtime.identity(name),
                                         connection)
        await self._save()

    async def _supervise(self) -> None:
        """Keep the proxies reconciled: restart dead ones, follow nodes as they join and
        leave; a failed start is retried with backoff until it succeeds."""
        failures = 0
        while True:
            await asyncio.sleep(constants.HEALTH_CHECK_PERIOD_S if not failures else
                                min(constants.MAX_RESTART_BACKOFF_S, 0.5 * 2 ** failures))
            try:
                await self.reconcile()
                failures = 0
            except Exception as exc:
                failures += 1
                logger.warning("An HTTP proxy could not be restarted (%s); retrying.", exc)
