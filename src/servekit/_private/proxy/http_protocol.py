"""The proxy's HTTP connections: uvicorn's httptools protocol, bounded against hostile clients.

What a connection may cost the proxy is bounded before any request reaches the app:

- its request head, in raw bytes as they arrive (``max_header_bytes``; a header value sent
  forever is cut off after about one read past the limit), and in header fields;
- its time: a request head must arrive within ``client_timeout_s`` of the connection (or of
  the request's first byte), and a request body may not stall longer than that between two
  reads, nor take longer in all than that plus a second for every ``min_body_rate`` bytes
  (a slowloris client, a byte at a time, holds a connection about that long);
- the bytes of request bodies held at once across all connections (``BodyBudget``); a body
  passed on as it arrives (to an ASGI app) counts only while the proxy holds it, and so do
  the messages of a WebSocket (``websocket_protocol.ProxyWebSocketProtocol``);
- the time a response may wait for a client that stopped reading it (``send_timeout_s``):
  past it the connection is closed, and what the response streams is cancelled;
- its place among the connections: one that waits for a request head holds none a request
  needs. When the connections reach uvicorn's ``limit_concurrency`` (or the room left under
  the open-file limit), the ones idle the longest are closed for the new ones, as nginx
  does with its keep-alive connections; running short of descriptors is logged.

A client that goes away before its response is complete has the callbacks in its scope's
``ON_DISCONNECT`` list called (no task per request waits for the disconnect).
"""

from __future__ import annotations

import collections
import heapq
import http
import itertools
import logging
import resource
from typing import Any, Callable, Deque, List, Optional, Protocol

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from servekit._private import constants

logger = logging.getLogger("servekit.proxy")

# Largest request body the fast lane serves (uvicorn stops reading past it until an ASGI
# app asks for more).
_FAST_BODY_BYTES = 65536
# A scope key: callbacks the protocol calls if the client leaves before its response ends.
ON_DISCONNECT = "servekit.on_disconnect"
# A scope key: the request's ``HeldBody`` (the proxy tells it what it passed on).
HELD_BODY = "servekit.held_body"

# What a connection owes the proxy, for its clock.
_IDLE = "idle"  # nothing: between requests (the keep-alive timeout applies), or answering
_HEAD = "head"  # a request head: the connection is new, or a request has begun
_BODY = "body"  # the rest of a request body


def body_time_left(waited: float, received: int, client_timeout_s: float,
                   min_rate: float) -> float:
    """Seconds a request body may still take: ``client_timeout_s`` plus a second for every
    ``min_rate`` bytes of the ``received`` ones, less the ``waited`` seconds it has taken
    (the rule of Apache's mod_reqtimeout; ``min_rate`` 0: no bound, infinity)."""
    if not min_rate:
        return float("inf")
    return client_timeout_s + received / min_rate - waited


def slow_body_text(waited: float, received: int, client_timeout_s: float,
                   min_rate: float) -> str:
    """The 408's text for a body past ``body_time_left``."""
    return (f"The request body arrived at {received / max(waited, 1e-9):.0f} bytes a second "
            f"over {waited:.0f} s: a body may take client_timeout_s ({client_timeout_s} s) "
            f"plus a second for every {min_rate:.0f} bytes (SERVEKIT_MIN_BODY_RATE).")


# Numbers the connections of a proxy in the order they come.
_NUMBERS = itertools.count()
# At most this many idle connections are closed at once to make room (nginx's figure).
_MAX_EVICTED = 32
# Seconds between two log lines about the same shortage (connections, descriptors).
_WARN_EVERY_S = 10.0


class BodyBudget:
    """The bytes of request bodies one proxy holds at once, across all its connections."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes; False (nothing held) if that would pass the limit."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held -= size


class HeldBody:
    """The bytes of one request's body the proxy holds, counted in the ``BodyBudget``."""

    __slots__ = ("size", "_budget")

    def __init__(self, budget: BodyBudget) -> None:
        self.size = 0
        self._budget = budget

    def taken(self, size: int) -> None:
        """``size`` bytes were passed on (to an ASGI app): no longer held here."""
        size = min(size, self.size)
        self.size -= size
        self._budget.give_back(size)

    def release(self) -> None:
        """The request is over: nothing of its body is held any more."""
        self._budget.give_back(self.size)
        self.size = 0


