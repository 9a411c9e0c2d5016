"""Unit tests of the TCP handshake (``servekit._private.wire.auth``), of the TLS every TCP
connection runs in (``servekit._private.wire.tls``), and of how the transport
(``servekit._private.wire.transport``) uses them.

The ``Handshake`` tests need no sockets: the bytes one side produces are handed to the other,
in whatever chunking the test needs. The transport tests use real loopback TCP connections
(an ``RpcServer`` on ``127.0.0.1:0``, an ``RpcClient`` or a raw ``asyncio`` stream, in TLS
with the instance's certificate unless a test says otherwise, as the peer). Each test runs
one event loop with ``asyncio.run``; waits are on futures or polls with a deadline, and
every connection is closed before the loop ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import shutil
import socket
import tempfile
from typing import Any, AsyncIterator, List, Optional, Tuple

import pytest
from loop_helpers import run, until

from servekit._private import constants
from servekit._private.wire import auth, tls, transport
from servekit._private.wire.auth import _MAC, _MAGIC, _NONCE, AuthenticationFailed, Handshake
from servekit._private.wire.transport import (
    _HEADER,
    _REPLY_OK,
    _REQUEST,
    ConnectFailed,
    RpcClient,
    RpcServer,
    _FrameProtocol,
    encode_call,
    parse_tcp_address,
    tcp_address,
)

SECRET = b"the instance secret, 32 bytes.."
OTHER_SECRET = b"another instance's secret......."
OPENING_SIZE = len(_MAGIC) + _NONCE  # what the server sends first
CLIENT_PROOF_SIZE = _NONCE + _MAC  # the client's answer
SERVER_PROOF_SIZE = _MAC  # the server's last message


@pytest.fixture(autouse=True)
def process_secret(monkeypatch: pytest.MonkeyPatch) -> bytes:
    """Every test starts with ``SECRET`` as the process secret and leaves the global as it
    found it, whatever it sets meanwhile."""
    monkeypatch.setattr(auth, "_secret", SECRET)
    return SECRET


# --------------------------------------------------------------------------- handshake


def feed(side: Handshake, data: bytes, bytewise: bool = False) -> bytes:
    """Hand ``data`` (one whole message) to ``side``; its reply.

    ``bytewise``: the bytes arrive one at a time, the buffer growing as a connection's would;
    nothing may be used (or answered) before the last byte.
    """
    if not bytewise:
        used, reply = side.receive(data)
        assert used == len(data)
        return reply
    for end in range(1, len(data)):
        assert side.receive(data[:end]) == (0, b""), f"after {end} of {len(data)} bytes"
        assert not side.done
    used, reply = side.receive(data)
    assert used == len(data)
    return reply


def full_handshake(server: Handshake, client: Handshake,
                   bytewise: bool = False) -> Tuple[bytes, bytes, bytes]:
    """Run a whole handshake; the three messages (opening, client proof, server proof)."""
    assert client.opening() == b""  # the client waits for the server's challenge
    opening = server.opening()
    assert len(opening) == OPENING_SIZE and opening.startswith(_MAGIC)
    client_proof = feed(client, opening, bytewise)
    assert len(client_proof) == CLIENT_PROOF_SIZE
    assert not client.done and not server.done
    server_proof = feed(server, client_proof, bytewise)
    assert len(server_proof) == SERVER_PROOF_SIZE
    assert server.done and not client.done  # the client has not checked the server yet
    assert feed(client, server_proof, bytewise) == b""
    assert client.done
    return opening, client_proof, server_proof


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "one-byte-at-a-time"])
def test_same_secret_completes_on_both_sides(bytewise: bool) -> None:
    """A server and a client holding the same secret both end ``done``, whether each
    message arrives whole or one byte at a time (nothing is used before it is complete)."""
    full_handshake(Handshake(server=True, secret=SECRET), Handshake(server=False, secret=SECRET),
                   bytewise)


def test_handshake_uses_only_its_own_bytes() -> None:
    """Bytes that follow a handshake message in the same read (the first frames) are not
    used by the handshake: ``used`` counts only the message."""
    server = Handshake(server=True, secret=SECRET)
    client = Handshake(server=False, secret=SECRET)
    used, client_proof = client.receive(server.opening() + b"frames")
    assert used == OPENING_SIZE
    used, server_proof = server.receive(client_proof + b"frames")
    assert used == CLIENT_PROOF_SIZE and server.done
    assert client.receive(server_proof + b"frames") == (SERVER_PROOF_SIZE, b"")
    assert client.done


def test_the_process_secret_is_used_by_default() -> None:
    """A ``Handshake`` given no secret uses the one set with ``set_secret``."""
    auth.set_secret(OTHER_SECRET)
    full_handshake(Handshake(server=True, secret=OTHER_SECRET), Handshake(server=False))
    with pytest.raises(AuthenticationFailed):
        full_handshake(Handshake(server=True, secret=SECRET), Handshake(server=False))


def test_different_secrets_fail_at_the_server() -> None:
    """A client holding another secret is refused by the server on its proof, before the
    server proves anything about its own secret."""
    server = Handshake(server=True, secret=SECRET)
    client = Handshake(server=False, secret=OTHER_SECRET)
    client_proof = feed(client, server.opening())
    with pytest.raises(AuthenticationFailed, match="proof of the instance secret is wrong"):
        server.receive(client_proof)
    assert not server.done and not client.done


def test_client_refuses_a_peer_without_the_magic() -> None:
    """A client whose peer does not open with the protocol's magic refuses it."""
    client = Handshake(server=False, secret=SECRET)
    with pytest.raises(AuthenticationFailed, match="not a servekit process"):
        client.receive(b"HTTP" + bytes(_NONCE))
    assert not client.done


