"""Unit tests of ``LongPollHost``: versioned keys, listeners, and acknowledgements.

A subscriber's next ``listen`` doubles as its acknowledgement of what it applied; the
controller's ``wait_until_applied`` relies on that to return only once every proxy serves a
change. Each test runs one event loop; ``spin`` lets tasks run without letting time pass.
"""

from __future__ import annotations

import asyncio
from typing import Dict

from loop_helpers import run, spin

from servekit._private.routing.long_poll import LongPollHost

KEY = "endpoints"






def listen(host: LongPollHost, subscriber: str, role: str,
           known: Dict[str, int]) -> asyncio.Task:
    return asyncio.ensure_future(host.listen(subscriber, role, known))


# --------------------------------------------------------------------------- listen


def test_listen_with_a_stale_version_returns_at_once() -> None:
    """A subscriber behind the host gets the latest value and version without waiting."""

    async def main() -> None:
        host = LongPollHost()
        await host.publish(KEY, "v1")
        version = await host.publish(KEY, "v2")
        assert version == host.version(KEY)
        assert await host.listen("proxy-1", "proxy", {KEY: -1}) == {KEY: (version, "v2")}

    run(main)


def test_listen_up_to_date_waits_for_the_next_publish() -> None:
    """A subscriber that has the latest version waits, and gets the next change as soon as
    it is published."""

    async def main() -> None:
        host = LongPollHost()
        version = await host.publish(KEY, "v1")
        task = listen(host, "proxy-1", "proxy", {KEY: version})
        await spin()
        assert not task.done()
        new = await host.publish(KEY, "v2")
        await spin()
        assert task.result() == {KEY: (new, "v2")}
        assert new == version + 1

    run(main)


def test_listen_returns_only_changed_keys_it_asked_for() -> None:
    """Only keys the subscriber listens to and whose version moved are returned; a change
    to another key does not wake it."""

    async def main() -> None:
        host = LongPollHost()
        endpoints = await host.publish(KEY, "e1")
        replicas = await host.publish("replicas", "r1")
        task = listen(host, "router-1", "router", {KEY: endpoints, "replicas": -1})
        await spin()
        assert task.result() == {"replicas": (replicas, "r1")}

        task = listen(host, "router-1", "router", {KEY: endpoints})
        await host.publish("backends", "b1")
        await spin()
        assert not task.done()
        new = await host.publish(KEY, "e2")
        await spin()
        assert task.result() == {KEY: (new, "e2")}

    run(main)


def test_a_restarted_host_resynchronises_subscribers() -> None:
    """A new host (a restarted controller) never reuses the versions of the previous one,
    so a subscriber's next listen gets the current value at once."""

    async def main() -> None:
        old = LongPollHost()
        known = await old.publish(KEY, "before restart")
        new = LongPollHost()
        await new.publish(KEY, "after restart")
        assert new.version(KEY) != known
        assert await new.listen("proxy-1", "proxy", {KEY: known}) == {
            KEY: (new.version(KEY), "after restart")}

    run(main)


# --------------------------------------------------------------------------- acknowledgements


def test_wait_until_applied_returns_once_every_subscriber_of_the_role_listened() -> None:
    """The wait ends, True, only after every subscriber of the role listened again with the
    new version; subscribers of other roles do not count."""

    async def main() -> None:
        host = LongPollHost()
        v1 = await host.publish(KEY, "v1")
        for name in ("proxy-1", "proxy-2"):
            listen(host, name, "proxy", {KEY: v1})
        listen(host, "router-1", "router", {KEY: v1})  # never acknowledges v2
        await spin()
        v2 = await host.publish(KEY, "v2")
        waiter = asyncio.ensure_future(host.wait_until_applied("proxy", KEY, v2, timeout=5.0))
        await spin()
        assert not waiter.done()

        listen(host, "proxy-1", "proxy", {KEY: v2})
        await spin()
        assert not waiter.done(), "returned before proxy-2 applied the change"

        listen(host, "proxy-2", "proxy", {KEY: v2})
        await spin()
        assert waiter.done() and waiter.result() is True

    run(main)


def test_wait_until_applied_is_false_on_timeout() -> None:
    """A subscriber that never acknowledges makes the wait end False after its timeout."""

    async def main() -> None:
        host = LongPollHost()
        v1 = await host.publish(KEY, "v1")
        listen(host, "proxy-1", "proxy", {KEY: v1})
        await spin()
        v2 = await host.publish(KEY, "v2")
        assert await host.wait_until_applied("proxy", KEY, v2, timeout=0.02) is False

    run(main)


def test_wait_until_applied_ignores_a_forgotten_subscriber() -> None:
    """A subscriber the host forgot (its connection dropped) is not waited for."""

    async def main() -> None:
        host = LongPollHost()
        v1 = await host.publish(KEY, "v1")
        listen(host, "proxy-1", "proxy", {KEY: v1})
        listen(host, "proxy-2", "proxy", {KEY: v1})
        await spin()
        v2 = await host.publish(KEY, "v2")
        listen(host, "proxy-1", "proxy", {KEY: v2})
        host.forget("proxy-2")
        assert await host.wait_until_applied("proxy", KEY, v2, timeout=5.0) is True

    run(main)


def test_forgetting_the_last_laggard_ends_a_wait_in_progress() -> None:
    """A wait already in progress ends, True, as soon as the only subscriber it waits for
    is forgotten, instead of running into its timeout (a graceful replica stop waits
    ``graceful_shutdown_wait_loop_s`` for routers this way; a proxy change up to 60 s).

    Fails on the current code: ``forget`` does not wake the waiters (see the report)."""

    async def main() -> None:
        host = LongPollHost()
        v1 = await host.publish(KEY, "v1")
        listen(host, "router-1", "router", {KEY: v1})
        await spin()
        v2 = await host.publish(KEY, "v2")
        waiter = asyncio.ensure_future(host.wait_until_applied("router", KEY, v2, timeout=0.5))
        await spin()
        assert not waiter.done()
        host.forget("router-1")  # its listen was cancelled: the driver process exited
        await spin()
        assert waiter.done(), "the wait did not notice that its laggard was forgotten"
        assert waiter.result() is True

    run(main)


def test_subscriber_not_listening_to_the_key_does_not_hold_the_wait() -> None:
    """A subscriber of the role that does not listen to that key counts as applied."""

    async def main() -> None:
        host = LongPollHost()
        replicas = await host.publish("replicas", "r1")
        listen(host, "proxy-1", "proxy", {"replicas": replicas})
        await spin()
        version = await host.publish(KEY, "e1")
        assert await host.wait_until_applied("proxy", KEY, version, timeout=5.0) is True

    run(main)