class ConnectionRoom:
    """The room a proxy has for connections, shared by all of them: the open-file limit
    (RLIMIT_NOFILE) leaves ``descriptors`` for connections (the rest is kept for the
    replicas' connections, logs, ...); past ``warn_at`` descriptors in use, running short is
    logged, at most every ``_WARN_EVERY_S`` (uvloop drops connections it cannot accept
    without a word)."""

    def __init__(self, open_files: Optional[int] = None) -> None:
        if open_files is None:
            open_files = open_file_limit()
        self.open_files = open_files
        self.descriptors = open_files - max(64, open_files // 8)
        self.warn_at = open_files - max(32, open_files // 16)
        self._warned: dict = {}

    def warn(self, what: str, now: float, message: str, *args: Any) -> None:
        if now - self._warned.get(what, -_WARN_EVERY_S) >= _WARN_EVERY_S:
            self._warned[what] = now
            logger.warning(message, *args)


def open_file_limit() -> int:
    """This process's soft limit on open files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class FastLane(Protocol):
    """What a connection needs of the proxy that serves its requests without an ASGI task
    (``proxy.HTTPProxy``)."""

    max_body_bytes: int
    request_timeout_s: Optional[float]

    def serve_now(self, protocol: Any, cycle: Any) -> bool: ...


class ProxyHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of the module docstring.

    Past ``max_header_bytes`` or ``max_header_count`` the client gets 431; past
    ``client_timeout_s``, or below ``min_body_rate``, 408; past the body budget 503. Each
    closes the connection. So does answering a request whose client waits for "100
    Continue" before it sends its body (the next bytes could be that body or the next
    request: neither is guessed).
    """

    def __init__(self, *args: Any, max_header_bytes: int, max_header_count: int,
                 client_timeout_s: float, body_budget: BodyBudget,
                 fast_lane: Optional[FastLane] = None,
                 send_timeout_s: float = constants.SEND_TIMEOUT_S,
                 min_body_rate: float = constants.MIN_BODY_RATE,
                 room: Optional[ConnectionRoom] = None, **kwargs: Any) -> None:
        """``fast_lane``: the proxy, when no user middleware wraps it: requests it can take
        are served by ``HTTPProxy.serve_now`` instead of an ASGI task. ``room``: shared by
        the proxy's connections (default: one of this connection's own)."""
        super().__init__(*args, **kwargs)
        self._max_header_bytes = max_header_bytes
        self._max_header_count = max_header_count
        self._client_timeout_s = client_timeout_s
        self._budget = body_budget
        self._head_bytes = 0  # the request line and header fields parsed so far
        self._raw_head = 0  # bytes read while a request head was under way
        self._head_begun = False
        self._too_large = False
        self._owed = _HEAD
        self._since = 0.0  # when what is owed became owed, or the body last moved
        self._min_body_rate = min_body_rate
        self._body_began = 0.0  # when the body began to be read (again, after a pause)
        self._body_bytes = 0  # what arrived of it since
        self._clock: Optional[Any] = None
        self._held: Deque[HeldBody] = collections.deque()  # per request, oldest first
        self._fast_lane = fast_lane
        self._waiting_for_body: Optional[Any] = None  # a fast-lane cycle, body incomplete
        self._send_timeout_s = send_timeout_s
        self._stalled_since: Optional[float] = None  # since when nothing could be written
        self._stalled_size = 0  # what was left to write then
        self._room = room if room is not None else ConnectionRoom()
        self._number = next(_NUMBERS)  # (the order connections came in, to break ties)
        self._earlier: Optional[Any] = None  # a cycle answering while a later one waits
        self._continue_cycle: Optional[Any] = None  # its client waits for 100 Continue

    # ------------------------------------------------------------- the connection

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._since = self.loop.time()
        self._clock = self.loop.call_later(self._client_timeout_s, self._check_client)
        room = self._room
        connections = len(self.connections)
        limit = self.limit_concurrency
        bound = room.descriptors if limit is None else min(limit, room.descriptors)
        if connections >= bound:  # (uvicorn answers 503 to a request at its limit)
            self._make_room(connections - bound + 1)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.fileno() >= room.warn_at:
            room.warn("descriptors", self._since,
                      "The proxy is running out of file descriptors: a new connection got "
                      "descriptor %d, its limit is %d (RLIMIT_NOFILE). Connections past the "
                      "limit are dropped unanswered; idle ones are closed to make room. "
                      "Raise the limit (ulimit -n) or lower HTTPOptions.limit_concurrency.",
                      sock.fileno(), room.open_files)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None
        while self._held:
            self._held.popleft().release()
        cycles = [self.cycle, self._earlier]
        super().connection_lost(exc)
        for cycle in cycles:
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # (uvicorn marks the latest cycle only)
                cycle.message_event.set()
                callbacks: List[Callable[[], None]] = cycle.scope.get(  # type: ignore[assignment]
                    ON_DISCONNECT, [])
                for callback in callbacks:
                    callback()

    def shutdown(self) -> None:
        self._continue_cycle = None  # (closed once answered, whatever its body)
        super().shutdown()

    # ------------------------------------------------------------- room for connections

    def _waiting_since(self) -> Optional[float]:
        """When this connection began to wait for a request head (new, or kept alive);
        None while a request is under way on it."""
        if self.transport.is_closing():  # (it goes once its client read the rest)
            return float("-inf") if self._stalled_since is not None else None
        cycle = self.cycle
        if self._owed == _BODY or self.pipeline or \
                (cycle is not None and not cycle.response_complete):
            return None
        if self._owed == _HEAD:
            return self._since
        task = self.timeout_keep_alive_task
        return self._since if task is None else task.when() - self.timeout_keep_alive

    def _make_room(self, needed: int) -> None:
        """Close the connections idle the longest (at least ``needed`` of them, if there
        are as many, at most ``_MAX_EVICTED``, or an eighth of the idle ones)."""
        idle = [(since, c._number, c) for c in self.connections
                if isinstance(c, ProxyHttpProtocol) and c is not self and
                (since := c._waiting_since()) is not None]
        count = min(len(idle), max(needed, min(_MAX_EVICTED, len(idle) // 8)))
        for _, _, connection in heapq.nsmallest(count, idle):
            connection._evict()
        self._room.warn("connections", self.loop.time(),
                        "The proxy holds %d connections, its limit (HTTPOptions."
                        "limit_concurrency=%s, or %d under the open-file limit): %s.",
                        len(self.connections) + count, self.limit_concurrency,
                        self._room.descriptors,
                        f"closed the {count} idle the longest to make room" if count else
                        "none is idle, requests beyond it get 503")

    def _evict(self) -> None:
        self.connections.discard(self)  # (its room is free from now on)
        if self.transport.is_closing():
            self.transport.abort()  # (closed already, its client reads nothing)
        elif self._head_begun:
            self._refuse(http.HTTPStatus.SERVICE_UNAVAILABLE,
                         "The proxy is at its limit of connections. Retry later.",
                         b"retry-after: 1\r\n")
        else:
            self.transport.close()

    def handle_websocket_upgrade(self) -> None:
        """Hand the connection to the WebSocket protocol: its clock and bounds are that
        protocol's from now on (ping timeouts, message size)."""
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None
        while self._held:
            self._held.popleft().release()
        super().handle_websocket_upgrade()

    def data_received(self, data: bytes) -> None:
        head_under_way = self._head_begun
        super().data_received(data)
        if head_under_way and self._head_begun and not self.transport.is_closing():
            # The whole read belongs to a head that is still incomplete (httptools keeps a
            # partial header field to itself, so the field callbacks cannot count it).
            self._raw_head += len(data)
            if self._raw_head > self._max_header_bytes:
                self._refuse_head()

    # ------------------------------------------------------------- the client's clock

    def _check_client(self) -> None:
        """Close the connection if the client owes a head, or a body that stalled, for
        ``client_timeout_s``, or has read nothing of a response for ``send_timeout_s``;
        else look again when it could next be late."""
        self._clock = None
        now, transport = self.loop.time(), self.transport
        closing = transport.is_closing()
        if closing:
            # What is left to write keeps a closed connection open until its client reads
            # it: for send_timeout_s at most without progress.
            if not transport.get_write_buffer_size():
                return
            if self._stalled_since is None:
                self._stalled(now)
        stalled = self._stalled_since
        if stalled is not None and now - stalled >= self._send_timeout_s:
            if transport.get_write_buffer_size() >= self._stalled_size:
                self._client_not_reading()
                return
            stalled = self._stalled(now)  # it read some meanwhile: a new window
        if closing:
            assert stalled is not None
            self._clock = self.loop.call_at(stalled + self._send_timeout_s,
                                            self._check_client)
            return
        timeout = self._client_timeout_s
        if self._owed == _BODY and self.flow.read_paused:
            self._since = now  # the proxy stopped reading: the client is not late
            self._body_began, self._body_bytes = now, 0
        waited = now - self._since
        if self._owed != _IDLE and waited >= timeout:
            self._client_too_slow()
            return
        if self._owed == _BODY and self._body_too_slow(now):
            return
        delay = timeout - waited if self._owed != _IDLE else timeout
        if stalled is not None:
            delay = min(delay, stalled + self._send_timeout_s - now)
        self._clock = self.loop.call_later(delay, self._check_client)

    def pause_writing(self) -> None:
        """The client reads slower than the proxy writes: the write deadline runs (the
        connection's clock looks by then)."""
        super().pause_writing()
        now = self.loop.time()
        self._stalled(now)
        deadline = now + self._send_timeout_s
        clock = self._clock
        if clock is None or clock.when() > deadline:
            if clock is not None:
                clock.cancel()
            self._clock = self.loop.call_at(deadline, self._check_client)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stalled_since = None

    def _stalled(self, now: float) -> float:
        """Nothing more can be written from ``now``: the client has ``send_timeout_s`` to
        read some of what waits (any progress opens a new window, as nginx's send_timeout
        does)."""
        self._stalled_since, self._stalled_size = now, self.transport.get_write_buffer_size()
        return now

    def _client_not_reading(self) -> None:
        logger.info("Closed a connection whose client read nothing of its response for "
                    "%s s (SERVEKIT_SEND_TIMEOUT_S).", self._send_timeout_s)
        self.transport.abort()  # (a close would wait for the client to read)

    def _body_too_slow(self, now: float) -> bool:
        """Answer 408 if the body has taken longer than ``client_timeout_s`` plus a second
        for every ``min_body_rate`` bytes that arrived; whether it did."""
        elapsed = now - self._body_began
        if body_time_left(elapsed, self._body_bytes, self._client_timeout_s,
                          self._min_body_rate) >= 0:
            return False
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self._refuse(http.HTTPStatus.REQUEST_TIMEOUT, slow_body_text(
                elapsed, self._body_bytes, self._client_timeout_s, self._min_body_rate))
        else:
            self.transport.close()
        return True

    def _client_too_slow(self) -> None:
        what = "request head" if self._owed == _HEAD else "request body"
        cycle = self.cycle
        if self._owed == _HEAD or (cycle is not None and not cycle.response_started):
            self._refuse(http.HTTPStatus.REQUEST_TIMEOUT,
                         f"The {what} did not arrive within {self._client_timeout_s} s "
                         "(HTTPOptions.client_timeout_s).")
        else:
            self.transport.close()

    # ------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        self._head_bytes = self._raw_head = 0
        self._head_begun = True
        held = HeldBody(self._budget)
        self._held.append(held)
        if self._owed == _IDLE:
            self._owed, self._since = _HEAD, self.loop.time()
        super().on_message_begin()
        self.scope[ON_DISCONNECT] = []  # type: ignore[literal-required]
        self.scope[HELD_BODY] = held  # type: ignore[literal-required]

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._max_header_bytes or \
                len(self.headers) >= self._max_header_count:
            self._too_large = True
            raise ValueError("request head too large")  # stops the parser

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_begun = False
        self._owed, self._since = _BODY, self.loop.time()
        self._body_began, self._body_bytes = self._since, 0
        limit = self.limit_concurrency
        if limit is not None and len(self.connections) >= limit:
            # (connections busy when the last ones came may be idle now: room for a request)
            self._make_room(len(self.connections) - limit + 1)
        earlier = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is earlier:
            return  # (a WebSocket upgrade)
        if earlier is not None and not earlier.response_complete:
            self._earlier = earlier  # (a pipelined request waits for it)
        if self.expect_100_continue and cycle.keep_alive:
            # Answered before its body came, it closes the connection (its client may
            # never send that body); once the body is whole, it is kept alive again.
            cycle.keep_alive = False
            self._continue_cycle = cycle

    def on_body(self, body: bytes) -> None:
        if self.transport.is_closing():
            return  # refused: the rest of the read is dropped
        self._since = self.loop.time()
        self._body_bytes += len(body)
        if self._held and not self.cycle.response_complete:
            if not self._budget.take(len(body)):
                self._refuse(http.HTTPStatus.SERVICE_UNAVAILABLE,
                             f"The proxy already holds {self._budget.held} bytes of request "
                             f"bodies, its limit (HTTPOptions.max_held_body_bytes="
                             f"{self._budget.limit}). Retry later.", b"retry-after: 1\r\n")
                return
            self._held[-1].size += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._owed = _IDLE
        if self.transport.is_closing():
            self._waiting_for_body = None
            return  # refused (or the connection closed): nothing of it is served
        super().on_message_complete()
        waiting, self._continue_cycle = self._continue_cycle, None
        if waiting is not None and waiting is self.cycle and not waiting.response_started:
            waiting.keep_alive = True  # (its body is whole: the next bytes are a request)
        cycle, self._waiting_for_body = self._waiting_for_body, None
        if cycle is not None and cycle is self.cycle and not cycle.response_complete:
            assert self._fast_lane is not None
            if not self._fast_lane.serve_now(self, cycle):
                super()._start_asgi_task(cycle, self.app)

    def on_response_complete(self) -> None:
        if self._held:
            self._held.popleft().release()
        self._earlier = None
        super().on_response_complete()

    # ------------------------------------------------------------- the fast lane

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        proxy = self._fast_lane
        if proxy is not None and app is self.app and self._fast_lane_takes(cycle, proxy):
            if cycle.more_body:
                self._waiting_for_body = cycle  # served once its body is complete
                return
            if proxy.serve_now(self, cycle):
                return
        super()._start_asgi_task(cycle, app)

    def _fast_lane_takes(self, cycle: Any, proxy: FastLane) -> bool:
        """Whether the fast lane may serve this request: its body is small and announced
        (the lane reads no body from a client that stalls while a timeout is set, and
        grants no 100-continue), or absent."""
        if cycle.waiting_for_100_continue:
            return False
        for name, value in cycle.scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > min(_FAST_BODY_BYTES,
                                                           proxy.max_body_bytes):
                    return False
                if int(value) and cycle.more_body and proxy.request_timeout_s is not None:
                    return False
            elif name == b"transfer-encoding":
                return False
        return True

    # ------------------------------------------------------------- refusals

    def send_400_response(self, msg: str) -> None:
        if not self._too_large:
            super().send_400_response(msg)
            return
        self._refuse_head()

    def _refuse_head(self) -> None:
        self._refuse(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                     f"The request head is larger than this server accepts (at most "
                     f"{self._max_header_count} headers and {self._max_header_bytes} bytes; "
                     "HTTPOptions.max_header_count / max_header_bytes).")

    def _refuse(self, status: http.HTTPStatus, text: str, headers: bytes = b"") -> None:
        """Answer ``status`` with ``text`` and close the connection (only close it if a
        response is under way: nothing can be said any more)."""
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()
            return
        body = text.encode()
        self.transport.write(b"".join([
            f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode(),
            b"content-type: text/plain; charset=utf-8\r\n", headers,
            b"content-length: ", str(len(body)).encode(), b"\r\n",
            b"connection: close\r\n\r\n", body]))
        self.transport.close()
