"""Unit tests of a router's choice of replica for requests that name a multiplexed model
(``ReplicaSet._pick_holder``): the replicas that hold it first, another one once they are
full, and what the replicas report.

The same fakes as ``test_router.py``: real ``RpcClient``s fed raw frames by ``FakeReplica``,
long-poll updates through ``Router.apply``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Optional

import pytest
from loop_helpers import run, spin
from router_fakes import Cluster, FakeReplica, Feed, make_router

from servekit._private import constants
from servekit._private.routing import replica_set
from servekit._private.routing.router import Router


async def sent(router: Router, value: Any, model_id: Optional[str]) -> asyncio.Future:
    """Send a request for ``model_id`` that must be written to a replica at once."""
    task = asyncio.ensure_future(router.send("ep", "call", None, (value,), model_id=model_id))
    await spin()
    assert task.done(), f"request {value!r} was not sent"
    return task.result()


def report(feed: Feed, **held: Dict[str, List[str]]) -> None:
    """The long-polled models each replica of each backend holds."""
    feed.push(constants.KEY_MODELS, held)


def where(replicas: List[FakeReplica], value: Any) -> str:
    [tag] = [r.tag for r in replicas if value in r.received()]
    return tag


def test_a_model_goes_to_the_replica_that_reported_it_while_it_has_room() -> None:
    """A replica that holds the model gets its requests, even when another one is idler."""

    async def main() -> None:
        cluster = Cluster()
        replicas = [cluster.replica("b#1"), cluster.replica("b#2"), cluster.replica("b#3")]
        router, feed = make_router(cluster, cap=4, b=replicas)
        report(feed, b={"b#2": ["m"]})
        for value in ("A", "B", "C"):
            await sent(router, value, "m")
        assert [where(replicas, v) for v in ("A", "B", "C")] == ["b#2"] * 3

    run(main)


def test_the_first_requests_for_a_new_model_go_to_one_replica() -> None:
    """A model no replica holds goes to the least busy one, and the requests after it go
    there too (it loads it once), before any report says so."""

    async def main() -> None:
        cluster = Cluster()
        replicas = [cluster.replica("b#1"), cluster.replica("b#2")]
        router, _ = make_router(cluster, cap=4, b=replicas)
        await sent(router, "other", None)  # one replica is busier
        first = where(replicas, "other")
        for value in ("A", "B", "C"):
            await sent(router, value, "m")
        chosen = {where(replicas, v) for v in ("A", "B", "C")}
        assert len(chosen) == 1 and first not in chosen

    run(main)


def test_a_hot_model_spreads_to_another_replica_when_its_holders_are_full() -> None:
    """Once every replica holding the model is at its cap, the next request for it goes to
    another replica with room (which then holds it too) instead of waiting."""

    async def main() -> None:
        cluster = Cluster()
        r1, r2, r3 = cluster.replica("b#1"), cluster.replica("b#2"), cluster.replica("b#3")
        router, feed = make_router(cluster, cap=2, b=[r1, r2, r3])
        report(feed, b={"b#1": ["m"]})
        replies = [await sent(router, v, "m") for v in ("A", "B", "C", "D")]
        assert r1.received() == ["A", "B"]
        spilled = where([r2, r3], "C")
        assert where([r2, r3], "D") == spilled  # the second holder, not the third
        # Room again on the first holder: the model's next request may go to either holder.
        r1.answer("A", "a")
        await spin()
        await sent(router, "E", "m")
        assert where([r1, r2, r3], "E") in ("b#1", spilled)
        assert replies[0].result() == "a"

    run(main)


def test_every_replica_full_the_request_waits_and_takes_the_first_room() -> None:
    """No replica has room: a model's request waits in line like any other and goes to
    the first replica that frees a place, holder or not."""

    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1"), cluster.replica("b#2")
        router, feed = make_router(cluster, cap=1, b=[r1, r2])
        report(feed, b={"b#1": ["m"]})
        await sent(router, "A", "m")
        await sent(router, "B", None)
        waiting = asyncio.ensure_future(router.send("ep", "call", None, ("C",),
                                                    model_id="m"))
        await spin()
        assert not waiting.done()
        r2.answer("B", "b")
        await spin()
        assert waiting.done() and r2.received() == ["B", "C"]

    run(main)


def test_a_report_without_the_model_forgets_it_after_the_grace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A model this router sent a replica stays with it through reports made before the
    replica loaded it, for the grace; a report after that without it (evicted) counts."""

    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1"), cluster.replica("b#2")
        router, feed = make_router(cluster, cap=4, b=[r1, r2])
        await sent(router, "A", "m")
        holder = where([r1, r2], "A")
        report(feed, b={})  # made before the replica saw the request
        assert "m" in router._replica_sets["b"].slots[holder].models
        monkeypatch.setattr(replica_set, "MODEL_REPORT_GRACE_S", 0.0)
        report(feed, b={})  # the replica evicted it
        assert "m" not in router._replica_sets["b"].slots[holder].models
        other = "b#2" if holder == "b#1" else "b#1"
        report(feed, b={other: ["m"]})
        await sent(router, "B", "m")
        assert where([r1, r2], "B") == other

    run(main)


def test_a_replica_listed_after_its_report_holds_what_it_reported() -> None:
    """The models of a replica the router learns of after their report are not lost."""

    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1"), cluster.replica("b#2")
        router, feed = make_router(cluster, cap=4, b=[r1])
        report(feed, b={"b#2": ["m"]})
        feed.replicas(b=[r1, r2])
        await sent(router, "A", "m")
        assert r2.received() == ["A"]

    run(main)
