"""Unit tests of a request's own stream in a router (``RoutedRequest.send_chunk`` and
``end_chunks``, the ``_Upload`` window).

A request body sent as it arrives, or a WebSocket's messages, goes out after the request's
payload, at most ``STREAM_WINDOW`` items ahead of what the replica took (its ``_IN_CREDIT``
frames). Until the replica takes the first item, the items are kept: a replica that refuses
the request never read them, and they go out again, in order, to the replica the request is
written to next. The replicas are ``FakeReplica``s (``router_fakes``): frames are fed in the
order each test picks, and what a replica got is read back from its connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from loop_helpers import run, spin
from router_fakes import END, Cluster, make_router, sent

from servekit._private.routing.routed_request import (
    CANCELLING,
    CONNECTING,
    QUEUED,
    STREAMING,
    RoutedRequest,
)
from servekit._private.routing.router import Router
from servekit._private.wire.transport import (
    _IN_CHUNK,
    _IN_END,
    _REQUEST,
    STREAM_WINDOW,
    STREAM_WINDOW_BYTES,
    encode_call,
)

WINDOW = list(range(STREAM_WINDOW))
# Items of which four fill the window's bytes (with their pickles' few bytes of framing).
QUARTER = STREAM_WINDOW_BYTES // 4 - 64


def big(tag: int, size: int = QUARTER) -> bytes:
    return bytes([tag]) * size


def place(router: Router, value: Any) -> RoutedRequest:
    """Place the request ``value`` without waiting for it to be written."""
    request = router.place("ep", "call", None, encode_call("call", (value,)))
    assert request is not None
    return request


async def send_now(request: RoutedRequest, item: Any) -> bool:
    """``send_chunk`` that must not wait for anything: its result."""
    sending = asyncio.ensure_future(request.send_chunk(item))
    await spin()
    assert sending.done(), f"sending {item!r} waited"
    return sending.result()


async def send_waiting(request: RoutedRequest, item: Any) -> asyncio.Future:
    """``send_chunk`` that must wait (for the request to be written, or for room)."""
    sending = asyncio.ensure_future(request.send_chunk(item))
    await spin()
    assert not sending.done(), f"sending {item!r} did not wait: {sending}"
    return sending


# --------------------------------------------------------------------------- before the write


@pytest.mark.parametrize("state", [QUEUED, CONNECTING])
def test_an_item_sent_before_the_request_is_written_follows_its_payload(state: str) -> None:
    """The request waits in the queue (the replica is full) or for its connection: an
    item sent meanwhile waits, and goes out right after the payload once it is written."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        if state == QUEUED:
            await sent(router, "A")
        request = place(router, "B")
        sending = asyncio.ensure_future(request.send_chunk(b"part 1"))
        await asyncio.sleep(0)  # (a connection takes a loop iteration to open)
        assert request.state == state and not sending.done()
        assert "B" not in r1.received()
        if state == QUEUED:
            r1.answer("A", "a")
        await spin()
        assert sending.result() is True
        assert r1.kinds("B") == [_REQUEST, _IN_CHUNK]
        assert r1.upload("B") == [b"part 1"]

    run(main)


def test_an_end_said_before_the_write_follows_the_payload() -> None:
    """A request whose own stream ends before it is written (an empty last body message)
    gets its end right after its payload."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        request = place(router, "A")
        assert request.state == CONNECTING
        request.end_chunks()
        await spin()
        assert r1.kinds("A") == [_REQUEST, _IN_END]

    run(main)


# --------------------------------------------------------------------------- the window


def test_items_beyond_the_window_wait_for_the_replica_to_take_one() -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        request: RoutedRequest = (await sent(router, "A")).request  # type: ignore[attr-defined]
        for item in WINDOW:
            assert await send_now(request, item)
        blocked = await send_waiting(request, "one more")
        assert r1.upload("A") == WINDOW
        r1.credit("A")
        await spin()
        assert blocked.result() is True
        assert r1.upload("A") == [*WINDOW, "one more"]
        await send_waiting(request, "and another")  # the credit made room for one

    run(main)


def test_once_the_replica_took_an_item_nothing_is_kept_and_each_credit_frees_a_place(
        ) -> None:
    """After the first credit the replica cannot refuse the request any more: the items are
    not held for a second write (a long body is not kept in the proxy), and the window
    counts what the replica has not taken."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        request: RoutedRequest = (await sent(router, "A")).request  # type: ignore[attr-defined]
        for item in range(3):
            assert await send_now(request, item)
        assert request.upload is not None and request.upload.kept is not None
        r1.credit("A")
        await spin()
        assert request.upload.kept is None
        for item in range(3, STREAM_WINDOW + 1):  # 2 not taken: room for the rest
            assert await send_now(request, item)
        assert request.upload.kept is None
        await send_waiting(request, "past the window")
        assert r1.upload("A") == list(range(STREAM_WINDOW + 1))

    run(main)


