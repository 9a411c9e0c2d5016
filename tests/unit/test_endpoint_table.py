"""Unit tests of the endpoint table: each change is checked against the whole table and the
registered backends, and a refused change leaves the table as it was."""

from __future__ import annotations

import re
from typing import Optional, Set

import pytest

from servekit._private.controller.endpoint_table import EndpointTable


def table(*backends: str) -> EndpointTable:
    registered: Set[str] = set(backends)
    return EndpointTable(lambda: registered)


def test_create_sends_all_traffic_to_the_backend_and_a_retry_is_a_no_op() -> None:
    endpoints = table("a")
    assert endpoints.create("e", "a", "/e", ["GET"])
    assert endpoints.describe() == {"e": {"route": "/e", "methods": ["GET"],
                                          "traffic": {"a": 1.0}, "shadows": {}}}
    assert not endpoints.create("e", "a", "/e", ["GET"])  # the same call again
    with pytest.raises(ValueError, match="Endpoint 'e' is already registered"):
        endpoints.create("e", "a", "/other", ["GET"])


def test_create_refuses_an_unknown_backend_and_a_taken_route() -> None:
    endpoints = table("a")
    with pytest.raises(ValueError, match="backend 'b' that is not registered"):
        endpoints.create("e", "b", "/e", ["GET"])
    endpoints.create("e", "a", "/e", ["GET"])
    with pytest.raises(ValueError, match="Route '/e' is already registered to endpoint 'e'"):
        endpoints.create("f", "a", "/e", ["GET"])
    assert list(endpoints.endpoints) == ["e"]


def test_update_changes_route_methods_and_mark_in_place() -> None:
    endpoints = table("a")
    endpoints.create("e", "a", "/e", ["GET"])
    endpoints.create("f", "a", "/f", ["GET"])
    endpoints.update("e", "/e2", ["GET", "POST"], managed="deploy")
    info = endpoints.endpoints["e"]
    assert (info.route, info.methods, info.managed, info.traffic) == \
        ("/e2", ["GET", "POST"], "deploy", {"a": 1.0})
    with pytest.raises(ValueError, match="Route '/f' is already registered to endpoint 'f'"):
        endpoints.update("e", "/f", ["GET"], managed="deploy")
    assert endpoints.endpoints["e"].route == "/e2"
    with pytest.raises(ValueError, match="update an endpoint 'x' that is not registered"):
        endpoints.update("x", "/x", ["GET"], managed=None)


def test_traffic_must_name_registered_backends_with_weights_summing_to_one() -> None:
    endpoints = table("a", "b")
    endpoints.create("e", "a", "/e", ["GET"])
    for traffic, error in (({"a": 0.5, "c": 0.5}, "backend 'c' that is not registered"),
                           ({"a": 1.5, "b": -0.5}, "weight of -0.5"),
                           ({"a": 0.5, "b": 0.4}, "must sum to 1")):
        with pytest.raises(ValueError, match=error):
            endpoints.set_traffic("e", traffic)
        assert endpoints.endpoints["e"].traffic == {"a": 1.0}
    endpoints.set_traffic("e", {"a": 0.25, "b": 0.75})
    assert endpoints.endpoints["e"].traffic == {"a": 0.25, "b": 0.75}


def test_shadows_are_set_and_removed_and_a_used_backend_is_named() -> None:
    endpoints = table("a", "b")
    endpoints.create("e", "a", "/e", ["GET"])
    assert endpoints.user_of("b") is None
    endpoints.shadow_traffic("e", "b", 0.1)
    assert endpoints.user_of("b") == "e"
    endpoints.shadow_traffic("e", "b", 0)
    assert endpoints.endpoints["e"].shadows == {} and endpoints.user_of("b") is None


def test_a_published_view_does_not_change_with_the_table() -> None:
    endpoints = table("a", "b")
    endpoints.create("e", "a", "/e", ["GET"])
    view = endpoints.view()
    endpoints.shadow_traffic("e", "b", 0.5)
    endpoints.set_traffic("e", {"b": 1.0})
    assert view["e"].shadows == {} and view["e"].traffic == {"a": 1.0}
    assert endpoints.delete("e") and not endpoints.delete("e")


# --------------------------------------------------------------------------- ASGI apps


def kinds_table(**kinds: Optional[bool]) -> EndpointTable:
    """Backends by tag, each an ASGI app (True), another kind (False), or not known yet
    (None: no replica has loaded its import path)."""
    return EndpointTable(lambda: set(kinds), lambda tag: kinds[tag])


def test_an_endpoint_cannot_mix_asgi_apps_with_other_backends_in_its_traffic() -> None:
    endpoints = kinds_table(app=True, app2=True, model=False, model2=False)
    endpoints.create("e", "app", "/e", ["GET"])
    with pytest.raises(ValueError, match=re.escape(
            "Endpoint 'e' cannot mix ASGI apps (['app', 'app2']) with other backends "
            "(['model', 'model2'])")):
        endpoints.set_traffic("e", {"app": 0.25, "app2": 0.25, "model": 0.25, "model2": 0.25})
    assert endpoints.endpoints["e"].traffic == {"app": 1.0}
    endpoints.set_traffic("e", {"app": 0.5, "app2": 0.5})
    endpoints.set_traffic("e", {"model": 0.5, "model2": 0.5})  # all of one kind, another
    assert endpoints.endpoints["e"].traffic == {"model": 0.5, "model2": 0.5}


