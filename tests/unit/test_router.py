"""Unit tests of the router (``servekit._private.routing.router``): replica choice, refusals, room
notices, dead replicas, endpoint deadlines and shadow copies.

No processes, no sockets: the router gets ``Cluster.connect`` as its ``connect_replica``,
which hands it a real ``RpcClient`` wired to a recording transport. A ``FakeReplica`` plays
the server side by feeding raw frames (replies, refusals, room notices) into that client, so
the router sees exactly what a real connection would deliver, in the order a test chooses.
Long-poll updates go in through ``Router.apply``. Each test runs one event loop; ``spin``
lets ready callbacks and tasks run without letting time pass.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest
from loop_helpers import run, spin, until
from router_fakes import (
    NOTICE,
    Cluster,
    FakeReplica,
    Feed,
    endpoint,
    make_router,
    sent,
    slot,
    start_send,
)

from servekit._private import constants
from servekit._private.routing.router import Router
from servekit._private.wire.transport import ConnectFailed, RpcClient
from servekit.exceptions import (
    BackendOverloadedError,
    BackendUnavailableError,
    EndpointNotFoundError,
)

# --------------------------------------------------------------------------- basics


def test_reply_reaches_the_caller() -> None:
    """A request is written to a replica and its reply ends the caller's future."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, b=[r1])
        reply = await sent(router, "A")
        assert r1.received() == ["A"]
        r1.answer("A", "a")
        await spin()
        assert reply.result() == "a"

    run(main)


