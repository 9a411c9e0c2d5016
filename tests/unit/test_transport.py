"""Unit tests of the framed RPC transport (``servekit._private.wire.transport``).

No sockets: an ``RpcClient`` or ``RpcServer`` is wired to a ``_FrameProtocol`` whose
transport is a recorder, and server frames are fed to ``data_received`` as raw bytes, in
whatever chunking the test needs. Each test runs one event loop with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import threading
from typing import Any, List, Optional, Tuple

import pytest
from loop_helpers import run, spin, until

from servekit._private.wire.transport import (
    _CANCEL,
    _CREDIT,
    _HEADER,
    _NOTIFY,
    _READ_SIZE,
    _REPLY_BUSY,
    _REPLY_ERROR,
    _REPLY_OK,
    _REQUEST,
    _REQUESTS_PER_WRITE,
    _STOPPED,
    _STREAM_CHUNK,
    _STREAM_END,
    STREAM_WINDOW_BYTES,
    Busy,
    ConnectFailed,
    ConnectionClosed,
    NotSent,
    RpcClient,
    RpcServer,
    Stream,
    _FrameProtocol,
    current_peer,
    decode_error,
    dumps,
    encode_call,
    encode_error,
    is_remote_error,
)
from servekit.exceptions import BackendUnavailableError, RemoteTraceback, ServeError

# --------------------------------------------------------------------------- helpers

Frame = Tuple[int, int, bytes]


def frame(msg_id: int, kind: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(len(payload), msg_id, kind) + payload


def split_frames(data: bytes) -> List[Frame]:
    """The (msg_id, kind, payload) frames of a byte stream made only of whole frames."""
    frames, offset = [], 0
    while offset < len(data):
        length, msg_id, kind = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        frames.append((msg_id, kind, data[start:start + length]))
        offset = start + length
    return frames


class RecordingTransport:
    """Stands in for a socket transport: records what is written, can be made to close.
    ``frames()`` first flushes what ``protocol`` sent this loop turn, if it is given."""

    def __init__(self, protocol: Optional[_FrameProtocol] = None) -> None:
        self.writes: List[bytes] = []
        self.closing = False
        self.protocol = protocol

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        self.writes.extend(bytes(part) for part in parts)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def frames(self) -> List[Frame]:
        if self.protocol is not None:
            self.protocol.flush()
        return split_frames(b"".join(self.writes))


def wired_client(name: str = "replica b#1") -> Tuple[RpcClient, _FrameProtocol,
                                                      RecordingTransport]:
    """An ``RpcClient`` as ``RpcClient.connect`` leaves it, over a recording transport."""
    client = RpcClient("/run/servekit/b-1.sock", name)
    client.closed = asyncio.get_running_loop().create_future()
    protocol = _FrameProtocol(client._on_frame, client._on_lost,
                              write_every=_REQUESTS_PER_WRITE)
    transport = RecordingTransport(protocol)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    client._protocol = protocol
    return client, protocol, transport


def request_ids(transport: RecordingTransport) -> List[int]:
    return [msg_id for msg_id, kind, _ in transport.frames() if kind == _REQUEST]




# --------------------------------------------------------------------------- framing


def test_frames_are_rebuilt_however_the_stream_is_chunked() -> None:
    """Frames cut mid-header or mid-payload, or several in one read, each arrive once, whole
    and in order."""
    received: List[Frame] = []
    protocol = _FrameProtocol(lambda *f: received.append(f), lambda exc: None)
    stream = (frame(1, _REPLY_OK, b"first") + frame(2, _NOTIFY) + frame(3, _REPLY_OK, b"x" * 300)
              + frame(4, _REPLY_ERROR, b"last"))
    expected = [(1, _REPLY_OK, b"first"), (2, _NOTIFY, b""), (3, _REPLY_OK, b"x" * 300),
                (4, _REPLY_ERROR, b"last")]
    for cut in (1, 5, _HEADER.size, _HEADER.size + 2, 40, len(stream)):
        received.clear()
        for start in range(0, len(stream), cut):
            protocol.data_received(stream[start:start + cut])
        assert received == expected, f"chunks of {cut} bytes"
        assert protocol._buffer == bytearray()


def test_a_partial_frame_waits_for_the_rest() -> None:
    """A frame is not handed on until its last payload byte has arrived."""
    received: List[Frame] = []
    protocol = _FrameProtocol(lambda *f: received.append(f), lambda exc: None)
    data = frame(9, _REPLY_OK, b"payload")
    protocol.data_received(data[:-1])
    assert received == []
    protocol.data_received(data[-1:])
    assert received == [(9, _REPLY_OK, b"payload")]


def test_send_writes_nothing_once_the_transport_is_closing() -> None:
    """A frame written to a closing transport is reported as not sent."""

    async def main() -> None:
        protocol = _FrameProtocol(lambda *f: None, lambda exc: None)
        transport = RecordingTransport(protocol)
        protocol.connection_made(transport)  # type: ignore[arg-type]
        assert protocol.send(1, _REQUEST, b"a") is True
        assert transport.frames() == [(1, _REQUEST, b"a")]
        transport.closing = True
        assert protocol.send(2, _REQUEST, b"b") is False
        assert transport.frames() == [(1, _REQUEST, b"a")]

    run(main)


def test_frames_sent_in_one_loop_turn_go_out_in_one_write_at_its_end() -> None:
    async def main() -> None:
        protocol = _FrameProtocol(lambda *f: None, lambda exc: None)
        transport = RecordingTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        for msg_id in (1, 2, 3):
            assert protocol.send(msg_id, _REQUEST, b"x")
        assert transport.writes == []
        await asyncio.sleep(0)
        assert len(transport.writes) == 1
        assert [i for i, _, _ in split_frames(transport.writes[0])] == [1, 2, 3]
        protocol.send(4, _REQUEST, b"y")
        protocol.close()  # what was sent goes out before the close
        assert [i for i, _, _ in transport.frames()] == [1, 2, 3, 4] and transport.closing

    run(main)


def test_a_clients_frames_go_out_once_four_wait_and_the_rest_at_the_turns_end() -> None:
    """A client's connection writes as soon as four frames wait (its server starts on them
    while the turn makes more), and what is left at the end of the turn; in order."""

    async def main() -> None:
        protocol = _FrameProtocol(lambda *f: None, lambda exc: None,
                                  write_every=_REQUESTS_PER_WRITE)
        transport = RecordingTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        for msg_id in range(1, 11):
            assert protocol.send(msg_id, _REQUEST, b"x")
        assert [len(split_frames(write)) for write in transport.writes] == [4, 4]
        await asyncio.sleep(0)
        assert [len(split_frames(write)) for write in transport.writes] == [4, 4, 2]
        assert [i for i, _, _ in split_frames(b"".join(transport.writes))] == \
            list(range(1, 11))

    run(main)


# --------------------------------------------------------------------------- client


def test_replies_reach_their_request_in_any_order() -> None:
    """Replies are matched to requests by message id, not by arrival order."""

    async def main() -> None:
        client, protocol, transport = wired_client()
        first = client.send(encode_call("call", ("a",)))
        second = client.send(encode_call("call", ("b",)))
        id_a, id_b = request_ids(transport)
        assert id_a != id_b
        assert [pickle.loads(p) for _, _, p in transport.frames()] == [
            ("call", ("a",)), ("call", ("b",))]
        protocol.data_received(frame(id_b, _REPLY_OK, dumps("B")))
        assert second.result() == "B" and not first.done()
        protocol.data_received(frame(id_a, _REPLY_OK, dumps("A")))
        assert first.result() == "A"

    run(main)


def test_busy_then_notice_in_one_read_counts_the_notice_after_the_refusal() -> None:
    """A refusal and the room notice the server sent right after it, read in one chunk: the
    ``Busy`` carries the notices seen before it (0), the connection has counted 1, so a
    router can tell the notice is newer than the refusal.

    Old behaviour caught: ``Busy`` carried no count, so the router could not tell that the
    notice it had already handled came after the refusal (and marked the replica full
    forever)."""

    async def main() -> None:
        client, protocol, transport = wired_client()
        woken: List[int] = []
        client.on_notify = lambda: woken.append(client.notices)
        reply = client.send(encode_call("call", ("a",)))
        [msg_id] = request_ids(transport)
        protocol.data_received(frame(msg_id, _REPLY_BUSY) + frame(0, _NOTIFY))
        error = reply.exception()
        assert isinstance(error, Busy)
        assert error.notices == 0
        assert client.notices == 1
        assert woken == [1]  # on_notify ran after the count went up

    run(main)


def test_notice_before_busy_is_counted_in_the_refusal() -> None:
    """A notice read before a refusal is included in that refusal's count: it says nothing
    about room after the refusal."""

    async def main() -> None:
        client, protocol, transport = wired_client()
        reply = client.send(encode_call("call", ("a",)))
        [msg_id] = request_ids(transport)
        protocol.data_received(frame(0, _NOTIFY) + frame(msg_id, _REPLY_BUSY))
        error = reply.exception()
        assert isinstance(error, Busy)
        assert error.notices == 1 == client.notices

    run(main)


def test_remote_error_keeps_its_type_and_remote_traceback() -> None:
    """An exception raised in the server reaches the caller with its own type and message,
    the server's traceback attached as its ``__cause__``."""

    async def main() -> None:
        client, protocol, transport = wired_client()
        reply = client.send(encode_call("call", ()))
        [msg_id] = request_ids(transport)
        try:
            raise KeyError("no such user")
        except KeyError as exc:
            payload = encode_error(exc)
        protocol.data_received(frame(msg_id, _REPLY_ERROR, payload))
        error = reply.exception()
        assert isinstance(error, KeyError)
        assert error.args == ("no such user",)
        assert isinstance(error.__cause__, RemoteTraceback)
        assert "raise KeyError" in str(error.__cause__)
        assert is_remote_error(error)

    run(main)


