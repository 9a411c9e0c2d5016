"""Code that never returns, against real processes: a backend's ``request_timeout_s`` (and a
handle's ``options(timeout_s=...)``) ends each request in time, over HTTP with 504 and
through handles with ``TimeoutError``, and cancels it in the replica."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from servekit.exceptions import RequestTimeoutError, ServeError

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


def hangs_sync(request: Any) -> str:
    """Sync code that never returns when asked to (its thread cannot be stopped)."""
    if request.query_params.get("hang"):
        time.sleep(3600)
    return "answered"


async def hangs_async(request: Any) -> str:
    """Async code that never returns when asked to; cancelling it frees the replica."""
    if request.query_params.get("hang"):
        await asyncio.sleep(3600)
    return "answered"


def test_a_sync_backend_that_never_returns_times_out_over_http_and_handles(
        serve_instance: tuple) -> None:
    client, url = serve_instance
    client.create_backend("stuck", hangs_sync, config={"request_timeout_s": 0.5,
                                                       "max_concurrent_queries": 1})
    client.create_endpoint("stuck", backend="stuck", route="/stuck")
    started = time.monotonic()
    response = httpx.get(f"{url}/stuck", params={"hang": "1"}, timeout=TIMEOUT)
    assert response.status_code == 504
    assert "request_timeout_s" in response.text and "stuck" in response.text
    # The call still runs on its thread, holding the replica's one place, so the next
    # request waits behind it, and is bounded by the same timeout.
    with pytest.raises(RequestTimeoutError, match="0.5") as raised:
        client.get_handle("stuck").remote().result(timeout=TIMEOUT)
    assert isinstance(raised.value, TimeoutError) and isinstance(raised.value, ServeError)
    assert time.monotonic() - started < 10


def test_an_async_backend_that_never_returns_is_cancelled_and_serves_the_next(
        serve_instance: tuple) -> None:
    client, url = serve_instance
    client.create_backend("stuck-async", hangs_async,
                          config={"request_timeout_s": 0.5, "max_concurrent_queries": 1})
    client.create_endpoint("stuck-async", backend="stuck-async", route="/stuck-async")
    for _ in range(3):  # each timed-out request frees the one place it held
        assert httpx.get(f"{url}/stuck-async", params={"hang": "1"},
                         timeout=TIMEOUT).status_code == 504
    assert httpx.get(f"{url}/stuck-async", timeout=TIMEOUT).text == "answered"


def test_a_handle_sets_its_own_timeout_per_call(serve_instance: tuple) -> None:
    client, _ = serve_instance
    client.create_backend("slow", hangs_async)  # no timeout of its own
    client.create_endpoint("slow", backend="slow")
    handle = client.get_handle("slow")
    with pytest.raises(TimeoutError, match="timeout_s=0.3"):
        handle.options(timeout_s=0.3).remote(hang="1").result(timeout=TIMEOUT)

    async def from_async_code() -> None:
        async_handle = client.get_handle("slow", sync=False)
        response = await async_handle.options(timeout_s=0.3).remote(hang="1")
        with pytest.raises(TimeoutError):
            await response
        assert await (await async_handle.remote()) == "answered"  # the option is per handle

    asyncio.run(from_async_code())
    with pytest.raises(ValueError, match="timeout_s"):
        handle.options(timeout_s=0)


def test_the_timeout_is_changed_in_place(serve_instance: tuple) -> None:
    client, url = serve_instance
    client.create_backend("later", hangs_async)
    client.create_endpoint("later", backend="later", route="/later")
    client.update_backend_config("later", {"request_timeout_s": 0.3})
    deadline = time.monotonic() + TIMEOUT
    while True:  # the proxy learns the new config through its long poll
        try:
            status = httpx.get(f"{url}/later", params={"hang": "1"}, timeout=3).status_code
        except httpx.ReadTimeout:
            status = None  # sent before the proxy knew
        if status == 504:
            break
        assert time.monotonic() < deadline, "the new request_timeout_s never applied"


def test_a_timeout_that_is_not_a_positive_number_is_refused(serve_instance: tuple) -> None:
    client, _ = serve_instance
    with pytest.raises(ValueError, match="request_timeout_s"):
        client.create_backend("bad", hangs_async, config={"request_timeout_s": -1})


def raises_timeout_error(request: Any) -> None:
    raise TimeoutError("the model's own deadline passed")


def test_a_timeout_error_the_backend_raises_reaches_the_caller_as_it_is(
        serve_instance: tuple) -> None:
    """Old behaviour caught: result(timeout) read any TimeoutError as its own wait running
    out, and replaced the backend's error with "No reply within 30.0s"."""
    client, _ = serve_instance
    client.create_backend("own-deadline", raises_timeout_error)
    client.create_endpoint("own-deadline", backend="own-deadline")
    with pytest.raises(TimeoutError, match="the model's own deadline passed"):
        client.get_handle("own-deadline").remote().result(timeout=TIMEOUT)
