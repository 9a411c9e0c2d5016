"""Unit tests of how the HTTP proxy finds the route of a path (``HTTPProxy.find``).

A route is an exact path; the route of an endpoint whose backends are ASGI apps is also a
prefix: it holds every path under it, by whole segments, the longest prefix winning and an
exact route beating any prefix. The proxy is built on a fake router that has only what the
proxy reads: its endpoints and the hooks it calls on each update.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any, Optional

import pytest

from servekit._private.proxy.proxy import HTTPProxy
from servekit._private.specs import EndpointInfo


def fake_router(**routes: Any) -> Any:
    """A router whose endpoints are ``name=route`` (an exact route) or ``name=(route,
    "asgi")`` (an ASGI app's prefix)."""
    router = types.SimpleNamespace(endpoints={}, on_update=[], shadow_stats={})
    set_routes(router, **routes)
    return router


def set_routes(router: Any, **routes: Any) -> None:
    router.endpoints = {}
    for name, route in routes.items():
        path, asgi = (route[0], True) if isinstance(route, tuple) else (route, False)
        router.endpoints[name] = EndpointInfo(name, path, ["GET"], {"b": 1.0}, asgi=asgi)


def found(proxy: HTTPProxy, path: str) -> Optional[str]:
    """The endpoint the proxy routes ``path`` to, if any."""
    route = proxy.find(path)
    return None if route is None else route.endpoint


def proxy_for(**routes: Any) -> HTTPProxy:
    return HTTPProxy(fake_router(**routes))


@pytest.mark.parametrize("path, endpoint", [
    ("/api", "api"),
    ("/api/", "api"),
    ("/api/items/3", "api"),
    ("/api/v2", "v2"),
    ("/api/v2/items", "v2"),
    ("/api/v2x", "api"),  # a prefix holds whole segments only
    ("/apix", None),
    ("/ap", None),
    ("/", None),
    ("/other", None),
])
def test_the_longest_asgi_prefix_holding_the_path_by_whole_segments_wins(
        path: str, endpoint: Optional[str]) -> None:
    proxy = proxy_for(api=("/api", "asgi"), v2=("/api/v2", "asgi"))
    assert found(proxy, path) == endpoint


def test_an_exact_route_beats_a_prefix_that_holds_its_path() -> None:
    proxy = proxy_for(app=("/api", "asgi"), health="/api/health")
    assert found(proxy, "/api/health") == "health"
    assert found(proxy, "/api/health/deep") == "app"  # an exact route holds no more
    assert found(proxy, "/api/other") == "app"


def test_a_root_prefix_holds_every_path_the_others_do_not() -> None:
    proxy = proxy_for(root=("/", "asgi"), api=("/api", "asgi"), exact="/model")
    assert found(proxy, "/") == "root"
    assert found(proxy, "/anything/at/all") == "root"
    assert found(proxy, "/api/x") == "api"
    assert found(proxy, "/model") == "exact"
    assert found(proxy, "/model/x") == "root"


def test_servekits_own_paths_are_never_an_apps() -> None:
    proxy = proxy_for(root=("/", "asgi"))
    assert found(proxy, "/-/healthz") is None and found(proxy, "/-/metrics") is None
    assert found(proxy, "/healthz") == "root"


def test_routes_of_other_backends_are_exact_only() -> None:
    proxy = proxy_for(model="/model", root="/")
    assert found(proxy, "/model") == "model"
    assert found(proxy, "/") == "root"
    for path in ("/model/", "/model/x", "/other"):
        assert found(proxy, path) is None, path


def test_the_prefixes_follow_the_routers_updates() -> None:
    router = fake_router(api=("/api", "asgi"))
    proxy = HTTPProxy(router)
    assert found(proxy, "/api/x") == "api"
    set_routes(router, api="/api")  # the endpoint's backends are no apps any more
    for hook in router.on_update:
        hook(router)
    assert found(proxy, "/api/x") is None and found(proxy, "/api") == "api"
    set_routes(router, v1=("/v1", "asgi"))
    for hook in router.on_update:
        hook(router)
    assert found(proxy, "/api") is None and found(proxy, "/v1/x") == "v1"


def test_a_request_waiting_out_a_routes_grace_stays_cancelled_when_the_route_returns(
        ) -> None:
    """A request for a route removed moments ago waits for it to come back; if its client
    leaves (the request is cancelled) in the very turn the route returns, it ends
    cancelled: it is not served for nobody (3.11's wait_for dropped such a cancellation)."""

    async def main() -> None:
        router = fake_router(api="/api")
        proxy = HTTPProxy(router)
        set_routes(router)
        proxy._update_routes(router)  # /api removed: its grace begins
        matching = asyncio.ensure_future(proxy._match("/api"))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not matching.done()
        set_routes(router, api="/api")
        proxy._update_routes(router)  # it comes back ...
        matching.cancel()  # ... as its client leaves
        with pytest.raises(asyncio.CancelledError):
            await matching

    asyncio.run(main())
