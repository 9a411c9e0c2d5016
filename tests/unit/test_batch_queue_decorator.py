"""Unit tests of ``@serve.batch``: callers pass one item each, the decorated function runs
on lists of them (no processes; the replica's side is ``current_admission``).

Each test runs one event loop with ``asyncio.run``; batch functions that must stay running
wait on an event the test sets, and ``spin`` lets queued work run without time passing.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, List

import pytest
from loop_helpers import run, spin

import servekit as serve
from servekit._private.config_checks import validate_backend_against_config
from servekit._private.controller.durable import _metadata, _unmetadata
from servekit._private.replica.admission import CANCELLING, ENDED, Admission, current_admission
from servekit.config import BackendConfig, BackendMetadata
from servekit.exceptions import BatchOutputError, ServeError


class Model:
    """A batched method that records its batches and can be held running."""

    def __init__(self, name: str = "model") -> None:
        self.name = name
        self.batches: List[List[Any]] = []
        self.release = asyncio.Event()
        self.release.set()

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=0)
    async def score(self, items: List[Any]) -> List[Any]:
        self.batches.append(list(items))
        await self.release.wait()
        if "bad" in items:
            raise ValueError(f"cannot score {items}")
        if "short" in items:
            return items[:-1]
        if "scalar" in items:
            return 42  # type: ignore[return-value]
        return [f"{self.name}:{item}" for item in items]


def test_each_caller_gets_its_own_result_from_batches_of_at_most_max_size() -> None:
    async def main() -> None:
        model = Model()
        model.release.clear()
        calls = [asyncio.ensure_future(model.score(i)) for i in range(7)]
        await spin()
        model.release.set()
        assert await asyncio.gather(*calls) == [f"model:{i}" for i in range(7)]
        # All came before the first batch formed: full batches, in arrival order.
        assert model.batches == [[0, 1, 2], [3, 4, 5], [6]]

    run(main)


def test_a_plain_function_batches_too() -> None:
    sizes: List[int] = []

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=60)
    async def double(items: List[int]) -> List[int]:
        sizes.append(len(items))
        return [item * 2 for item in items]

    async def main() -> None:
        sizes.clear()
        assert await asyncio.gather(*(double(i) for i in range(8))) == \
            [0, 2, 4, 6, 8, 10, 12, 14]
        assert sizes == [4, 4]  # full batches start at once, whatever the timeout

    run(main)
    run(main)  # a new event loop gets a new queue


def test_a_batch_that_is_not_full_waits_its_timeout_then_runs() -> None:
    sizes: List[int] = []

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def echo(items: List[int]) -> List[int]:
        sizes.append(len(items))
        return items

    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(echo(1))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(echo(2))
        assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [1, 2]
        assert loop.time() - started >= 0.045
        assert sizes == [2]  # the second joined the first's batch while it waited

    run(main)


def test_batches_are_per_instance() -> None:
    async def main() -> None:
        one, two = Model("one"), Model("two")
        results = await asyncio.gather(one.score(1), two.score(2), one.score(3))
        assert results == ["one:1", "two:2", "one:3"]
        assert one.batches == [[1], [3]] or one.batches == [[1, 3]]
        assert two.batches == [[2]]

    run(main)


def test_an_override_and_the_method_it_overrides_have_queues_of_their_own() -> None:
    class Base:
        @serve.batch(max_batch_size=4, batch_wait_timeout_s=0)
        async def run(self, items: List[str]) -> List[str]:
            return [f"base({item})" for item in items]

    class Child(Base):
        @serve.batch(max_batch_size=4, batch_wait_timeout_s=0)
        async def run(self, items: List[str]) -> List[str]:
            return list(await asyncio.gather(*(Base.run(self, f"child({item})")
                                               for item in items)))

    async def main() -> None:
        child = Child()
        results = await asyncio.wait_for(asyncio.gather(child.run("a"), child.run("b")), 5)
        assert results == ["base(child(a))", "base(child(b))"]

    run(main)


def test_an_exception_fails_every_caller_of_its_batch_only() -> None:
    async def main() -> None:
        model = Model()
        model.release.clear()
        first = asyncio.ensure_future(model.score(0))
        await spin()
        failing = [asyncio.ensure_future(model.score(x)) for x in (1, "bad", 3)]
        passing = asyncio.ensure_future(model.score(4))
        await spin()
        model.release.set()
        assert await first == "model:0"
        for call in failing:
            with pytest.raises(ValueError, match="cannot score"):
                await call
        assert await passing == "model:4"

    run(main)


@pytest.mark.parametrize("poison, message", [
    ("short", r"Model\.score must return one result per request: it got 2 requests but "
              r"returned 1 results"),
    ("scalar", r"Model\.score must return an ordered sequence .* it returned a int"),
])
def test_a_wrong_output_fails_its_batch_with_an_error_naming_it(poison: str,
                                                                message: str) -> None:
    async def main() -> None:
        model = Model()
        model.release.clear()
        first = asyncio.ensure_future(model.score(0))
        await spin()
        calls = [asyncio.ensure_future(model.score(x)) for x in (1, poison)]
        await spin()
        model.release.set()
        await first
        for call in calls:
            with pytest.raises(BatchOutputError, match=message):
                await call
        assert await model.score(5) == "model:5"  # batching goes on

    run(main)


def test_a_caller_that_leaves_before_its_batch_starts_is_taken_out() -> None:
    async def main() -> None:
        model = Model()
        model.release.clear()
        first = asyncio.ensure_future(model.score(0))
        await spin()
        gone = asyncio.ensure_future(model.score("gone"))
        kept = [asyncio.ensure_future(model.score(x)) for x in (1, 2, 3)]
        await spin()
        gone.cancel()
        await spin()
        assert gone.cancelled()
        model.release.set()
        assert await asyncio.gather(*kept) == ["model:1", "model:2", "model:3"]
        await first
        # It never ran, and did not take a place in the next batch: 1, 2, 3 filled it.
        assert model.batches == [[0], [1, 2, 3]]

    run(main)


def test_a_caller_whose_batch_runs_holds_its_place_until_the_batch_ends() -> None:
    """The caller's task ends only once its batch has ended, however often it is
    cancelled meanwhile; its admission is marked cancelled, and the others of the batch
    get their results."""

    async def main() -> None:
        model = Model()
        model.release.clear()
        released: List[Admission] = []

        async def caller(item: Any) -> Any:
            admission = Admission(released.append)
            current_admission.set(admission)
            try:
                return await model.score(item)
            finally:
                admission.finish()

        leaving = asyncio.ensure_future(caller("left"))
        staying = asyncio.ensure_future(caller("stayed"))
        await spin()
        assert model.batches == [["left", "stayed"]] or model.batches == [["left"]]
        leaving.cancel()
        await spin()
        leaving.cancel()  # a second cancellation (its connection lost too)
        await spin()
        assert not leaving.done() and released == []
        model.release.set()
        assert await staying == "model:stayed"
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert [a.state for a in released] == [ENDED, ENDED]

    run(main)


def test_a_cancelled_caller_in_a_running_batch_is_marked_cancelling() -> None:
    async def main() -> None:
        model = Model()
        model.release.clear()
        admission = Admission(lambda _: None)

        async def caller() -> Any:
            current_admission.set(admission)
            return await model.score(1)

        task = asyncio.ensure_future(caller())
        await spin()
        task.cancel()
        await spin()
        assert admission.state == CANCELLING
        model.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main)


def test_user_code_raising_beyond_exception_fails_its_batch_and_batching_goes_on() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0)
    async def exits(items: List[str]) -> List[str]:
        if "exit" in items:
            raise SystemExit(3)
        return items

    async def main() -> None:
        with pytest.raises(ServeError, match=r"exits raised SystemExit\(3\)"):
            await exits("exit")
        assert await exits("fine") == "fine"

    run(main)


def test_the_settings_change_at_runtime_from_the_next_batch() -> None:
    sizes: List[int] = []

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0)
    async def echo(items: List[int]) -> List[int]:
        sizes.append(len(items))
        return items

    async def main() -> None:
        echo.set_max_batch_size(5)
        echo.set_batch_wait_timeout_s(60)
        assert (echo._get_max_batch_size(), echo._get_batch_wait_timeout_s()) == (5, 60.0)
        assert await asyncio.gather(*(echo(i) for i in range(5))) == [0, 1, 2, 3, 4]
        assert sizes == [5]
        with pytest.raises(ValueError, match="max_batch_size must be an int >= 1, got 0"):
            echo.set_max_batch_size(0)
        with pytest.raises(TypeError, match="batch_wait_timeout_s must be a number"):
            echo.set_batch_wait_timeout_s("1")
        assert echo._get_max_batch_size() == 5

    run(main)


@pytest.mark.parametrize("settings, error, message", [
    ({"max_batch_size": 0}, ValueError, "max_batch_size must be an int >= 1, got 0"),
    ({"max_batch_size": 2.0}, TypeError, r"max_batch_size must be an int >= 1, got 2\.0"),
    ({"max_batch_size": True}, TypeError, "max_batch_size must be an int >= 1, got True"),
    ({"batch_wait_timeout_s": -0.1}, ValueError, "got -0.1"),
    ({"batch_wait_timeout_s": math.nan}, ValueError, "finite number of seconds >= 0"),
    ({"batch_wait_timeout_s": "0.1"}, TypeError, "batch_wait_timeout_s must be a number"),
])
def test_bad_settings_are_refused_at_decoration(settings: dict, error: type,
                                                message: str) -> None:
    with pytest.raises(error, match=message):
        serve.batch(**settings)


def test_bad_functions_are_refused_at_decoration() -> None:
    with pytest.raises(TypeError, match="needs an `async def` function"):
        @serve.batch
        def sync(items: List[int]) -> List[int]:
            return items

    with pytest.raises(TypeError, match=r"takes \['self', 'items', 'more'\]"):
        @serve.batch
        async def three(self: Any, items: List[int], more: int) -> List[int]:
            return items

    with pytest.raises(TypeError, match="takes its settings by name"):
        serve.batch(8)  # type: ignore[arg-type]


def test_a_call_with_other_than_one_item_is_a_type_error() -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match="call it with one item .* given 2 arguments"):
            await Model().score(1, 2)  # type: ignore[call-arg]

    run(main)


def test_request_timeout_must_exceed_the_batch_wait() -> None:
    class Slow:
        @serve.batch(batch_wait_timeout_s=2)
        async def predict(self, items: List[int]) -> List[int]:
            return items

    metadata = BackendMetadata.inspect(Slow)
    assert metadata.batch_wait_timeout_s == 2.0
    validate_backend_against_config(metadata, BackendConfig(request_timeout_s=2.5))
    with pytest.raises(ValueError, match=r"request_timeout_s is 2(\.0)? but a @serve.batch "
                                         r"function of the backend Slow waits up to "
                                         r"batch_wait_timeout_s=2\.0"):
        validate_backend_against_config(metadata, BackendConfig(request_timeout_s=2))
    # The controller keeps it across a restart.
    assert _unmetadata(_metadata(metadata), "test") == metadata


def test_the_batch_runs_in_a_context_of_its_own() -> None:
    """A batch serves many callers: it does not see the first caller's request id or
    admission."""
    seen: List[Any] = []

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0)
    async def look(items: List[int]) -> List[int]:
        seen.append(current_admission.get())
        return items

    async def main() -> None:
        current_admission.set(Admission(lambda _: None))
        assert await look(1) == 1
        assert seen == [None]

    run(main)


# --------------------------------------------------------------------------- streamed


class Generator:
    """A batched async generator: yields ``steps`` lists, element ``f"{item}.{step}"`` for
    each caller; an item "stop@1" ends its caller's stream at step 1 (Ray's sentinel),
    "bad@1" raises at step 1, "short" yields a list one short. Each step waits for
    ``step`` to be set when ``held``."""

    def __init__(self, steps: int = 3, held: bool = False) -> None:
        self.steps = steps
        self.batches: List[List[Any]] = []
        self.yielded = 0
        self.closed = 0
        self.step = asyncio.Event()
        if not held:
            self.step.set()

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=0)
    async def generate(self, items: List[str]):  # type: ignore[no-untyped-def]
        self.batches.append(list(items))
        try:
            for step in range(self.steps):
                await self.step.wait()
                await asyncio.sleep(0)  # (a step of work: its readers run meanwhile)
                if f"bad@{step}" in items:
                    raise ValueError(f"step {step} failed")
                out: List[Any] = [StopIteration if item == f"stop@{step}" else
                                  f"{item}.{step}" for item in items]
                self.yielded += 1
                yield out[:-1] if "short" in items else out
        finally:
            self.closed += 1


async def read_all(stream: Any) -> List[Any]:
    return [element async for element in stream]


def test_a_streamed_batch_gives_each_caller_its_elements_in_order() -> None:
    async def main() -> None:
        model = Generator()
        results = await asyncio.gather(*(read_all(model.generate(x)) for x in
                                         ("a", "stop@1", "c", "d")))
        assert results == [["a.0", "a.1", "a.2"], ["stop@1.0"], ["c.0", "c.1", "c.2"],
                           ["d.0", "d.1", "d.2"]]
        assert model.batches == [["a", "stop@1", "c"], ["d"]]

    run(main)


def test_a_streamed_batch_that_raises_fails_its_callers_after_what_they_got() -> None:
    async def main() -> None:
        model = Generator()
        got: List[List[str]] = [[], []]

        async def read(index: int, item: str) -> None:
            async for element in model.generate(item):
                got[index].append(element)

        outcomes = await asyncio.gather(read(0, "a"), read(1, "bad@1"),
                                        return_exceptions=True)
        assert [str(outcome) for outcome in outcomes] == ["step 1 failed"] * 2
        assert got == [["a.0"], ["bad@1.0"]]
        with pytest.raises(BatchOutputError, match=r"Generator\.generate must yield one "
                                                   r"result per request: it got 2 requests "
                                                   r"but yielded 1 results"):
            await asyncio.gather(read_all(model.generate("x")),
                                 read_all(model.generate("short")))

    run(main)


def test_a_caller_that_stops_reading_is_dropped_and_the_rest_read_on() -> None:
    async def main() -> None:
        model = Generator(steps=50)
        leaving = model.generate("a")
        staying = model.generate("b")
        first = await asyncio.gather(leaving.__anext__(), staying.__anext__())
        assert first == ["a.0", "b.0"]
        closing = asyncio.ensure_future(leaving.aclose())  # holds until the batch ends
        rest = await read_all(staying)
        assert rest == [f"b.{step}" for step in range(1, 50)]
        await closing
        # When every caller has stopped reading, the generator is closed early.
        lone = model.generate("c")
        assert await lone.__anext__() == "c.0"
        await lone.aclose()
        assert model.yielded < 50 + 5 and model.closed == 2

    run(main)


def test_a_streamed_caller_that_leaves_before_its_batch_starts_is_taken_out() -> None:
    async def main() -> None:
        model = Generator(held=True)
        first = asyncio.ensure_future(read_all(model.generate("a")))
        await spin()
        gone = asyncio.ensure_future(read_all(model.generate("gone")))
        kept = asyncio.ensure_future(read_all(model.generate("b")))
        await spin()
        gone.cancel()
        await spin()
        assert gone.cancelled()
        model.step.set()
        assert await first == ["a.0", "a.1", "a.2"]
        assert await kept == ["b.0", "b.1", "b.2"]
        assert model.batches == [["a"], ["b"]]

    run(main)


def test_a_streamed_caller_cancelled_mid_batch_holds_its_place_until_it_ends() -> None:
    async def main() -> None:
        model = Generator(held=True)
        admission = Admission(lambda _: None)

        async def caller() -> List[Any]:
            current_admission.set(admission)
            return await read_all(model.generate("a"))

        leaving = asyncio.ensure_future(caller())
        staying = asyncio.ensure_future(read_all(model.generate("b")))
        await spin()
        leaving.cancel()
        await spin()
        assert not leaving.done() and admission.state == CANCELLING
        model.step.set()
        assert await staying == ["b.0", "b.1", "b.2"]
        with pytest.raises(asyncio.CancelledError):
            await leaving

    run(main)
