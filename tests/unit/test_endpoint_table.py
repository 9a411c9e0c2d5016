"""Unit tests of the endpoint table: each change is checked against the whole table and the
registered backends, and a refused change leaves the table as it was."""

from __future__ import annotations

from typing import Set

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
    endpoints.update("e", "/e2", ["GET", "POST"], managed=True)
    info = endpoints.endpoints["e"]
    assert (info.route, info.methods, info.managed, info.traffic) == \
        ("/e2", ["GET", "POST"], True, {"a": 1.0})
    with pytest.raises(ValueError, match="Route '/f' is already registered to endpoint 'f'"):
        endpoints.update("e", "/f", ["GET"], managed=True)
    assert endpoints.endpoints["e"].route == "/e2"
    with pytest.raises(ValueError, match="update an endpoint 'x' that is not registered"):
        endpoints.update("x", "/x", ["GET"], managed=False)


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
