"""The wire on TCP in simulation: a replica's port open to anyone, and the peers that must
still get in.

One world is one replica's real ``RpcServer`` listening on TCP as on Ray (TLS with the
instance's certificate, then the instance secret's handshake, ``wire/auth.py``), over
``simnet.SimTcp`` (TLS is modelled there: a handshake that succeeds or fails as asyncio's
would, with the same order of events around it; the secret's handshake is the real one).
Real ``Router``s send to it, connecting with ``RpcClient.connect`` as on Ray, and so do
plain clients that try again as a router does. The seed draws:

- bursts of attackers, from anyone who can reach the port: connections that send nothing,
  send bytes that are not TLS, stop halfway through TLS, or present another instance's
  certificate; and processes of the instance stopped while they connected (past TLS: silent,
  half their proof sent, or a wrong proof);
- when routers and clients come (before, during and after the bursts), and the network's
  delays.

The cyclic collector does not run during a run (a server's garbage may wait minutes for a
full collection): whatever a failed connection leaves in a reference cycle stays, and a
seed replays exactly.

After every run it checks: a peer that holds the instance's secret is served within
``BOUND_S`` of its first try, whatever the attackers do; a refusal never tells it that its
secret may be the wrong one without the other reason (a server busy with others); a
connection whose handshake failed holds no place among those authenticating; once the
handshake timeouts have passed, every connection the server accepted has authenticated or
is closed, and a new peer is served at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import random
import socket
from typing import Any, List, Optional, Tuple

from dataplane import ticks
from scenarios import check, scenario
from simloop import SimLoop, run
from simnet import CLIENT_HELLO, ConnectFaults, SimNet, SimTcp

from servekit._private import constants
from servekit._private.routing.router import Router
from servekit._private.specs import BackendLimits, EndpointInfo
from servekit._private.wire import auth, tls
from servekit._private.wire.auth import _MAC, _NONCE, HANDSHAKE_TIMEOUT_S
from servekit._private.wire.transport import (
    ConnectFailed,
    RpcClient,
    RpcServer,
    encode_call,
    tcp_address,
)

SECRET = b"the simulated instance's secret!"
OTHER_SECRET = b"another instance's secret, 32 b."
HOST, PORT = "10.0.0.1", 7000
ADDRESS = tcp_address(HOST, PORT)
BACKEND, ENDPOINT, TAG = "b", "ep", "b#0"
# Seconds a peer with the secret may wait, from its first try, to be served.
BOUND_S = 3.0
# From anyone who can reach the port.
STRANGERS = ("silent", "garbage", "half_hello", "other_instance")
# Processes of the instance stopped while they connected: past TLS, they stall in the
# secret's handshake.
STOPPED_MEMBERS = ("stopped", "half_proof", "wrong_proof")
_PROOF_SIZE = _NONCE + _MAC  # what a client answers the server's challenge with


@dataclasses.dataclass
class Burst:
    at: float
    spread_s: float  # its attackers come over this long
    size: int
    kinds: Tuple[str, ...]


@dataclasses.dataclass
class Settings:
    """What the seed chose for a world."""

    max_delay_s: float
    bursts: List[Burst]
    routers: List[float]  # when each comes
    clients: List[float]
    work_s: float  # what a call takes on the replica


def draw_settings(rng: random.Random) -> Settings:
    bursts = [Burst(at=ticks(rng, 0.0, 3.0),
                    spread_s=rng.choice([0.0, ticks(rng, 0.0, 0.05), ticks(rng, 0.0, 2.0)]),
                    size=rng.choice([rng.randint(1, 10), rng.randint(40, 70),
                                     rng.randint(64, 100)]),
                    kinds=tuple(rng.sample(STRANGERS + STOPPED_MEMBERS, rng.randint(1, 3))))
              for _ in range(rng.choice([0, 1, 1, 1, 2]))]
    # Peers come at any time, or just before a burst (so that a burst may find them still
    # authenticating, the oldest).
    arrivals = [ticks(rng, 0.0, 6.0)] + [max(0.0, b.at - ticks(rng, 0.0, 0.01)) for b in bursts]
    return Settings(
        max_delay_s=rng.choice([0.002, 0.02, 0.1]),
        bursts=bursts,
        routers=[rng.choice(arrivals) for _ in range(rng.randint(1, 3))],
        clients=[rng.choice(arrivals) for _ in range(rng.randint(0, 3))],
        work_s=rng.choice([0.0, ticks(rng, 0.0, 0.05)]),
    )


class _ListeningSocket:
    """What ``RpcServer.start`` is given: a TCP listener of the simulated network."""

    family = socket.AF_INET

    def getsockname(self) -> Tuple[str, int]:
        return HOST, PORT


class _Attacker(asyncio.Protocol):
    """An attacker's end: it sends what its kind says once connected (a stopped member,
    once the server's challenge arrives), then nothing, and never closes."""

    def __init__(self, kind: str, rng: random.Random) -> None:
        self._kind = kind
        self._rng = rng
        self._challenged = False
        self._transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        rng = self._rng
        if self._kind == "garbage":  # (a TLS record's first byte, then noise)
            transport.write(b"\x16" + bytes(rng.getrandbits(8)  # type: ignore[attr-defined]
                                            for _ in range(rng.randint(0, 100))))
        elif self._kind == "half_hello":
            transport.write(  # type: ignore[attr-defined]
                CLIENT_HELLO[:rng.randint(1, len(CLIENT_HELLO))])

    def data_received(self, data: bytes) -> None:
        if self._challenged:
            return
        self._challenged = True
        if self._kind == "half_proof":
            self._transport.write(bytes(self._rng.randint(1, _PROOF_SIZE - 1)))
        elif self._kind == "wrong_proof":
            self._transport.write(bytes(_PROOF_SIZE))


