"""The controller process: serves the controller's RPC API on its socket."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
from typing import Any

from servekit._private.controller.controller import Controller
from servekit._private.process import WorkerSpec, parent_exit_hooks
from servekit._private.runtime.local import LocalRuntime
from servekit._private.specs import ControllerSpec
from servekit._private.transport import RpcServer

logger = logging.getLogger("servekit.controller")


def controller_handlers(controller: Controller, started: asyncio.Future,
                        stop: asyncio.Event) -> dict:
    """The RPC API of the controller: name -> coroutine function."""

    def shielded(method: Any) -> Any:
        # A mutation runs to the end even if the caller disconnects half-way.
        async def call(*args: Any) -> Any:
            return await asyncio.shield(method(*args))
        return call

    def plain(method: Any) -> Any:
        async def call(*args: Any) -> Any:
            return method(*args)
        return call

    async def ready() -> int:
        """Wait until the controller runs; its pid (a detached one is not our child)."""
        await asyncio.shield(started)
        return os.getpid()

    async def shutdown() -> None:
        await controller.shutdown()
        stop.set()  # the process exits once this reply is sent

    return {
        "ready": ready,
        "shutdown": shielded(shutdown),
        "create_backend": shielded(controller.create_backend),
        "update_backend_config": shielded(controller.update_backend_config),
        "delete_backend": shielded(controller.delete_backend),
        "create_endpoint": shielded(controller.create_endpoint),
        "delete_endpoint": shielded(controller.delete_endpoint),
        "set_traffic": shielded(controller.set_traffic),
        "shadow_traffic": shielded(controller.shadow_traffic),
        "wait_for_goal": controller.goals.wait,
        "listen": controller.listen,
        "get_backend_config": plain(controller.get_backend_config),
        "list_backends": plain(controller.list_backends),
        "backend_status": plain(controller.backend_status),
        "list_endpoints": plain(controller.list_endpoints),
        "endpoint_exists": plain(controller.endpoint_exists),
    }


async def run_controller(worker: WorkerSpec, sock: socket.socket, stop: asyncio.Event) -> None:
    spec: ControllerSpec = worker.load_payload()
    runtime = LocalRuntime(worker.instance_dir, controller_address=sock.getsockname(),
                           sys_path=worker.sys_path, custom_resources=spec.custom_resources)
    controller = Controller(runtime, spec.http_options)

    def exit_now() -> None:
        # The driver died: take every worker down and leave no directory behind.
        runtime.kill_all_now()
        shutil.rmtree(worker.instance_dir, ignore_errors=True)

    parent_exit_hooks.append(exit_now)
    started: asyncio.Future = asyncio.get_running_loop().create_future()
    server = RpcServer(controller_handlers(controller, started, stop))
    await server.start(sock)
    try:
        await controller.start()
    except Exception as exc:
        started.set_exception(exc)
        await runtime.shutdown()
        await stop.wait()
        return
    started.set_result(None)
    await stop.wait()
    server.close()
    await controller.shutdown()
    shutil.rmtree(worker.instance_dir, ignore_errors=True)
