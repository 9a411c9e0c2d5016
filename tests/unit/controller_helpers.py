"""What the controller's unit tests share: a model, a controller over the FakeRuntime that
is always shut down, and waits that poll a condition with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Callable, List, Optional, Tuple

import cloudpickle
import pytest
from fake_runtime import FakeRuntime

from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig
from servekit._private.controller.controller import Controller
from servekit._private.specs import HTTPSettings
from servekit.config import BackendConfig, HTTPOptions

TIMEOUT_S = 5.0


class Model:
    """A well-behaved class backend that records the user_configs it was given."""

    def __init__(self, name: str = "model") -> None:
        self.name = name
        self.user_configs: List[Any] = []

    def reconfigure(self, user_config: Any) -> None:
        self.user_configs.append(user_config)

    def __call__(self, request: Any) -> str:
        return self.name


def replica_config(target: Any, *init_args: Any) -> ReplicaConfig:
    return ReplicaConfig(cloudpickle.dumps((target, init_args)), {},
                         getattr(target, "__qualname__", repr(target)))


@contextlib.asynccontextmanager
async def running_controller(
        runtime: Optional[FakeRuntime] = None) -> AsyncIterator[Tuple[Controller, FakeRuntime]]:
    runtime = runtime if runtime is not None else FakeRuntime()
    controller = Controller(runtime, HTTPSettings.of(HTTPOptions(host=None)))
    await controller.start()
    try:
        yield controller, runtime
    finally:
        await controller.shutdown()


async def wait_goal(controller: Controller, goal: Optional[str]) -> None:
    if goal is not None:
        await asyncio.wait_for(controller.goals.wait(goal), TIMEOUT_S)


async def eventually(condition: Callable[[], Any], message: str,
                     timeout: float = TIMEOUT_S) -> Any:
    """Poll ``condition`` on the loop until it is truthy; fail the test after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"Timed out after {timeout}s waiting for {message}.")
        await asyncio.sleep(0.005)


async def start_backend(controller: Controller, tag: str, target: Any = Model,
                        *init_args: Any, wait: bool = True, **config: Any) -> Optional[str]:
    goal = await controller.create_backend(tag, replica_config(target, *init_args),
                                           BackendConfig(**config),
                                           BackendMetadata.inspect(target))
    if wait:
        await wait_goal(controller, goal)
    return goal


def replica_tags(controller: Controller, tag: str, *states: str) -> List[str]:
    """Tags of the backend's replicas (in ``states``, default any), oldest first."""
    backend = controller.backends[tag].state
    return [r.tag for r in backend.replicas.values() if not states or r.state in states]


def abandon(controller: Controller) -> None:
    """Make ``controller`` vanish as if its process were killed: its tasks stop, its
    workers (in the runtime) and its saved state stay."""
    for task in (controller._health_task, controller.proxies._task):
        if task is not None:
            task.cancel()
    for reconciler in controller.backends.values():
        reconciler.stop_autoscaling()
        for record in reconciler.state.replicas.values():
            record.cancel_tasks()
