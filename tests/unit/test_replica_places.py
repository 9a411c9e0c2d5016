"""Unit tests of a real ``Replica`` in this process: a request keeps its place on the replica
(counted against ``max_concurrent_queries``) until the user's work for it stops, also when
its caller leaves while the batch it is part of runs; the model id a request sees."""

from __future__ import annotations

import asyncio
from typing import Any, List

import cloudpickle
from loop_helpers import run, spin

import servekit as serve
from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig
from servekit._private.context import MODEL_ID_HEADER, current_model_id
from servekit._private.replica.replica import Replica
from servekit._private.specs import ReplicaSpec
from servekit.config import BackendConfig


class HeldBatches:
    """A batched model whose batches run until the test sets ``release``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    @serve.accept_batch
    async def __call__(self, requests: List[Any]) -> List[int]:
        await self.release.wait()
        return [1] * len(requests)


async def started_replica(target: Any, **config: Any) -> Replica:
    replica_config = ReplicaConfig(cloudpickle.dumps((target, ())), {}, "test")
    replica = Replica(ReplicaSpec("b", "b#1", replica_config,
                                  BackendConfig(**config).replica_settings(),
                                  BackendMetadata.inspect(target)))
    replica.start()
    await replica.ready()
    return replica


def call(replica: Replica, value: int) -> asyncio.Task:
    return asyncio.ensure_future(replica.handle_call(None, (value,), {}, "GET", {}))


def test_a_caller_leaving_a_running_batch_keeps_its_place_until_the_batch_ends() -> None:
    async def main() -> None:
        replica = await started_replica(HeldBatches, max_batch_size=2,
                                        batch_wait_timeout=30.0, max_concurrent_queries=2)
        try:
            first, second = call(replica, 1), call(replica, 2)
            await spin()  # both admitted; the batch of two runs
            first.cancel()
            await spin()
            assert replica._in_flight == 2  # the batch still computes for the first
            replica._callable.release.set()
            assert await second == 1
            await asyncio.gather(first, return_exceptions=True)
            assert replica._in_flight == 0
        finally:
            replica._callable.release.set()
            replica.close()

    run(main)


def test_a_second_cancellation_does_not_give_a_running_batchs_place_back() -> None:
    """The caller leaves (a cancel), then its connection drops (a second cancel) while the
    batch it is part of still runs: its place is held until the batch ends all the same."""
    async def main() -> None:
        replica = await started_replica(HeldBatches, max_batch_size=2,
                                        batch_wait_timeout=30.0, max_concurrent_queries=2)
        try:
            first, second = call(replica, 1), call(replica, 2)
            await spin()  # both admitted; the batch of two runs
            first.cancel()
            await spin()
            first.cancel()  # the connection is lost too
            await spin()
            assert not first.done() and replica._in_flight == 2
            replica._callable.release.set()
            assert await second == 1
            await asyncio.gather(first, return_exceptions=True)
            assert first.cancelled() and replica._in_flight == 0
        finally:
            replica._callable.release.set()
            replica.close()

    run(main)


def test_a_caller_leaving_before_its_batch_starts_frees_its_place_at_once() -> None:
    async def main() -> None:
        replica = await started_replica(HeldBatches, max_batch_size=2,
                                        batch_wait_timeout=30.0, max_concurrent_queries=2)
        try:
            waiting = call(replica, 1)  # waits for a second request to fill its batch
            await spin()
            assert replica._in_flight == 1
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            assert replica._in_flight == 0  # it never ran, and never will
        finally:
            replica._callable.release.set()
            replica.close()

    run(main)


class PickyConfig:
    """A model whose ``reconfigure`` refuses a user_config until it is told to accept it."""

    def __init__(self) -> None:
        self.seen: List[Any] = []
        self.accept = False

    def reconfigure(self, user_config: Any) -> None:
        self.seen.append(user_config)
        if not self.accept:
            raise ValueError(f"cannot take {user_config!r}")

    async def __call__(self, request: Any) -> int:
        return 1


def test_a_refused_reconfigure_leaves_the_config_it_runs_with_so_a_retry_calls_it_again(
        ) -> None:
    async def main() -> None:
        replica = await started_replica(PickyConfig)
        try:
            new = BackendConfig(user_config={"v": 2}).replica_settings()
            try:
                await replica.update_config(new)
            except ValueError:
                pass
            else:
                raise AssertionError("reconfigure's refusal was not raised")
            assert replica.config.user_config is None
            replica._callable.accept = True
            await replica.update_config(new)
            assert replica._callable.seen == [{"v": 2}, {"v": 2}]
            assert replica.config.user_config == {"v": 2}
        finally:
            replica.close()

    run(main)


async def model_id_of(request: Any) -> str:
    return current_model_id.get()  # (what serve.get_multiplexed_model_id() gives)


def test_a_request_naming_no_model_sees_none_whatever_context_it_was_dispatched_from(
        ) -> None:
    """A request's task copies the context it is started from; one that names no model
    gets "" even if that context held another request's model id."""
    async def main() -> None:
        replica = await started_replica(model_id_of)
        try:
            named = await replica.handle_call(None, (1,), {}, "GET",
                                              {MODEL_ID_HEADER: "m1"})
            current_model_id.set("m1")  # (a stale id where the next task is started)
            unnamed = await asyncio.ensure_future(
                replica.handle_call(None, (2,), {}, "GET", {}))
            assert (named, unnamed) == ("m1", "")
        finally:
            replica.close()

    run(main)
