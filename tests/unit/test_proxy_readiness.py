"""Unit tests of the proxy's readiness (``/-/ready``): what the router learnt by long poll
decides it (a real router fed updates, no controller asked)."""

from __future__ import annotations

from loop_helpers import run
from router_fakes import Cluster, Feed

from servekit._private import constants
from servekit._private.proxy.proxy import HTTPProxy
from servekit._private.routing.router import Router
from servekit._private.specs import BackendLimits, EndpointInfo


def routed(name: str, route: str, **traffic: float) -> EndpointInfo:
    return EndpointInfo(name, route, ["GET"], traffic)


def proxy_and_feed() -> tuple:
    router = Router("/run/servekit/controller.sock", "proxy")
    return HTTPProxy(router), Feed(router), Cluster()


def answer(proxy: HTTPProxy) -> tuple:
    response = proxy.readiness()
    return response.status, bytes(response.body).decode()


def test_ready_once_every_routed_backend_has_a_running_replica() -> None:
    async def main() -> None:
        proxy, feed, cluster = proxy_and_feed()
        feed.endpoints(routed("iris", "/iris", **{"iris:v1": 1.0}))
        feed.caps(**{"iris:v1": 8})
        feed.replicas(**{"iris:v1": []})
        status, body = answer(proxy)
        assert status == 503
        assert body == "not ready:\nendpoint iris (/iris): no running replica of iris:v1"
        feed.replicas(**{"iris:v1": [cluster.replica("iris:v1#1")]})
        assert answer(proxy) == (200, "ready: 1 routed endpoint(s) can serve")
        feed.replicas(**{"iris:v1": []})  # its last replica died
        assert answer(proxy)[0] == 503

    run(main)


def test_an_instance_without_routes_is_not_ready() -> None:
    """A load balancer sends nothing to an instance still being deployed (``servekit run``
    serves HTTP before it applies its file): every request would be a 404."""
    async def main() -> None:
        proxy, feed, cluster = proxy_and_feed()
        assert answer(proxy) == (503, "not ready: no endpoint has a route yet")
        feed.endpoints(EndpointInfo("inner", None, ["GET"], {"c": 1.0}))  # handle only
        feed.caps(c=8)
        feed.replicas(c=[cluster.replica("c#1")])
        assert answer(proxy)[0] == 503
        feed.endpoints(EndpointInfo("inner", None, ["GET"], {"c": 1.0}),
                       routed("web", "/web", c=1.0))
        assert answer(proxy) == (200, "ready: 1 routed endpoint(s) can serve")

    run(main)


def test_a_backend_that_scales_to_zero_is_ready_without_replicas() -> None:
    async def main() -> None:
        proxy, feed, _ = proxy_and_feed()
        feed.endpoints(routed("m", "/m", m=1.0))
        feed.push(constants.KEY_BACKENDS, {"m": BackendLimits(8, -1, None, 1.0,
                                                              scales_to_zero=True)})
        feed.replicas(m=[])
        assert answer(proxy)[0] == 200

    run(main)


def test_only_backends_with_traffic_of_routed_endpoints_count() -> None:
    async def main() -> None:
        proxy, feed, cluster = proxy_and_feed()
        feed.endpoints(routed("split", "/split", a=1.0, b=0.0),  # b gets no traffic
                       EndpointInfo("inner", None, ["GET"], {"c": 1.0}),  # handle only
                       EndpointInfo("shadowed", "/s", ["GET"], {"a": 1.0}, {"d": 0.5}))
        feed.caps(a=8, b=8, c=8, d=8)
        feed.replicas(a=[cluster.replica("a#1")], b=[], c=[], d=[])
        assert answer(proxy)[0] == 200

    run(main)


def test_every_endpoint_that_cannot_serve_is_named_up_to_a_bound() -> None:
    async def main() -> None:
        proxy, feed, _ = proxy_and_feed()
        feed.endpoints(*(routed(f"e{i:02}", f"/e{i:02}", **{f"b{i}": 1.0})
                         for i in range(12)))
        status, body = answer(proxy)
        assert status == 503
        lines = body.splitlines()
        assert lines[1] == "endpoint e00 (/e00): no running replica of b0"
        assert lines[-1] == "and 2 more" and len(lines) == 12

    run(main)


def test_not_ready_while_draining() -> None:
    async def main() -> None:
        proxy, feed, _ = proxy_and_feed()
        proxy.draining = True
        assert answer(proxy) == (503, "draining: this proxy is shutting down")

    run(main)
