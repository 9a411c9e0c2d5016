"""Unit tests of the load a router reports for autoscaled backends: requests waiting plus
those on replicas, every report interval, and at once when requests wait on a backend
without replicas (scaled to zero). Replicas are played by ``router_fakes``; the controller
by a recorder of the reports."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List, Tuple

from loop_helpers import run, spin, until
from router_fakes import Cluster, Feed, endpoint, make_router, start_send

from servekit._private import constants
from servekit._private.routing.router import Router
from servekit._private.specs import BackendLimits


class ReportRecorder:
    """Stands for the router's controller connection: records ``report_load`` calls."""

    def __init__(self) -> None:
        self.reports: List[Dict[str, float]] = []

    async def call(self, name: str, *args: Any) -> None:
        assert name == "report_load"
        self.reports.append(args[1])


def reporting(router: Router) -> Tuple[ReportRecorder, asyncio.Task]:
    recorder = ReportRecorder()
    router._controller = recorder  # type: ignore[assignment]
    return recorder, asyncio.ensure_future(router._report_forever())


def autoscale(feed: Feed, interval: float, **caps: int) -> None:
    feed.push(constants.KEY_BACKENDS, {backend: BackendLimits(cap, -1, None, interval)
                                       for backend, cap in caps.items()})


def test_waiting_and_running_requests_are_reported_each_interval() -> None:
    async def main() -> None:
        cluster = Cluster()
        router, feed = make_router(cluster, cap=1, b=[cluster.replica("r1")])
        autoscale(feed, 0.05, b=1)
        recorder, task = reporting(router)
        sends = [start_send(router, value) for value in range(3)]
        await spin()
        await until(lambda: {"b": 3.0} in recorder.reports, "report of 1 running + 2 waiting")
        for send in sends:
            send.cancel()
        task.cancel()

    run(main)


def test_requests_waiting_without_replicas_are_reported_at_once() -> None:
    async def main() -> None:
        cluster = Cluster()
        router, feed = make_router(cluster, cap=1, b=[])
        autoscale(feed, 60.0, b=1)  # an interval the test never waits for
        recorder, task = reporting(router)
        await until(lambda: recorder.reports == [{"b": 0.0}], "first report (limits changed)")
        send = start_send(router, "first")
        await until(lambda: recorder.reports[-1] == {"b": 1.0}, "report of the waiting request")
        send.cancel()
        task.cancel()

    run(main)


def test_only_autoscaled_backends_are_reported_and_an_idle_one_once() -> None:
    async def main() -> None:
        cluster = Cluster()
        router, feed = make_router(cluster, cap=1, b=[cluster.replica("r1")])
        feed.push(constants.KEY_BACKENDS, {"b": BackendLimits(1, -1, None, 0.01),
                                           "fixed": BackendLimits(1, -1)})
        recorder, task = reporting(router)
        await asyncio.sleep(0.2)  # some twenty report intervals
        assert recorder.reports == [{"b": 0.0}]
        task.cancel()

    run(main)


def test_shadow_copies_to_a_backend_scaled_to_zero_ask_for_a_replica() -> None:
    """A shadow copy never waits, so it never counts as waiting; one dropped because its
    backend has no replica is reported as a load of 1 until a replica is there."""

    async def main() -> None:
        cluster = Cluster()
        router, feed = make_router(cluster, cap=1, b=[cluster.replica("r1")])
        feed.push(constants.KEY_BACKENDS, {"b": BackendLimits(1, -1),
                                           "shadow": BackendLimits(1, -1, None, 60.0)})
        feed.replicas(b=[cluster.replica("r1")], shadow=[])
        feed.endpoints(endpoint(shadows={"shadow": 1.0}))
        recorder, task = reporting(router)
        await until(lambda: recorder.reports == [{"shadow": 0.0}], "the first report")
        send = start_send(router, "primary")
        await until(lambda: recorder.reports[-1] == {"shadow": 1.0}, "a replica asked for")
        feed.replicas(b=[cluster.replica("r1")], shadow=[cluster.replica("s1")])
        assert router._replica_sets["shadow"].load == 0  # the copy that came was dropped
        send.cancel()
        task.cancel()

    run(main)