def test_unreadable_reply_fails_only_its_own_request() -> None:
    """A reply whose payload cannot be unpickled fails that request with a ServeError; the
    other requests on the connection still get their replies."""

    async def main() -> None:
        client, protocol, transport = wired_client()
        bad = client.send(encode_call("call", ("a",)))
        good = client.send(encode_call("call", ("b",)))
        id_bad, id_good = request_ids(transport)
        protocol.data_received(frame(id_bad, _REPLY_OK, b"not a pickle")
                               + frame(id_good, _REPLY_OK, dumps("fine")))
        with pytest.raises(ServeError, match="could not be unpickled"):
            bad.result()
        assert good.result() == "fine"

    run(main)


def test_send_on_a_closing_connection_fails_unsent() -> None:
    """A request on a connection that is closing is not written and fails with
    ``ConnectionClosed`` (a ``NotSent``: it may be sent elsewhere), naming the peer; not
    with ``ConnectFailed``, which would say the peer cannot be reached at all."""

    async def main() -> None:
        client, protocol, transport = wired_client("replica b#7")
        transport.closing = True
        reply = client.send(encode_call("call", ()))
        assert transport.writes == []
        with pytest.raises(ConnectionClosed, match="replica b#7"):
            reply.result()
        assert isinstance(reply.exception(), NotSent)
        assert not isinstance(reply.exception(), ConnectFailed)

    run(main)


