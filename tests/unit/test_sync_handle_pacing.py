"""Unit tests of a sync handle's pacing: ``remote()`` returns at once while placements find
room, and waits for its own placement otherwise.

The handle runs on servekit's real background loop; its router is a fake whose
``place`` says where each call got to (placed with room, queued, or an error), and the
loop can be held still by a callback that waits on an event.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, List, Optional

import pytest

from servekit._private.event_loop import background_loop
from servekit._private.routing.routed_request import QUEUED, SENT
from servekit.exceptions import EndpointNotFoundError
from servekit.handle import _AHEAD_LIMIT, ServeSyncHandle, routers

TIMEOUT = 5.0


class FakeRequest:
    def __init__(self, state: str) -> None:
        self.state = state
        self.reply: asyncio.Future = asyncio.get_running_loop().create_future()
        self.placed = asyncio.get_running_loop().create_future()

    async def written(self) -> None:
        await self.placed


class FakeRouter:
    """Places calls as ``outcome`` says: SENT (room), QUEUED (no room), or an error."""

    def __init__(self) -> None:
        self.outcome: Any = SENT
        self.requests: List[FakeRequest] = []
        self.payloads: List[bytes] = []

    def place(self, endpoint: str, kind: str, shard_key: Optional[str], payload: bytes,
              **options: Any) -> FakeRequest:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        request = FakeRequest(self.outcome)
        self.requests.append(request)
        self.payloads.append(payload)
        return request


@pytest.fixture
def handle_and_router():
    loop = background_loop()
    address = f"fake-controller-{id(object())}"
    router = FakeRouter()
    started = concurrent.futures.Future()

    def install() -> None:
        future = loop.create_future()
        future.set_result(router)
        routers._routers[(address, id(loop))] = future
        started.set_result(None)

    loop.call_soon_threadsafe(install)
    started.result(TIMEOUT)
    yield ServeSyncHandle(address, "endpoint"), router, loop
    with routers._lock:
        routers._routers.pop((address, id(loop)), None)


def on_loop(loop: asyncio.AbstractEventLoop, function: Any) -> Any:
    """Run ``function`` on ``loop`` and return its result."""
    async def call() -> Any:
        return function()
    return asyncio.run_coroutine_threadsafe(call(), loop).result(TIMEOUT)


class HeldLoop:
    """Holds the loop still (a callback waiting on an event) until ``release``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.holding = threading.Event()
        self.released = threading.Event()
        loop.call_soon_threadsafe(self._hold)
        assert self.holding.wait(TIMEOUT)

    def _hold(self) -> None:
        self.holding.set()
        self.released.wait(TIMEOUT)

    def release(self) -> None:
        self.released.set()


def test_the_first_call_waits_for_its_placement_and_raises_its_error(handle_and_router):
    handle, router, loop = handle_and_router
    router.outcome = EndpointNotFoundError("no endpoint 'endpoint'")
    with pytest.raises(EndpointNotFoundError):
        handle.remote(1)


def test_calls_go_ahead_of_a_held_loop_while_there_was_room_up_to_the_limit(
        handle_and_router):
    handle, router, loop = handle_and_router
    first = handle.remote(0)  # waits: nothing was placed yet
    on_loop(loop, lambda: router.requests[0].reply.set_result("r0"))
    assert first.result(TIMEOUT) == "r0"
    held = HeldLoop(loop)
    returned: List[Any] = []

    def caller() -> None:
        for index in range(1, _AHEAD_LIMIT + 2):
            returned.append(handle.remote(index))

    thread = threading.Thread(target=caller)
    thread.start()
    # The limit's calls return while the loop is held; the one after waits for the loop.
    thread.join(0.5)
    assert thread.is_alive() and len(returned) == _AHEAD_LIMIT
    held.release()
    thread.join(TIMEOUT)
    assert len(returned) == _AHEAD_LIMIT + 1
    # Placed in the order they were made, and each answered by its own reply.
    assert len(router.requests) == _AHEAD_LIMIT + 2
    on_loop(loop, lambda: [request.reply.set_result(f"r{index}")
                           for index, request in enumerate(router.requests[1:], 1)])
    assert [response.result(TIMEOUT) for response in returned] == \
        [f"r{index}" for index in range(1, _AHEAD_LIMIT + 2)]


def test_once_a_call_is_queued_the_next_waits_until_a_replica_is_chosen(handle_and_router):
    handle, router, loop = handle_and_router
    handle.remote(0)
    router.outcome = QUEUED
    handle.remote(1)  # went ahead (the last placement had room); its own is queued
    on_loop(loop, lambda: None)  # (its placement has run)
    waited = concurrent.futures.Future()
    thread = threading.Thread(target=lambda: waited.set_result(handle.remote(2)))
    thread.start()
    thread.join(0.5)
    assert not waited.done()  # no replica has room: remote() blocks
    on_loop(loop, lambda: router.requests[2].placed.set_result(None))
    response = waited.result(TIMEOUT)
    on_loop(loop, lambda: router.requests[2].reply.set_result("r2"))
    assert response.result(TIMEOUT) == "r2"


def test_an_error_placing_a_call_that_went_ahead_is_raised_by_its_result(handle_and_router):
    handle, router, loop = handle_and_router
    handle.remote(0)
    router.outcome = EndpointNotFoundError("endpoint 'endpoint' was deleted")
    response = handle.remote(1)
    with pytest.raises(EndpointNotFoundError, match="was deleted"):
        response.result(TIMEOUT)
    with pytest.raises(EndpointNotFoundError):  # and the next call waits, so raises it
        handle.remote(2)


def test_a_call_cancelled_before_the_loop_got_to_it_is_never_placed(handle_and_router):
    handle, router, loop = handle_and_router
    handle.remote(0)
    held = HeldLoop(loop)
    response = handle.remote(1)
    response.cancel()
    held.release()
    with pytest.raises(concurrent.futures.CancelledError):
        response.result(TIMEOUT)
    on_loop(loop, lambda: None)
    assert len(router.requests) == 1
    handle.remote(2)  # the next call still goes ahead
    on_loop(loop, lambda: None)
    assert len(router.requests) == 2


def test_a_call_that_went_ahead_can_be_awaited_from_another_loop(handle_and_router):
    handle, router, loop = handle_and_router
    handle.remote(0)
    response = handle.remote(1)

    async def main() -> Any:
        on_loop(loop, lambda: router.requests[1].reply.set_result("r1"))
        return await response

    assert asyncio.run(main()) == "r1"


def test_cancelling_a_call_that_waits_for_room_cancels_it_before_it_is_written(
        handle_and_router):
    handle, router, loop = handle_and_router
    handle.remote(0)
    router.outcome = QUEUED
    response = handle.remote(1)  # went ahead; its request waits for room
    on_loop(loop, lambda: None)  # (its placement has run)
    response.cancel()
    on_loop(loop, lambda: None)  # (the cancel has reached the loop)
    assert on_loop(loop, lambda: router.requests[1].reply.cancelled())
    with pytest.raises(concurrent.futures.CancelledError):
        response.result(TIMEOUT)
