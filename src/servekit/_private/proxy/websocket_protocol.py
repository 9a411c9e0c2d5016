"""The proxy's WebSocket connections: uvicorn's WebSocket protocol, bounded as its HTTP
connections are (``http_protocol``).

A module of its own: the proxy imports it, and with it the websockets library, when its
first connection becomes a WebSocket (``proxy.websocket_protocol``), not at start.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Deque, Optional

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from servekit._private import constants
from servekit._private.proxy.http_protocol import BodyBudget

logger = logging.getLogger("servekit.proxy")


class ProxyWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, bounded as the proxy's HTTP connections are.

    The client's messages it holds count in the proxy's ``BodyBudget``, from their first
    byte to the moment the proxy passed them on (it asks for the next one): a message
    being received, the ones queued for the proxy, the one the proxy holds. Past the
    budget the connection is closed with 1013 (try again later). A client that reads
    nothing of what is sent to it for ``send_timeout_s`` has its connection closed.
    """

    def __init__(self, *args: Any, body_budget: BodyBudget,
                 send_timeout_s: float = constants.SEND_TIMEOUT_S, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._budget = body_budget
        self._send_timeout_s = send_timeout_s
        self._held = 0  # bytes counted in the budget
        self._messages = 0  # bytes of the messages queued or in the proxy's hands
        self._sizes: Deque[int] = collections.deque()  # of the queued messages, in order
        self._in_hand = 0  # the size of the message the proxy took last
        self._stalled_since: Optional[float] = None
        self._stalled_size = 0
        self._send_clock: Optional[Any] = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._count()

    def send_receive_event_to_app(self) -> None:
        size = sum(map(len, self.frames))
        queued = self.queue.qsize()
        super().send_receive_event_to_app()
        if self.queue.qsize() > queued:
            self._sizes.append(size)
            self._messages += size

    async def receive(self) -> Any:
        if self._in_hand:  # the proxy passed the last one on
            self._messages -= self._in_hand
            self._in_hand = 0
            self._count()
        message = await super().receive()
        if message["type"] == "websocket.receive" and self._sizes:
            self._in_hand = self._sizes.popleft()
        return message

    def _count(self) -> None:
        """Make what the budget counts for this connection what it holds now: its queued
        messages, and the bytes of the next one received so far (a partial frame, and the
        frames of a fragmented message)."""
        if self.disconnected or self.close_sent:  # what comes after the close is dropped
            return
        partial = len(self.conn.reader.buffer) + sum(map(len, self.frames))
        held = self._messages + partial
        if held > self._held:
            if not self._budget.take(held - self._held):
                self._refuse()
                return
        else:
            self._budget.give_back(self._held - held)
        self._held = held

    def _refuse(self) -> None:
        """The proxy holds too many request bytes: close with 1013 (try again later).

        The close frame goes out followed by the end of the proxy's half of the stream;
        what the client still sends is read and dropped until it closes its half (or
        ``close_timeout`` passes). Closing at once with its bytes unread would reset the
        connection, and a reset can overtake the close frame: the client would never see
        why it was closed."""
        self._budget.give_back(self._held)
        self._held = 0
        if self.transport.is_closing():
            return
        if not (self.handshake_complete and self.initial_response is None
                and not self.close_sent):
            self.transport.close()
            return
        self.conn.fail(1013, "the proxy holds too many request bytes "
                             "(HTTPOptions.max_held_body_bytes); try again later")
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1013})
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        super().connection_lost(exc)
        self._budget.give_back(self._held)
        self._held = 0
        if self._send_clock is not None:
            self._send_clock.cancel()
            self._send_clock = None

    # ------------------------------------------------------------- the write deadline

    def pause_writing(self) -> None:
        super().pause_writing()
        self._stalled_since = self.loop.time()
        self._stalled_size = self.transport.get_write_buffer_size()
        if self._send_clock is None:
            self._send_clock = self.loop.call_later(self._send_timeout_s, self._check_send)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stalled_since = None  # (the clock, if any, finds nothing late)

    def _check_send(self) -> None:
        self._send_clock = None
        stalled = self._stalled_since
        if stalled is None or self.disconnected:
            return
        now = self.loop.time()
        size = self.transport.get_write_buffer_size()
        if now - stalled >= self._send_timeout_s and size < self._stalled_size:
            stalled = self._stalled_since = now  # it read some meanwhile: a new window
            self._stalled_size = size
        waited = now - stalled
        if waited < self._send_timeout_s:
            self._send_clock = self.loop.call_later(self._send_timeout_s - waited,
                                                    self._check_send)
            return
        logger.info("Closed a WebSocket whose client read nothing for %s s "
                    "(SERVEKIT_SEND_TIMEOUT_S).", self._send_timeout_s)
        self.transport.abort()
