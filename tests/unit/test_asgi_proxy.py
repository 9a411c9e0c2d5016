"""Unit tests of the proxy's side of an ASGI backend (``servekit._private.proxy.asgi_proxy``):
the scope an app gets, and a request body passed on as it arrives (``forward_body``).

``forward_body`` reads the client's messages from a scripted ``receive`` and hands the body
to a fake routed request that records what it was sent (and can say the request ended).
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List

import pytest
from loop_helpers import run

from servekit._private.proxy.asgi_proxy import ShadowCopies, app_scope, forward_body
from servekit._private.routing.routed_request import ENDED

END = "<end>"

# --------------------------------------------------------------------------- the scope


def proxy_scope(**extra: Any) -> Dict[str, Any]:
    """A scope as the proxy's server makes it, with what the proxy itself adds."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": "/api/items", "raw_path": b"/api/items",
             "query_string": b"q=1", "headers": [(b"host", b"x")],
             "client": ("10.0.0.2", 5000), "server": ("10.0.0.1", 8000), "extensions": {},
             "root_path": "", "state": {"proxy": "private"}, "app": object(),
             "servekit.held_body": object()}
    scope.update(extra)
    return scope


def test_an_app_gets_the_servers_keys_and_its_route_as_root_path() -> None:
    scope = proxy_scope()
    forwarded = app_scope(scope, "/api")
    assert set(forwarded) == {"type", "asgi", "http_version", "method", "scheme", "path",
                              "raw_path", "query_string", "headers", "client", "server",
                              "extensions", "root_path"}
    assert forwarded["path"] == "/api/items"  # the path whole, as behind a reverse proxy
    assert forwarded["root_path"] == "/api"
    assert all(forwarded[key] == scope[key] for key in forwarded if key != "root_path")


def test_the_root_path_is_the_route_below_the_proxys_own() -> None:
    forwarded = app_scope(proxy_scope(root_path="/serve", path="/serve/api/items"), "/api")
    assert forwarded["root_path"] == "/serve/api"


@pytest.mark.parametrize("proxy_root", ["", "/serve"])
def test_an_app_at_the_root_route_gets_the_proxys_own_root_path(proxy_root: str) -> None:
    assert app_scope(proxy_scope(root_path=proxy_root), "/")["root_path"] == proxy_root


def test_a_websockets_subprotocols_are_passed_on() -> None:
    scope = proxy_scope(type="websocket", subprotocols=["chat"])
    del scope["method"]
    forwarded = app_scope(scope, "/api")
    assert forwarded["subprotocols"] == ["chat"] and "method" not in forwarded


# --------------------------------------------------------------------------- the body


class FakeRequest:
    """A routed request that records what it is sent; ``open`` False: it ended (its reply
    came), so ``send_chunk`` says there is nothing more to send."""

    def __init__(self, open_for: int = 1000) -> None:
        self.sent: List[Any] = []
        self.open_for = open_for  # chunks it takes before it ends

    async def send_chunk(self, item: Any) -> bool:
        if len(self.sent) >= self.open_for:
            return False
        self.sent.append(item)
        return True

    def end_chunks(self) -> None:
        self.sent.append(END)


class Client:
    """The client's messages, read one by one; reading past them fails the test."""

    def __init__(self, *messages: Dict[str, Any]) -> None:
        self.messages = list(messages)
        self.read = 0

    async def receive(self) -> Dict[str, Any]:
        assert self.read < len(self.messages), "read past the client's last message"
        self.read += 1
        return self.messages[self.read - 1]


def part(data: bytes, more: bool = True) -> Dict[str, Any]:
    return {"type": "http.request", "body": data, "more_body": more}


def forward(request: FakeRequest, client: Client, room: int) -> tuple:
    """``forward_body``'s result and the sizes ``taken`` was told."""
    taken: List[int] = []
    results: List[bool] = []

    async def main() -> None:
        results.append(await forward_body(request, client.receive, room,  # type: ignore[arg-type]
                                          taken.append))

    run(main)
    return results[0], taken


