"""Unit tests of ``@serve.multiplexed``: a replica's cache of models by id (no processes;
the requests are ``Admission``s made current in their tasks, as the replica does).

Loaders that must stay running wait on an event the test sets; ``spin`` lets queued work
run without time passing.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Dict, List

import pytest
from loop_helpers import run, spin

import servekit as serve
from servekit._private.context import current_request_id
from servekit._private.replica.admission import Admission, current_admission
from servekit._private.replica.multiplexed import held_model_ids
from servekit.exceptions import ServeError


class FakeModel:
    """A loaded model; records its cleanup (``aclose``)."""

    def __init__(self, model_id: str, closed: List[str]) -> None:
        self.model_id = model_id
        self._closed = closed

    async def aclose(self) -> None:
        self._closed.append(self.model_id)


class SyncClosedModel:
    """A model with a sync ``close``, which runs on a thread."""

    def __init__(self, model_id: str, closed: List[str]) -> None:
        self.model_id = model_id
        self._closed = closed

    def close(self) -> None:
        self._closed.append(f"{self.model_id} on {threading.current_thread().name}")


class Server:
    """A class backend whose loader records each load and can be held or made to fail."""

    def __init__(self, capacity: int = 2, sync_close: bool = False) -> None:
        self.loads: List[str] = []
        self.closed: List[str] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail: Dict[str, Exception] = {}
        self.sync_close = sync_close
        self.get_model = serve.multiplexed(max_num_models_per_replica=capacity)(self._load)

    async def _load(self, model_id: str) -> Any:
        self.loads.append(model_id)
        await self.release.wait()
        error = self.fail.pop(model_id, None)
        if error is not None:
            raise error
        kind = SyncClosedModel if self.sync_close else FakeModel
        return kind(model_id, self.closed)


class Request:
    """A request in flight on the replica: gets models in its own task, ends on ``end``."""

    def __init__(self) -> None:
        self.admission = Admission(lambda admission: None)

    def get(self, server: Server, model_id: str) -> "asyncio.Task[Any]":
        async def get() -> Any:
            current_admission.set(self.admission)
            return await server.get_model(model_id)
        return asyncio.ensure_future(get())

    def end(self) -> None:
        self.admission.finish()


async def served(server: Server, model_id: str) -> Any:
    """A whole request for ``model_id``: gets the model, then ends."""
    request = Request()
    model = await request.get(server, model_id)
    request.end()
    return model


def test_concurrent_first_requests_load_the_model_once_and_all_get_it() -> None:
    async def main() -> None:
        server = Server()
        server.release.clear()
        requests = [Request() for _ in range(5)]
        tasks = [r.get(server, "m") for r in requests]
        await spin()
        assert server.loads == ["m"] and not any(t.done() for t in tasks)
        assert held_model_ids() == ("m",)  # reported while it loads
        server.release.set()
        models = await asyncio.gather(*tasks)
        assert server.loads == ["m"]
        assert all(model is models[0] for model in models)
        assert (await served(server, "m")) is models[0]  # a hit: no load
        assert server.loads == ["m"]

    run(main)


def test_a_failed_load_fails_every_waiter_with_its_error_and_the_next_call_loads_again(
) -> None:
    async def main() -> None:
        server = Server()
        server.release.clear()
        server.fail["m"] = FileNotFoundError("no weights for m")
        tasks = [Request().get(server, "m") for _ in range(3)]
        await spin()
        server.release.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(e, FileNotFoundError) and "no weights for m" in str(e)
                   for e in outcomes)
        assert len({id(e) for e in outcomes}) == 3  # each request its own (notes apart)
        assert held_model_ids() == ()
        model = await served(server, "m")
        assert model.model_id == "m" and server.loads == ["m", "m"]

    run(main)


def test_beyond_the_limit_the_least_recently_used_model_is_evicted_and_closed() -> None:
    async def main() -> None:
        server = Server(capacity=2)
        for model_id in ("a", "b", "a", "c"):  # "a" used again: "b" is the oldest
            await served(server, model_id)
        await spin()
        assert server.closed == ["b"]
        assert held_model_ids() == ("a", "c")
        await served(server, "b")  # loaded again; "a" is the oldest now
        await spin()
        assert server.closed == ["b", "a"]
        assert server.loads == ["a", "b", "c", "b"]

    run(main)


def test_a_sync_close_runs_on_a_thread() -> None:
    async def main() -> None:
        server = Server(capacity=1, sync_close=True)
        await served(server, "a")
        await served(server, "b")
        for _ in range(100):
            if server.closed:
                break
            await asyncio.sleep(0.01)
        [closed] = server.closed
        assert closed.startswith("a on ") and threading.main_thread().name not in closed

    run(main)


def test_a_model_in_use_is_not_evicted_until_its_request_ends() -> None:
    async def main() -> None:
        server = Server(capacity=1)
        using = Request()
        await using.get(server, "a")
        await served(server, "b")  # over the limit, but "a" is in use: "b" goes
        await spin()
        assert server.closed == ["b"]
        assert held_model_ids() == ("a",)
        second = Request()
        await second.get(server, "c")  # "a" and "c" both in use: both stay
        await spin()
        assert held_model_ids() == ("a", "c")
        using.end()  # "a" is free and the oldest: evicted now
        await spin()
        assert server.closed == ["b", "a"] and held_model_ids() == ("c",)
        second.end()

    run(main)


def test_a_load_that_needs_room_waits_for_the_evicted_models_cleanup() -> None:
    async def main() -> None:
        closing = asyncio.Event()
        events: List[str] = []

        class SlowToClose:
            async def aclose(self) -> None:
                events.append("close started")
                await closing.wait()
                events.append("closed")

        @serve.multiplexed(max_num_models_per_replica=1)
        async def load(model_id: str) -> Any:
            events.append(f"load {model_id}")
            return SlowToClose()

        await load("a")
        task = asyncio.ensure_future(load("b"))
        await spin()
        assert events == ["load a", "close started"]
        closing.set()
        await task
        assert events == ["load a", "close started", "closed", "load b"]

    run(main)


@pytest.mark.parametrize("model_id, error", [("", ValueError), (3, TypeError)])
def test_a_bad_model_id_is_refused_with_a_hint(model_id: Any, error: type) -> None:
    @serve.multiplexed
    async def load(model_id: str) -> str:
        return model_id

    async def main() -> None:
        with pytest.raises(error, match="model id"):
            await load(model_id)

    run(main)


def test_the_loader_must_be_async_and_take_one_model_id() -> None:
    def sync_loader(model_id: str) -> None: ...

    async def two(a: str, b: str, c: str) -> None: ...

    with pytest.raises(TypeError, match="async def"):
        serve.multiplexed(sync_loader)
    with pytest.raises(TypeError, match="one argument"):
        serve.multiplexed(two)
    with pytest.raises(ValueError, match="max_num_models_per_replica"):
        serve.multiplexed(max_num_models_per_replica=0)
    with pytest.raises(TypeError, match="max_num_models_per_replica"):
        serve.multiplexed(max_num_models_per_replica="3")


def test_get_multiplexed_model_id_outside_a_backend_is_a_serve_error() -> None:
    with pytest.raises(ServeError, match="get_multiplexed_model_id"):
        serve.get_multiplexed_model_id()


class Backend:
    """The loader as users write it: a method, with the cache on each instance."""

    def __init__(self) -> None:
        self.loads: List[str] = []

    @serve.multiplexed(max_num_models_per_replica=1)
    async def get_model(self, model_id: str) -> str:
        self.loads.append(model_id)
        return model_id.upper()


def test_a_decorated_method_keeps_a_cache_per_instance() -> None:
    async def main() -> None:
        first, second = Backend(), Backend()
        assert await first.get_model("m") == "M"
        assert await first.get_model("m") == "M"
        assert await second.get_model("m") == "M"
        assert first.loads == second.loads == ["m"]

    run(main)


def test_a_load_runs_in_no_single_requests_context() -> None:
    """The load serves every request that waits for it: the first one's request id and
    place are not its own."""
    seen: List[Any] = []

    @serve.multiplexed
    async def load(model_id: str) -> str:
        seen.append((current_request_id.get(), current_admission.get()))
        return model_id

    async def main() -> None:
        current_request_id.set("first")
        current_admission.set(Admission(lambda admission: None))
        assert await load("m") == "m"
        assert seen == [(None, None)]

    run(main)
