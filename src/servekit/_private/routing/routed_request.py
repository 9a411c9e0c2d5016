"""The life of one request in a router, from its backend's queue to the end of its reply.

A ``RoutedRequest`` owns everything the request holds: its place in the queue, its place
(capacity) on a replica, the future of its reply, its cancellation, the window of a
streamed reply, and the metrics that count it. It moves between named states through one
method, ``_apply``, which checks each move against ``TRANSITIONS`` and gives the replica's
place back exactly once, on the event that really ends the request there:

    QUEUED ──granted──▶ CONNECTING ──written──▶ SENT ──replied──▶ ENDED
      ▲                     │                    │ └──streamed──▶ STREAMING ──replied──▶ ENDED
      └──────unsent─────────┘◀──────refused──────┘
    SENT / STREAMING ──cancel──▶ CANCELLING ──stopped / replied / refused──▶ ENDED

A request cancelled after it was written keeps its place until the replica says the work
stopped (or its connection is lost), so a router never sends more work into a replica than
it can take. A request that provably never reached a replica (its connection failed, or the
replica refused it as full) goes back first in line; one that may have started is never
sent twice. The reply can be a stream; so can the request itself (a body sent as it
arrives, WebSocket messages): after its payload, its items go out as the replica grants
room (``send_chunk``), and those the replica has not yet taken are kept until it takes
the first one, so a request refused as full is sent elsewhere whole.
"""

from __future__ import annotations

import asyncio
import collections
import pickle
import weakref
from typing import Any, Deque, Dict, List, Optional, Protocol

from servekit._private.wire.transport import (
    _IN_CREDIT,
    _REPLY_BUSY,
    _REPLY_ERROR,
    _REPLY_OK,
    _STOPPED,
    _STREAM_CHUNK,
    _STREAM_END,
    Exchange,
    ReplyStream,
    RpcClient,
    StreamWindow,
    decode_error,
    dumps,
    fits_window,
    peer_lost,
)
from servekit.exceptions import RequestTimeoutError, ServeError

# States.
QUEUED = "queued"  # waits in its backend's queue for a replica with room
CONNECTING = "connecting"  # holds a place on a replica whose connection is being opened
SENT = "sent"  # written to the replica; holds its place until the reply
STREAMING = "streaming"  # the reply is a stream; holds the place until the stream ends
CANCELLING = "cancelling"  # its caller left after it was written; holds the place until
# the replica says the work stopped
ENDED = "ended"  # holds nothing

# Events.
GRANTED = "granted"  # a replica with room was picked for it
WRITTEN = "written"  # its frame went out on the replica's connection
UNSENT = "unsent"  # the connection could not be opened, or was closed: nothing went out
REFUSED = "refused"  # the replica was full and refused it: it never ran
REPLIED = "replied"  # the last frame of the reply (a value, an error, a stream's end)
STREAMED = "streamed"  # the first frame of a streamed reply
STOPPED = "stopped"  # the replica stopped the work of a cancelled request
LOST = "lost"  # the connection was lost before the reply ended
CANCEL = "cancel"  # the caller gave up
FAILED = "failed"  # it could not be placed (no replica came back in time)

# (state, event) -> the next state. Any other pair is a bug, raised as such.
TRANSITIONS: Dict[tuple, str] = {
    (QUEUED, GRANTED): CONNECTING,
    (QUEUED, CANCEL): ENDED,
    (QUEUED, FAILED): ENDED,
    (CONNECTING, WRITTEN): SENT,
    (CONNECTING, UNSENT): QUEUED,
    (CONNECTING, CANCEL): ENDED,
    (SENT, REFUSED): QUEUED,
    (SENT, REPLIED): ENDED,
    (SENT, STREAMED): STREAMING,
    (SENT, LOST): ENDED,
    (SENT, CANCEL): CANCELLING,
    (STREAMING, REPLIED): ENDED,
    (STREAMING, LOST): ENDED,
    (STREAMING, CANCEL): CANCELLING,
    (CANCELLING, STOPPED): ENDED,
    (CANCELLING, REPLIED): ENDED,
    (CANCELLING, REFUSED): ENDED,
    (CANCELLING, LOST): ENDED,
    (CANCELLING, CANCEL): CANCELLING,
    (ENDED, CANCEL): ENDED,
}
# States in which the request holds a place on a replica.
_HOLDING = frozenset((CONNECTING, SENT, STREAMING, CANCELLING))