def test_requests_wait_in_order_for_room_under_the_cap() -> None:
    """With every replica at its cap, requests wait and go out in arrival order as room
    frees, never more than the cap at once."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=2, b=[r1])
        first = [await sent(router, v) for v in ("A", "B")]
        waiting = [start_send(router, v) for v in ("C", "D", "E")]
        await spin()
        assert r1.received() == ["A", "B"]
        assert not any(task.done() for task in waiting)
        r1.answer("B", "b")
        await spin()
        assert r1.received() == ["A", "B", "C"]
        r1.answer("A", "a")
        r1.answer("C", "c")
        await spin()
        assert r1.received() == ["A", "B", "C", "D", "E"]
        assert [f.result() for f in first] == ["a", "b"]
        assert [t.done() for t in waiting] == [True, True, True]

    run(main)


def test_idle_replicas_share_the_load() -> None:
    """Requests go to the least busy replica: two replicas with cap 2 get two each."""

    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1"), cluster.replica("b#2")
        router, _ = make_router(cluster, cap=2, b=[r1, r2])
        for value in "ABCD":
            await sent(router, value)
        assert len(r1.received()) == len(r2.received()) == 2

    run(main)


# --------------------------------------------------------------------------- 1. refusals


def test_refusal_and_room_notice_read_together_do_not_leave_the_replica_full() -> None:
    """The replica refuses A (full because of another router) and says it has room again;
    both frames are read in one chunk. The refused A must then be sent again, first in
    line, and the queued B after it.

    Old behaviour caught: the refusal's callback marked the replica full after the notice had
    cleared it, so nothing was ever sent to that replica again (B and A's retry hung)."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        reply_a = await sent(router, "A")
        send_b = start_send(router, "B")
        await spin()
        assert r1.received() == ["A"] and not send_b.done()

        r1.feed(r1.busy_frame("A"), NOTICE)
        await spin()
        assert r1.received() == ["A", "A"], "the refused A was not sent again after the notice"
        r1.answer("A", "a")
        await spin()
        assert reply_a.result() == "a"
        assert r1.received() == ["A", "A", "B"], "B was not delivered after A's answer"
        assert send_b.done()
        r1.answer("B", "b")
        await spin()
        assert send_b.result().result() == "b"

    run(main)


def test_notice_before_refusal_keeps_the_replica_full_until_the_next_notice() -> None:
    """A notice counted before a refusal is older than it: the replica stays full, nothing
    is re-sent, until a later notice; then the refused request goes first, ahead of B.

    Catches the opposite mistake: ignoring refusals (re-sending to a full replica at once)."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        reply_a = await sent(router, "A")
        send_b = start_send(router, "B")
        await spin()
        r1.notice()  # room notice for an earlier refusal, read while A is in flight
        await spin()
        r1.refuse("A")
        await spin()
        assert r1.received() == ["A"], "a full replica got requests before its notice"
        assert not reply_a.done() and not send_b.done()

        r1.notice()
        await spin()
        assert r1.received() == ["A", "A"], "the refused request must go first"
        r1.answer("A", "a")
        await spin()
        assert reply_a.result() == "a"
        assert r1.received() == ["A", "A", "B"]

    run(main)


def test_refused_request_goes_to_another_replica_with_room() -> None:
    """A request refused by one replica is delivered to another that has room, once, and
    its reply reaches the caller; its trace (for the access log) names the second."""

    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1"), cluster.replica("b#2")
        router, _ = make_router(cluster, cap=1, b=[r1, r2])
        trace: Dict[str, str] = {}
        reply = await router.send("ep", "call", None, ("A",), trace=trace)
        [first] = [r for r in (r1, r2) if r.received()]
        other = r2 if first is r1 else r1
        assert trace == {"backend": "b", "replica": first.tag}
        first.refuse("A")
        await spin()
        assert other.received() == ["A"] and first.received() == ["A"]
        assert trace["replica"] == other.tag  # the access log names the one that ran it
        other.answer("A", "a")
        await spin()
        assert reply.result() == "a"

    run(main)


def test_refused_request_whose_caller_gave_up_is_not_sent_again() -> None:
    """A caller cancels the reply of a request that was refused and waits for room (e.g.
    ``asyncio.wait_for`` on a handle call timed out). The request never ran and nobody
    waits for it: when room comes it must not be sent, and the room goes to the next request.

    Fails on the current code (see the report): the redelivery ignores the cancellation,
    so the abandoned request runs anyway and B waits behind it."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        r1.refuse("A")
        await spin()
        reply.cancel()  # the caller gave up while A waited for room
        send_b = start_send(router, "B")
        await spin()
        r1.notice()
        await spin()
        assert r1.received() == ["A", "B"], "an abandoned request was sent again"
        assert send_b.done()

    run(main)


# --------------------------------------------------------------------------- 2. pickling


def test_unpicklable_argument_fails_alone_and_uses_no_slot() -> None:
    """An argument that cannot be pickled raises a TypeError naming its type before
    anything is sent; no replica slot is taken, so with cap 1 the next request is delivered
    at once.

    Old behaviour caught: the payload was pickled after a slot was taken and the slot was
    never given back, so every later request to the backend waited forever."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        with pytest.raises(TypeError, match="lock that cannot be pickled"):
            await router.send("ep", "call", None, (threading.Lock(),))
        assert slot(router, "b#1").in_flight == 0
        assert r1.received() == []
        reply = await sent(router, "A")
        assert r1.received() == ["A"]
        r1.answer("A", "a")
        await spin()
        assert reply.result() == "a"
        assert slot(router, "b#1").in_flight == 0

    run(main)


# --------------------------------------------------------------------------- 3. retries


def test_refused_request_whose_retry_cannot_connect_is_still_delivered() -> None:
    """Replica 1 refuses A; the retry picks replica 2, whose connect is refused. A must not
    be lost: it waits for replica 1's room notice and is delivered there.

    Old behaviour caught: the retry's connect error killed the retry task (only logged), so
    the caller's future stayed pending forever."""

    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1"), cluster.replica("b#2")
        r2.refuse_connections = True
        router, feed = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        feed.replicas(b=[r1, r2])  # a second replica appears while A is in flight
        r1.refuse("A")
        await spin()
        assert r2.connects == 1 and not reply.done()

        r1.notice()
        await spin()
        assert r1.received() == ["A", "A"]
        r1.answer("A", "a")
        await spin()
        assert reply.result() == "a"

    run(main)


def test_a_refusal_is_forgotten_with_the_connection_it_came_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica 1 refuses A (it is full), then its connection drops before its room notice
    arrives: once the router connects again, it sends to the replica again. (Found by the
    simulator: the refusal outlived the connection, and no notice ever came on the new one,
    so a healthy, idle replica was never picked again.)"""
    monkeypatch.setattr(constants, "RECONNECT_BACKOFF_S", 0.01)

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        r1.refuse("A")
        await spin()
        r1.drop()  # no notice came before the connection was lost
        await until(lambda: r1.received() == ["A", "A"], "A to be sent again")
        r1.answer("A", "a")
        assert await asyncio.wait_for(reply, 5.0) == "a"

    run(main)


def test_refused_request_with_no_live_replica_left_waits_for_a_replacement() -> None:
    """Replica 1 refuses A, replica 2's connect is refused, then replica 1's connection is
    lost: A (which never ran) waits, and is delivered to the replacement replica that the
    long poll lists next."""

    async def main() -> None:
        cluster = Cluster()
        r1, r2, r3 = (cluster.replica(f"b#{i}") for i in (1, 2, 3))
        r2.refuse_connections = True
        router, feed = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        feed.replicas(b=[r1, r2])
        r1.refuse("A")
        await spin()
        r1.drop()
        await spin()
        assert not reply.done()

        feed.replicas(b=[r1, r2, r3])
        await spin()
        assert r3.received() == ["A"]
        assert r1.received() == ["A"], "A was sent again on a lost connection"
        r3.answer("A", "a")
        await spin()
        assert reply.result() == "a"

    run(main)


@pytest.fixture
def short_no_replica_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(constants, "NO_REPLICA_TIMEOUT_S", 0.1)
    return 0.1


def test_refused_request_ends_when_no_listed_replica_can_be_reached(
        short_no_replica_timeout: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica 1 refuses A, replica 2's connect is refused, replica 1's process dies (its
    connection is lost, its connects refused), and the long poll keeps listing just those
    two (nothing replaces them). A never ran; the router keeps trying both replicas again,
    and every try fails, so A ends with a BackendUnavailableError after
    ``NO_REPLICA_TIMEOUT_S`` (the tries do not restart that deadline) instead of waiting
    forever; so does a new request to the backend.

    Old behaviour caught: the retry died on the connect error and A hung forever. (On
    4b86c1b A still hung: it waited in the queue with no deadline.)"""

    monkeypatch.setattr(constants, "RECONNECT_BACKOFF_S", 0.005)
    monkeypatch.setattr(constants, "MAX_RECONNECT_BACKOFF_S", 0.005)

    monkeypatch.setattr(constants, "RECONNECT_BACKOFF_S", 0.005)
    monkeypatch.setattr(constants, "MAX_RECONNECT_BACKOFF_S", 0.005)

    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1"), cluster.replica("b#2")
        r2.refuse_connections = True
        router, feed = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        feed.replicas(b=[r1, r2])
        r1.refuse("A")
        await spin()
        r1.refuse_connections = True
        r1.drop()
        await spin()
        feed.replicas(b=[r1, r2])  # the controller republishes: the same two replicas
        began = time.monotonic()
        later = start_send(router, "B")
        await spin()
        assert not reply.done() and not later.done(), "failed before the deadline"

        with pytest.raises(BackendUnavailableError, match="No replica of backend 'b'"):
            await asyncio.wait_for(reply, 5.0)
        with pytest.raises(BackendUnavailableError, match="No replica of backend 'b'"):
            await asyncio.wait_for(later, 5.0)
        assert time.monotonic() - began >= short_no_replica_timeout * 0.9
        assert r1.received() == ["A"] and r2.received() == []
        assert r2.connects > 2  # tried again meanwhile, every try refused

    run(main)


@pytest.mark.parametrize("failure", ["emfile", "unexpected"])
def test_a_replica_whose_connect_failed_is_tried_again_and_serves(
        failure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The only replica's first connect fails (EMFILE, or an error the transport does not
    name): the request is not failed, the replica is not given up on while it is listed,
    and after a short backoff the router connects again and the request is answered; the
    failed connect is tried again once, not in a loop."""
    monkeypatch.setattr(constants, "RECONNECT_BACKOFF_S", 0.01)

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        tries: List[str] = []

        async def flaky_connect(address: str, name: str) -> RpcClient:
            tries.append(address)
            if len(tries) == 1:
                await asyncio.sleep(0)
                if failure == "emfile":
                    raise ConnectFailed(f"Could not connect to {name}: [Errno 24] Too many "
                                        "open files")
                raise RuntimeError("the connect failed in a way nobody expected")
            return await cluster.connect(address, name)

        router, _ = make_router(cluster, cap=1, connect=flaky_connect, b=[r1])
        reply = await asyncio.wait_for(start_send(router, "A"), 5.0)
        r1.answer("A", "a")
        assert await asyncio.wait_for(reply, 5.0) == "a"
        assert len(tries) == 2 and r1.received() == ["A"]
        second = await sent(router, "B")
        r1.answer("B", "b")
        assert await asyncio.wait_for(second, 5.0) == "b"

    run(main)


def test_requests_waiting_for_room_do_not_expire(short_no_replica_timeout: float) -> None:
    """The no-replica deadline is only for backends with no reachable replica: a request
    waiting because the replicas are busy waits as long as it takes (here three deadlines),
    then is delivered."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        first = await sent(router, "A")
        waiting = start_send(router, "B")
        await asyncio.sleep(3 * short_no_replica_timeout)
        assert not waiting.done()
        r1.answer("A", "a")
        await spin()
        assert first.result() == "a"
        assert waiting.done() and r1.received() == ["A", "B"]

    run(main)


def test_request_written_to_a_closing_connection_goes_to_another_replica() -> None:
    """A request that could not be written because its connection was already closing
    (the replica closed it, the loss not yet read) provably never reached the replica: it
    is sent to another replica, and the closing one is not used again.

    Old behaviour caught: the frame was silently dropped, so the request was never sent and
    only failed, with BackendUnavailableError, once the connection loss was read."""

    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1"), cluster.replica("b#2")
        router, feed = make_router(cluster, cap=8, b=[r1])
        in_flight = await sent(router, "A")
        r1.transport.closing = True
        send_b = start_send(router, "B")  # written nowhere: it waits for another replica
        await spin()
        assert not send_b.done() and r1.received() == ["A"]
        feed.replicas(b=[r1, r2])  # r1 still listed: the router must not pick it again
        await spin()
        assert r1.received() == ["A"]
        assert r2.received() == ["B"]
        r2.answer("B", "b")
        await spin()
        assert send_b.result().result() == "b"

        r1.drop()
        await spin()
        assert isinstance(in_flight.exception(), BackendUnavailableError)
        await sent(router, "C")
        assert r2.received() == ["B", "C"] and r1.received() == ["A"]

    run(main)


def run_bounded(test: Any, timeout: float = 10.0) -> None:
    """``run(test)`` on a thread of its own: a router that spins without ever yielding to
    its event loop fails the test instead of hanging the suite (the thread spins on)."""
    failure: List[BaseException] = []

    def target() -> None:
        try:
            run(test)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the router's event loop never got control back"
    if failure:
        raise failure[0]


def test_request_that_meets_a_lost_connection_before_its_loss_is_handled_waits() -> None:
    """A request picks a replica whose connection was just lost, before the router has
    handled the loss (its callbacks still wait on the loop): the replica is dropped then and
    there, and the request waits for the replica that has room next.

    Old behaviour caught: the request picked the same replica again and again without ever
    yielding, so the router's event loop spun forever and every request on it hung (a
    proxy stopped answering after a replica was killed)."""

    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1"), cluster.replica("b#2")
        router, _ = make_router(cluster, cap=1, b=[r1, r2])
        first, second = await sent(router, "A"), await sent(router, "B")
        idle, busy = (r1, r2) if r1.received() == ["A"] else (r2, r1)
        idle.answer("A", "a")
        await spin()
        assert first.result() == "a"

        task = start_send(router, "C")  # it runs before the loss is handled
        idle.transport.lose()
        await spin()
        assert not task.done()  # waiting: the live replica is at its cap
        assert idle.received() == ["A"]
        busy.answer("B", "b")
        await spin()
        assert second.result() == "b"
        assert task.done() and busy.received() == ["B", "C"]
        busy.answer("C", "c")
        await spin()
        assert task.result().result() == "c"

    run_bounded(main)


# --------------------------------------------------------------------------- 4. dead replicas


def test_replica_refusing_connections_is_skipped_and_never_tried_again() -> None:
    """A replica whose connect is refused is marked dead: requests go to the other replica,
    and the dead one is not tried again, even after the long poll lists it again.

    Old behaviour caught: the connect error reached the caller (``send`` raised
    BackendUnavailableError) instead of the request going to the healthy replica."""

    async def main() -> None:
        cluster = Cluster()
        good, bad = cluster.replica("b#1"), cluster.replica("b#2")
        bad.refuse_connections = True
        router, feed = make_router(cluster, cap=8, b=[good, bad])
        replies = [await sent(router, value) for value in "ABCD"]
        assert good.received() == list("ABCD")
        assert bad.connects == 1
        feed.replicas(b=[good, bad])
        replies += [await sent(router, value) for value in "EF"]
        assert good.received() == list("ABCDEF")
        assert bad.connects == 1
        for value in "ABCDEF":
            good.answer(value, value.lower())
        await spin()
        assert [r.result() for r in replies] == list("abcdef")

    run(main)


def test_request_in_flight_on_a_lost_connection_fails_and_is_not_resent() -> None:
    """A request in flight when its replica's connection is lost fails with a
    BackendUnavailableError naming that replica's tag; it may have run, so it is not sent to
    another replica. Later requests go to the other replica, without reconnecting.

    Old behaviour caught: the error named only the socket address, not the replica."""

    async def main() -> None:
        cluster = Cluster()
        r1, r2 = cluster.replica("b#1aa2"), cluster.replica("b#3bb4")
        router, _ = make_router(cluster, cap=1, b=[r1, r2])
        reply = await sent(router, "A")
        [holder] = [r for r in (r1, r2) if r.received()]
        other = r2 if holder is r1 else r1
        holder.drop()
        await spin()
        error = reply.exception()
        assert isinstance(error, BackendUnavailableError)
        assert holder.tag in str(error)
        assert other.received() == []
        assert holder.received() == ["A"]

        for value in "BC":
            later = await sent(router, value)
            other.answer(value, value.lower())
            await spin()
            assert later.result() == value.lower()
        assert other.received() == ["B", "C"]
        assert holder.connects == 1

    run(main)


# --------------------------------------------------------------------------- 5. remote errors


def test_remote_backend_unavailable_error_does_not_mark_the_replica_dead() -> None:
    """A replica whose user code called another endpoint that died answers with a
    BackendUnavailableError of its own. The caller gets that error, but the replica is
    healthy: it keeps getting requests on the same connection.

    Guards the dead-replica rule (new since ef152d1, which never marked replicas dead) from
    treating a remote error like a lost connection."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=1, b=[r1])
        reply = await sent(router, "A")
        r1.fail("A", BackendUnavailableError("replica other#9 went away"))
        await spin()
        error = reply.exception()
        assert isinstance(error, BackendUnavailableError)
        assert "other#9" in str(error)
        assert not slot(router, "b#1").dead

        later = await sent(router, "B")
        assert r1.received() == ["A", "B"]
        assert r1.connects == 1
        r1.answer("B", "b")
        await spin()
        assert later.result() == "b"

    run(main)


# --------------------------------------------------------------------------- 6. deadlines


@pytest.fixture
def short_deadlines(monkeypatch: pytest.MonkeyPatch) -> float:
    """The route grace period, 0.1 s; the missing-endpoint timeout is 0.3 s."""
    monkeypatch.setattr(constants, "ROUTE_GRACE_S", 0.1)
    monkeypatch.setattr(constants, "MISSING_ENDPOINT_TIMEOUT_S", 0.3)
    return 0.1


def test_deleted_endpoint_fails_after_the_route_grace(short_deadlines: float) -> None:
    """A request to an endpoint the long poll removed waits out the grace period, then
    raises EndpointNotFoundError saying it was deleted."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, feed = make_router(cluster, b=[r1])
        feed.endpoints()
        began = time.monotonic()
        task = start_send(router, "A")
        await spin()
        assert not task.done()
        with pytest.raises(EndpointNotFoundError, match="was deleted"):
            await task
        assert time.monotonic() - began >= short_deadlines * 0.9
        assert r1.received() == []

    run(main)


def test_endpoint_deleted_long_ago_fails_at_once_after_other_changes(
        short_deadlines: float) -> None:
    """Once the grace period of a deleted endpoint is over, calls to it fail at once, even
    after updates about other endpoints (the router keeps remembering the deletion)."""

    async def main() -> None:
        cluster = Cluster()
        router, feed = make_router(cluster, b=[cluster.replica("b#1")])
        feed.endpoints()
        with pytest.raises(EndpointNotFoundError):
            await start_send(router, "A")
        feed.endpoints(endpoint("bystander"))
        task = start_send(router, "B")
        await spin()
        assert task.done()
        with pytest.raises(EndpointNotFoundError, match="was deleted"):
            task.result()

    run(main)


def test_unknown_endpoint_without_missing_ok_fails_after_the_grace(
        short_deadlines: float) -> None:
    """A handle checked at creation (missing_ok False) whose endpoint this router never saw
    waits only the grace period for it (it may have just been created), not the 30 s."""

    async def main() -> None:
        cluster = Cluster()
        router, _ = make_router(cluster, b=[cluster.replica("b#1")])
        began = time.monotonic()
        with pytest.raises(EndpointNotFoundError, match="does not exist"):
            await start_send(router, "A", name="nowhere")
        assert short_deadlines * 0.9 <= time.monotonic() - began < 0.3

    run(main)


async def sent_to_a_deleted_endpoint() -> Tuple[FakeReplica, Feed, asyncio.Task]:
    """A request sent to endpoint ``ep`` just deleted (it waits out the grace), the
    endpoint's replica, and the feed that can bring the endpoint back."""
    cluster = Cluster()
    r1 = cluster.replica("b#1")
    router, feed = make_router(cluster, b=[r1])
    feed.endpoints()
    task = start_send(router, "A")
    await spin()
    assert not task.done()
    return r1, feed, task


def test_endpoint_recreated_within_the_grace_gets_the_request(short_deadlines: float) -> None:
    """An endpoint removed and created again within the grace period serves a request
    that arrived in between."""

    async def main() -> None:
        r1, feed, task = await sent_to_a_deleted_endpoint()
        feed.endpoints(endpoint())
        await spin()
        assert task.done()
        assert r1.received() == ["A"]

    run(main)


def test_a_request_cancelled_as_its_endpoint_returns_is_never_sent(
        short_deadlines: float) -> None:
    """A request waiting out the grace of its endpoint, cancelled by its caller in the turn
    the endpoint comes back, ends cancelled and reaches no replica (3.11's wait_for
    dropped such a cancellation, and the request was sent for nobody)."""

    async def main() -> None:
        r1, feed, task = await sent_to_a_deleted_endpoint()
        feed.endpoints(endpoint())
        task.cancel()
        await spin()
        assert task.cancelled()
        assert r1.received() == []

    run(main)


def test_missing_endpoint_fails_after_its_timeout(short_deadlines: float) -> None:
    """A request to an endpoint never seen waits ``MISSING_ENDPOINT_TIMEOUT_S``, then
    raises EndpointNotFoundError saying it does not exist."""

    async def main() -> None:
        cluster = Cluster()
        router, _ = make_router(cluster, b=[cluster.replica("b#1")])
        began = time.monotonic()
        with pytest.raises(EndpointNotFoundError, match="not created within 0.3s"):
            await start_send(router, "A", name="nowhere", missing_ok=True)
        assert time.monotonic() - began >= 0.3 * 0.9

    run(main)


def test_missing_endpoint_created_meanwhile_gets_the_request(short_deadlines: float) -> None:
    """A request to an endpoint that is created while it waits is delivered."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, feed = make_router(cluster, b=[r1])
        task = start_send(router, "A", name="late", missing_ok=True)
        await spin()
        assert not task.done()
        feed.endpoints(endpoint(), endpoint("late"))
        await spin()
        assert task.done()
        assert r1.received() == ["A"]

    run(main)


# --------------------------------------------------------------------------- 7. shadows


def shadow_router(cluster: Cluster, main_replica: FakeReplica,
                  shadow_replica: FakeReplica) -> Router:
    router, feed = make_router(cluster, cap=1, main=[main_replica], shadow=[shadow_replica])
    feed.endpoints(endpoint(traffic={"main": 1.0}, shadows={"shadow": 1.0}))
    return router


def test_refused_shadow_copy_is_dropped_and_the_primary_unaffected() -> None:
    """A shadow copy the shadow replica refuses is counted dropped (not sent, not re-sent);
    the primary request is delivered and answered as usual."""

    async def main() -> None:
        cluster = Cluster()
        primary, shadow = cluster.replica("main#1"), cluster.replica("shadow#1")
        router = shadow_router(cluster, primary, shadow)
        reply = await sent(router, "A")
        assert shadow.received() == ["A"]
        shadow.refuse("A")
        primary.answer("A", "a")
        await spin()
        assert reply.result() == "a"
        assert primary.received() == ["A"]
        assert shadow.received() == ["A"]
        assert router.shadow_stats.counts[("ep", "shadow")] == {
            "sent": 0, "dropped": 1, "failed": 0}

    run(main)


def test_shadow_copy_to_an_unreachable_replica_is_dropped() -> None:
    """Shadow copies to a replica refusing connections are dropped, and once it is marked
    dead it is not tried again; the primary requests are unaffected.

    Old behaviour caught: the connect error counted the copy as sent and failed."""

    async def main() -> None:
        cluster = Cluster()
        primary, shadow = cluster.replica("main#1"), cluster.replica("shadow#1")
        shadow.refuse_connections = True
        router = shadow_router(cluster, primary, shadow)
        for value in "AB":
            reply = await sent(router, value)
            primary.answer(value, value.lower())
            await spin()
            assert reply.result() == value.lower()
        assert shadow.connects == 1
        assert router.shadow_stats.counts[("ep", "shadow")] == {
            "sent": 0, "dropped": 2, "failed": 0}

    run(main)


def test_shadow_copy_that_raises_counts_as_sent_and_failed() -> None:
    """A shadow copy that reaches its replica and raises is counted sent and failed; the
    caller only sees the primary's reply."""

    async def main() -> None:
        cluster = Cluster()
        primary, shadow = cluster.replica("main#1"), cluster.replica("shadow#1")
        router = shadow_router(cluster, primary, shadow)
        reply = await sent(router, "A")
        shadow.fail("A", ValueError("shadow model broke"))
        primary.answer("A", "a")
        await spin()
        assert reply.result() == "a"
        assert router.shadow_stats.counts[("ep", "shadow")] == {
            "sent": 1, "dropped": 0, "failed": 1}

    run(main)


# --------------------------------------------------------------------------- controller address


def test_a_tcp_controller_that_is_restarting_is_waited_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On Ray the controller's TCP port is unserved while Ray restarts it: a router starting
    then retries until the new controller listens, instead of failing."""
    from servekit._private.wire import auth
    from servekit._private.wire.transport import RpcServer

    monkeypatch.setattr(auth, "_secret", b"k" * 32)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    attempts: List[str] = []
    real_connect = RpcClient.connect.__func__  # type: ignore[attr-defined]

    async def main() -> None:
        disconnected = asyncio.Event()
        server = RpcServer({"listen": listen_nothing},
                           on_disconnect=lambda peer: disconnected.set())
        async def counting_connect(cls: Any, address: str, name: Any = None) -> RpcClient:
            attempts.append(address)
            if len(attempts) == 3:  # the new controller comes up after two refusals
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                sock.listen()
                await server.start(sock)
            return await real_connect(cls, address, name)

        monkeypatch.setattr(RpcClient, "connect", classmethod(counting_connect))
        router = await asyncio.wait_for(Router.start(f"tcp://127.0.0.1:{port}"), 10)
        try:
            assert len(attempts) == 3  # two refused, then served
        finally:
            router.close()
            server.close()
            await asyncio.wait_for(disconnected.wait(), 5)

    run(main)


def test_a_tcp_controller_that_moved_is_found_at_its_new_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A controller restarted where its old port could not be had serves elsewhere: the
    router, given the old address, connects where the registered resolver says it is now
    (and looks again while the resolver does not know yet)."""
    from servekit._private.wire import auth, discovery
    from servekit._private.wire.transport import RpcServer

    monkeypatch.setattr(auth, "_secret", b"k" * 32)
    monkeypatch.setattr(discovery, "_resolvers", {})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        old = f"tcp://127.0.0.1:{probe.getsockname()[1]}"  # nothing serves it any more
    lookups: List[str] = []

    async def main() -> None:
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        new = f"tcp://127.0.0.1:{listening.getsockname()[1]}"
        server = RpcServer({"listen": listen_nothing})
        await server.start(listening)

        def where_now() -> Optional[str]:
            lookups.append("lookup")
            return new if len(lookups) >= 2 else None  # the first look finds nothing yet

        discovery.register_controller_resolver(old, where_now)
        router = await asyncio.wait_for(Router.start(old), 10)
        try:
            assert router._controller is not None
            assert router._controller.address == new
            assert len(lookups) >= 2
        finally:
            router.close()
            server.close()

    run(main)


def test_a_unix_controller_socket_that_refuses_means_the_instance_is_gone(
        tmp_path: Any) -> None:
    """Locally the supervisor keeps the controller's socket bound across restarts, so a
    refusal is final: the router fails at once."""
    async def main() -> None:
        with pytest.raises(ConnectFailed):
            await asyncio.wait_for(Router.start(str(tmp_path / "gone.sock")), 1.0)

    run(main)


async def listen_nothing(subscriber_id: str, role: str, known: Dict[str, int]) -> dict:
    """The first poll gets an empty route table; later ones wait, as on a quiet instance."""
    if known.get(constants.KEY_ENDPOINTS, -1) >= 1:
        await asyncio.Event().wait()
    return {constants.KEY_ENDPOINTS: (1, {})}


# --------------------------------------------------------------------------- overload


def test_beyond_max_queued_a_request_is_shed_at_once_and_nothing_is_sent() -> None:
    """Cap 1, queue of 2: the third waiting request fails at once with
    BackendOverloadedError; the queued ones go out, in order, as room frees; then the
    queue takes requests again."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, feed = make_router(cluster, b=[r1])
        feed.caps(max_queued=2, b=1)
        first = await sent(router, "A")
        queued = [start_send(router, v) for v in ("B", "C")]
        await spin()
        shed = start_send(router, "D")
        await spin()
        assert shed.done() and isinstance(shed.exception(), BackendOverloadedError)
        assert "max_queued_requests=2" in str(shed.exception())
        assert r1.received() == ["A"]
        r1.answer("A", "a")
        await spin()
        assert r1.received() == ["A", "B"]
        again = start_send(router, "E")  # a place in the queue is free again
        await spin()
        assert not again.done()
        r1.answer("B", "b")
        await spin()
        r1.answer("C", "c")
        await spin()
        assert r1.received() == ["A", "B", "C", "E"]
        assert first.result() == "a"
        assert [t.done() and t.exception() is None for t in queued] == [True, True]

    run(main)


@pytest.mark.parametrize("max_queued, waiting", [(0, 0), (-1, 50)])
def test_a_queue_of_zero_sheds_whenever_every_replica_is_full_and_minus_one_never(
        max_queued: int, waiting: int) -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, feed = make_router(cluster, b=[r1])
        feed.caps(max_queued=max_queued, b=1)
        await sent(router, "A")
        tasks = [start_send(router, i) for i in range(50)]
        await spin()
        assert sum(not task.done() for task in tasks) == waiting
        assert all(isinstance(task.exception(), BackendOverloadedError)
                   for task in tasks if task.done())
        for task in tasks:
            task.cancel()
        await spin()

    run(main)


def test_a_refused_request_put_back_first_in_line_is_never_shed() -> None:
    """A request the replica refused was accepted before: it goes back to the head of the
    queue even when the queue is full, and is delivered before the queued ones."""

    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, feed = make_router(cluster, b=[r1])
        feed.caps(max_queued=1, b=1)
        refused = await sent(router, "A")
        queued = start_send(router, "B")
        await spin()
        r1.refuse("A")  # full because of another router; the queue is full too
        await spin()
        assert not refused.done()
        r1.notice()
        await spin()
        assert r1.received() == ["A", "A"]
        r1.answer("A", "a")
        await spin()
        assert refused.result() == "a"
        assert r1.received() == ["A", "A", "B"]
        assert not queued.done() or queued.exception() is None

    run(main)


def test_a_caller_that_gives_up_frees_its_place_in_the_queue() -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, feed = make_router(cluster, b=[r1])
        feed.caps(max_queued=1, b=1)
        await sent(router, "A")
        waiting = start_send(router, "B")
        await spin()
        waiting.cancel()
        await spin()
        later = start_send(router, "C")
        await spin()
        assert not later.done()  # queued, not shed
        r1.answer("A", "a")
        await spin()
        assert r1.received() == ["A", "C"]  # B was never sent

    run(main)


# --------------------------------------------------------------------------- cancellation


def test_a_caller_that_cancels_a_delivered_request_has_the_replica_told_to_stop_it() -> None:
    async def main() -> None:
        cluster = Cluster()
        r1 = cluster.replica("b#1")
        router, _ = make_router(cluster, cap=2, b=[r1])
        kept = await sent(router, "A")
        given_up = await sent(router, "B")
        given_up.cancel()
        await spin()
        assert r1.cancelled() == ["B"]
        r1.answer("A", "a")
        await spin()
        assert kept.result() == "a"
        assert r1.cancelled() == ["B"]  # an answered request is never cancelled
        # B's work may still run on the replica: its place is held until the replica says
        # it stopped, so only one more request goes out meanwhile.
        await sent(router, "C")
        send_d = start_send(router, "D")
        await spin()
        assert not send_d.done() and "D" not in r1.received()
        r1.stopped("B")
        await spin()
        assert send_d.done() and r1.received()[-1] == "D"

    run(main)
