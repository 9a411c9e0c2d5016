"""Framed, multiplexed RPC over stream sockets: the control plane and the data plane.

One connection carries many requests at once. Every frame is a fixed header
``(payload length, message id, kind)`` followed by a pickle (protocol 5) payload, so a reply
can be matched to its request even when its payload cannot be unpickled.

An address is a Unix socket path (the embedded runtime: the socket lives in a directory only
the instance's owner can enter, and a server accepts only peers of its own user) or
``tcp://host:port`` (the Ray runtime: every byte is encrypted and authenticated by mutual
TLS with the instance's certificate, see ``tls``, and both sides prove they hold the
instance's secret, see ``auth``, before either reads a frame). A TCP peer that vanishes
without closing (a node powered off, a partition) is found by TCP keepalive and, while
requests are in flight, by pings: its connection is aborted and its requests fail.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import logging
import os
import pickle
import socket
import ssl
import struct
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Deque,
    Dict,
    Iterable,
    List,
    Optional,
    Protocol,
    Tuple,
)

from servekit._private import constants, user_errors
from servekit._private.wire import tls
from servekit._private.wire.auth import (
    HANDSHAKE_TIMEOUT_S,
    AuthenticationFailed,
    Handshake,
    get_secret,
)
from servekit.exceptions import BackendUnavailableError, RemoteTraceback, ServeError

logger = logging.getLogger("servekit")

_HEADER = struct.Struct("!IQB")
_REQUEST, _REPLY_OK, _REPLY_ERROR, _REPLY_BUSY, _NOTIFY, _CANCEL = 0, 1, 2, 3, 4, 5
# A streamed reply: chunks, then its end (or an error); the reader grants room by credits.
_STREAM_CHUNK, _STREAM_END, _CREDIT = 6, 7, 8
# The last frame of a request its caller cancelled: the server's work for it has stopped.
_STOPPED = 9
# A client asks whether a silent TCP peer is still there; the peer answers at once.
_PING, _PONG = 10, 11
# A request's own stream (a request body sent as it arrives, WebSocket messages): its
# items, then its end, from the caller; the server grants room by credits, as for replies.
_IN_CHUNK, _IN_END, _IN_CREDIT = 12, 13, 14
# TCP connections of a listener past TLS that may be proving the secret at once; past it,
# the oldest of them is dropped to make room for the newcomer.
MAX_UNAUTHENTICATED = 64
# TCP keepalive: probes after this many idle seconds, then every few seconds, a few times.
_KEEPALIVE = ((getattr(socket, "TCP_KEEPIDLE", None), 10), (socket.TCP_KEEPINTVL, 5),
              (socket.TCP_KEEPCNT, 3))
# Chunks a sender sends ahead of what the reader has taken, and their bytes: the buffer a
# stream may grow (either way: a streamed reply, or a request's own stream). A chunk larger
# than the bytes goes alone, once the reader took every chunk before it.
STREAM_WINDOW = 8
STREAM_WINDOW_BYTES = 4 << 20
_PICKLE_PROTOCOL = 5
# A client writes its frames once this many wait, besides at the end of each loop turn:
# its server starts on them while the client makes more (measured: a FastAPI app behind
# the proxy served 1.7x the requests a second, async handle calls 1.4x, to one write a
# turn). Replies keep one write a turn: their reader is the busier process.
_REQUESTS_PER_WRITE = 4
# Payloads from this size on are written apart from their frame's header, not copied behind
# it (a body of 100 MB is not held twice while it is written).
_COPY_LIMIT = 64 * 1024
# asyncio's own socket transports read with recv(256 KiB): above glibc's mmap threshold
# (128 KiB), so each read maps, faults in and unmaps a fresh block (14 us a read measured,
# against 2.5 us at 64 KiB). Below it the heap serves the read. (uvloop reads into one
# buffer of its own and has no such size.)
_READ_SIZE = 64 * 1024

Handler = Callable[..., Awaitable[Any]]

# The connection whose request the current task serves (set for every handler call).
current_peer: contextvars.ContextVar["_FrameProtocol"] = contextvars.ContextVar("current_peer")


class Busy(Exception):
    """A refusal for now: the server is at capacity.

    A handler raises it to refuse; the caller's future then fails with a ``Busy`` whose
    ``notices`` is how many room notices that connection had received when the refusal
    arrived. The server always sends a notice after a refusal, so a caller that has seen more
    notices than that knows the server has room again, whatever order it handles them in.
    """

    def __init__(self, notices: int = 0) -> None:
        super().__init__(notices)
        self.notices = notices


class Stream:
    """What a handler returns to reply with a stream: the items of ``chunks`` (an async
    iterator), each sent as the reader takes the earlier ones, at most a ``StreamWindow``
    ahead. The iterator is closed when the reader goes away."""

    __slots__ = ("chunks",)

    def __init__(self, chunks: AsyncIterator[Any]) -> None:
        self.chunks = chunks


class StreamWindow:
    """What a stream's sender has sent and its reader not yet taken: at most
    ``STREAM_WINDOW`` chunks and ``STREAM_WINDOW_BYTES`` bytes, or one chunk of any size.
    The reader grants one credit a chunk it takes, in the order they were sent."""

    __slots__ = ("_sizes", "_bytes")

    def __init__(self, sizes: Iterable[int] = ()) -> None:
        self._sizes: Deque[int] = collections.deque(sizes)
        self._bytes = sum(self._sizes)

    def fits(self, size: int) -> bool:
        """Whether a chunk of ``size`` bytes may be sent now."""
        return fits_window(len(self._sizes), self._bytes, size)

    def sent(self, size: int) -> None:
        self._sizes.append(size)
        self._bytes += size

    def taken(self) -> None:
        """The reader took the oldest chunk sent (a credit came)."""
        if self._sizes:
            self._bytes -= self._sizes.popleft()


def fits_window(chunks: int, size_bytes: int, size: int) -> bool:
    """Whether a chunk of ``size`` bytes may join ``chunks`` of ``size_bytes`` bytes in a
    stream's window (a chunk alone always fits)."""
    return not chunks or (chunks < STREAM_WINDOW and size_bytes + size <= STREAM_WINDOW_BYTES)