def test_client_refuses_a_wrong_server_proof() -> None:
    """A server that cannot prove it holds the secret (its last message tampered with) is
    refused by the client."""
    server = Handshake(server=True, secret=SECRET)
    client = Handshake(server=False, secret=SECRET)
    server_proof = feed(server, feed(client, server.opening()))
    tampered = bytes([server_proof[0] ^ 1]) + server_proof[1:]
    with pytest.raises(AuthenticationFailed, match="proof of the instance secret is wrong"):
        client.receive(tampered)
    assert not client.done


def test_client_refuses_a_server_that_echoes_the_client_proof() -> None:
    """A peer that does not know the secret cannot pass by reflecting the client's own MAC
    back at it (the two directions are told apart)."""
    server = Handshake(server=True, secret=SECRET)
    client = Handshake(server=False, secret=SECRET)
    client_proof = feed(client, server.opening())
    with pytest.raises(AuthenticationFailed):
        client.receive(client_proof[_NONCE:])
    assert not client.done


def test_a_recorded_client_proof_does_not_authenticate_again() -> None:
    """Replay: a client proof recorded from one session is refused by the next server
    session, which challenges with a fresh nonce."""
    first_opening, recorded_proof, _ = full_handshake(Handshake(server=True, secret=SECRET),
                                                      Handshake(server=False, secret=SECRET))
    second = Handshake(server=True, secret=SECRET)
    assert second.opening() != first_opening
    with pytest.raises(AuthenticationFailed):
        second.receive(recorded_proof)
    assert not second.done


def test_no_secret_no_handshake() -> None:
    """A process that holds no secret cannot start a handshake that needs it."""
    auth._secret = None  # restored by the ``process_secret`` fixture
    with pytest.raises(AuthenticationFailed, match="no servekit instance secret"):
        Handshake(server=False)
    with pytest.raises(AuthenticationFailed, match="no servekit instance secret"):
        auth.get_secret()


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize("host, port", [("127.0.0.1", 8000), ("node-3.cluster", 1), ("::1", 65535)])
def test_tcp_address_round_trips(host: str, port: int) -> None:
    """``parse_tcp_address`` gives back the host and port ``tcp_address`` was made of."""
    address = tcp_address(host, port)
    assert address.startswith("tcp://")
    assert parse_tcp_address(address) == (host, port)