def test_lost_connection_fails_requests_in_flight_naming_the_peer() -> None:
    """When the connection drops, every request in flight fails with a
    BackendUnavailableError (not ``ConnectFailed``: it may have run) naming the peer; the
    connection counts as closed and later requests fail unsent."""

    async def main() -> None:
        client, protocol, transport = wired_client("replica b#7")
        in_flight = [client.send(encode_call("call", (i,))) for i in range(2)]
        protocol.connection_lost(None)
        for reply in in_flight:
            error = reply.exception()
            assert isinstance(error, BackendUnavailableError)
            assert not isinstance(error, NotSent)
            assert "replica b#7" in str(error)
            assert not is_remote_error(error)
        assert client.closed is not None and client.closed.done()
        assert client.is_closed
        with pytest.raises(ConnectionClosed):
            client.send(encode_call("call", ())).result()

    run(main)


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("args, type_name", [
    ((threading.Lock(),), "lock"),
    ((1, [2, threading.Lock()]), "lock"),
    (({"ok": 1, "bad": threading.Lock()},), "lock"),
])
def test_encode_call_names_the_type_that_cannot_be_pickled(args: tuple,
                                                           type_name: str) -> None:
    """An unpicklable argument, even nested in a list or dict, gives a TypeError that names
    its type."""
    with pytest.raises(TypeError, match=f"hold a {type_name} that cannot be pickled"):
        encode_call("call", args)