class _Window:
    """A streamed reply's room: its sender waits here until the reader has taken enough."""

    def __init__(self) -> None:
        self.in_flight = StreamWindow()
        self._granted = asyncio.Event()

    def grant(self) -> None:
        self.in_flight.taken()
        self._granted.set()

    async def take(self, size: int) -> None:
        """Return once a chunk of ``size`` bytes may be sent (counted as sent)."""
        while not self.in_flight.fits(size):
            self._granted.clear()
            await self._granted.wait()
        self.in_flight.sent(size)


class ReplyStream:
    """A stream as its reader sees it: ``async for chunk in stream`` (a streamed reply in
    the caller; a request's own stream in the server that serves it).

    Its owner (what waits for the reply) pushes chunks in and ends it; taking a chunk calls
    ``grant`` (the sender may send one more), and ``cancel()`` calls ``stop`` once (the
    sender is told to stop)."""

    __slots__ = ("_grant", "_stop", "_chunks", "_arrived", "_ended", "_error")

    def __init__(self, grant: Callable[[], object], stop: Callable[[], None]) -> None:
        self._grant = grant
        self._stop = stop
        self._chunks: Deque[bytes] = collections.deque()
        self._arrived: Optional[asyncio.Event] = None
        self._ended = False
        self._error: Optional[BaseException] = None

    def __aiter__(self) -> "ReplyStream":
        return self

    async def __anext__(self) -> Any:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._ended:
                raise StopAsyncIteration
            if self._arrived is None:
                self._arrived = asyncio.Event()
            self._arrived.clear()
            await self._arrived.wait()
        chunk = self._chunks.popleft()
        if not self._ended:
            self._grant()
        return pickle.loads(chunk)

    @property
    def ended(self) -> bool:
        """No more chunks will arrive (some may still wait to be read)."""
        return self._ended

    def cancel(self) -> None:
        """Stop reading: the sender is told to stop; a later read ends the iteration."""
        if not self._ended:
            stop = self._stop
            self.finish(None)
            stop()

    def push(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        if self._arrived is not None:
            self._arrived.set()

    def finish(self, error: Optional[BaseException]) -> None:
        """No more chunks; a read past the last one raises ``error``, if given. An ended
        stream holds nothing of its sender (it grants and stops nothing more)."""
        if self._ended:
            return
        self._ended, self._error = True, error
        self._grant = self._stop = _nothing
        if self._arrived is not None:
            self._arrived.set()


class Exchange(Protocol):
    """What waits for the reply to one request sent on an ``RpcClient``: the connection hands
    it each frame of the reply, in order, and tells it if the connection is lost first."""

    __slots__ = ()

    def on_reply(self, kind: int, payload: bytes) -> bool:
        """Take one frame of the reply; True if it was the last (the connection then
        forgets the request)."""
        ...

    def on_lost(self, peer: str) -> None:
        """The connection to ``peer`` (its name) was lost before the last frame of the
        reply arrived; ``peer_lost`` makes the error to report."""
        ...


def peer_lost(peer: str, streaming: bool = False) -> BackendUnavailableError:
    """The error of a request whose connection to ``peer`` was lost before its reply ended."""
    during = "in the middle of a streamed reply" if streaming else \
        "while a request was in flight on it"
    return BackendUnavailableError(
        f"The {peer} went away (its process exited or was killed, or the connection to it "
        f"broke) {during}.")


class NotSent(BackendUnavailableError):
    """A request was not sent: the peer provably never saw it, so it may be sent elsewhere."""


class ConnectFailed(NotSent):
    """A connection could not be opened (nothing listens, or the peer refused it)."""


class ConnectionClosed(NotSent):
    """A request was not written because its connection was already closed. Unlike
    ``ConnectFailed``, this says nothing about whether the peer can be reached again."""


def tcp_address(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


def parse_tcp_address(address: str) -> Optional[Tuple[str, int]]:
    """``(host, port)`` of a ``tcp://`` address; None for a Unix socket path."""
    if not address.startswith("tcp://"):
        return None
    host, _, port = address[len("tcp://"):].rpartition(":")
    return host.strip("[]"), int(port)


def notify(peer: "_FrameProtocol") -> None:
    """Tell the peer, out of band, that this server has room again."""
    peer.send(0, _NOTIFY, b"")


def dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=_PICKLE_PROTOCOL)


def _unpicklable_part(value: Any, depth: int = 3) -> str:
    """The type name of the innermost item of ``value`` that cannot be pickled."""
    if depth and isinstance(value, (tuple, list, dict)):
        for item in (value.values() if isinstance(value, dict) else value):
            try:
                dumps(item)
            except Exception:
                return _unpicklable_part(item, depth - 1)
    return type(value).__name__


def dumps_by_value(value: Any, main_by_value: bool = False) -> bytes:
    """``value`` pickled: plain pickle first (fast); what it cannot carry (a lambda, a
    closure, an instance of a class sent by value) through cloudpickle, as Ray sends
    values. ``main_by_value``: also send by value what refers to ``__main__`` (the
    caller's script, which the other process cannot import). Raises what cloudpickle
    raises for what neither can carry."""
    try:
        payload = dumps(value)
    except Exception:
        payload = None
    if payload is None or (main_by_value and b"__main__" in payload):
        return user_errors.dumps_by_value(value, protocol=_PICKLE_PROTOCOL)
    return payload


def encode_call(name: str, args: tuple) -> bytes:
    """The payload of a request; a ``TypeError`` naming the type that cannot be pickled.
    (A string argument holding "__main__" only costs the slower path.)"""
    try:
        return dumps_by_value((name, args), main_by_value=True)
    except Exception as exc:
        raise TypeError(f"The request cannot be sent: its arguments hold a "
                        f"{_unpicklable_part(args)} that cannot be pickled ({exc}). Pass "
                        "picklable values (plain data, numpy arrays, ...).") from exc


def encode_error(exc: BaseException) -> bytes:
    """Pickle ``exc`` with its traceback (the user's frames); fall back to a ServeError
    naming it."""
    tb = user_errors.user_traceback(exc)
    try:
        return dumps((exc, tb))
    except Exception:
        return dumps((ServeError(f"{type(exc).__name__}: {exc}"), tb))


def decode_error(payload: bytes) -> BaseException:
    """Rebuild an exception sent by ``encode_error``; its remote traceback is its ``__cause__``."""
    try:
        exc, tb = pickle.loads(payload)
    except Exception as load_error:
        return ServeError(f"A remote error could not be unpickled here: {load_error!r}")
    exc.__cause__ = RemoteTraceback(tb)
    return exc


def is_remote_error(exc: BaseException) -> bool:
    """Whether ``exc`` was raised in the peer and sent back (not raised by this transport)."""
    return isinstance(exc.__cause__, RemoteTraceback)


class _FrameProtocol(asyncio.Protocol):
    """Splits the byte stream into frames and hands each one to ``on_frame``.

    With a ``handshake``, nothing is read as a frame until the handshake is done; a peer that
    fails it, or takes longer than ``HANDSHAKE_TIMEOUT_S``, is dropped and logged.
    """

    def __init__(self, on_frame: Callable[[int, int, bytes], None],
                 on_lost: Callable[[Optional[Exception]], None],
                 handshake: Optional[Handshake] = None, same_user: bool = False,
                 on_made: Optional[Callable[["_FrameProtocol"], None]] = None,
                 write_every: int = 0) -> None:
        """``same_user``: a Unix socket server's side, which drops a peer of another user
        (``SO_PEERCRED``), whatever the mode of the socket's directory. ``on_made``: told
        of the connection once it is made (for TCP: once TLS is done). ``write_every``: if
        set, frames are also written as soon as that many wait (see ``send``)."""
        self._write_every = write_every or 1 << 62
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._same_user = same_user
        self._on_made = on_made
        self.heard = False  # bytes arrived since the last look (see RpcClient._check_peer)
        self._buffer = bytearray()
        self._unsent: Optional[List[bytes]] = None  # frames sent this loop turn
        self._large = False  # one of them carries a payload written apart from its header
        self.transport: Optional[asyncio.Transport] = None
        self.handshake = handshake
        self.authenticated: Optional[asyncio.Future] = None
        self._deadline: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if getattr(transport, "max_size", 0) > _READ_SIZE:
            transport.max_size = _READ_SIZE  # type: ignore[attr-defined]
        if self._same_user and not _same_user(transport.get_extra_info("socket")):
            logger.warning("Dropped a connection from a process of another user.")
            transport.abort()  # type: ignore[attr-defined]
            return
        if self.handshake is not None:  # (TCP)
            _keep_alive(transport.get_extra_info("socket"))
            loop = asyncio.get_running_loop()
            if not self.handshake.server:  # the client awaits it before it sends anything
                self.authenticated = loop.create_future()
            self._deadline = loop.call_later(
                HANDSHAKE_TIMEOUT_S, self._fail_handshake,
                AuthenticationFailed("the peer did not authenticate in time"))
            opening = self.handshake.opening()
            if opening:
                transport.write(opening)  # type: ignore[attr-defined]
        if self._on_made is not None:
            self._on_made(self)

    def _fail_handshake(self, exc: AuthenticationFailed) -> None:
        if self.handshake is None or self.handshake.done or self.transport is None or \
                self.transport.is_closing():
            return
        if self._deadline is not None:
            self._deadline.cancel()
        if self.handshake.server:
            logger.warning("Dropped a connection from %s: %s.",
                           self.transport.get_extra_info("peername"), exc)
        if self.authenticated is not None and not self.authenticated.done():
            self.authenticated.set_exception(exc)
        self.transport.abort()

    def _shake(self) -> bool:
        """Feed the handshake; True once it is done (and the buffer holds only frames)."""
        assert self.handshake is not None and self.transport is not None
        try:
            used, reply = self.handshake.receive(bytes(self._buffer))
        except AuthenticationFailed as exc:
            self._buffer.clear()
            self._fail_handshake(exc)
            return False
        del self._buffer[:used]
        if reply:
            self.transport.write(reply)
        if not self.handshake.done:
            return False
        if self._deadline is not None:
            self._deadline.cancel()
        if self.authenticated is not None and not self.authenticated.done():
            self.authenticated.set_result(None)
        return True

    def data_received(self, data: bytes) -> None:
        self.heard = True
        buffer = self._buffer
        if not buffer and (self.handshake is None or self.handshake.done):
            # The common case: the read starts with a frame. Payloads are views of ``data``
            # (immutable), not copies; only a partial frame at the end is buffered.
            view = memoryview(data)
            offset = self._frames(view, len(data))
            if offset < len(data):
                buffer += view[offset:]
            return
        buffer += data
        if self.handshake is not None and not self.handshake.done and not self._shake():
            return
        size = len(buffer)
        if size < _HEADER.size or _HEADER.size + _HEADER.unpack_from(buffer)[0] > size:
            return  # the first frame is not whole yet: nothing to copy
        offset = self._frames(memoryview(bytes(buffer)), size)
        del buffer[:offset]

    def _frames(self, view: memoryview, size: int) -> int:
        """Hand each whole frame of ``view`` to ``on_frame``; the offset after the last."""
        offset = 0
        header_size = _HEADER.size
        on_frame = self._on_frame
        while size - offset >= header_size:
            length, msg_id, kind = _HEADER.unpack_from(view, offset)
            end = offset + header_size + length
            if end > size:
                break
            on_frame(msg_id, kind, view[offset + header_size:end])  # type: ignore[arg-type]
            offset = end
        return offset

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self.authenticated is not None and not self.authenticated.done():
            self.authenticated.set_exception(AuthenticationFailed(
                "the peer closed the connection before the handshake ended (it may be busy "
                "authenticating many others, or hold another instance's secret)"))
        self._on_lost(exc)

    def send(self, msg_id: int, kind: int, payload: bytes) -> bool:
        """Write one frame; False if the connection is closing (nothing was written).

        Frames sent in one turn of the event loop go out in one write at its end (under
        load many requests share a system call; alone, a frame waits for nothing), or once
        ``write_every`` of them wait: then the peer starts on the first frames while this
        turn makes the rest, instead of the two processes taking turns, each idle while
        the other works."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        header = _HEADER.pack(len(payload), msg_id, kind)
        unsent = self._unsent
        if unsent is None:
            unsent = self._unsent = []
            asyncio.get_running_loop().call_soon(self.flush)
        if len(payload) < _COPY_LIMIT:
            unsent.append(header + payload)
        else:  # a large payload is written after its header, never copied behind it
            unsent += (header, payload)
            self._large = True
        if len(unsent) >= self._write_every:
            self.flush()
        return True

    def flush(self) -> None:
        """Write the frames sent since the last flush."""
        unsent, self._unsent = self._unsent, None
        transport = self.transport
        if unsent and transport is not None and not transport.is_closing():
            if len(unsent) == 1:
                transport.write(unsent[0])
            elif self._large:
                transport.writelines(unsent)  # (uvloop writes them as they are)
            else:
                transport.write(b"".join(unsent))
        self._large = False

    def close(self) -> None:
        """Close the connection once the frames already sent are written.

        A TLS connection is dropped once they are handed to the socket, without waiting for
        the peer's TLS goodbye: frames, not TLS, say where a conversation ends, and a
        connection closed as its event loop ends (``asyncio.run`` of a handle) would
        otherwise hold its socket until the goodbye that loop no longer waits for."""
        if self.transport is not None:
            self.flush()
            if self.handshake is not None:
                self.transport.abort()
            else:
                self.transport.close()

    def abort(self) -> None:
        """Drop the connection now (its peer is gone: nothing more can be written)."""
        if self.transport is not None:
            self.transport.abort()


def _same_user(sock: Any) -> bool:
    """Whether the peer of a Unix socket runs as this process's user."""
    try:
        credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                      struct.calcsize("3i"))
    except (AttributeError, OSError):
        return False
    return struct.unpack("3i", credentials)[1] == os.getuid()