def test_bracketed_ipv6_address_is_parsed() -> None:
    assert parse_tcp_address("tcp://[::1]:8000") == ("::1", 8000)


@pytest.mark.parametrize("path", ["/run/servekit/b-1.sock", "relative.sock", "tcp.sock"])
def test_unix_path_is_not_a_tcp_address(path: str) -> None:
    assert parse_tcp_address(path) is None


# --------------------------------------------------------------------------- loopback TCP


class RecordingEcho:
    """An ``echo`` handler that records the values it was called with."""

    def __init__(self) -> None:
        self.called: List[Any] = []

    async def __call__(self, value: Any) -> Any:
        self.called.append(value)
        return value


class TrackedServer(RpcServer):
    """An ``RpcServer`` that remembers its connections, so a test can see them all closed."""

    def __init__(self, handlers: dict) -> None:
        super().__init__(handlers, on_disconnect=self._gone)
        self.peers: List[_FrameProtocol] = []
        self.lost: List[_FrameProtocol] = []

    def _new_connection(self, handshake: Optional[Handshake] = None,
                        same_user: bool = False) -> _FrameProtocol:
        protocol = super()._new_connection(handshake, same_user)
        self.peers.append(protocol)
        return protocol

    @property
    def connected(self) -> List[_FrameProtocol]:
        """The peers that got past TLS (a connection refused there never reaches them)."""
        return [peer for peer in self.peers if peer.transport is not None]

    def _gone(self, protocol: _FrameProtocol) -> None:
        self.lost.append(protocol)


def listening_tcp_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@contextlib.asynccontextmanager
async def tcp_server(handlers: dict) -> AsyncIterator[Tuple[TrackedServer, str]]:
    """A ``TrackedServer`` on a loopback port and its ``tcp://`` address; on the way out it
    stops listening and waits until every connection it accepted has closed."""
    sock = listening_tcp_socket()
    server = TrackedServer(handlers)
    try:
        await server.start(sock)
    except BaseException:
        sock.close()
        raise
    try:
        yield server, tcp_address(*sock.getsockname()[:2])
    finally:
        server.close()
        for peer in server.peers:
            if peer.transport is not None and not peer.transport.is_closing():
                peer.transport.close()
        await until(lambda: len(server.lost) == len(server.connected),
                    what="the server's connections to close")


async def closed_client(client: RpcClient) -> None:
    client.close()
    assert client.closed is not None
    await asyncio.wait_for(asyncio.shield(client.closed), 3.0)


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    """Everything the peer sends until it closes the connection (fails after ``timeout``)."""
    return await asyncio.wait_for(reader.read(), timeout)


