"""Fakes for router tests: replicas played by feeding raw frames into real ``RpcClient``s.

The router gets ``Cluster.connect`` as its ``connect_replica``, which hands it a real
``RpcClient`` wired to a recording transport. A ``FakeReplica`` plays the server side by
feeding raw frames (replies, refusals, room notices, stream chunks) into that client, so the
router sees exactly what a real connection would deliver, in the order a test chooses.
Long-poll updates go in through ``Router.apply`` (``Feed``).
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any, Dict, List, Optional, Tuple

from loop_helpers import spin

from servekit._private import constants
from servekit._private.routing.router import Router
from servekit._private.specs import BackendLimits, EndpointInfo
from servekit._private.wire.transport import (
    _CANCEL,
    _CREDIT,
    _HEADER,
    _IN_CHUNK,
    _IN_CREDIT,
    _IN_END,
    _NOTIFY,
    _REPLY_BUSY,
    _REPLY_ERROR,
    _REPLY_OK,
    _REQUEST,
    _STOPPED,
    _STREAM_CHUNK,
    _STREAM_END,
    ConnectFailed,
    RpcClient,
    _FrameProtocol,
    dumps,
    encode_error,
)

# --------------------------------------------------------------------------- fakes


def frame(msg_id: int, kind: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(len(payload), msg_id, kind) + payload


class FakeTransport:
    """The socket of one connection: records writes; closing it loses it on the next loop
    iteration, as an asyncio transport does."""

    def __init__(self, protocol: _FrameProtocol) -> None:
        self.protocol = protocol
        self.data = bytearray()
        self.closing = False
        self.lost = False

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.data += part

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.lose)

    def lose(self) -> None:
        """The peer went away: the protocol learns it now."""
        self.closing = True
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)


class FakeReplica:
    """The server end of a replica's connections: what it received, and frames to answer."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.address = f"/run/servekit/sock-{len(tag)}-{id(self):x}"  # does not name the tag
        self.refuse_connections = False
        self.connects = 0
        self.transports: List[FakeTransport] = []

    @property
    def transport(self) -> FakeTransport:
        assert self.transports, f"nothing connected to {self.tag}"
        return self.transports[-1]

    def _frames(self) -> List[Tuple[int, int, bytes]]:
        found = []
        for transport in self.transports:
            data, offset = bytes(transport.data), 0
            while offset < len(data):
                length, msg_id, kind = _HEADER.unpack_from(data, offset)
                start = offset + _HEADER.size
                found.append((msg_id, kind, data[start:start + length]))
                offset = start + length
        return found

    def requests(self) -> List[Tuple[int, Any]]:
        """(message id, first argument) of every request written to this replica."""
        found = []
        for msg_id, kind, payload in self._frames():
            assert kind in (_REQUEST, _CANCEL, _CREDIT, _IN_CHUNK, _IN_END)
            if kind == _REQUEST:
                _, args = pickle.loads(payload)
                found.append((msg_id, args[0] if args else None))
        return found

    def cancelled(self) -> List[Any]:
        """The first arguments of the requests the router told this replica to cancel."""
        by_id = dict(self.requests())
        return [by_id[msg_id] for msg_id, kind, _ in self._frames() if kind == _CANCEL]

    def received(self) -> List[Any]:
        return [value for _, value in self.requests()]

    def _id(self, value: Any) -> int:
        ids = [msg_id for msg_id, got in self.requests() if got == value]
        assert ids, f"{self.tag} never received {value!r}: {self.received()}"
        return ids[-1]

    def feed(self, *frames: bytes) -> None:
        """Frames arriving at the router in one read."""
        self.transport.protocol.data_received(b"".join(frames))

    def answer_frame(self, value: Any, result: Any) -> bytes:
        return frame(self._id(value), _REPLY_OK, dumps(result))

    def busy_frame(self, value: Any) -> bytes:
        return frame(self._id(value), _REPLY_BUSY)

    def answer(self, value: Any, result: Any) -> None:
        self.feed(self.answer_frame(value, result))

    def refuse(self, value: Any) -> None:
        self.feed(self.busy_frame(value))

    def notice(self) -> None:
        self.feed(NOTICE)

    def kinds(self, value: Any) -> List[int]:
        """The kinds of the frames the router wrote for the request ``value``."""
        msg_id = self._id(value)
        return [kind for i, kind, _ in self._frames() if i == msg_id]

    def chunk(self, value: Any, item: Any) -> None:
        self.feed(self.chunk_frame(value, item))

    def chunk_frame(self, value: Any, item: Any) -> bytes:
        return frame(self._id(value), _STREAM_CHUNK, dumps(item))

    def upload(self, value: Any) -> List[Any]:
        """The request ``value``'s own stream as this replica got it: its items, in order,
        then ``END`` if the router said it ended."""
        msg_id = self._id(value)
        return [pickle.loads(payload) if kind == _IN_CHUNK else END
                for i, kind, payload in self._frames()
                if i == msg_id and kind in (_IN_CHUNK, _IN_END)]

    def credit(self, value: Any, times: int = 1) -> None:
        """The replica took ``times`` items of the request ``value``'s own stream."""
        self.feed(*[frame(self._id(value), _IN_CREDIT)] * times)

    def end_stream(self, value: Any) -> None:
        self.feed(frame(self._id(value), _STREAM_END))

    def stopped(self, value: Any) -> None:
        """The replica says the work of a cancelled request has stopped."""
        self.feed(frame(self._id(value), _STOPPED))

    def fail(self, value: Any, exc: BaseException) -> None:
        self.feed(frame(self._id(value), _REPLY_ERROR, encode_error(exc)))

    def drop(self) -> None:
        """The replica's process died: its connection is lost."""
        self.transport.lose()


