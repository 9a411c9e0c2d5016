"""A seeded network of stream connections between the processes of one simulated world.

Listeners and connections stand in for Unix sockets: ``SimLoop.create_unix_server`` and
``create_unix_connection`` land here, so servekit's real transport (``RpcServer``,
``RpcClient``, its framing and its protocols) runs unchanged over it. The seed decides:

- how long each connect takes, and whether it fails (refused, ``EMFILE``, or an unexpected
  error) — ``connect_faults``;
- how long each write takes to arrive, and how the bytes are cut into reads (frames split
  anywhere), always in order per direction;
- faults injected by the world: a connection reset (possibly with a frame half delivered),
  a peer that stalls (nothing delivered either way for a while), a process that dies (its
  listener gone and every connection of its reset).

``SimTcp`` adds TCP listeners and connections, in a model of TLS, on the same network.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import os
import socket
import ssl
import struct
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

ProtocolFactory = Callable[[], asyncio.Protocol]


class UnexpectedConnectError(RuntimeError):
    """A connect that failed in a way the transport does not name (a bug elsewhere, a
    resource exhausted in a new way): the router must survive it like any other."""


class _PeerSocket:
    """What ``get_extra_info("socket")`` gives: a socket whose peer is this user, at made-up
    loopback addresses (for the HTTP server's logs)."""

    family = socket.AF_UNIX

    def __init__(self, number: int) -> None:
        self._number = number

    def getsockopt(self, level: int, option: int, size: int = 0) -> bytes:
        return struct.pack("3i", os.getpid(), os.getuid(), os.getgid())

    def fileno(self) -> int:
        return 100 + self._number % 100  # (a descriptor number well below any limit)

    def getpeername(self) -> Tuple[str, int]:
        return ("127.0.0.1", 10_000 + self._number)

    def getsockname(self) -> Tuple[str, int]:
        return ("127.0.0.1", 8000)


# Bytes a writer may have in flight before its protocol is told to pause writing.
HIGH_WATER = 64 * 1024


class SimTransport(asyncio.Transport):
    """One end of a simulated connection."""

    def __init__(self, net: "SimNet", connection: "SimConnection", side: int) -> None:
        super().__init__()
        self._net = net
        self._connection = connection
        self._side = side
        self.protocol: Optional[asyncio.Protocol] = None
        self._outbox = bytearray()
        self._closing = False
        self._lost = False
        self._delivery: Optional[asyncio.TimerHandle] = None
        self.reading_paused = False  # this end reads nothing: its peer's writes pile up
        self._writing_paused = False  # this end's protocol was told to pause writing

    # the asyncio.Transport interface the transport code uses

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return _PeerSocket(self._connection.number)
        if name == "peername":
            return self._connection.address
        return default

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes) -> None:  # type: ignore[override]
        if self._closing:
            return
        self._outbox += data
        if len(self._outbox) > HIGH_WATER and not self._writing_paused and \
                self.protocol is not None:
            self._writing_paused = True
            self.protocol.pause_writing()
        self._schedule_delivery()

    def close(self) -> None:
        """Deliver what was written, then end the connection (the peer reads EOF)."""
        if self._closing:
            return
        self._closing = True
        self._schedule_delivery(closing=True)

    def abort(self) -> None:
        """End the connection now; what was not delivered is lost."""
        self._closing = True
        self._outbox.clear()
        self._connection.end(None)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            peer = self._connection.ends[1 - self._side]
            if peer._lost:  # it closed meanwhile: this end now reads the end
                self._connection.end(None)
            else:
                peer._schedule_delivery()

    def is_reading(self) -> bool:
        return not self.reading_paused

    def get_write_buffer_size(self) -> int:
        return len(self._outbox)

    # delivery

    def _schedule_delivery(self, closing: bool = False) -> None:
        if self._delivery is not None or self._lost:
            return
        delay = self._net.delay(self._connection)
        self._delivery = self._net.loop.call_later(delay, self._deliver)

    def _deliver(self) -> None:
        """Hand what was written to the peer, in order, in reads cut where the seed says."""
        self._delivery = None
        connection = self._connection
        if self._lost:
            return
        if connection.stalled_until > self._net.loop.time():
            self._delivery = self._net.loop.call_at(connection.stalled_until, self._deliver)
            return
        peer = connection.ends[1 - self._side]
        if peer.reading_paused:
            if self._closing and not self._outbox:
                # Closed with all it wrote handed over: this end is done (its peer reads
                # the end of the connection once it reads again).
                self._lose(None)
            return  # delivered once the peer reads again (``resume_reading``)
        data, self._outbox = bytes(self._outbox), bytearray()
        rng = self._net.loop.rng
        while data and not peer._lost:
            if peer.reading_paused:  # it stopped reading midway: the rest waits
                self._outbox[:0] = data
                break
            cut = len(data) if rng.random() < 0.7 else rng.randint(1, len(data))
            piece, data = data[:cut], data[cut:]
            assert peer.protocol is not None
            peer.protocol.data_received(piece)  # type: ignore[attr-defined]
        if self._writing_paused and len(self._outbox) < HIGH_WATER // 4 and \
                not self._lost and self.protocol is not None:
            self._writing_paused = False
            self.protocol.resume_writing()
        if self._closing and not self._outbox:
            connection.end(None)

    def _lose(self, exc: Optional[Exception]) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        if self._delivery is not None:
            self._delivery.cancel()
            self._delivery = None
        protocol = self.protocol
        if protocol is not None:
            self._net.loop.call_soon(protocol.connection_lost, exc)