def test_large_items_are_bounded_by_the_windows_bytes_and_a_larger_one_goes_alone(
        ) -> None:
    """What is in flight is bounded in bytes as well as items (WebSocket messages of many
    MiB to an app slow to read would otherwise sit in its replica by the window): four
    quarter-window items fill it; an item larger than the whole window waits until the
    replica took everything before it, then goes alone."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        request: RoutedRequest = (await sent(router, "A")).request  # type: ignore[attr-defined]
        for tag in range(4):
            assert await send_now(request, big(tag))
        fifth = await send_waiting(request, big(4))
        r1.credit("A")
        await spin()
        assert fifth.result() is True
        huge = await send_waiting(request, big(5, STREAM_WINDOW_BYTES + 1))
        r1.credit("A", 3)
        await spin()
        assert not huge.done()  # the fifth is still in flight
        r1.credit("A")
        await spin()
        assert huge.result() is True
        await send_waiting(request, b"small")  # nothing joins an item past the window
        assert [len(item) for item in r1.upload("A")] == [QUARTER] * 5 + [
            STREAM_WINDOW_BYTES + 1]

    run(main)


def test_items_go_on_while_the_reply_streams() -> None:
    """A WebSocket's messages keep going to the app after its reply stream started."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        request: RoutedRequest = reply.request  # type: ignore[attr-defined]
        r1.chunk("A", "accepted")
        await spin()
        assert request.state == STREAMING
        assert await send_now(request, "hello")
        request.end_chunks()
        await spin()
        assert r1.upload("A") == ["hello", END]

    run(main)


# --------------------------------------------------------------------------- refusals


def test_a_refused_request_goes_to_the_next_replica_with_its_items_and_end_in_order(
        ) -> None:
    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1"), cluster.replica("b#2")
        router, feed = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        request: RoutedRequest = reply.request  # type: ignore[attr-defined]
        assert await send_now(request, b"part 1")
        assert await send_now(request, b"part 2")
        request.end_chunks()
        await spin()
        assert r1.upload("A") == [b"part 1", b"part 2", END]
        r1.refuse("A")
        await spin()
        assert request.state == QUEUED  # r1 is full until it says it has room
        feed.replicas(b=[r1, r2])
        await spin()
        assert r2.kinds("A") == [_REQUEST, _IN_CHUNK, _IN_CHUNK, _IN_END]
        assert r2.upload("A") == [b"part 1", b"part 2", END]
        r2.answer("A", "a")
        await spin()
        assert reply.result() == "a"
        assert r1.upload("A") == [b"part 1", b"part 2", END]  # nothing more went to r1

    run(main)


def test_an_end_said_while_the_refused_request_waits_follows_its_items_on_the_next_replica(
        ) -> None:
    """The body's last message arrives while the refused request is back in the queue:
    the next replica gets the item the first one refused, then the end."""

    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1"), cluster.replica("b#2")
        router, feed = make_router(cluster, cap=1, b=[r1])
        request: RoutedRequest = (await sent(router, "A")).request  # type: ignore[attr-defined]
        assert await send_now(request, b"part 1")
        r1.refuse("A")
        await spin()
        request.end_chunks()
        await spin()
        assert r1.upload("A") == [b"part 1"]  # the end did not go to the replica that refused
        feed.replicas(b=[r1, r2])
        await spin()
        assert r2.kinds("A") == [_REQUEST, _IN_CHUNK, _IN_END]
        assert r2.upload("A") == [b"part 1", END]

    run(main)


def test_an_item_sent_while_the_refused_request_waits_goes_after_the_kept_ones() -> None:
    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1"), cluster.replica("b#2")
        router, feed = make_router(cluster, cap=1, b=[r1])
        request: RoutedRequest = (await sent(router, "A")).request  # type: ignore[attr-defined]
        assert await send_now(request, 1)
        r1.refuse("A")
        await spin()
        sending = await send_waiting(request, 2)  # queued again: waits for the next write
        feed.replicas(b=[r1, r2])
        await spin()
        assert sending.result() is True
        request.end_chunks()
        await spin()
        assert r2.upload("A") == [1, 2, END]
        assert r1.upload("A") == [1]

    run(main)