def test_encode_call_sends_what_plain_pickle_cannot_carry_by_value() -> None:
    """A lambda, a closure or a class of the caller's script (``__main__``, which the
    replica cannot import) goes through cloudpickle; plain pickle reads it back."""
    offset = 3
    scripted = type("Scripted", (), {"__module__": "__main__", "value": 7})
    name, (add, instance) = pickle.loads(encode_call("call", (lambda x: x + offset,
                                                             scripted())))
    assert name == "call" and add(1) == 4 and instance.value == 7


def test_encode_call_round_trips_plain_data() -> None:
    """A picklable request decodes back to its method name and arguments."""
    payload = encode_call("call", (1, {"a": [2.5]}, None))
    assert pickle.loads(payload) == ("call", (1, {"a": [2.5]}, None))


def test_encode_error_of_an_unpicklable_exception_names_it() -> None:
    """An exception that cannot be pickled reaches the caller as a ServeError naming its
    type and message, with the remote traceback."""

    class LockedError(Exception):
        def __init__(self) -> None:
            super().__init__("holding a lock")
            self.lock = threading.Lock()

    error = decode_error(encode_error(LockedError()))
    assert isinstance(error, ServeError)
    assert "LockedError: holding a lock" in str(error)
    assert is_remote_error(error)


def test_decode_error_of_garbage_is_a_serve_error() -> None:
    """An error payload that cannot be unpickled becomes a ServeError saying so."""
    error = decode_error(b"garbage")
    assert isinstance(error, ServeError)
    assert "could not be unpickled" in str(error)


def test_local_errors_are_not_remote() -> None:
    """``is_remote_error`` tells an error sent by the peer from one raised locally."""
    assert not is_remote_error(BackendUnavailableError("went away"))
    assert is_remote_error(decode_error(encode_error(BackendUnavailableError("went away"))))


# --------------------------------------------------------------------------- server


def dispatch(handlers: dict, msg_id: int, payload: bytes) -> List[Frame]:
    """Run one request through ``RpcServer._dispatch``; the frames it wrote back."""
    transport = RecordingTransport()

    async def main() -> None:
        protocol = _FrameProtocol(lambda *f: None, lambda exc: None)
        protocol.connection_made(transport)  # type: ignore[arg-type]
        await RpcServer(handlers)._dispatch(protocol, msg_id, payload, {}, lambda _: None)  # type: ignore[arg-type,return-value]

    asyncio.run(main())
    return transport.frames()


def test_unpicklable_return_value_is_an_error_reply_naming_its_type() -> None:
    """A handler returning something that cannot be pickled gets an error reply: a
    TypeError naming the method and the type, instead of no reply at all.

    Old behaviour caught: the error reply carried only pickle's own message, without the
    method or any advice."""

    async def handler() -> Any:
        return {"model": "ok", "state": threading.Lock()}

    [(msg_id, kind, payload)] = dispatch({"predict": handler}, 7, encode_call("predict", ()))
    assert (msg_id, kind) == (7, _REPLY_ERROR)
    error = decode_error(payload)
    assert isinstance(error, TypeError)
    assert "return value of 'predict' is a lock that cannot be pickled" in str(error)
    assert is_remote_error(error)