class SimConnection:
    """Two ends; ``ends[0]`` is the client's, ``ends[1]`` the server's."""

    def __init__(self, net: "SimNet", address: str) -> None:
        self.address = address
        net.connects += 1
        self.number = net.connects
        self.ends = (SimTransport(net, self, 0), SimTransport(net, self, 1))
        self.stalled_until = 0.0
        self.over = False
        self.was_reset = False  # the network broke it (not either end)
        self._net = net

    def end(self, exc: Optional[Exception]) -> None:
        """Both ends are lost (their protocols told, in later callbacks)."""
        if self.over:
            return
        self.over = True
        self._net.connections.pop(self, None)
        for end in self.ends:
            end._lose(exc)


class SimServer:
    """What ``create_unix_server`` returns."""

    def __init__(self, net: "SimNet", address: str) -> None:
        self._net = net
        self._address = address

    def close(self) -> None:
        self._net.listeners.pop(self._address, None)

    async def wait_closed(self) -> None:
        pass


class ConnectFaults:
    """How often connects fail, and how (probabilities per connect)."""

    def __init__(self, refused: float = 0.0, emfile: float = 0.0,
                 unexpected: float = 0.0, max_delay_s: float = 0.005) -> None:
        self.refused = refused
        self.emfile = emfile
        self.unexpected = unexpected
        self.max_delay_s = max_delay_s


class SimNet:
    """The simulated network of one world."""

    def __init__(self, loop: Any, connect_faults: Optional[ConnectFaults] = None,
                 max_delay_s: float = 0.002) -> None:
        self.loop = loop
        self.listeners: Dict[str, ProtocolFactory] = {}
        self.frozen: Dict[str, float] = {}  # address -> until when it delivers nothing
        self.reliable: Set[str] = set()  # addresses whose connects never fail
        self.connections: Dict[SimConnection, None] = {}  # (ordered: runs replay exactly)
        self.connect_faults = connect_faults or ConnectFaults()
        self.max_delay_s = max_delay_s
        self.connects = 0
        self.failed_connects: List[Tuple[str, str]] = []  # (address, how)

    def delay(self, connection: SimConnection) -> float:
        """How long a write takes to arrive: often nothing more than a loop turn."""
        rng = self.loop.rng
        return 0.0 if rng.random() < 0.3 else self.loop.ticks(0, self.max_delay_s)

    def listen(self, factory: ProtocolFactory, address: str) -> SimServer:
        self.listeners[address] = factory
        return SimServer(self, address)

    async def connect(self, factory: ProtocolFactory,
                      address: str) -> Tuple[SimTransport, asyncio.Protocol]:
        rng = self.loop.rng
        faults = self.connect_faults if address not in self.reliable else ConnectFaults()
        await asyncio.sleep(self.loop.ticks(0, faults.max_delay_s))
        roll = rng.random()
        if roll < faults.refused:
            self._failed(address, "refused")
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        roll -= faults.refused
        if roll < faults.emfile:
            self._failed(address, "EMFILE")
            raise OSError(errno.EMFILE, "Too many open files")
        roll -= faults.emfile
        if roll < faults.unexpected:
            self._failed(address, "unexpected")
            raise UnexpectedConnectError("simulated: the connect failed unexpectedly")
        server_factory = self.listeners.get(address)
        if server_factory is None:
            self._failed(address, "no listener")
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        connection = SimConnection(self, address)
        connection.stalled_until = self.frozen.get(address, 0.0)
        self.connections[connection] = None
        client_end, server_end = connection.ends
        server_protocol = server_factory()
        server_end.protocol = server_protocol
        server_protocol.connection_made(server_end)
        client_protocol = factory()
        client_end.protocol = client_protocol
        client_protocol.connection_made(client_end)
        return client_end, client_protocol

    def _failed(self, address: str, how: str) -> None:
        self.failed_connects.append((address, how))

    # ------------------------------------------------------------- faults

    def reset(self, connection: SimConnection) -> None:
        """The connection breaks: what is in flight is lost, both ends are told."""
        connection.was_reset = True
        connection.end(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))

    def stall(self, address: str, until: float) -> None:
        """Nothing is delivered on ``address``'s connections, either way, until ``until``
        (a process stopped with SIGSTOP: connects still succeed, nothing is read)."""
        self.frozen[address] = max(self.frozen.get(address, 0.0), until)
        for connection in list(self.connections):
            if connection.address == address:
                connection.stalled_until = max(connection.stalled_until, until)

    def kill(self, address: str) -> None:
        """The process serving ``address`` dies: no more connects, every connection reset."""
        self.listeners.pop(address, None)
        for connection in list(self.connections):
            if connection.address == address:
                connection.end(None)