def test_an_endpoint_cannot_shadow_to_another_kind_of_backend() -> None:
    endpoints = kinds_table(app=True, app2=True, model=False)
    endpoints.create("e", "app", "/e", ["GET"])
    with pytest.raises(ValueError, match=re.escape("ASGI apps (['app']) with other "
                                                   "backends (['model'])")):
        endpoints.shadow_traffic("e", "model", 0.1)
    assert endpoints.endpoints["e"].shadows == {}
    endpoints.shadow_traffic("e", "app2", 0.1)
    with pytest.raises(ValueError, match=re.escape("ASGI apps (['app2']) with other "
                                                   "backends (['model'])")):
        endpoints.set_traffic("e", {"model": 1.0})  # the app shadow would be left mixed
    assert endpoints.endpoints["e"].traffic == {"app": 1.0}
    endpoints.shadow_traffic("e", "model", 0)  # removing a shadow never mixes anything


def test_a_backend_of_unknown_kind_mixes_with_either() -> None:
    endpoints = kinds_table(app=True, model=False, unknown=None)
    endpoints.create("apps", "app", "/apps", ["GET"])
    endpoints.set_traffic("apps", {"app": 0.5, "unknown": 0.5})
    endpoints.create("models", "model", "/models", ["GET"])
    endpoints.set_traffic("models", {"model": 0.5, "unknown": 0.5})
    endpoints.shadow_traffic("models", "unknown", 0.2)
    endpoints.shadow_traffic("apps", "unknown", 0.2)


def test_an_endpoint_mixed_by_a_backend_of_unknown_kind_is_reported() -> None:
    kinds = {"app": True, "model": False, "later": None}
    endpoints = EndpointTable(lambda: list(kinds), kinds.get)
    endpoints.create("e", "model", "/e", ["GET"])
    endpoints.set_traffic("e", {"model": 0.5, "later": 0.5})  # not known yet: allowed
    assert endpoints.mixed() == []
    kinds["later"] = True  # a replica loaded it: an app
    assert endpoints.mixed() == [
        "Endpoint 'e' cannot mix ASGI apps (['later']) with other backends (['model']): a "
        "request to it must suit any of its backends. Serve the other backends from an "
        "endpoint of their own."]


def test_an_asgi_route_ending_with_a_slash_is_refused_with_the_fix() -> None:
    endpoints = kinds_table(app=True, model=False)
    with pytest.raises(ValueError, match=re.escape(
            "Route '/api/' ends with '/': the route of an ASGI app is a prefix, which holds "
            "the paths under it. Use '/api'.")):
        endpoints.create("e", "app", "/api/", ["GET"])
    assert endpoints.endpoints == {}
    endpoints.create("root", "app", "/", ["GET"])  # the root prefix holds everything
    endpoints.create("e", "app", "/api", ["GET"])
    with pytest.raises(ValueError, match=re.escape("Use '/v2'")):
        endpoints.update("e", "/v2/", ["GET"], managed=None)
    assert endpoints.endpoints["e"].route == "/api"
    endpoints.create("m", "model", "/model/", ["GET"])  # an exact route may end with "/"
    with pytest.raises(ValueError, match=re.escape("Use '/model'")):
        endpoints.set_traffic("m", {"app": 1.0})  # turning it into an app's route
    assert endpoints.endpoints["m"].traffic == {"model": 1.0}


def test_the_published_view_marks_endpoints_whose_traffic_goes_to_apps() -> None:
    endpoints = kinds_table(app=True, model=False, unknown=None)
    endpoints.create("apps", "app", "/apps", ["GET"])
    endpoints.create("models", "model", "/models", ["GET"])
    endpoints.create("pending", "unknown", "/pending", ["GET"])
    view = endpoints.view()
    assert {name: info.asgi for name, info in view.items()} == {
        "apps": True, "models": False, "pending": False}
    endpoints.set_traffic("pending", {"unknown": 0.5, "app": 0.5})
    assert endpoints.view()["pending"].asgi and not view["pending"].asgi


@pytest.mark.parametrize("name, route, methods, error, fragment", [
    ("e\n", "/e", ["GET"], ValueError, "endpoint_name 'e\\n' contains '\\n'"),
    ("e", "/e/../admin", ["GET"], ValueError, "route '/e/../admin' has a '.' or '..' segment"),
    ("e", "/e?x=1", ["GET"], ValueError, "route '/e?x=1' contains '?'"),
    ("e", "e", ["GET"], TypeError, "route 'e' must start with '/'"),
    ("e", "/e", ["GET /x HTTP/1.1"], ValueError, "methods holds 'GET /x HTTP/1.1'"),
    ("e", "/e", [], TypeError, "methods must be a non-empty list"),
], ids=["name", "dot-segment", "query", "no-slash", "method", "no-methods"])
def test_create_and_update_refuse_bad_names_routes_and_methods(
        name: str, route: str, methods: list, error: type, fragment: str) -> None:
    """The table holds to the API's checks itself: a call that did not come through the
    Client (or a deploy file) creates nothing either."""
    endpoints = table("a")
    with pytest.raises(error, match=re.escape(fragment)):
        endpoints.create(name, "a", route, methods)
    assert endpoints.endpoints == {}
    endpoints.create("e", "a", "/e", ["GET"])
    before = endpoints.describe()
    if name == "e":
        with pytest.raises(error, match=re.escape(fragment)):
            endpoints.update("e", route, methods, False)
    assert endpoints.describe() == before


def test_methods_are_kept_upper_cased_and_sorted() -> None:
    endpoints = table("a")
    endpoints.create("e", "a", "/e", ["post", "get"])
    assert endpoints.describe()["e"]["methods"] == ["GET", "POST"]