def test_handler_result_is_an_ok_reply_and_sees_its_peer() -> None:
    """A handler's return value goes back as an OK reply with the request's id; the handler
    can see which connection it serves."""
    seen: List[Optional[_FrameProtocol]] = []

    async def handler(x: int, y: int) -> int:
        seen.append(current_peer.get(None))
        return x + y

    assert dispatch({"add": handler}, 3, encode_call("add", (2, 5))) == [
        (3, _REPLY_OK, dumps(7))]
    assert len(seen) == 1 and isinstance(seen[0], _FrameProtocol)


def test_a_streamed_reply_runs_at_most_a_window_of_bytes_ahead_of_its_reader() -> None:
    """A stream of large chunks sends what fits in the window's bytes (four chunks of a
    quarter of it here, not the eight the item count allows), one more for each credit,
    and a chunk larger than the window alone, once the reader took all before it."""
    quarter = STREAM_WINDOW_BYTES // 4 - 64
    sizes = [quarter] * 5 + [STREAM_WINDOW_BYTES + 1, 10]

    async def chunks() -> Any:
        for size in sizes:
            yield b"x" * size

    async def handler() -> Stream:
        return Stream(chunks())

    async def main() -> None:
        protocol = RpcServer({"gen": handler})._new_connection()
        transport = RecordingTransport(protocol)
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(frame(1, _REQUEST, encode_call("gen", ())))

        def sent() -> List[int]:
            return [len(pickle.loads(payload)) if kind == _STREAM_CHUNK else -1
                    for _, kind, payload in transport.frames()]

        await until(lambda: len(sent()) == 4)
        await spin()
        assert sent() == [quarter] * 4
        protocol.data_received(frame(1, _CREDIT))
        await until(lambda: len(sent()) == 5)
        protocol.data_received(frame(1, _CREDIT) * 3)
        await spin()
        assert len(sent()) == 5  # the fifth is still in flight: the large one waits
        protocol.data_received(frame(1, _CREDIT))
        await until(lambda: len(sent()) == 6)
        protocol.data_received(frame(1, _CREDIT))
        await until(lambda: len(sent()) == 8)
        assert sent() == [*sizes, -1]  # (the end, once the last chunk went)
        assert transport.frames()[-1][1] == _STREAM_END

    run(main)


def test_handler_raising_busy_sends_a_busy_reply() -> None:
    """A handler that refuses with ``Busy`` sends a BUSY frame, not an error."""

    async def handler() -> None:
        raise Busy()

    assert dispatch({"call": handler}, 4, encode_call("call", ())) == [(4, _REPLY_BUSY, b"")]


def test_handler_exception_is_an_error_reply() -> None:
    """An exception raised by a handler goes back with its type, for that request only."""

    async def handler() -> None:
        raise ValueError("bad input")

    [(msg_id, kind, payload)] = dispatch({"call": handler}, 5, encode_call("call", ()))
    assert (msg_id, kind) == (5, _REPLY_ERROR)
    error = decode_error(payload)
    assert isinstance(error, ValueError) and str(error) == "bad input"


def test_unknown_method_is_an_error_reply() -> None:
    """A request naming no handler gets a ServeError naming the method."""
    [(msg_id, kind, payload)] = dispatch({}, 6, encode_call("nope", ()))
    assert (msg_id, kind) == (6, _REPLY_ERROR)
    error = decode_error(payload)
    assert isinstance(error, ServeError) and "'nope'" in str(error)


# --------------------------------------------------------------------------- cancellation


def test_a_request_cancelled_by_its_caller_sends_a_cancel_and_ignores_a_late_reply() -> None:
    async def main() -> None:
        client, protocol, transport = wired_client()
        kept = client.call_nowait("call", "kept")
        given_up = client.call_nowait("call", "given up")
        given_up.cancel()
        await asyncio.sleep(0)  # done callbacks run on the next loop iteration
        [_, cancelled_id] = request_ids(transport)
        assert [(i, k) for i, k, _ in transport.frames() if k == _CANCEL] == \
            [(cancelled_id, _CANCEL)]
        protocol.data_received(frame(cancelled_id, _REPLY_OK, dumps("late")))  # ignored
        protocol.data_received(frame(request_ids(transport)[0], _REPLY_OK, dumps("ok")))
        assert await kept == "ok"
        # An answered request never sends a cancel.
        assert [k for _, k, _ in transport.frames()].count(_CANCEL) == 1

    run(main)