def test_a_refused_request_with_a_full_window_waits_for_the_next_replicas_credit() -> None:
    """The kept items fill the next replica's window again: the item that waited for room
    on the first replica waits for the second one to take something."""

    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1"), cluster.replica("b#2")
        router, feed = make_router(cluster, cap=1, b=[r1])
        request: RoutedRequest = (await sent(router, "A")).request  # type: ignore[attr-defined]
        for item in WINDOW:
            assert await send_now(request, item)
        blocked = await send_waiting(request, "ninth")
        r1.refuse("A")
        await spin()
        feed.replicas(b=[r1, r2])
        await spin()
        assert r2.upload("A") == WINDOW
        assert not blocked.done()
        r2.credit("A")
        await spin()
        assert blocked.result() is True
        assert r2.upload("A") == [*WINDOW, "ninth"]
        assert r1.upload("A") == WINDOW

    run(main)


# --------------------------------------------------------------------------- the request ends


def end_request(how: str, r1: Any, reply: asyncio.Future) -> None:
    if how == "reply":
        r1.answer("A", "answered without reading it all")
    elif how == "error":
        r1.fail("A", ValueError("the app failed"))
    elif how == "stream end":
        r1.chunk("A", "accepted")
        r1.end_stream("A")
    elif how == "cancel":
        reply.cancel()
    else:
        r1.drop()


ENDINGS = ["reply", "error", "stream end", "cancel", "lost"]


@pytest.mark.parametrize("how", ENDINGS)
def test_nothing_more_is_sent_once_the_request_ended(how: str) -> None:
    """Its reply came (a value, an error, a stream's end), its caller cancelled it, or its
    connection was lost: ``send_chunk`` says there is nothing more to send, and sends
    nothing; ``end_chunks`` sends nothing either."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        request: RoutedRequest = reply.request  # type: ignore[attr-defined]
        assert await send_now(request, "first")
        end_request(how, r1, reply)
        await spin()
        assert await send_now(request, "too late") is False
        request.end_chunks()
        await spin()
        assert r1.upload("A") == ["first"]

    run(main)


@pytest.mark.parametrize("how", ENDINGS)
def test_an_item_waiting_for_room_is_dropped_when_the_request_ends(how: str) -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        request: RoutedRequest = reply.request  # type: ignore[attr-defined]
        for item in WINDOW:
            assert await send_now(request, item)
        blocked = await send_waiting(request, "waits")
        end_request(how, r1, reply)
        await spin()
        assert blocked.result() is False
        if how == "cancel":
            assert request.state == CANCELLING  # (its place is held until it stopped)
        assert r1.upload("A") == WINDOW

    run(main)


def test_an_item_waiting_in_the_queue_is_dropped_when_the_request_is_cancelled() -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        await sent(router, "A")
        request = place(router, "B")
        sending = await send_waiting(request, "body")
        request.reply.cancel()
        await spin()
        assert sending.result() is False
        r1.answer("A", "a")
        await spin()
        assert r1.received() == ["A"]

    run(main)


# --------------------------------------------------------------------------- shadow copies


def test_offered_items_beyond_the_room_wait_in_a_backlog_and_follow_the_credits() -> None:
    """A shadow copy's items never wait for its replica: past the window they wait in a
    backlog (one window at most), sent as credits come, and the end after the last."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        request: RoutedRequest = (await sent(router, "A")).request  # type: ignore[attr-defined]
        for item in range(2 * STREAM_WINDOW):
            assert request.offer_chunk(item) is True
        assert request.offer_chunk("one too many") is False  # window + backlog are full
        request.end_chunks()
        await spin()
        assert r1.upload("A") == WINDOW  # the rest waits for room; no end yet
        r1.credit("A", STREAM_WINDOW - 1)
        await spin()
        assert r1.upload("A") == list(range(2 * STREAM_WINDOW - 1))
        r1.credit("A")
        await spin()
        assert r1.upload("A") == [*range(2 * STREAM_WINDOW), END]

    run(main)


def test_a_shadow_copys_backlog_is_bounded_by_the_windows_bytes_too() -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        request: RoutedRequest = (await sent(router, "A")).request  # type: ignore[attr-defined]
        for tag in range(8):  # four in flight, four in the backlog
            assert request.offer_chunk(big(tag)) is True
        assert request.offer_chunk(big(8)) is False
        await spin()
        assert len(r1.upload("A")) == 4
        r1.credit("A", 4)
        await spin()
        assert [item[0] for item in r1.upload("A")] == list(range(8))

    run(main)


def test_items_offered_before_the_write_follow_the_payload_and_stop_once_it_ends() -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        request = place(router, "A")
        assert request.state == CONNECTING
        assert request.offer_chunk("early") is True
        request.end_chunks()
        await spin()
        assert r1.upload("A") == ["early", END]
        r1.answer("A", "done")
        await spin()
        assert request.offer_chunk("late") is False  # the request ended

    run(main)
