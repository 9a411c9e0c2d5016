"""Autoscaling against real processes and real HTTP: a backend scaled to zero answers its
first request, follows a step up in load within its delay plus a replica's start, goes back
down (to zero) after its delays, and no request fails because of a scaling change."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from request_streams import RequestStream, bad_records

import servekit as serve
from conftest import BOTH_RUNTIMES, wait_for

pytestmark = pytest.mark.integration
RUNTIMES = BOTH_RUNTIMES

UPSCALE_DELAY_S = 1.0
DOWNSCALE_DELAY_S = 2.0
# A replica process starts in well under this (on Ray too).
START_S = 20.0


async def slow(request: Any) -> str:
    await asyncio.sleep(0.1)
    return "done"


def status(client: serve.Client, tag: str) -> dict:
    return client.status()["backends"][tag]


def test_a_backend_follows_its_load_from_zero_and_back_without_failing_a_request(
        serve_instance: tuple) -> None:
    client, url = serve_instance
    client.create_backend("slow", slow, config={"autoscaling_config": {
        "min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 1,
        "upscale_delay_s": UPSCALE_DELAY_S, "downscale_delay_s": DOWNSCALE_DELAY_S,
        "look_back_period_s": 0.5, "metrics_interval_s": 0.2}})
    client.create_endpoint("slow", backend="slow", route="/slow")
    assert status(client, "slow")["running"] == 0  # initial_replicas = min_replicas = 0
    # Scaled to zero, it is ready: a request starts a replica.
    assert httpx.get(f"{url}/-/ready", timeout=10).status_code == 200

    # From zero: the request waits in the router while the first replica starts.
    response = httpx.get(f"{url}/slow", timeout=START_S + 10)
    assert (response.status_code, response.text) == (200, "done")
    assert status(client, "slow")["running"] == 1

    with RequestStream(f"{url}/slow", threads=6, pause=0.0) as stream:
        stepped = time.monotonic()
        wait_for(lambda: status(client, "slow")["running"] == 3,
                 timeout=UPSCALE_DELAY_S + START_S,
                 message="3 replicas for 6 requests in flight at 1 per replica")
        scaled_up_in = time.monotonic() - stepped
        stream.wait_for_requests_since(time.monotonic(), 20)  # served by the three
        decision = status(client, "slow")
    records = stream.snapshot()
    assert decision["target"] == 3 and "max_replicas=3" in decision["autoscaling"]

    # Less load: replicas leave routing and drain while requests keep coming.
    with RequestStream(f"{url}/slow", threads=1, pause=0.0) as stream:
        # (One request in flight at 1 per replica keeps two: a replica is removed only
        # when the rest would run at most 90% of the target.)
        wait_for(lambda: status(client, "slow")["running"] == 2,
                 timeout=2 * DOWNSCALE_DELAY_S + START_S, message="scaled down to 2")
    records += stream.snapshot()

    dropped = time.monotonic()
    wait_for(lambda: status(client, "slow")["running"] == 0,
             timeout=2 * DOWNSCALE_DELAY_S + START_S, message="scaled back to zero")
    assert time.monotonic() - dropped >= DOWNSCALE_DELAY_S
    assert bad_records(records) == [], "a request failed while the backend scaled"
    assert scaled_up_in < UPSCALE_DELAY_S + START_S

    # And from zero again, over a handle this time.
    assert client.get_handle("slow").remote(None).result(timeout=START_S + 10) == "done"


def test_autoscaling_config_errors_name_the_bad_value(serve_instance: tuple) -> None:
    client, _ = serve_instance
    with pytest.raises(ValueError, match="min_replicas=4 is above max_replicas=2"):
        client.create_backend("bad", slow, config={"autoscaling_config": {
            "min_replicas": 4, "max_replicas": 2}})
    with pytest.raises(ValueError, match="num_replicas=2 and autoscaling_config"):
        client.create_backend("bad", slow, config={
            "num_replicas": 2, "autoscaling_config": {"max_replicas": 2}})
    assert "bad" not in client.list_backends()