@dataclasses.dataclass
class Peer:
    """A router's request or a client's call: a peer with the secret; what it saw."""

    name: str
    began: float = 0.0
    served_after: Optional[float] = None
    outcome: Any = None
    refusals: List[str] = dataclasses.field(default_factory=list)


class WireWorld:
    """One seed's replica listener, attackers, routers and clients."""

    def __init__(self, loop: SimLoop, settings: Settings) -> None:
        self.loop = loop
        self.rng = loop.rng
        self.settings = settings
        self.net = loop.net = SimNet(loop, ConnectFaults(max_delay_s=settings.max_delay_s),
                                     max_delay_s=settings.max_delay_s)
        SimTcp(self.net).install()
        self.server = RpcServer({"call": self._call, "echo": self._echo})
        self.routers: List[Router] = []
        self.peers: List[Peer] = []
        self.attacks: List[str] = []

    async def _call(self, *call: Any) -> Any:
        await asyncio.sleep(self.settings.work_s)
        return call[1][0]

    async def _echo(self, value: Any) -> Any:
        return value

    async def start(self) -> None:
        await self.server.start(_ListeningSocket())  # type: ignore[arg-type]

    def close(self) -> None:
        for router in self.routers:
            router.close()
        self.server.close()

    # ------------------------------------------------------------- attackers

    async def burst(self, burst: Burst) -> None:
        await asyncio.sleep(burst.at)
        await asyncio.gather(*(self.attack(self.rng.choice(burst.kinds), burst.spread_s)
                               for _ in range(burst.size)))

    async def attack(self, kind: str, spread_s: float) -> None:
        await asyncio.sleep(self.loop.ticks(0.0, spread_s))
        self.attacks.append(kind)
        context = None
        if kind == "other_instance":
            context = tls.client_context(OTHER_SECRET)
        elif kind in STOPPED_MEMBERS:
            context = tls.client_context(SECRET)
        try:
            await self.loop.create_connection(
                lambda: _Attacker(kind, self.rng), HOST, PORT, ssl=context,
                server_hostname=tls.SERVER_NAME, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except OSError:  # (ssl.SSLError too: another instance's certificate)
            pass

    # ------------------------------------------------------------- peers with the secret

    async def route(self, name: str, at: float) -> None:
        """A router comes at ``at`` (a new process, or one that had no connection to the
        replica yet) and sends its requests."""
        await asyncio.sleep(at)
        router = Router("/sim/controller", name, connect_replica=RpcClient.connect)
        self.routers.append(router)
        router.apply({
            constants.KEY_ENDPOINTS: (1, {ENDPOINT: EndpointInfo(ENDPOINT, None, [],
                                                                  {BACKEND: 1.0})}),
            constants.KEY_BACKENDS: (1, {BACKEND: BackendLimits(8, -1, None)}),
            constants.KEY_REPLICAS: (1, {BACKEND: [(TAG, ADDRESS)]}),
        })
        await asyncio.gather(*(self.request(router, f"{name}.{i}")
                               for i in range(self.rng.randint(1, 3))))

    async def request(self, router: Router, name: str) -> None:
        await asyncio.sleep(self.rng.choice([0.0, self.loop.ticks(0.0, 1.0)]))
        peer = self._peer(name)
        call = ("call", (name,), {}, "GET", {}, False, name)
        request = router.place(ENDPOINT, "call", None, encode_call("call", call),
                               timeout_s=BOUND_S)
        assert request is not None
        try:
            self._served(peer, await request.reply, name)
        except Exception as exc:
            peer.outcome = exc

    async def client(self, name: str, at: float) -> None:
        """A plain client: connects (trying again after a failed connect, backing off as a
        router does) and calls once; it gives up after ``BOUND_S``."""
        await asyncio.sleep(at)
        peer = self._peer(name)
        backoff = constants.RECONNECT_BACKOFF_S
        while True:
            try:
                connection = await RpcClient.connect(ADDRESS, f"replica {TAG}")
                break
            except ConnectFailed as exc:
                peer.refusals.append(str(exc))
                peer.outcome = exc
            if self.loop.time() + backoff > peer.began + BOUND_S:
                return
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, constants.MAX_RECONNECT_BACKOFF_S)
        try:
            self._served(peer, await asyncio.wait_for(connection.call("echo", name),
                                                      peer.began + BOUND_S - self.loop.time()),
                         name)
        except Exception as exc:
            peer.outcome = exc
        finally:
            connection.close()

    def _peer(self, name: str) -> Peer:
        peer = Peer(name, began=self.loop.time())
        self.peers.append(peer)
        return peer

    def _served(self, peer: Peer, value: Any, expected: str) -> None:
        peer.outcome = value
        if value == expected:
            peer.served_after = self.loop.time() - peer.began

    # ------------------------------------------------------------- the invariants

    def check_peers(self) -> None:
        attacks = f"(attackers: {_counts(self.attacks)})"
        for peer in self.peers:
            check(peer.served_after is not None and peer.served_after <= BOUND_S,
                  "a peer with the instance's secret is never locked out",
                  f"{peer.name} was not served within {BOUND_S} s of its first try "
                  f"{attacks}: {peer.outcome!r}")
            for refusal in peer.refusals + [str(peer.outcome)]:
                check("secret" not in refusal or "busy" in refusal,
                      "a refusal names its reason",
                      f"{peer.name}, which holds the instance's secret, was told its secret "
                      f"may be the wrong one, and nothing else: {refusal!r} {attacks}")

    def check_places(self) -> None:
        """Once every attacker had its time to authenticate, nobody holds a place among
        those authenticating, and every connection the server accepted is a peer's."""
        waiting = [p for p in self.server._authenticating
                   if p.handshake is not None and not p.handshake.done]
        check(not waiting, "a connection whose handshake failed holds no place",
              f"the handshake timeouts are over, yet the server counts {len(waiting)} "
              f"connections as authenticating ({sum(p.transport is None for p in waiting)} "
              f"of them never got past TLS; attackers: {_counts(self.attacks)})")
        for connection in self.net.connections:
            protocol = connection.ends[1].protocol
            handshake = getattr(protocol, "handshake", None)
            check(handshake is not None and handshake.done,
                  "a connection that does not authenticate is closed",
                  f"connection {connection.number} is still open past the handshake "
                  f"timeouts, unauthenticated (server side: {type(protocol).__name__})")


def _counts(kinds: List[str]) -> str:
    return ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds))) or "none"


async def _play(loop: SimLoop) -> None:
    settings = draw_settings(loop.rng)
    world = WireWorld(loop, settings)
    try:
        await world.start()
        tasks = [world.burst(b) for b in settings.bursts]
        tasks += [world.route(f"router{i}", at) for i, at in enumerate(settings.routers)]
        tasks += [world.client(f"client{i}", at) for i, at in enumerate(settings.clients)]
        await asyncio.gather(*tasks)
        await asyncio.sleep(HANDSHAKE_TIMEOUT_S + 1.0)  # every attacker's time is over
        world.check_places()
        await asyncio.gather(world.route("late router", 0.0), world.client("late client", 0.0))
        world.check_peers()
    finally:
        world.close()


@scenario("wire")
def wire(seed: int) -> None:
    """A replica's TCP listener under seeded attackers; routers and clients must get in."""
    logging.getLogger("servekit").setLevel(logging.CRITICAL)
    collecting, secret = gc.isenabled(), auth._secret
    gc.disable()
    auth.set_secret(SECRET)
    try:
        run(_play, seed)
    finally:
        auth._secret = secret
        if collecting:
            gc.enable()