def _keep_alive(sock: Any) -> None:
    """Let the kernel find a TCP peer that vanished without a FIN (about 25 s idle)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in _KEEPALIVE:
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except (AttributeError, OSError):
        pass  # (a transport without a real socket)


class RpcServer:
    """Serves ``handlers[name](*args)`` to every peer that connects to ``sock``.

    When a peer disconnects, the calls still running for it are cancelled (a handler whose
    work must finish regardless shields it) and ``on_disconnect(peer)`` is called. A handler
    named in ``streaming`` gets the request's own stream (a ``ReplyStream`` of what the
    caller sends with ``RpcClient.send_chunk``) as its first argument.
    """

    def __init__(self, handlers: Dict[str, Handler],
                 on_disconnect: Optional[Callable[["_FrameProtocol"], None]] = None,
                 streaming: Collection[str] = ()) -> None:
        self._handlers = handlers
        self._on_disconnect = on_disconnect
        self._streaming = frozenset(streaming)
        self._server: Optional[asyncio.AbstractServer] = None
        # TCP connections past TLS still proving the secret, oldest first (a dict for its
        # order). A connection enters once TLS is done: one whose TLS fails never does.
        self._authenticating: Dict[_FrameProtocol, None] = {}

    async def start(self, sock: socket.socket) -> None:
        """Serve the listening ``sock``: a Unix socket (peers of this user only), or a TCP
        one (TLS; peers authenticate, at most ``MAX_UNAUTHENTICATED`` at once)."""
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            self._server = await loop.create_unix_server(
                lambda: self._new_connection(same_user=True), sock=sock)
        else:
            secret = get_secret()  # fails here, not per connection, if this process has none
            self._server = await loop.create_server(
                lambda: self._accept(secret), sock=sock, ssl=tls.server_context(secret),
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)

    def _accept(self, secret: bytes) -> "_FrameProtocol":
        return self._new_connection(Handshake(server=True, secret=secret))

    def _authenticate(self, protocol: "_FrameProtocol") -> None:
        """A TCP connection got past TLS and starts proving the secret. Past
        ``MAX_UNAUTHENTICATED`` at once, the oldest is dropped: connections that stall there
        cannot lock out the peers that authenticate in a few milliseconds."""
        authenticating = self._authenticating
        for peer in [p for p in authenticating if p.handshake is None or p.handshake.done]:
            del authenticating[peer]
        while len(authenticating) >= MAX_UNAUTHENTICATED:
            oldest = next(iter(authenticating))
            del authenticating[oldest]
            logger.warning("Dropped a connection from %s: it had not authenticated while %d "
                           "newer ones were waiting to.",
                           oldest.transport.get_extra_info("peername")
                           if oldest.transport is not None else "?",
                           MAX_UNAUTHENTICATED)
            oldest.abort()
        authenticating[protocol] = None

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def _new_connection(self, handshake: Optional[Handshake] = None,
                        same_user: bool = False) -> _FrameProtocol:
        protocol: _FrameProtocol
        tasks: Dict[int, asyncio.Future] = {}  # message id -> the call serving it
        windows: Dict[int, _Window] = {}  # message id -> the room of its streamed reply
        inbound: Dict[int, ReplyStream] = {}  # message id -> the request's own stream
        cancelled: set = set()  # message ids whose caller cancelled them, still running

        def stream_of(msg_id: int) -> ReplyStream:
            """The request's own stream: taking an item grants the caller room for one."""
            stream = inbound.get(msg_id)
            if stream is None:
                stream = inbound[msg_id] = ReplyStream(
                    functools.partial(protocol.send, msg_id, _IN_CREDIT, b""), _nothing)
            return stream

        def ended(msg_id: int, task: asyncio.Future) -> None:
            tasks.pop(msg_id, None)
            inbound.pop(msg_id, None)
            if msg_id in cancelled:
                cancelled.discard(msg_id)
                if task.cancelled() or task.exception() is not None or not task.result():
                    # Its work has stopped and it sent no reply: say so, so the caller can
                    # count the capacity it held as free.
                    protocol.send(msg_id, _STOPPED, b"")

        def on_frame(msg_id: int, kind: int, payload: bytes) -> None:
            if kind == _CREDIT:
                window = windows.get(msg_id)
                if window is not None:
                    window.grant()
                return
            if kind == _CANCEL:  # the caller gave up: stop its call
                running = tasks.get(msg_id)
                if running is not None:
                    cancelled.add(msg_id)
                    running.cancel()
                return
            if kind == _PING:
                protocol.send(0, _PONG, b"")
                return
            if kind == _IN_CHUNK or kind == _IN_END:
                if msg_id in tasks:  # (else its call ended: nobody reads it any more)
                    if kind == _IN_CHUNK:
                        stream_of(msg_id).push(payload)
                    else:
                        stream_of(msg_id).finish(None)
                return
            task = asyncio.ensure_future(self._dispatch(protocol, msg_id, payload, windows,
                                                        stream_of))
            tasks[msg_id] = task
            task.add_done_callback(functools.partial(ended, msg_id))

        def on_lost(exc: Optional[Exception]) -> None:
            self._authenticating.pop(protocol, None)
            # Nobody is left to read the replies: stop the work done for this peer.
            for task in list(tasks.values()):
                task.cancel()
            if self._on_disconnect is not None:
                self._on_disconnect(protocol)

        protocol = _FrameProtocol(on_frame, on_lost, handshake, same_user,
                                  self._authenticate if handshake is not None else None)
        return protocol

    async def _dispatch(self, protocol: _FrameProtocol, msg_id: int, payload: bytes,
                        windows: Dict[int, _Window],
                        stream_of: Callable[[int], ReplyStream]) -> bool:
        """Serve one request; whether a last frame of its reply was sent."""
        current_peer.set(protocol)
        try:
            name, args = pickle.loads(payload)
            handler = self._handlers.get(name)
            if handler is None:
                raise ServeError(f"Unknown RPC method {name!r}.")
            if name in self._streaming:
                args = (stream_of(msg_id), *args)
            result = await handler(*args)
            if isinstance(result, Stream):
                return await _send_stream(protocol, msg_id, result, windows)
            try:
                reply = dumps_by_value(result)
            except Exception as exc:
                raise TypeError(f"The return value of {name!r} is a "
                                f"{_unpicklable_part(result)} that cannot be pickled to send "
                                f"it back ({exc}). Return picklable values.") from exc
        except Busy:
            return protocol.send(msg_id, _REPLY_BUSY, b"")
        except Exception as exc:
            return protocol.send(msg_id, _REPLY_ERROR, encode_error(exc))
        return protocol.send(msg_id, _REPLY_OK, reply)