NOTICE = frame(0, _NOTIFY)
END = "<end of the request's own stream>"


class Cluster:
    """The replicas the router may connect to; ``connect`` is its ``connect_replica``."""

    def __init__(self) -> None:
        self.by_address: Dict[str, FakeReplica] = {}

    def replica(self, tag: str) -> FakeReplica:
        replica = FakeReplica(tag)
        self.by_address[replica.address] = replica
        return replica

    async def connect(self, address: str, name: str) -> RpcClient:
        replica = self.by_address[address]
        replica.connects += 1
        await asyncio.sleep(0)  # connecting takes a loop iteration
        if replica.refuse_connections:
            raise ConnectFailed(f"Could not connect to {name}: [Errno 111] Connection refused")
        client = RpcClient(address, name)
        client.closed = asyncio.get_running_loop().create_future()
        protocol = _FrameProtocol(client._on_frame, client._on_lost)
        transport = FakeTransport(protocol)
        protocol.connection_made(transport)  # type: ignore[arg-type]
        client._protocol = protocol
        replica.transports.append(transport)
        return client


def endpoint(name: str = "ep", traffic: Optional[Dict[str, float]] = None,
             shadows: Optional[Dict[str, float]] = None) -> EndpointInfo:
    return EndpointInfo(name, None, ["__call__"], traffic or {"b": 1.0}, shadows or {})


class Feed:
    """The long poll as the router sees it: versioned updates pushed through ``apply``."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.version = 0

    def push(self, key: str, value: Any) -> None:
        self.version += 1
        self.router.apply({key: (self.version, value)})

    def endpoints(self, *infos: EndpointInfo) -> None:
        self.push(constants.KEY_ENDPOINTS, {info.name: info for info in infos})

    def caps(self, max_queued: int = -1, **caps: int) -> None:
        self.push(constants.KEY_BACKENDS,
                  {backend: BackendLimits(cap, max_queued) for backend, cap in caps.items()})

    def replicas(self, **replicas: List[FakeReplica]) -> None:
        self.push(constants.KEY_REPLICAS,
                  {backend: [(r.tag, r.address) for r in rs] for backend, rs in replicas.items()})


def make_router(cluster: Cluster, cap: int = 1, connect: Optional[Any] = None,
                **replicas: List[FakeReplica]) -> Tuple[Router, Feed]:
    """A router knowing endpoint ``ep`` (traffic all to backend ``b``), the caps and
    replicas given (default: backend ``b``); ``connect``: instead of ``cluster.connect``."""
    router = Router("/run/servekit/controller.sock", "router",
                    connect_replica=connect or cluster.connect)
    feed = Feed(router)
    feed.endpoints(endpoint())
    feed.caps(**{backend: cap for backend in replicas})
    feed.replicas(**replicas)
    return router, feed




def start_send(router: Router, value: Any, name: str = "ep",
               missing_ok: bool = False) -> asyncio.Task:
    """``router.send`` of a request whose argument is ``value``, as a task."""
    return asyncio.ensure_future(router.send(name, "call", None, (value,), missing_ok))


async def sent(router: Router, value: Any, name: str = "ep") -> asyncio.Future:
    """Send a request that must be written to a replica at once; the future of its reply."""
    task = start_send(router, value, name)
    await spin()
    assert task.done(), f"request {value!r} was not sent"
    return task.result()


def slot(router: Router, tag: str, backend: str = "b") -> Any:
    return router._replica_sets[backend].slots[tag]