class IllegalTransition(ServeError):
    """A request got an event its state has no move for: a bug in servekit."""


class Reply(asyncio.Future):
    """The future of a routed request's reply. Cancelling it cancels the request at once,
    in the same loop turn (no callback in between in which a reply could slip past).

    It knows its request by a weak reference: the request holds its reply, and a cycle
    between them would keep an ended request (and what it holds) until the cyclic
    collector runs. Whatever sends or reads the request holds it while it lives."""

    __slots__ = ("_request",)

    def __init__(self, request: "RoutedRequest") -> None:
        super().__init__()
        self._request = weakref.ref(request)

    @property
    def request(self) -> Optional["RoutedRequest"]:
        """The request, while anything else still holds it (None once it has ended and
        been dropped)."""
        return self._request()

    def cancel(self, msg: Optional[object] = None) -> bool:
        if not super().cancel(msg):
            return False
        request = self._request()
        if request is not None:
            request.cancel()
        return True


class _Upload:
    """The caller's side of a request's own stream: what is in flight to the replica (its
    ``window``), and the items sent before the replica took any (kept: a replica that
    refuses the request never reads them, and they go out again after the request's
    payload to the next one). A shadow copy's items beyond the window wait in ``backlog``
    (at most a window of them), and the end after them."""

    __slots__ = ("window", "kept", "ended", "backlog", "_changed")

    def __init__(self) -> None:
        self.window = StreamWindow()
        self.kept: Optional[List[bytes]] = []  # None once the replica took an item
        self.ended = False
        self.backlog: Deque[bytes] = collections.deque()
        self._changed: Optional[asyncio.Event] = None

    def wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def changed(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        self._changed.clear()
        await self._changed.wait()


class Place(Protocol):
    """A replica as a request placed on it sees it (``replica_set.ReplicaSlot``)."""

    tag: str
    connection: Optional[RpcClient]

    def connecting(self) -> asyncio.Future: ...
    def release(self, completed: bool) -> None: ...
    def refused(self) -> None: ...
    def lost(self) -> None: ...


class Backend(Protocol):
    """The backend a request is routed to, as the request sees it (``ReplicaSet``)."""

    backend: str
    request_timeout_s: Optional[float]
    requests: Any  # the router's request counter of this backend

    def dequeued(self, request: RoutedRequest) -> None: ...
    def requeue(self, request: RoutedRequest) -> None: ...


class RoutedRequest(Exchange):
    """One request of a router, from its queue to the end of its reply (module docstring).

    ``reply`` is what the caller awaits: the value, the replica's error, a ``ReplyStream``,
    or the error that ended the request. ``first``: it goes ahead of the queue (a request
    put back after it was accepted is never shed). ``shadow``: a copy that is dropped, not
    put back, when it cannot be sent at once. ``trace`` is filled with the replica's tag.
    ``model_id``: the multiplexed model it names (replicas that hold it are preferred).
    """

    __slots__ = ("state", "replica_set", "payload", "reply", "trace", "first", "shadow",
                 "model_id", "slot", "connection", "msg_id", "stream", "expiry", "counted",
                 "dropped", "upload", "_written", "__weakref__")

    def __init__(self, replica_set: Backend, payload: Optional[bytes],
                 trace: Optional[Dict[str, str]] = None, shadow: bool = False,
                 model_id: Optional[str] = None) -> None:
        self.model_id = model_id
        self.state = QUEUED
        self.replica_set = replica_set
        self.payload = payload  # dropped once it ends: the router keeps no copy of it then
        self.reply = Reply(self)
        self.trace = trace
        self.first = False
        self.shadow = shadow
        self.slot: Optional[Place] = None
        self.connection: Optional[RpcClient] = None
        self.msg_id = 0
        self.stream: Optional[ReplyStream] = None
        self.expiry: Optional[asyncio.TimerHandle] = None  # fails it while no replica lives
        self.counted = False  # counted among the requests waiting in the queue
        self.dropped = False  # a shadow copy that found no room
        self.upload: Optional[_Upload] = None  # the request's own stream, if it has one
        self._written: Optional[asyncio.Future] = None

    def __repr__(self) -> str:
        return f"<RoutedRequest {self.state} backend={self.replica_set.backend}>"

    # ------------------------------------------------------------- the one place it moves

    def _apply(self, event: str, completed: bool = False) -> str:
        """Move to the state ``event`` leads to, giving the replica's place back if the
        request leaves it; ``completed``: the replica finished the request's work."""
        before = self.state
        after = TRANSITIONS.get((before, event))
        if after is None:
            raise IllegalTransition(f"A request in state {before!r} got event {event!r}.")
        self.state = after
        if before in _HOLDING and after not in _HOLDING:
            slot, self.slot, self.connection = self.slot, None, None
            assert slot is not None
            slot.release(completed)
        if before == QUEUED and after != QUEUED:
            self.replica_set.dequeued(self)
        upload = self.upload
        if upload is not None:
            upload.wake()
        if after == ENDED:
            # It holds nothing once it has ended: not its bytes, not what it would have
            # sent of its own stream, not the stream of its reply (its reader does).
            self.payload = self.upload = self.stream = None
            if self.expiry is not None:
                self.expiry.cancel()
                self.expiry = None
        return after

    # ------------------------------------------------------------- placing it

    def granted(self, slot: Place) -> None:
        """A replica with room was picked: write the request to it (once connected)."""
        self._apply(GRANTED)
        self.slot = slot
        connection = slot.connection
        if connection is not None and not connection.is_closed:
            self._write(connection)
        else:
            slot.connecting().add_done_callback(self._on_connected)

    def _on_connected(self, connecting: asyncio.Future) -> None:
        if self.state != CONNECTING or self.slot is None:
            return  # cancelled meanwhile: its place was given back then
        if connecting.cancelled() or connecting.exception() is not None:
            self._unsent()  # the slot marked its replica dead
        else:
            self._write(connecting.result())

    def _write(self, connection: RpcClient) -> None:
        assert self.payload is not None  # (it has not ended)
        msg_id = connection.start(self.payload, self)
        if not msg_id:
            # Closed, and perhaps not yet handled: never pick this replica again (a request
            # put back first in line would otherwise pick it forever).
            assert self.slot is not None
            self.slot.lost()
            self._unsent()
            return
        self.msg_id, self.connection = msg_id, connection
        upload = self.upload
        if upload is not None and upload.kept is not None:
            upload.window = StreamWindow(map(len, upload.kept))
            for data in upload.kept:
                connection.send_chunk(msg_id, data)
            if upload.ended and not upload.backlog:
                connection.end_chunks(msg_id)
        self._apply(WRITTEN)
        if self.expiry is not None:  # (armed while it waited for a replica to come back)
            self.expiry.cancel()
            self.expiry = None
        self.replica_set.requests.inc()
        if self.trace is not None:
            assert self.slot is not None
            self.trace["replica"] = self.slot.tag
        written, self._written = self._written, None
        if written is not None and not written.done():
            written.set_result(None)

    def _unsent(self) -> None:
        self._apply(UNSENT)
        self._put_back()

    def _put_back(self) -> None:
        """It never ran: first in line again (a shadow copy is dropped instead)."""
        if self.shadow:
            self.dropped = True
            self._apply(FAILED)
            self._settle_value(None)
            return
        self.first = True
        self.replica_set.requeue(self)

    async def written(self) -> None:
        """Return once the request was written to a replica; raise what ended it first."""
        if self.state not in (QUEUED, CONNECTING):
            return  # (ended: the reply says how)
        if self._written is None:
            self._written = asyncio.get_running_loop().create_future()
        try:
            await self._written
        except asyncio.CancelledError:
            self.cancel()
            raise

    def time_out_after(self, timeout_s: Optional[float]) -> None:
        """Bound the wait for the reply (for a stream, its first chunk): ``timeout_s``, the
        caller's, else the backend's ``request_timeout_s``; none if both are None. Past
        it, the request is cancelled as if its caller had left, and the caller gets
        ``RequestTimeoutError``."""
        if timeout_s is not None:
            bound = f"the handle's timeout_s={timeout_s}"
        elif self.replica_set.request_timeout_s is not None:
            timeout_s = self.replica_set.request_timeout_s
            bound = f"its request_timeout_s={timeout_s}"
        else:
            return
        timer = asyncio.get_running_loop().call_later(timeout_s, self._time_out, bound)
        self.reply.add_done_callback(lambda _: timer.cancel())

    def _time_out(self, bound: str) -> None:
        if self.state in (ENDED, CANCELLING) or self.reply.done():
            return  # (it ended, or its caller left, without settling the reply)
        self._leave(RequestTimeoutError(
            f"No reply from backend '{self.replica_set.backend}' within {bound} s: the "
            f"request was cancelled. Raise the timeout if the backend needs longer."))

    # ------------------------------------------------------------- its own stream

    def _own_stream(self) -> Optional[_Upload]:
        """The request's own stream (made by its first item); None once the request ended
        or its caller left: nothing more of it needs sending."""
        if self.state == ENDED or self.state == CANCELLING:
            return None
        upload = self.upload
        if upload is None:
            upload = self.upload = _Upload()
        return upload

    async def send_chunk(self, item: Any) -> bool:
        """Send one item of the request's own stream once the request is written to a
        replica with room for it; False if the request ended first (its reply came, or it
        failed or was cancelled): nothing more needs sending."""
        upload = self._own_stream()
        if upload is None:
            return False
        data = dumps(item)
        while True:
            state = self.state
            if state == ENDED or state == CANCELLING:
                return False
            if (state == SENT or state == STREAMING) and upload.window.fits(len(data)):
                break
            await upload.changed()
        upload.window.sent(len(data))
        if upload.kept is not None:
            upload.kept.append(data)
        assert self.connection is not None
        self.connection.send_chunk(self.msg_id, data)
        return True

    def offer_chunk(self, item: Any) -> bool:
        """Send one item of the request's own stream without waiting: now if the replica
        has room for it (before the request is written: once it is), else after a backlog
        of at most a window; False if that is full too, or if the request ended. For a
        shadow copy, which never holds its primary back."""
        upload = self._own_stream()
        if upload is None:
            return False
        state = self.state
        data = dumps(item)
        backlog = upload.backlog
        if backlog or not upload.window.fits(len(data)):
            if not fits_window(len(backlog), sum(map(len, backlog)), len(data)):
                return False
            backlog.append(data)
            return True
        upload.window.sent(len(data))
        if state == SENT or state == STREAMING:
            if upload.kept is not None:
                upload.kept.append(data)
            assert self.connection is not None
            self.connection.send_chunk(self.msg_id, data)
        else:  # queued or connecting: it goes out after the request, once written
            assert upload.kept is not None
            upload.kept.append(data)
        return True

    def _send_backlog(self, upload: _Upload) -> None:
        """Send what waits in the backlog as the room allows; the end after the last."""
        connection = self.connection
        if connection is None:
            return
        while upload.backlog and upload.window.fits(len(upload.backlog[0])):
            data = upload.backlog.popleft()
            upload.window.sent(len(data))
            connection.send_chunk(self.msg_id, data)
        if upload.ended and not upload.backlog:
            connection.end_chunks(self.msg_id)

    def end_chunks(self) -> None:
        """The request's own stream has ended (sent now, or after its items if the
        request is put back and written again)."""
        upload = self._own_stream()
        if upload is None:
            return
        upload.ended = True
        if (self.state == SENT or self.state == STREAMING) and self.connection is not None \
                and not upload.backlog:
            self.connection.end_chunks(self.msg_id)

    def fail(self, error: BaseException) -> None:
        """It could not be placed: it ends with ``error``."""
        self._apply(FAILED)
        self._end_with(error)

    # ------------------------------------------------------------- the reply (Exchange)

    def on_reply(self, kind: int, payload: bytes) -> bool:
        state = self.state
        if kind == _IN_CREDIT:  # the replica took an item of the request's own stream
            upload = self.upload
            if upload is not None:
                upload.window.taken()
                upload.kept = None
                if upload.backlog:
                    self._send_backlog(upload)
                upload.wake()
            return False
        if kind == _STREAM_CHUNK:
            if state == SENT:
                self._apply(STREAMED)
                self.stream = ReplyStream(self._grant, self.cancel)
                self.stream.push(payload)
                self._settle_value(self.stream)
            elif state == STREAMING:
                assert self.stream is not None
                self.stream.push(payload)
            return False  # (CANCELLING: a chunk sent before the cancel arrived; dropped)
        if kind == _REPLY_BUSY:
            self.slot.refused()  # type: ignore[union-attr]
            self._apply(REFUSED)
            if state == SENT:
                self._put_back()
            return True
        if kind == _STOPPED:
            self._apply(STOPPED, completed=True)
            return True
        # The last frame: a value, an error, or a stream's end.
        stream = self.stream
        self._apply(REPLIED, completed=True)
        if state == CANCELLING:
            return True
        if kind == _STREAM_END:
            if stream is None:  # a stream with no chunk at all
                stream = ReplyStream(self._grant, self.cancel)
                self._settle_value(stream)
            stream.finish(None)
        elif kind == _REPLY_ERROR:
            if stream is not None:
                stream.finish(decode_error(payload))
            else:
                self._end_with(decode_error(payload))
        elif kind == _REPLY_OK:
            try:
                value = pickle.loads(payload)
            except Exception as exc:
                self._end_with(ServeError(f"A reply could not be unpickled here: {exc!r}"))
            else:
                self._settle_value(value)
        else:
            self._end_with(ServeError(f"The {self._peer()} sent a frame of unknown kind "
                                      f"{kind}."))
        return True

    def on_lost(self, peer: str) -> None:
        state = self.state
        if state == ENDED:
            return  # (a shadow copy ended without a reply; nothing else gets here)
        stream = self.stream
        self.slot.lost()  # type: ignore[union-attr]
        self._apply(LOST)
        if state == STREAMING:
            assert stream is not None
            stream.finish(peer_lost(peer, streaming=True))
        elif state == SENT:
            self._end_with(peer_lost(peer))

    def _grant(self) -> None:
        if self.state == STREAMING and self.connection is not None:
            self.connection.grant(self.msg_id)

    def _peer(self) -> str:
        return f"replica {self.slot.tag}" if self.slot is not None else "replica"

    def _settle_value(self, value: object) -> None:
        if not self.reply.done():
            self.reply.set_result(value)

    def _end_with(self, error: BaseException) -> None:
        """End the caller's wait with ``error``: where it waits for the request to be
        written, if it still does, else in the reply."""
        written, self._written = self._written, None
        if written is not None and not written.done():
            written.set_exception(error)
        elif not self.reply.done():
            self.reply.set_exception(error)

    # ------------------------------------------------------------- cancellation

    def cancel(self) -> None:
        """The caller gave up: leave the queue, or tell the replica to stop the request
        (its place is held until the replica says the work stopped)."""
        self._leave(None)

    def _leave(self, error: Optional[BaseException]) -> None:
        """Cancel the request; its caller sees ``error``, or a cancellation if None."""
        state = self.state
        if state == ENDED:
            return
        self._apply(CANCEL)
        if state in (SENT, STREAMING):
            if self.stream is not None:
                self.stream.finish(error)
            assert self.connection is not None
            self.connection.cancel(self.msg_id)
        if error is not None:
            self._end_with(error)
            return
        if not self.reply.done():
            super(Reply, self.reply).cancel()
        written, self._written = self._written, None
        if written is not None and not written.done():
            written.cancel()