async def _send_stream(protocol: _FrameProtocol, msg_id: int, stream: Stream,
                       windows: Dict[int, _Window]) -> bool:
    """Send the chunks of ``stream`` as the reader grants room, then its end; whether the
    end was sent. An error raised while iterating (or closing) ends the stream with that
    error (by the caller)."""
    window = windows[msg_id] = _Window()
    try:
        async for chunk in stream.chunks:
            try:
                data = dumps_by_value(chunk)
            except Exception as exc:
                raise TypeError(f"A chunk of the stream is a {_unpicklable_part(chunk)} that "
                                f"cannot be pickled ({exc}). Yield picklable values.") from exc
            await window.take(len(data))
            if not protocol.send(msg_id, _STREAM_CHUNK, data):
                return False  # the reader is gone
    finally:
        windows.pop(msg_id, None)
        close = getattr(stream.chunks, "aclose", None)
        if close is not None:
            await close()
    return protocol.send(msg_id, _STREAM_END, b"")


def _nothing() -> None:
    pass


class _CallReply(Exchange):
    """The reply to a plain call (``RpcClient.send``): settles one future."""

    __slots__ = ("future", "client")

    def __init__(self, future: asyncio.Future, client: "RpcClient") -> None:
        self.future = future
        self.client = client

    def on_reply(self, kind: int, payload: bytes) -> bool:
        future = self.future
        if future.done():
            return True
        if kind == _IN_CREDIT:
            return False  # (a plain call sends no stream of its own)
        if kind == _REPLY_OK:
            try:
                future.set_result(pickle.loads(payload))
            except Exception as exc:
                future.set_exception(ServeError(f"A reply could not be unpickled here: {exc!r}"))
        elif kind == _REPLY_BUSY:
            future.set_exception(Busy(self.client.notices))
        elif kind == _REPLY_ERROR:
            future.set_exception(decode_error(payload))
        else:
            future.set_exception(ServeError(
                f"{self.client.name} sent a frame of kind {kind} for a plain call; only "
                "routed requests read streamed replies."))
        return True

    def on_lost(self, peer: str) -> None:
        if not self.future.done():
            self.future.set_exception(peer_lost(peer))


