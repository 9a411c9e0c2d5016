"""Unit tests of the replica's ``CallGate`` (user calls together, ``reconfigure`` alone) and
of ``user_code`` (what user code raises beyond ``Exception`` fails only its request).

Sections are coroutines that record when they enter and leave and hold until the test lets
them go; ``spin`` lets tasks run without letting time pass.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Dict, List, Set

import pytest
from loop_helpers import run, spin

from servekit._private.replica.replica import CallGate, user_code
from servekit.exceptions import ServeError


class Sections:
    """Starts shared and exclusive sections on a gate; each holds until released."""

    def __init__(self, gate: CallGate) -> None:
        self.gate = gate
        self.log: List[str] = []
        self.inside: List[str] = []
        self._release: Dict[str, asyncio.Event] = {}
        self.passing_names: Set[str] = set()  # sections that hold nothing

    def _hold(self, name: str) -> asyncio.Event:
        event = self._release[name] = asyncio.Event()
        return event

    async def _body(self, name: str, event: asyncio.Event) -> None:
        self.log.append(f"enter {name}")
        self.inside.append(name)
        try:
            await event.wait()
        finally:
            self.inside.remove(name)
            self.log.append(f"leave {name}")

    def shared(self, name: str) -> asyncio.Task:
        event = self._hold(name)

        async def section() -> None:  # as Replica._call runs a user call
            if not self.gate.enter():
                await self.gate.enter_when_open()
            try:
                await self._body(name, event)
            finally:
                self.gate.leave()

        return asyncio.ensure_future(section())

    def passing(self, name: str) -> asyncio.Task:
        """A section that starts once the gate is open but holds nothing (an ASGI app's
        request or WebSocket)."""
        event = self._hold(name)
        self.passing_names.add(name)

        async def section() -> None:
            await self.gate.pass_through()
            await self._body(name, event)

        return asyncio.ensure_future(section())

    def exclusive(self, name: str) -> asyncio.Task:
        event = self._hold(name)

        async def section() -> None:
            async with self.gate.exclusive():
                alongside = [n for n in self.inside if n not in self.passing_names]
                assert alongside == [], f"{name} ran alongside {alongside}"
                await self._body(name, event)

        return asyncio.ensure_future(section())

    def release(self, name: str) -> None:
        self._release[name].set()

    def entered(self) -> List[str]:
        return [entry.split()[1] for entry in self.log if entry.startswith("enter")]


# --------------------------------------------------------------------------- CallGate


def test_shared_sections_run_together() -> None:
    """User calls do not wait for one another."""

    async def main() -> None:
        sections = Sections(CallGate())
        tasks = [sections.shared(f"s{i}") for i in range(3)]
        await spin()
        assert sorted(sections.inside) == ["s0", "s1", "s2"]
        for i in range(3):
            sections.release(f"s{i}")
        await asyncio.gather(*tasks)

    run(main)


def test_exclusive_waits_for_running_shared_sections_to_end() -> None:
    """``reconfigure`` starts only once every user call that was running has ended."""

    async def main() -> None:
        sections = Sections(CallGate())
        shared = [sections.shared("s1"), sections.shared("s2")]
        await spin()
        exclusive = sections.exclusive("x")
        await spin()
        assert "x" not in sections.entered()
        sections.release("s1")
        await spin()
        assert "x" not in sections.entered()
        sections.release("s2")
        await spin()
        assert sections.inside == ["x"]
        sections.release("x")
        await asyncio.gather(*shared, exclusive)

    run(main)


def test_a_passing_section_never_makes_an_exclusive_one_wait_but_waits_for_it() -> None:
    """A WebSocket open for hours does not hold ``reconfigure`` back (nor, behind it, new
    calls); one that arrives while ``reconfigure`` runs starts after it."""

    async def main() -> None:
        sections = Sections(CallGate())
        socket = sections.passing("ws1")
        await spin()
        exclusive = sections.exclusive("x")
        await spin()
        assert sorted(sections.inside) == ["ws1", "x"]
        late = sections.passing("ws2")
        await spin()
        assert "ws2" not in sections.entered()
        sections.release("x")
        await spin()
        assert sorted(sections.inside) == ["ws1", "ws2"]
        sections.release("ws1")
        sections.release("ws2")
        await asyncio.gather(socket, exclusive, late)

    run(main)


def test_shared_sections_arriving_while_exclusive_waits_are_held_back() -> None:
    """User calls that arrive while ``reconfigure`` waits run only after it has finished,
    and then all together."""

    async def main() -> None:
        sections = Sections(CallGate())
        first = sections.shared("s1")
        await spin()
        exclusive = sections.exclusive("x")
        await spin()
        late = [sections.shared("late1"), sections.shared("late2")]
        await spin()
        assert sections.inside == ["s1"]
        sections.release("s1")
        await spin()
        assert sections.inside == ["x"]
        sections.release("x")
        await spin()
        assert sorted(sections.inside) == ["late1", "late2"]
        assert sections.entered() == ["s1", "x", "late1", "late2"]
        sections.release("late1")
        sections.release("late2")
        await asyncio.gather(first, exclusive, *late)

    run(main)


def test_exclusive_is_not_starved_by_a_steady_stream_of_shared_sections() -> None:
    """Under a constant load of overlapping user calls, ``reconfigure`` still runs as soon
    as the calls that were running when it arrived have ended."""

    async def main() -> None:
        sections = Sections(CallGate())
        tasks = [sections.shared("s0")]
        await spin()
        exclusive = sections.exclusive("x")
        for i in range(1, 20):
            tasks.append(sections.shared(f"s{i}"))  # a new call arrives...
            await spin(3)
            sections.release(f"s{i - 1}")  # ...before the previous one ends
            await spin(3)
        assert sections.entered()[:2] == ["s0", "x"], sections.log
        assert sections.inside == ["x"]
        sections.release("x")
        await spin()
        assert sorted(sections.inside) == ["s19"]
        sections.release("s19")
        await asyncio.gather(exclusive, *tasks)

    run(main)


def test_exclusive_sections_run_one_at_a_time() -> None:
    """Two ``reconfigure`` calls never overlap; user calls wait for both."""

    async def main() -> None:
        sections = Sections(CallGate())
        first, second = sections.exclusive("x1"), sections.exclusive("x2")
        await spin()
        late = sections.shared("s")
        await spin()
        assert sections.inside == ["x1"]
        sections.release("x1")
        await spin()
        assert sections.inside == ["x2"]
        sections.release("x2")
        await spin()
        assert sections.inside == ["s"]
        sections.release("s")
        await asyncio.gather(first, second, late)

    run(main)


def test_failed_or_cancelled_exclusive_reopens_the_gate() -> None:
    """A ``reconfigure`` that raises, or is cancelled while it waits, lets held-back user
    calls run."""

    async def main() -> None:
        gate = CallGate()
        with pytest.raises(ValueError):
            async with gate.exclusive():
                raise ValueError("bad user_config")
        sections = Sections(gate)
        busy = sections.shared("s1")
        await spin()
        waiting = sections.exclusive("x")
        await spin()
        held = sections.shared("s2")
        await spin()
        waiting.cancel()
        await spin()
        assert sorted(sections.inside) == ["s1", "s2"]
        assert waiting.cancelled()
        sections.release("s1")
        sections.release("s2")
        await asyncio.gather(busy, held)

    run(main)


# --------------------------------------------------------------------------- user_code


def raised_by(body: Callable[[], Any]) -> BaseException:
    """What ``body`` raised; catching BaseException keeps a KeyboardInterrupt that got
    through from stopping the test run."""
    try:
        body()
    except BaseException as exc:
        return exc
    pytest.fail("nothing was raised")


def in_user_code(exc: BaseException) -> Callable[[], None]:
    def body() -> None:
        with user_code("clf"):
            raise exc

    return body


@pytest.mark.parametrize("exc, name", [
    (SystemExit(3), "SystemExit(3)"),
    (KeyboardInterrupt(), "KeyboardInterrupt()"),
    (GeneratorExit(), "GeneratorExit()"),
])
def test_user_base_exceptions_become_a_serve_error_naming_them(exc: BaseException,
                                                               name: str) -> None:
    """``SystemExit``, ``KeyboardInterrupt`` and the like raised by user code fail only the
    request, with a ServeError naming the backend and what was raised."""
    error = raised_by(in_user_code(exc))
    assert isinstance(error, ServeError), repr(error)
    assert f"Backend 'clf' raised {name}" in str(error)
    assert error.__cause__ is exc


def test_user_exceptions_pass_through_unchanged() -> None:
    """An ordinary exception from user code reaches the caller as itself."""
    exc = ValueError("bad input")
    assert raised_by(in_user_code(exc)) is exc


def test_user_cancelled_error_on_the_loop_becomes_a_serve_error() -> None:
    """A ``CancelledError`` that user code raises itself, in a request nobody cancelled,
    fails that request with a ServeError naming it (the replica keeps serving)."""

    async def request() -> None:
        with user_code("clf"):
            raise asyncio.CancelledError("user code gave up")

    async def main() -> None:
        task = asyncio.ensure_future(request())
        await spin()
        assert not task.cancelled()
        error = task.exception()
        assert isinstance(error, ServeError)
        assert "CancelledError(user code gave up)" in str(error)

    run(main)


def test_real_cancellation_passes_through_user_code() -> None:
    """A request cancelled from outside (its caller went away) is cancelled, not turned
    into a ServeError."""

    async def main() -> None:
        started = asyncio.Event()

        async def request() -> None:
            with user_code("clf"):
                started.set()
                await asyncio.Event().wait()

        task = asyncio.ensure_future(request())
        await started.wait()
        task.cancel()
        await spin()
        assert task.cancelled()

    run(main)


def test_user_cancelled_error_off_the_loop_becomes_a_serve_error() -> None:
    """A constructor or ``reconfigure`` runs on a thread with no event loop; a
    ``CancelledError`` it raises must still become a ServeError naming it.

    Caught a bug of 4b86c1b (fixed in 35aa21e): ``_cancelled_by_servekit`` called
    ``asyncio.current_task()``, which raises ``RuntimeError: no running event loop`` there,
    so the user's error became that RuntimeError."""
    box: List[BaseException] = []

    def constructor_thread() -> None:
        box.append(raised_by(in_user_code(asyncio.CancelledError("download cancelled"))))

    thread = threading.Thread(target=constructor_thread)
    thread.start()
    thread.join()
    [error] = box
    assert isinstance(error, ServeError), repr(error)
    assert "CancelledError(download cancelled)" in str(error)