# ----------------------------------------------------------------- TCP, in TLS

# The TLS 1.3 handshake with certificates both ways, as modelled (every message is one
# marker and 32 bytes): the client's hello; the server's answer, with the certificate it
# presents, after which the client checks it against its pin and is done; the client's
# certificate, which the server checks against its pin before it is done.
CLIENT_HELLO = b"TLS?" + bytes(32)
SERVER_HELLO = b"TLS!"
CLIENT_FINISHED = b"TLS."
TLS_MESSAGE_SIZE = len(CLIENT_HELLO)
_SSL_HANDSHAKE_TIMEOUT_S = 60.0  # asyncio's, when none is given


def pin_of(context: ssl.SSLContext) -> bytes:
    """What a TLS context trusts and presents, as the model compares it: the digest of its
    pinned certificate (servekit's contexts trust that one certificate and present it)."""
    return hashlib.sha256(b"".join(context.get_ca_certs(binary_form=True))).digest()


class _TlsServerSide(asyncio.Protocol):
    """The server's TLS under the application's protocol, as asyncio's ``SSLProtocol``: the
    application's protocol is made when the connection is accepted, but told of the
    connection only once the handshake is done; a handshake that fails (bytes that are not
    TLS, an untrusted certificate, the peer gone, not done within ``timeout_s``) aborts the
    connection, tells the application nothing, and lets go of its protocol (whatever else
    refers to that protocol still keeps it)."""

    def __init__(self, loop: Any, app_factory: ProtocolFactory, pin: bytes,
                 timeout_s: float) -> None:
        self._loop = loop
        self._app: Optional[asyncio.Protocol] = app_factory()
        self._pin = pin
        self._timeout_s = timeout_s
        self._buffer = bytearray()
        self._greeted = False  # the client's hello was answered
        self._timer: Optional[asyncio.TimerHandle] = None
        self.transport: Optional[SimTransport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._timer = self._loop.call_later(self._timeout_s, self._fail)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        transport = self.transport
        assert transport is not None
        while True:
            message = bytes(self._buffer[:TLS_MESSAGE_SIZE])
            expected = CLIENT_FINISHED + self._pin if self._greeted else CLIENT_HELLO
            if not expected.startswith(message):
                self._fail()  # not TLS, or a certificate this server does not trust
                return
            if len(message) < TLS_MESSAGE_SIZE:
                return
            del self._buffer[:TLS_MESSAGE_SIZE]
            if self._greeted:
                break
            self._greeted = True
            transport.write(SERVER_HELLO + self._pin)
        rest, app = bytes(self._buffer), self._app
        assert app is not None
        self._end()
        transport.set_protocol(app)
        app.connection_made(transport)
        if rest and not transport.is_closing():
            app.data_received(rest)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._end()

    def _fail(self) -> None:
        transport = self.transport
        self._end()
        if transport is not None:
            transport.abort()

    def _end(self) -> None:
        """The handshake is over: this layer holds nothing more."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._app = None


class _TlsClientSide(asyncio.Protocol):
    """The client's TLS, as ``SSLProtocol``: ``done`` is the application's protocol once the
    server presented the pinned certificate (the client is done before the server, which
    has the client's certificate still to check), or the error ``create_connection``
    raises."""

    def __init__(self, loop: Any, app_factory: ProtocolFactory, context: ssl.SSLContext,
                 timeout_s: float) -> None:
        self._loop = loop
        self._app_factory = app_factory
        self._pin = pin_of(context)
        self._timeout_s = timeout_s
        self._buffer = bytearray()
        self._timer: Optional[asyncio.TimerHandle] = None
        self.transport: Optional[SimTransport] = None
        self.done: asyncio.Future = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._timer = self._loop.call_later(self._timeout_s, self._fail, ConnectionAbortedError(
            f"SSL handshake is taking longer than {self._timeout_s} seconds: aborting the "
            "connection"))
        self.transport.write(CLIENT_HELLO)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) < TLS_MESSAGE_SIZE:
            return
        if bytes(self._buffer[:TLS_MESSAGE_SIZE]) != SERVER_HELLO + self._pin:
            self._fail(ssl.SSLCertVerificationError(
                "simulated: certificate verify failed (the server's certificate is not the "
                "pinned one)"))
            return
        rest, transport = bytes(self._buffer[TLS_MESSAGE_SIZE:]), self.transport
        assert transport is not None
        self._end()
        transport.write(CLIENT_FINISHED + self._pin)
        app = self._app_factory()
        transport.set_protocol(app)
        app.connection_made(transport)
        if rest and not transport.is_closing():
            app.data_received(rest)  # type: ignore[attr-defined]
        if not self.done.done():
            self.done.set_result(app)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._fail(ConnectionResetError(errno.ECONNRESET, "Connection lost"))

    def _fail(self, exc: Exception) -> None:
        self._end()
        if not self.done.done():
            self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def _end(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class SimTcp:
    """TCP listeners and connections on a ``SimNet``, in TLS when given an ``ssl`` context:
    ``install()`` makes its loop's ``create_server`` and ``create_connection`` land here,
    so servekit's TCP transport (TLS, then the instance secret's handshake) runs unchanged.

    TLS is modelled, not run: TLS 1.3's order of messages, each certificate checked against
    the pinned one (``pin_of``), and asyncio's order of events around them (see
    ``_TlsServerSide``); bytes that are not TLS, an untrusted certificate, a peer gone
    mid-handshake or one that takes longer than ``ssl_handshake_timeout`` fail it.
    Addresses are ``host:port``; delays, stalls, resets and kills are ``SimNet``'s."""

    def __init__(self, net: SimNet) -> None:
        self.net = net

    def install(self) -> None:
        loop = self.net.loop
        loop.create_server = self.create_server
        loop.create_connection = self.create_connection

    async def create_server(self, protocol_factory: ProtocolFactory, host: Optional[str] = None,
                            port: Optional[int] = None, *, sock: Any = None,
                            ssl: Optional[ssl.SSLContext] = None,
                            ssl_handshake_timeout: Optional[float] = None,
                            **kwargs: Any) -> SimServer:
        if sock is not None:
            host, port = sock.getsockname()[:2]
        factory = protocol_factory
        if ssl is not None:
            factory = functools.partial(
                _TlsServerSide, self.net.loop, protocol_factory, pin_of(ssl),
                ssl_handshake_timeout or _SSL_HANDSHAKE_TIMEOUT_S)
        return self.net.listen(factory, f"{host}:{port}")

    async def create_connection(self, protocol_factory: ProtocolFactory, host: str, port: int,
                                *, ssl: Optional[ssl.SSLContext] = None,
                                ssl_handshake_timeout: Optional[float] = None,
                                **kwargs: Any) -> Tuple[SimTransport, asyncio.Protocol]:
        address = f"{host}:{port}"
        if ssl is None:
            return await self.net.connect(protocol_factory, address)
        tls = _TlsClientSide(self.net.loop, protocol_factory, ssl,
                             ssl_handshake_timeout or _SSL_HANDSHAKE_TIMEOUT_S)
        transport, _ = await self.net.connect(lambda: tls, address)
        try:
            return transport, await tls.done
        except BaseException:  # (failed, or its caller gave up: as asyncio, closed)
            transport.abort()
            raise


class ListeningSocket:
    """What ``RpcServer.start`` is given: the address of a listener of the simulated net."""

    family = socket.AF_UNIX

    def __init__(self, address: str) -> None:
        self._address = address

    def getsockname(self) -> str:
        return self._address