def test_a_cancel_frame_stops_the_call_and_says_when_it_stopped() -> None:
    """A cancelled call is stopped; once it has really ended the server sends STOPPED (and
    no reply), so the caller knows the capacity it held is free."""

    async def main() -> None:
        started, stopped = asyncio.Event(), asyncio.Event()

        async def slow() -> str:
            started.set()
            try:
                await asyncio.Event().wait()
            finally:
                stopped.set()
            return "never"

        async def quick() -> str:
            return "quick"

        server = RpcServer({"slow": slow, "quick": quick})
        protocol = server._new_connection()
        transport = RecordingTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(frame(1, _REQUEST, encode_call("slow", ())))
        await asyncio.wait_for(started.wait(), 5)
        protocol.data_received(frame(1, _CANCEL) + frame(2, _REQUEST, encode_call("quick", ())))
        await asyncio.wait_for(stopped.wait(), 5)
        await asyncio.sleep(0)
        assert [(i, k) for i, k, _ in transport.frames()] == [(2, _REPLY_OK), (1, _STOPPED)]
        protocol.data_received(frame(7, _CANCEL))  # for no call: ignored

    run(main)


class _RecordingTransport:
    """A transport that keeps what is written, as one call each."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, Any]] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def writelines(self, parts: List[bytes]) -> None:
        self.calls.append(("writelines", list(parts)))


def test_a_large_payload_is_written_after_its_header_not_copied_behind_it() -> None:
    """Frames sent in one loop turn go out in one call; a large payload is handed to the
    transport as the object it is (a 100 MB body is not held twice while it is written),
    and what goes out still reads back as the same frames."""
    async def main() -> None:
        sender = _FrameProtocol(lambda *frame: None, lambda exc: None)
        recorder = _RecordingTransport()
        sender.transport = recorder  # type: ignore[assignment]
        big = b"x" * (1 << 20)
        assert sender.send(1, _REQUEST, b"small") and sender.send(2, _REQUEST, big)
        await asyncio.sleep(0)
        [(how, parts)] = recorder.calls
        assert how == "writelines" and parts[-1] is big
        frames: List[Tuple[int, int, bytes]] = []
        reader = _FrameProtocol(lambda *frame: frames.append(frame), lambda exc: None)
        reader.data_received(b"".join(parts))
        assert [(msg_id, bytes(payload)) for msg_id, _, payload in frames] == \
            [(1, b"small"), (2, big)]
        assert sender.send(3, _REQUEST, b"alone")
        await asyncio.sleep(0)
        assert recorder.calls[-1][0] == "write"  # small frames: one buffer, one write

    run(main)


def test_on_asyncios_own_loop_reads_stay_below_the_mmap_threshold_and_frames_stay_whole(
        ) -> None:
    """asyncio's socket transport reads 256 KiB at a time by default, a block glibc maps
    and unmaps for every read; a connection lowers it, and a frame larger than one read
    still arrives whole."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        frames: List[Frame] = []
        transport, _ = await loop.connect_accepted_socket(
            lambda: _FrameProtocol(lambda *frame: frames.append(frame), lambda exc: None),
            ours)
        assert transport.max_size == _READ_SIZE  # type: ignore[attr-defined]
        big = bytes(range(256)) * 1024  # 256 KiB: several reads
        theirs.setblocking(False)
        await loop.sock_sendall(theirs, frame(1, _REQUEST, big) + frame(2, _REQUEST, b"x"))
        await until(lambda: len(frames) == 2, "both frames")
        assert [(msg_id, bytes(payload)) for msg_id, _, payload in frames] == \
            [(1, big), (2, b"x")]
        transport.close()
        theirs.close()

    loop = asyncio.DefaultEventLoopPolicy().new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
