"""Unit tests of ``discovery``: where a process reaches its controller now."""

from __future__ import annotations

import logging

import pytest

from servekit._private.wire import discovery


@pytest.fixture(autouse=True)
def no_resolvers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "_resolvers", {})


def test_an_address_without_a_resolver_is_where_the_controller_is() -> None:
    assert discovery.resolve_controller("/run/servekit/c.sock") == "/run/servekit/c.sock"


def test_a_resolver_says_where_the_controller_moved() -> None:
    answers = [None, "tcp://10.0.0.2:7001"]
    discovery.register_controller_resolver("tcp://10.0.0.1:7000", lambda: answers.pop(0))
    assert discovery.resolve_controller("tcp://10.0.0.1:7000") == "tcp://10.0.0.1:7000"
    assert discovery.resolve_controller("tcp://10.0.0.1:7000") == "tcp://10.0.0.2:7001"


def test_a_resolver_that_fails_leaves_the_old_address_and_says_why(
        caplog: pytest.LogCaptureFixture) -> None:
    def unreachable() -> str:
        raise ConnectionError("the store is down")

    discovery.register_controller_resolver("tcp://10.0.0.1:7000", unreachable)
    with caplog.at_level(logging.WARNING, logger="servekit"):
        assert discovery.resolve_controller("tcp://10.0.0.1:7000") == "tcp://10.0.0.1:7000"
    assert "the store is down" in caplog.text
