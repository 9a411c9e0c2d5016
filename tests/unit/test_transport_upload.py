"""Unit tests of a request's own stream in the RPC transport (``RpcServer(streaming=...)``,
``RpcClient.send_chunk`` and ``end_chunks``).

A handler named in ``streaming`` gets, as its first argument, a ``ReplyStream`` of the items
its caller sends after the request (``_IN_CHUNK`` frames, then ``_IN_END``); each item it
reads grants the caller room for one more (an ``_IN_CREDIT`` frame). No sockets: frames
are fed to the server's ``_FrameProtocol.data_received`` as raw bytes, in whatever reads
the test picks, and what the server writes is read back from a ``RecordingTransport``.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any, Callable, Dict, List, Tuple

from loop_helpers import run, spin
from test_transport import Frame, RecordingTransport, frame, request_ids, wired_client

from servekit._private.wire.transport import (
    _IN_CHUNK,
    _IN_CREDIT,
    _IN_END,
    _REPLY_OK,
    _REQUEST,
    ReplyStream,
    RpcServer,
    _FrameProtocol,
    dumps,
    encode_call,
)


def serve(handlers: Dict[str, Any], streaming: Tuple[str, ...]) -> Tuple[
        _FrameProtocol, RecordingTransport]:
    """A connection of an ``RpcServer`` serving ``handlers``, over a recording transport."""
    protocol = RpcServer(handlers, streaming=streaming)._new_connection()
    transport = RecordingTransport(protocol)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


def request(msg_id: int, name: str, *args: Any) -> bytes:
    return frame(msg_id, _REQUEST, encode_call(name, args))


def item(msg_id: int, value: Any) -> bytes:
    return frame(msg_id, _IN_CHUNK, dumps(value))


def replies(transport: RecordingTransport) -> List[Tuple[int, int, Any]]:
    """(msg_id, kind, value) of each frame the server wrote; a value only for OK replies."""
    return [(msg_id, kind, pickle.loads(payload) if kind == _REPLY_OK else payload)
            for msg_id, kind, payload in transport.frames()]


def closed_over(function: Callable[..., Any], name: str) -> Any:
    """The value of the variable ``name`` that the closure ``function`` holds."""
    cells = dict(zip(function.__code__.co_freevars, function.__closure__ or (), strict=True))
    return cells[name].cell_contents


def inbound_streams(protocol: _FrameProtocol) -> Dict[int, ReplyStream]:
    """The server's streams of requests by message id (the connection's own state, held by
    the closures ``RpcServer._new_connection`` makes)."""
    return closed_over(closed_over(protocol._on_frame, "stream_of"), "inbound")


class Collector:
    """A streaming handler that returns what it read, one item per loop iteration."""

    def __init__(self) -> None:
        self.read: List[Any] = []
        self.streams: List[ReplyStream] = []

    async def __call__(self, stream: ReplyStream, label: str) -> Tuple[str, List[Any]]:
        self.streams.append(stream)
        async for value in stream:
            self.read.append(value)
        return label, self.read


# --------------------------------------------------------------------------- the server


def test_a_streaming_handler_gets_the_items_sent_in_the_same_read_as_the_request() -> None:
    """Items arriving with the request, before its handler started, are not lost: the
    handler gets them first, then the arguments of the call."""

    async def main() -> None:
        handler = Collector()
        protocol, transport = serve({"up": handler}, streaming=("up",))
        protocol.data_received(request(1, "up", "body") + item(1, b"part 1")
                               + item(1, b"part 2") + frame(1, _IN_END))
        await spin()
        assert replies(transport) == [(1, _REPLY_OK, ("body", [b"part 1", b"part 2"]))]

    run(main)


def test_each_item_read_grants_its_own_request_room_for_one_more() -> None:
    async def main() -> None:
        first, second = Collector(), Collector()
        protocol, transport = serve({"first": first, "second": second},
                                    streaming=("first", "second"))
        protocol.data_received(request(1, "first", "a") + request(2, "second", "b")
                               + item(2, "x") + item(1, "y") + item(2, "z"))
        await spin()
        assert (first.read, second.read) == (["y"], ["x", "z"])
        assert sorted(replies(transport)) == [(1, _IN_CREDIT, b""), (2, _IN_CREDIT, b""),
                                              (2, _IN_CREDIT, b"")]
        protocol.data_received(frame(2, _IN_END))
        await spin()
        assert replies(transport)[-1] == (2, _REPLY_OK, ("b", ["x", "z"]))
        assert first.streams[0] is not second.streams[0]

    run(main)


def test_the_end_ends_the_iteration_and_items_read_after_it_grant_nothing() -> None:
    """Once the caller said its stream ended, nothing more can come: the items still unread
    are read without credits, then the iteration stops."""

    async def main() -> None:
        handler = Collector()
        started, gate = asyncio.Event(), asyncio.Event()

        async def late(stream: ReplyStream) -> Any:
            started.set()
            await gate.wait()  # reads nothing until the end arrived
            return await handler(stream, "late")

        protocol, transport = serve({"late": late}, streaming=("late",))
        protocol.data_received(request(1, "late") + item(1, 1) + item(1, 2))
        await asyncio.wait_for(started.wait(), 5)
        protocol.data_received(frame(1, _IN_END))
        gate.set()
        await spin()
        assert replies(transport) == [(1, _REPLY_OK, ("late", [1, 2]))]

    run(main)


def test_a_handler_not_named_streaming_gets_only_its_arguments() -> None:
    async def main() -> None:
        async def plain(*args: Any) -> Tuple[Any, ...]:
            return args

        protocol, transport = serve({"plain": plain, "up": Collector()}, streaming=("up",))
        protocol.data_received(request(1, "plain", "a", "b"))
        await spin()
        assert replies(transport) == [(1, _REPLY_OK, ("a", "b"))]

    run(main)


def test_items_for_a_call_that_ended_are_dropped_without_a_stream_or_a_reply() -> None:
    """The app answered without reading its whole body: the rest still arriving is dropped
    (nothing is kept for it, nothing is sent back); the connection serves on."""

    async def main() -> None:
        async def answer_at_once(stream: ReplyStream) -> str:
            return "answered"

        handler = Collector()
        protocol, transport = serve({"quick": answer_at_once, "up": handler},
                                    streaming=("quick", "up"))
        protocol.data_received(request(1, "quick"))
        await spin()
        assert replies(transport) == [(1, _REPLY_OK, "answered")]
        assert inbound_streams(protocol) == {}
        protocol.data_received(item(1, b"late part") + frame(1, _IN_END)
                               + item(5, b"for no call at all"))
        await spin()
        assert inbound_streams(protocol) == {}
        assert replies(transport) == [(1, _REPLY_OK, "answered")]
        protocol.data_received(request(2, "up", "next") + frame(2, _IN_END))
        await spin()
        assert replies(transport)[-1] == (2, _REPLY_OK, ("next", []))

    run(main)


def test_a_call_forgets_its_stream_when_it_ends_with_items_unread() -> None:
    async def main() -> None:
        async def reads_one(stream: ReplyStream) -> Any:
            return await stream.__anext__()

        protocol, transport = serve({"one": reads_one}, streaming=("one",))
        protocol.data_received(request(1, "one") + item(1, "a") + item(1, "b"))
        await spin()
        assert replies(transport) == [(1, _IN_CREDIT, b""), (1, _REPLY_OK, "a")]
        assert inbound_streams(protocol) == {}

    run(main)


# --------------------------------------------------------------------------- the client


def sent_frames(frames: List[Frame], msg_id: int) -> List[Tuple[int, bytes]]:
    return [(kind, bytes(payload)) for i, kind, payload in frames if i == msg_id]


def test_the_client_sends_items_and_the_end_of_a_request_after_it() -> None:
    async def main() -> None:
        client, protocol, transport = wired_client()
        reply = client.send(encode_call("up", ()))
        [msg_id] = request_ids(transport)
        assert client.send_chunk(msg_id, dumps(b"part 1")) is True
        client.end_chunks(msg_id)
        assert [kind for kind, _ in sent_frames(transport.frames(), msg_id)] == [
            _REQUEST, _IN_CHUNK, _IN_END]
        assert sent_frames(transport.frames(), msg_id)[1:] == [
            (_IN_CHUNK, dumps(b"part 1")), (_IN_END, b"")]
        protocol.data_received(frame(msg_id, _IN_CREDIT))  # room for a plain call: ignored
        assert not reply.done()
        protocol.data_received(frame(msg_id, _REPLY_OK, dumps("done")))
        assert reply.result() == "done"

    run(main)


def test_the_client_sends_nothing_for_a_request_it_does_not_wait_for() -> None:
    """An unknown message id, a request already answered, or a closing connection: no
    frame is written, and ``send_chunk`` says so."""

    async def main() -> None:
        client, protocol, transport = wired_client()
        reply = client.send(encode_call("up", ()))
        [msg_id] = request_ids(transport)
        written = transport.frames()
        assert client.send_chunk(msg_id + 1, b"x") is False
        client.end_chunks(msg_id + 1)
        protocol.data_received(frame(msg_id, _REPLY_OK, dumps("done")))
        assert reply.result() == "done"
        assert client.send_chunk(msg_id, b"x") is False
        client.end_chunks(msg_id)
        assert transport.frames() == written
        other = client.send(encode_call("up", ()))
        other_id = request_ids(transport)[-1]
        transport.closing = True
        assert client.send_chunk(other_id, b"x") is False
        assert not other.done()

    run(main)
