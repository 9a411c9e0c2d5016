"""Unit tests of what the controller learns of multiplexed models: a replica's health ping
answers with the models it holds, which ``status()`` shows and the long poll publishes to
routers (the FakeRuntime's replicas are real ``Replica`` objects in this process)."""

from __future__ import annotations

from typing import Any, List, Optional

from controller_helpers import eventually, replica_tags, running_controller, start_backend
from loop_helpers import run

import servekit as serve
from servekit._private import constants
from servekit._private.controller.controller import Controller


class Multiplexed:
    @serve.multiplexed(max_num_models_per_replica=1)
    async def get_model(self, model_id: str) -> str:
        return model_id.upper()

    async def __call__(self, request: Any) -> str:
        return await self.get_model(serve.get_multiplexed_model_id())


def models_in_status(controller: Controller, replica: str) -> Optional[List[str]]:
    return next(p["models"] for p in controller.status()["processes"] if p["name"] == replica)


def published(controller: Controller) -> Any:
    return controller.long_poll._values.get(constants.KEY_MODELS, (0, None))[1]


def test_a_replicas_models_reach_status_and_the_long_poll_and_follow_its_evictions() -> None:
    async def main() -> None:
        async with running_controller() as (controller, runtime):
            await start_backend(controller, "lora", Multiplexed, health_check_period_s=0.01)
            [replica] = replica_tags(controller, "lora")
            assert models_in_status(controller, replica) == []
            model = runtime.workers[replica].instance.get_model
            assert await model("a") == "A"
            await eventually(lambda: models_in_status(controller, replica) == ["a"],
                             "status to show model a")
            assert published(controller) == {"lora": {replica: ["a"]}}
            await model("b")  # the limit is 1: "a" is evicted
            await eventually(lambda: published(controller) == {"lora": {replica: ["b"]}},
                             "the long poll to publish that the replica holds b alone")
            assert models_in_status(controller, replica) == ["b"]

    run(main)