class RpcClient:
    """One persistent connection to an ``RpcServer``; requests may be sent concurrently.

    ``send`` (and ``call``) reply through a future; ``start`` hands every frame of a reply
    to an ``Exchange`` of the caller's, which can read streamed replies and cancel.
    ``name`` says what the peer is ("replica clf#3a2b1c") in the errors of its requests.
    """

    def __init__(self, address: str, name: Optional[str] = None) -> None:
        self.address = address
        self.name = name or f"servekit process at {address}"
        self._pending: Dict[int, Exchange] = {}
        self._next_id = 0
        self._protocol: Optional[_FrameProtocol] = None
        self.closed: Optional[asyncio.Future] = None
        self.on_notify: Optional[Callable[[], None]] = None
        self.notices = 0  # room notices received so far
        self._pinged = False

    @classmethod
    async def connect(cls, address: str, name: Optional[str] = None) -> "RpcClient":
        """Connect, or raise ``ConnectFailed`` (the peer provably got nothing)."""
        client = cls(address, name)
        loop = asyncio.get_running_loop()
        client.closed = loop.create_future()
        tcp = parse_tcp_address(address)
        try:
            if tcp is None:
                _, protocol = await loop.create_unix_connection(
                    lambda: _FrameProtocol(client._on_frame, client._on_lost,
                                           write_every=_REQUESTS_PER_WRITE), address)
            else:
                handshake = Handshake(server=False)
                _, protocol = await asyncio.wait_for(loop.create_connection(
                    lambda: _FrameProtocol(client._on_frame, client._on_lost, handshake,
                                           write_every=_REQUESTS_PER_WRITE), *tcp,
                    ssl=tls.client_context(handshake.secret), server_hostname=tls.SERVER_NAME,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S), constants.CONNECT_TIMEOUT_S)
                assert protocol.authenticated is not None
                await asyncio.shield(protocol.authenticated)
                loop.call_later(constants.PEER_PING_INTERVAL_S, client._check_peer)
        except AuthenticationFailed as exc:
            raise ConnectFailed(f"Could not connect to {client.name}: authentication "
                                f"failed ({exc}).") from None
        except ssl.SSLError as exc:
            raise ConnectFailed(f"Could not connect to {client.name}: authentication "
                                f"failed (TLS: {exc.reason or exc}; the peer does not hold "
                                "this instance's certificate).") from None
        except asyncio.TimeoutError:
            raise ConnectFailed(f"Could not connect to {client.name}: no answer within "
                                f"{constants.CONNECT_TIMEOUT_S} s.") from None
        except OSError as exc:
            raise ConnectFailed(f"Could not connect to {client.name}: {exc}") from exc
        client._protocol = protocol
        return client

    def _check_peer(self) -> None:
        """TCP: while requests are in flight, ping a peer that sent nothing for a ping
        interval; if it still sends nothing for another, take it for gone (a node powered
        off, a partition: no FIN ever comes) and abort the connection, failing them."""
        protocol = self._protocol
        if self.is_closed or protocol is None:
            return
        if protocol.heard or not self._pending:
            protocol.heard = self._pinged = False
        elif self._pinged:
            logger.warning("No answer from %s for %.0f s with requests in flight: taken for "
                           "gone.", self.name, 2 * constants.PEER_PING_INTERVAL_S)
            protocol.abort()
            return
        else:
            protocol.send(0, _PING, b"")
            self._pinged = True
        asyncio.get_running_loop().call_later(constants.PEER_PING_INTERVAL_S,
                                              self._check_peer)

    @property
    def is_closed(self) -> bool:
        return self.closed is None or self.closed.done()

    def start(self, payload: bytes, exchange: Exchange) -> int:
        """Write an encoded request (``encode_call``) whose reply ``exchange`` takes; its
        message id, or 0 if the connection is closed (nothing was written)."""
        if self.is_closed:
            return 0
        self._next_id += 1
        msg_id = self._next_id
        if not self._protocol.send(msg_id, _REQUEST, payload):  # type: ignore[union-attr]
            return 0
        self._pending[msg_id] = exchange
        return msg_id

    def cancel(self, msg_id: int) -> None:
        """Tell the peer to stop a request; its exchange still gets the reply's last frame
        (``_STOPPED`` if the work stopped before it replied)."""
        if msg_id in self._pending and self._protocol is not None:
            self._protocol.send(msg_id, _CANCEL, b"")

    def grant(self, msg_id: int) -> None:
        """Let the peer send one more chunk of a streamed reply."""
        if msg_id in self._pending and self._protocol is not None:
            self._protocol.send(msg_id, _CREDIT, b"")

    def send_chunk(self, msg_id: int, data: bytes) -> bool:
        """Send one item (pickled) of a request's own stream; False if it could not be
        written (the request ended, or the connection is closed). The caller keeps to the
        room the peer grants (``_IN_CREDIT`` frames reach the request's exchange)."""
        return msg_id in self._pending and self._protocol is not None and \
            self._protocol.send(msg_id, _IN_CHUNK, data)

    def end_chunks(self, msg_id: int) -> None:
        """Say that a request's own stream has ended."""
        if msg_id in self._pending and self._protocol is not None:
            self._protocol.send(msg_id, _IN_END, b"")

    def send(self, payload: bytes) -> asyncio.Future:
        """Send an encoded request (``encode_call``); return the future of its reply.
        Cancelling the future tells the peer to stop the request."""
        future = asyncio.get_running_loop().create_future()
        msg_id = self.start(payload, _CallReply(future, self))
        if not msg_id:
            future.set_exception(ConnectionClosed(f"The connection to {self.name} is closed."))
            return future
        future.add_done_callback(functools.partial(self._cancel_if_cancelled, msg_id))
        return future

    def _cancel_if_cancelled(self, msg_id: int, future: asyncio.Future) -> None:
        if future.cancelled():
            self.cancel(msg_id)

    def call_nowait(self, name: str, *args: Any) -> asyncio.Future:
        """Send a request and return the future of its reply without awaiting it."""
        return self.send(encode_call(name, args))

    async def call(self, name: str, *args: Any) -> Any:
        return await self.call_nowait(name, *args)

    def close(self) -> None:
        if self._protocol is not None:
            self._protocol.close()

    def _on_frame(self, msg_id: int, kind: int, payload: bytes) -> None:
        if kind == _NOTIFY:
            self.notices += 1
            if self.on_notify is not None:
                self.on_notify()
            return
        exchange = self._pending.get(msg_id)
        if exchange is not None and exchange.on_reply(kind, payload):
            self._pending.pop(msg_id, None)

    def _on_lost(self, exc: Optional[Exception]) -> None:
        pending, self._pending = self._pending, {}
        for exchange in pending.values():
            exchange.on_lost(self.name)
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)