def test_the_body_goes_on_part_by_part_then_its_end() -> None:
    request, client = FakeRequest(), Client(part(b"ab"), part(b"cde"), part(b"f", more=False))
    assert forward(request, client, room=100) == (True, [2, 3, 1])
    assert request.sent == [b"ab", b"cde", b"f", END]


def test_an_empty_last_message_only_ends_the_body() -> None:
    request, client = FakeRequest(), Client(part(b"ab"), part(b"", more=False))
    assert forward(request, client, room=100) == (True, [2, 0])
    assert request.sent == [b"ab", END]


@pytest.mark.parametrize("room, fits", [(6, True), (5, False)])
def test_a_body_past_the_room_is_refused_and_the_rest_left_unread(room: int,
                                                                   fits: bool) -> None:
    request = FakeRequest()
    client = Client(part(b"abc"), part(b"def"), part(b"", more=False))
    result, taken = forward(request, client, room)
    assert result is fits
    if fits:
        assert request.sent == [b"abc", b"def", END] and client.read == 3
    else:
        assert request.sent == [b"abc"] and taken == [3]
        assert client.read == 2  # the part past the room was not sent on, nor any more read


def test_a_client_that_disconnects_ends_the_body_without_its_end() -> None:
    request, client = FakeRequest(), Client(part(b"ab"), {"type": "http.disconnect"})
    assert forward(request, client, room=100) == (True, [2])
    assert request.sent == [b"ab"]  # the replica never reads a truncated body as whole


def test_a_request_that_ended_stops_the_reading() -> None:
    """The app answered without reading its whole body: the rest is neither sent nor read
    (nor counted as taken by the replica)."""
    request = FakeRequest(open_for=1)
    client = Client(part(b"ab"), part(b"cd"), part(b"ef"), part(b"", more=False))
    assert forward(request, client, room=100) == (True, [2])
    assert request.sent == [b"ab"] and client.read == 2


# --------------------------------------------------------------------------- shadow copies


class FakeCopy:
    """A shadow copy: takes ``room`` items, then refuses; records its end and cancel."""

    def __init__(self, room: int, state: str = "sent") -> None:
        self.room = room
        self.state = state
        self.items: List[Any] = []
        self.ended = self.cancelled = self.dropped = False

    def offer_chunk(self, item: Any) -> bool:
        if self.state == ENDED or len(self.items) >= self.room:
            return False
        self.items.append(item)
        return True

    def end_chunks(self) -> None:
        self.ended = True

    def cancel(self) -> None:
        self.cancelled = True


def test_a_copy_that_falls_behind_is_dropped_and_the_others_go_on() -> None:
    keeping, lagging = FakeCopy(room=10), FakeCopy(room=1)
    copies = ShadowCopies([keeping, lagging])  # type: ignore[list-item]
    for item in ("a", "b", "c"):
        copies.offer(item)
    assert keeping.items == ["a", "b", "c"] and lagging.items == ["a"]
    assert lagging.dropped and lagging.cancelled  # counted as dropped, its work stopped
    copies.end()
    assert keeping.ended and not lagging.ended and not keeping.cancelled


def test_a_copy_that_was_answered_already_is_not_counted_as_dropped() -> None:
    answered = FakeCopy(room=0, state=ENDED)
    copies = ShadowCopies([answered])  # type: ignore[list-item]
    copies.offer("a")
    assert not answered.dropped and not answered.cancelled and copies.copies == []


def test_copies_of_a_stream_that_will_not_be_whole_are_dropped() -> None:
    copy = FakeCopy(room=10)
    ShadowCopies([copy]).drop()  # type: ignore[list-item]
    assert copy.dropped and copy.cancelled


def test_copies_still_running_after_the_grace_are_cancelled() -> None:
    async def main() -> None:
        copy = FakeCopy(room=10)
        copies = ShadowCopies([copy])  # type: ignore[list-item]
        copies.end(grace_s=0.01)
        assert copy.ended and not copy.cancelled
        cancelled = asyncio.Event()
        copy.cancel = cancelled.set  # type: ignore[method-assign]
        await asyncio.wait_for(cancelled.wait(), 5)
        assert not copy.dropped

    run(main)
