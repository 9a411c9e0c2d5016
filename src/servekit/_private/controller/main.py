"""The controller's RPC API, served on its socket by whichever runtime runs it."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from servekit._private import metrics, versions
from servekit._private.controller.controller import Controller
from servekit._private.memory import release_freed_memory
from servekit._private.runtime.base import Runtime
from servekit._private.specs import HTTPSettings
from servekit._private.wire.transport import RpcServer

logger = logging.getLogger("servekit.controller")


def controller_handlers(controller: Controller, started: asyncio.Future,
                        stop: asyncio.Event) -> dict:
    """The RPC API of the controller: name -> coroutine function.

    Every call but ``listen`` waits until the controller has started (and taken over any
    saved state).
    """

    def shielded(method: Any) -> Any:
        # A mutation runs to the end even if the caller disconnects half-way.
        async def call(*args: Any) -> Any:
            await asyncio.shield(started)
            return await asyncio.shield(method(*args))
        return call

    def waiting(method: Any) -> Any:
        async def call(*args: Any) -> Any:
            await asyncio.shield(started)
            return await method(*args)
        return call

    def plain(method: Any) -> Any:
        async def call(*args: Any) -> Any:
            await asyncio.shield(started)
            return method(*args)
        return call

    async def version() -> dict:
        return versions.software()  # (at once: a client checks it before anything else)

    async def ready() -> int:
        """Wait until the controller runs; return the pid of the instance's first process
        (locally its supervisor, which outlives controller restarts)."""
        await asyncio.shield(started)
        return controller.runtime.instance_processes()[0]["pid"]

    async def ping() -> bool:
        """Answer from the event loop (before the start too: the supervisor's liveness
        check)."""
        return True

    async def shutdown(keep_state: bool = False) -> None:
        async def stop_everything() -> None:
            # Also after a failed start (e.g. a damaged state file): then nothing runs to
            # stop, and the state is the user's to repair, so it is kept.
            try:
                await asyncio.shield(started)
            except Exception:
                return
            await controller.shutdown(keep_state)

        stopping = asyncio.ensure_future(stop_everything())
        try:
            await asyncio.shield(stopping)  # to the end, even if the caller leaves
        finally:
            # The process exits once ``stop`` is set: not before this call's reply is sent
            # (as it returns, in this step of the loop), or everything stopped if the caller
            # left (on either loop, whichever order it wakes its tasks in).
            stopping.add_done_callback(lambda _: stop.set())

    def status() -> dict:
        status = controller.status()
        status["processes"] = [*controller.runtime.instance_processes(),
                               *status["processes"]]
        return status

    return {
        "version": version,
        "ready": ready,
        "ping": ping,
        "shutdown": shutdown,
        "create_backend": shielded(controller.create_backend),
        "update_backend_config": shielded(controller.update_backend_config),
        "redeploy_backend": shielded(controller.redeploy_backend),
        "delete_backend": shielded(controller.delete_backend),
        "create_endpoint": shielded(controller.create_endpoint),
        "update_endpoint": shielded(controller.update_endpoint),
        "delete_endpoint": shielded(controller.delete_endpoint),
        "set_traffic": shielded(controller.set_traffic),
        "shadow_traffic": shielded(controller.shadow_traffic),
        "wait_for_goal": waiting(controller.goals.wait),
        # Not held back: the proxy the controller starts listens before start() ends, and
        # nothing is published before the saved state has been taken over.
        "listen": controller.listen,
        "report_load": plain(controller.report_load),
        "get_backend_config": plain(controller.get_backend_config),
        "get_backend_definition": plain(controller.get_backend_definition),
        "list_backends": plain(controller.list_backends),
        "status": plain(status),
        "metrics": plain(metrics.exposition),
        "metrics_of_every_process": waiting(controller.metrics_of_every_process),
        "list_endpoints": plain(controller.list_endpoints),
        "endpoint_exists": plain(controller.endpoint_exists),
    }


async def serve_controller(runtime: Runtime, http_options: HTTPSettings, sock: socket.socket,
                           stop: asyncio.Event) -> None:
    """Run a controller over ``runtime`` and serve its API on ``sock`` until ``stop``."""
    controller = Controller(runtime, http_options)
    started: asyncio.Future = asyncio.get_running_loop().create_future()
    server = RpcServer(controller_handlers(controller, started, stop),
                       on_disconnect=controller.disconnected)
    await server.start(sock)
    try:
        await controller.start()
    except Exception as exc:
        started.set_exception(exc)
        await runtime.shutdown(discard_state=False)  # it may be the user's to repair
        await stop.wait()
        return
    started.set_result(None)
    release_freed_memory()  # what taking over the saved state and starting freed
    await stop.wait()
    server.close()
    await controller.shutdown()