@contextlib.asynccontextmanager
async def raw_connection(address: str, secure: bool = True) -> AsyncIterator[
        Tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A stream to ``address``: a peer that speaks bytes, not servekit. ``secure``: in TLS
    with the instance's certificate (a peer that holds the secret); else plain TCP."""
    host_port = parse_tcp_address(address)
    assert host_port is not None
    if secure:
        reader, writer = await asyncio.open_connection(
            *host_port, ssl=tls.client_context(SECRET), server_hostname=tls.SERVER_NAME)
    else:
        reader, writer = await asyncio.open_connection(*host_port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def request_frame(msg_id: int, name: str, *args: Any) -> bytes:
    payload = encode_call(name, args)
    return _HEADER.pack(len(payload), msg_id, _REQUEST) + payload


def dropped_records(caplog: pytest.LogCaptureFixture) -> List[logging.LogRecord]:
    return [record for record in caplog.records
            if record.name == "servekit" and record.levelno == logging.WARNING
            and record.getMessage().startswith("Dropped a connection from")]


def test_same_secret_calls_go_through() -> None:
    """A client holding the server's secret connects over TCP and its call is answered."""

    async def echo(value: Any) -> Any:
        return value

    async def main() -> None:
        async with tcp_server({"echo": echo}) as (server, address):
            client = await RpcClient.connect(address)
            try:
                assert await asyncio.wait_for(client.call("echo", {"a": [1, 2.5]}), 3.0) == {
                    "a": [1, 2.5]}
            finally:
                await closed_client(client)
            assert len(server.peers) == 1

    run(main)


def test_concurrent_calls_on_one_tcp_connection_get_their_own_replies() -> None:
    """Many calls in flight at once on one authenticated connection, answered out of order,
    each get the reply to their own request."""
    count = 60

    async def echo(value: int) -> Tuple[str, int]:
        for _ in range(value * 7 % 11):  # finish in another order than they were sent
            await asyncio.sleep(0)
        return ("reply", value)

    async def main() -> None:
        async with tcp_server({"echo": echo}) as (server, address):
            client = await RpcClient.connect(address)
            try:
                replies = await asyncio.wait_for(
                    asyncio.gather(*(client.call("echo", i) for i in range(count))), 5.0)
            finally:
                await closed_client(client)
            assert replies == [("reply", i) for i in range(count)]
            assert len(server.peers) == 1

    run(main)


def test_client_with_another_secret_is_refused() -> None:
    """A client holding another secret (the process secret changed after the server started:
    the server keeps the one it started with, the client takes the current one) has another
    certificate: connect fails in TLS with ``ConnectFailed`` saying authentication failed,
    and nothing reaches the server's frames."""
    echo = RecordingEcho()

    async def main() -> None:
        async with tcp_server({"echo": echo}) as (server, address):
            auth.set_secret(OTHER_SECRET)
            with pytest.raises(ConnectFailed, match="authentication failed.*TLS"):
                await asyncio.wait_for(RpcClient.connect(address), 3.0)
            assert server.connected == []
        assert echo.called == []

    run(main)


def test_a_plaintext_peer_gets_no_servekit_byte() -> None:
    """Between nodes nothing is plaintext: a peer that speaks plain TCP gets no challenge
    and no frame, only the TLS layer refusing it, and its request never runs."""
    echo = RecordingEcho()

    async def main() -> None:
        async with tcp_server({"echo": echo}) as (server, address):
            async with raw_connection(address, secure=False) as (reader, writer):
                writer.write(b"\x00" * CLIENT_PROOF_SIZE + request_frame(1, "echo", "hi"))
                received = await read_to_eof(reader, timeout=5.0)
            assert _MAGIC not in received
            assert server.connected == [] and echo.called == []

    run(main)


def test_connections_that_stall_before_authenticating_cannot_lock_others_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``MAX_UNAUTHENTICATED`` connections still authenticating, the oldest is dropped
    to make room: silent connections cost a newcomer nothing, and a real client connects
    and is served however many of them are open."""
    monkeypatch.setattr(transport, "MAX_UNAUTHENTICATED", 2)

    async def echo(value: Any) -> Any:
        return value

    async def main() -> None:
        async with tcp_server({"echo": echo}) as (server, address):
            async with raw_connection(address) as (first, _), \
                    raw_connection(address) as (second, _):
                for reader in (first, second):  # both got the challenge, and stay silent
                    await asyncio.wait_for(reader.readexactly(OPENING_SIZE), 3.0)
                async with raw_connection(address) as (third, _):
                    await asyncio.wait_for(third.readexactly(OPENING_SIZE), 3.0)  # challenged
                    assert await read_to_eof(first) == b""  # the oldest was dropped
                    client = await asyncio.wait_for(RpcClient.connect(address), 3.0)
                    try:
                        assert await asyncio.wait_for(client.call("echo", 1), 3.0) == 1
                    finally:
                        await closed_client(client)
                    assert await read_to_eof(second) == b""  # dropped for the client
            await until(lambda: len(server.lost) == len(server.connected),
                        what="the silent connections to close")
            assert len(server._authenticating) == 0

    run(main)


def test_a_connection_whose_tls_fails_holds_no_place_among_those_authenticating(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections that never get past TLS (no certificate, garbage) are never counted
    among those authenticating, so they cannot fill the places of real peers."""
    monkeypatch.setattr(transport, "MAX_UNAUTHENTICATED", 1)

    async def echo(value: Any) -> Any:
        return value

    async def main() -> None:
        async with tcp_server({"echo": echo}) as (server, address):
            for _ in range(3):
                async with raw_connection(address, secure=False) as (reader, writer):
                    writer.write(b"not a TLS hello")
                    await read_to_eof(reader, timeout=5.0)
            assert len(server._authenticating) == 0
            client = await asyncio.wait_for(RpcClient.connect(address), 3.0)
            try:
                assert await asyncio.wait_for(client.call("echo", 2), 3.0) == 2
            finally:
                await closed_client(client)

    run(main)


def test_a_peer_that_falls_silent_with_a_request_in_flight_is_taken_for_gone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No FIN ever comes from a node that lost power: the server stops reading (it answers
    no ping), and the request in flight fails within two ping intervals. A server that
    answers pings keeps a long request alive (the control)."""
    monkeypatch.setattr(constants, "PEER_PING_INTERVAL_S", 0.1)

    async def main() -> None:
        release = asyncio.Event()

        async def slow(value: Any) -> Any:
            await release.wait()
            return value

        async with tcp_server({"slow": slow}) as (server, address):
            client = await RpcClient.connect(address)
            try:
                alive = client.call_nowait("slow", "alive")
                await asyncio.sleep(0.5)  # five ping intervals, pings answered
                assert not alive.done()
                release.set()
                assert await asyncio.wait_for(alive, 3.0) == "alive"
                release.clear()
                silent = client.call_nowait("slow", "lost")
                [peer] = server.connected
                assert peer.transport is not None
                peer.transport.pause_reading()  # it hears no more pings
                with pytest.raises(transport.BackendUnavailableError):
                    await asyncio.wait_for(silent, 3.0)
                assert client.is_closed
                peer.transport.resume_reading()  # (so that it sees the client gone)
            finally:
                await closed_client(client)
                release.set()

    run(main)


def test_client_without_a_secret_cannot_connect_over_tcp() -> None:
    """A process holding no secret gets ``ConnectFailed`` (not a bare authentication
    error) when it connects to a TCP address."""

    async def main() -> None:
        async with tcp_server({}) as (server, address):
            auth._secret = None  # the server already holds its secret
            with pytest.raises(ConnectFailed, match="authentication failed"):
                await RpcClient.connect(address)
            assert server.peers == []  # nothing was even sent

    run(main)


@pytest.mark.parametrize("answer", ["valid", "garbage"])
def test_a_request_frame_after_the_handshake(answer: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A raw peer answers the server's challenge and sends a well-formed request frame in
    the same write. With a valid proof (the control), the request is served; with garbage
    of the right length, the handler never runs and the server closes the connection."""
    caplog.set_level(logging.WARNING, logger="servekit")
    echo = RecordingEcho()

    async def main() -> None:
        async with tcp_server({"echo": echo}) as (server, address):
            async with raw_connection(address) as (reader, writer):
                opening = await asyncio.wait_for(reader.readexactly(OPENING_SIZE), 3.0)
                handshake = Handshake(server=False, secret=SECRET)
                if answer == "valid":
                    _, proof = handshake.receive(opening)
                else:
                    proof = b"\x00" * CLIENT_PROOF_SIZE
                assert len(proof) == CLIENT_PROOF_SIZE
                writer.write(proof + request_frame(1, "echo", "hello"))
                if answer == "valid":
                    server_proof = await asyncio.wait_for(
                        reader.readexactly(SERVER_PROOF_SIZE), 3.0)
                    handshake.receive(server_proof)
                    assert handshake.done
                    header = await asyncio.wait_for(reader.readexactly(_HEADER.size), 3.0)
                    length, msg_id, kind = _HEADER.unpack(header)
                    payload = await asyncio.wait_for(reader.readexactly(length), 3.0)
                    assert (msg_id, kind, pickle.loads(payload)) == (1, _REPLY_OK, "hello")
                    assert echo.called == ["hello"]
                else:
                    assert await read_to_eof(reader) == b""
                    assert echo.called == []
        if answer == "garbage":
            assert len(dropped_records(caplog)) == 1
        else:
            assert dropped_records(caplog) == []

    run(main)


def test_a_silent_peer_is_dropped_after_the_handshake_timeout(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A peer that connects and never answers the challenge is dropped once
    ``HANDSHAKE_TIMEOUT_S`` (as the transport sees it) has passed, and the drop is logged."""
    timeout = 0.2
    monkeypatch.setattr(transport, "HANDSHAKE_TIMEOUT_S", timeout)
    caplog.set_level(logging.WARNING, logger="servekit")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with tcp_server({}) as (server, address):
            async with raw_connection(address) as (reader, _):
                started = loop.time()
                received = await read_to_eof(reader, timeout=3.0)
                waited = loop.time() - started
            assert len(received) == OPENING_SIZE and received.startswith(_MAGIC)
            assert waited >= timeout * 0.5  # not dropped straight away
        [record] = dropped_records(caplog)
        assert "did not authenticate in time" in record.getMessage()

    run(main)


def test_a_frame_sent_instead_of_the_handshake_is_never_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw peer that skips the handshake and sends a whole request frame, shorter than a
    client proof (so the handshake still waits for more): the frame is never dispatched,
    and the peer is dropped when the handshake timeout passes."""
    monkeypatch.setattr(transport, "HANDSHAKE_TIMEOUT_S", 0.2)
    echo = RecordingEcho()

    async def main() -> None:
        async with tcp_server({"echo": echo}) as (server, address):
            async with raw_connection(address) as (reader, writer):
                frame = request_frame(1, "echo", "hi")
                assert len(frame) < CLIENT_PROOF_SIZE
                writer.write(frame)
                received = await read_to_eof(reader)
            assert len(received) == OPENING_SIZE  # the challenge, and no reply
            assert echo.called == []

    run(main)


def test_client_refuses_a_server_without_the_secret() -> None:
    """A TCP server that speaks the protocol but cannot prove it holds the secret (it
    answers with a wrong proof) makes ``connect`` fail with ``ConnectFailed``."""

    async def main() -> None:
        served = asyncio.get_running_loop().create_future()

        async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(_MAGIC + os.urandom(_NONCE))
                await reader.readexactly(CLIENT_PROOF_SIZE)
                writer.write(b"\x00" * SERVER_PROOF_SIZE)
                await reader.read()  # until the client hangs up
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
                served.set_result(None)

        sock = listening_tcp_socket()
        server = await asyncio.start_server(impostor, sock=sock)
        try:
            address = tcp_address(*sock.getsockname()[:2])
            with pytest.raises(ConnectFailed, match="authentication failed"):
                await asyncio.wait_for(RpcClient.connect(address), 3.0)
            await asyncio.wait_for(served, 3.0)
        finally:
            server.close()
            await server.wait_closed()

    run(main)


def test_tcp_server_needs_a_secret() -> None:
    """``RpcServer.start`` on a TCP socket in a process without a secret fails at once."""
    auth._secret = None  # restored by the ``process_secret`` fixture

    async def main() -> None:
        with listening_tcp_socket() as sock:
            with pytest.raises(AuthenticationFailed, match="no servekit instance secret"):
                await RpcServer({}).start(sock)

    run(main)


def test_unix_socket_needs_no_secret() -> None:
    """Over a Unix socket there is no handshake: a process without a secret serves and
    calls."""
    auth._secret = None  # restored by the ``process_secret`` fixture

    async def echo(value: Any) -> Any:
        return value

    async def main() -> None:
        with tempfile.TemporaryDirectory(dir="/tmp") as directory:
            path = os.path.join(directory, "s.sock")
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(path)
            sock.listen()
            server = TrackedServer({"echo": echo})
            await server.start(sock)
            try:
                client = await RpcClient.connect(path)
                try:
                    assert await asyncio.wait_for(client.call("echo", 5), 3.0) == 5
                finally:
                    await closed_client(client)
                await until(lambda: server.lost, what="the server side to close")
            finally:
                server.close()

    run(main)


def test_a_refused_peer_is_logged_once(monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """A peer dropped for a wrong proof is reported once, not again when the handshake
    timeout it no longer needs runs out."""
    timeout = 0.2
    monkeypatch.setattr(transport, "HANDSHAKE_TIMEOUT_S", timeout)
    caplog.set_level(logging.WARNING, logger="servekit")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with tcp_server({}) as (server, address):
            async with raw_connection(address) as (reader, writer):
                await asyncio.wait_for(reader.readexactly(OPENING_SIZE), 3.0)
                writer.write(b"\x00" * CLIENT_PROOF_SIZE)
                assert await read_to_eof(reader) == b""
            assert len(dropped_records(caplog)) == 1
            # A timer set now fires after the server's handshake timer for that connection.
            timeout_passed = loop.create_future()
            loop.call_later(timeout + 0.05, timeout_passed.set_result, None)
            await asyncio.wait_for(timeout_passed, 3.0)
        assert len(dropped_records(caplog)) == 1

    run(main)


OTHER_USER_CLIENT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.settimeout(5)
try:
    sock.sendall(bytes.fromhex(sys.argv[2]))
    print(len(sock.recv(65536)))
except (BrokenPipeError, ConnectionResetError):
    print(0)  # dropped while sending
"""


# A Python another user may run (this one may live in a home only its owner enters).
OTHER_USER_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin") or "python3"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another user")
def test_a_unix_socket_server_drops_peers_of_another_user(
        caplog: pytest.LogCaptureFixture) -> None:
    """Whatever the mode of its directory, a Unix socket server serves only processes of
    its own user (``SO_PEERCRED``): another user's request never runs."""
    caplog.set_level(logging.WARNING, logger="servekit")
    echo = RecordingEcho()

    async def main() -> None:
        with tempfile.TemporaryDirectory(dir="/tmp") as directory:
            os.chmod(directory, 0o777)  # a careless mode: the check does not rely on it
            path = os.path.join(directory, "s.sock")
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(path)
            os.chmod(path, 0o777)
            sock.listen()
            server = TrackedServer({"echo": echo})
            await server.start(sock)
            try:
                stranger = await asyncio.create_subprocess_exec(
                    OTHER_USER_PYTHON, "-c", OTHER_USER_CLIENT, path,
                    request_frame(1, "echo", "from a stranger").hex(),
                    user=65534, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE)
                out, err = await asyncio.wait_for(stranger.communicate(), 10.0)
                assert out.strip() == b"0", err  # dropped: not one byte back
                client = await RpcClient.connect(path)  # the owner is served
                try:
                    assert await asyncio.wait_for(client.call("echo", "owner"), 3.0) == "owner"
                finally:
                    await closed_client(client)
            finally:
                server.close()
        assert echo.called == ["owner"]
        assert any("another user" in record.getMessage() for record in caplog.records)

    run(main)
