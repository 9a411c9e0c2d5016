"""The HTTP proxy in simulation: real HTTP clients' bytes through the real proxy to replicas.

The world of ``dataplane`` (one backend, real replicas, faults) plus, in front of it, the
proxy as it runs: ``HTTPProxy`` behind uvicorn's httptools protocol as servekit bounds it
(``ProxyHttpProtocol``, fast lane included), listening on the simulated network. Clients
speak HTTP/1.1 through ``h11``: GET or POST (bodies of every size), plain or streamed
replies, and they leave at seeded moments — before the reply, in the loop turn the reply
reaches the proxy, at its first chunk, mid-body — or stop reading for a while. The proxy's
request timeout is drawn small, so deadlines land in the same loop turn as replies and
chunks. The backend is a class, or an ASGI app (one with a ``reconfigure`` too); an app's
streams may last minutes.

After every run, besides the data plane's invariants: every client's request ended (a
whole, well-framed response, or the connection closed) within its bound; a whole response
to a plain call carries what the backend returned; every byte of request bodies the proxy
held is given back; the user's work for a client that left stops soon after (not at its
natural end); a config change is applied within a bound however long requests stay open,
and requests that come meanwhile are not held behind them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import urllib.parse
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

import h11
import uvicorn
from dataplane import (
    BACKEND,
    ENDPOINT,
    LEAVE_BOUND_S,
    QUIET_S,
    USER_CODE,
    World,
    current_world,
    live,
)
from scenarios import check, scenario
from simloop import SimLoop, run

from servekit._private import constants
from servekit._private.asgi_app import ASGIFactory, ingress
from servekit._private.proxy.proxy import HTTPProxy, server_config
from servekit._private.routing.routed_request import RoutedRequest
from servekit._private.routing.router import Router
from servekit._private.specs import BackendLimits, EndpointInfo
from servekit.config import HTTPOptions

PROXY = "/sim/proxy"
ROUTE = "/ep"
# Virtual seconds after the last client before the places are checked: past every
# timeout of the data plane and past the proxy's deadline for a client that stopped reading.
PROXY_QUIET_S = max(QUIET_S, constants.SEND_TIMEOUT_S) + 10
# An app's long streams: at most this many a world (at a cap of 1, requests wait behind
# them), each of 2 or 3 chunks with a wait past LEAVE_BOUND_S before each.
LONG_STREAMS = 4
LONGEST_STREAM_S = 3 * 2 * LEAVE_BOUND_S
# Virtual seconds a client waits for the end of a response before the run is a failure:
# longer than any timeout, retry or freeze of a world, and than its long streams.
CLIENT_PATIENCE_S = 3 * PROXY_QUIET_S + LONG_STREAMS * LONGEST_STREAM_S
# A client that stops reading and never reads again (nor closes its connection).
FOREVER = float("inf")


def make_app(replica: str) -> Any:
    """A raw ASGI app (what a FastAPI app is to servekit, without the framework's cost) whose
    answers the request's query picks: ``kind`` "one" (one body message), "stream" (chunks
    as they come), "early" (it answers before it reads the body), "raise"; ``cl`` its
    Content-Length: "ok", "none", or wrong ("short", "long": the app's bug to survive)."""

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].split(".")[1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        world = _world_of_app()
        query = {k: v[0] for k, v in urllib.parse.parse_qs(scope["query_string"].decode()).items()}
        caller, sent, kind = int(query["c"]), int(query["n"]), query["kind"]
        world.started(replica, caller)
        try:
            if kind != "early":
                received = 0
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    received += len(message.get("body", b""))
                    if not message.get("more_body"):
                        break
                if received != sent:
                    world.breaks(USER_CODE, f"HTTP caller {caller} sent {sent} bytes of "
                                 f"body, its app received {received}")
            await asyncio.sleep(world.work_s())
            if kind == "raise":
                raise RuntimeError("simulated: the app raised")
            body = app_body(caller)
            headers = [(b"content-type", b"text/plain")]
            if kind == "stream":
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                chunks, size, pause_s = world.app_stream_shape()
                for index in range(chunks):
                    await asyncio.sleep(world.work_s() / 4 if pause_s is None else pause_s)
                    await send({"type": "http.response.body", "more_body": True,
                                "body": f"{caller}:{index}:".encode() + b"x" * size})
                await send({"type": "http.response.body", "body": b""})
                return
            length = {"ok": len(body), "short": len(body) - 1, "long": len(body) + 5}
            if query["cl"] in length:
                headers.append((b"content-length", str(length[query["cl"]]).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            world.stopped(replica, caller)

    return app


def configurable_app(replica: str) -> type:
    """``make_app(replica)`` served by an ``@ingress`` class that has a ``reconfigure``: an
    app whose ``user_config`` changes while its requests and streams are open. (A class per
    replica, as the app is: its answers say which replica ran them.)"""

    class ConfigurableApp:
        def reconfigure(self, user_config: Any) -> None:
            self.user_config = user_config

    return ingress(make_app(replica))(ConfigurableApp)


def app_body(caller: int) -> bytes:
    return f"app answers {caller}".encode()


def _world_of_app() -> "ProxyWorld":
    world = current_world()
    assert isinstance(world, ProxyWorld)
    return world


class HttpClient(asyncio.Protocol):
    """A client connection: bytes in, ``h11`` events out, in order."""

    def __init__(self) -> None:
        self.connection = h11.Connection(h11.CLIENT)
        self.transport: Optional[asyncio.Transport] = None
        self.events: Deque[Any] = collections.deque()
        self.changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.connection.receive_data(data)
        self._pump()

    def eof_received(self) -> None:
        pass

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.connection.their_state is not h11.CLOSED:
            self.connection.receive_data(b"")
        self._pump()
        self.events.append(h11.ConnectionClosed())
        self.changed.set()

    def _pump(self) -> None:
        while True:
            try:
                event = self.connection.next_event()
            except h11.RemoteProtocolError as exc:
                self.events.append(exc)
                break
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            self.events.append(event)
            if isinstance(event, h11.ConnectionClosed):
                break
        self.changed.set()

    async def next_event(self) -> Any:
        while not self.events:
            self.changed.clear()
            await self.changed.wait()
        return self.events.popleft()

    def send(self, event: Any) -> None:
        data = self.connection.send(event)
        if data and self.transport is not None:
            self.transport.write(data)


@dataclasses.dataclass
class HttpCaller:
    """One HTTP request and what its client does; ``outcome`` is what it saw."""

    index: int
    method: str
    body: int  # bytes of its POST body (0: a GET)
    start_at: float
    # "before" (the reply), "answer" (as its reply reaches the proxy), "first" (chunk),
    # "mid" (body), None
    leave: Optional[str]
    leave_after: float
    stall_s: float  # stops reading this long after the head (0: never)
    trickle_s: float = 0.0  # sends its body a byte at a time, this far apart (0: at once)
    app_kind: str = ""  # to an ASGI app: what it answers ("one", "stream", "early", "raise")
    content_length: str = ""  # the app's Content-Length ("ok", "none", "short", "long")
    framed: bool = True  # the response said where its body ends
    outcome: Optional[str] = None
    status: Optional[int] = None
    body_read: bytes = b""
    waited: Optional[float] = None


class ProxyWorld(World):
    """The data plane's world with the proxy and HTTP clients in front of it."""

    def __init__(self, loop: SimLoop, threads: Any, settings: Any) -> None:
        super().__init__(loop, threads, settings)
        rng = self.rng
        self.proxy_timeout_s = rng.choice([None, loop.ticks(0.001, 0.05), loop.ticks(0.01, 1.0)])
        self.options = HTTPOptions(
            max_body_bytes=200_000, max_held_body_bytes=rng.choice([200_000, 1 << 20]),
            request_timeout_s=self.proxy_timeout_s,
            limit_concurrency=rng.choice([4096, rng.randint(2, 12)]),
            keep_alive_timeout_s=rng.choice([5.0, loop.ticks(0.01, 1.0)]),
            client_timeout_s=rng.choice([10.0, loop.ticks(0.05, 2.0)]))
        self.proxy = HTTPProxy(self.router, self.options.max_body_bytes,
                               self.options.request_timeout_s)
        # The proxy as ``run_proxy`` serves it: uvicorn's config, servekit's protocol.
        self.config, self.budget = server_config(self.proxy, self.options)
        self.config.load()
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # (set by the config)
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self.server_state = uvicorn.server.ServerState()
        self.http_callers: List[HttpCaller] = []
        self.evicted: Set[Any] = set()  # connections the proxy closed as idle
        self.is_app = rng.random() < 0.4
        self.has_reconfigure = not self.is_app or rng.random() < 0.7
        self.placed: Optional[RoutedRequest] = None  # the router's latest request
        self.long_streams = 0  # drawn so far
        self.router.place = self._place  # type: ignore[method-assign]
        self.proxy.serve_now = self._serve_now  # type: ignore[method-assign]

    def target(self, replica: str) -> Tuple[Any, Tuple[Any, ...]]:
        if self.is_app and self.has_reconfigure:
            return configurable_app(replica), ()
        if self.is_app:
            return ASGIFactory(make_app), (replica,)
        return super().target(replica)

    def route(self) -> EndpointInfo:
        return EndpointInfo(ENDPOINT, ROUTE, ["GET", "POST"], {BACKEND: 1.0},
                            asgi=self.is_app)

    async def start(self) -> None:
        s = self.settings
        self.router.apply({
            constants.KEY_ENDPOINTS: (1, {ENDPOINT: self.route()}),
            constants.KEY_BACKENDS: (1, {BACKEND: BackendLimits(
                s.cap, s.max_queued, s.request_timeout_s)}),
        })
        for _ in range(s.replicas):
            await self.add_replica()
        self.net.listen(self._accept, PROXY)
        self.net.reliable.add(PROXY)

    def _accept(self) -> Any:
        """A new connection's protocol, as uvicorn makes it; its evictions are noted (a
        client whose request head was still on its way sees only the close)."""
        protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state={}, _loop=self.loop)
        evict = protocol._evict

        def noted_evict() -> None:
            self.evicted.add(protocol.transport._connection)
            evict()

        protocol._evict = noted_evict
        return protocol

    def app_stream_shape(self) -> Tuple[int, int, Optional[float]]:
        """(chunks, bytes per chunk, the wait before each chunk) of an app's stream: the
        data plane's streams (a short wait drawn per chunk: None), and streams that last
        minutes (an app streams as long as it likes: a client that leaves one must not
        leave it running to its end, a config change must not wait for it)."""
        if self.long_streams < LONG_STREAMS and self.rng.random() < 0.5:
            self.long_streams += 1
            return self.rng.randint(2, 3), 0, self.loop.ticks(LEAVE_BOUND_S + 1,
                                                              LONGEST_STREAM_S / 3)
        chunks, size, _ = self.stream_shape()
        return chunks, size, None

    def _place(self, *args: Any, **kwargs: Any) -> Optional[RoutedRequest]:
        """The router's ``place``, noting the request (for ``_serve_now``)."""
        self.placed = Router.place(self.router, *args, **kwargs)
        return self.placed

    def _serve_now(self, protocol: Any, cycle: Any) -> bool:
        """The proxy's fast lane, where a client that leaves at its "answer" drops its
        connection in the loop turn its reply settles (the reply's first frame reached the
        proxy, which has written none of it yet)."""
        self.placed = None
        served = HTTPProxy.serve_now(self.proxy, protocol, cycle)
        query = urllib.parse.parse_qs(cycle.scope["query_string"].decode())
        caller = self.http_callers[int(query["c"][0])]
        if caller.leave == "answer" and self.placed is not None:
            client_end = protocol.transport._connection.ends[0]
            self.placed.reply.add_done_callback(
                lambda _: self._leave(caller, client_end))
        return served

    # ------------------------------------------------------------- clients

    def draw_http_caller(self, index: int) -> HttpCaller:
        rng = self.rng
        app_kind = rng.choice(["one", "one", "stream", "stream", "early", "raise"]) \
            if self.is_app else ""
        return HttpCaller(
            index, "app" if self.is_app else self.settings.method,
            app_kind=app_kind,
            content_length=rng.choice(["ok", "ok", "none", "short", "long"]),
            body=rng.choice([0, 0, 7, 5000, 150_000]),
            start_at=self.loop.ticks(0.0, 2.0),
            leave=rng.choice([None, None, "before", "answer", "first", "mid"]),
            leave_after=rng.choice([0.0, self.loop.ticks(0.0, 0.01), self.loop.ticks(0.0, 1.0)]),
            stall_s=rng.choice([0.0, 0.0, 0.0, self.loop.ticks(0.0, 2.0), FOREVER]),
            trickle_s=rng.choice([0.0] * 7 + [self.loop.ticks(0.05, 0.5)]))

    async def http_call(self, caller: HttpCaller) -> None:
        await asyncio.sleep(caller.start_at)
        began = self.loop.time()
        transport, client = await self.net.connect(HttpClient, PROXY)
        assert isinstance(client, HttpClient)
        target = f"{ROUTE}?c={caller.index}&n={caller.body}"
        if caller.app_kind:
            target = f"{ROUTE}/x?c={caller.index}&n={caller.body}&kind={caller.app_kind}" \
                     f"&cl={caller.content_length}"
        headers = [("host", "sim"), ("x-serve-call-method", caller.method)]
        if caller.body:
            headers.append(("content-length", str(caller.body)))
        client.send(h11.Request(method="POST" if caller.body else "GET", target=target,
                                headers=headers))
        trickling = None
        if caller.body and caller.trickle_s:
            trickling = asyncio.ensure_future(self._trickle(caller, client, transport))
        else:
            if caller.body:
                client.send(h11.Data(data=b"x" * caller.body))
            client.send(h11.EndOfMessage())
        leaving = None
        if caller.leave == "before":
            leaving = self.loop.call_later(caller.leave_after, self._leave, caller, transport)
        try:
            await asyncio.wait_for(self._read(caller, client, transport),
                                   CLIENT_PATIENCE_S)
        except asyncio.TimeoutError:
            caller.outcome = "hung"
        finally:
            if leaving is not None:
                leaving.cancel()
            if trickling is not None:
                trickling.cancel()
            caller.waited = self.loop.time() - began
            transport.close()

    async def _trickle(self, caller: HttpCaller, client: HttpClient,
                       transport: asyncio.Transport) -> None:
        """Send the body a byte every ``trickle_s`` (never silent for long, always too
        slow), until it is all sent, answered, or the connection closes."""
        for _ in range(caller.body):
            if transport.is_closing() or caller.status is not None:
                return
            client.send(h11.Data(data=b"x"))
            await asyncio.sleep(caller.trickle_s)
        if not transport.is_closing() and caller.status is None:
            client.send(h11.EndOfMessage())

    async def _read(self, caller: HttpCaller, client: HttpClient,
                    transport: asyncio.Transport) -> None:
        chunks = 0
        while True:
            event = await client.next_event()
            if caller.outcome == "left":
                return
            connection = transport._connection  # type: ignore[attr-defined]
            if isinstance(event, (h11.RemoteProtocolError, h11.ConnectionClosed)) and \
                    connection.was_reset:
                caller.outcome = "reset"  # the network broke the connection
                return
            if isinstance(event, (h11.RemoteProtocolError, h11.ConnectionClosed)) and \
                    connection in self.evicted and caller.status is None:
                caller.outcome = "evicted"  # closed as idle for others, its head in flight
                return
            if isinstance(event, h11.RemoteProtocolError):
                if caller.status is None:
                    caller.outcome = f"closed before any response ({event})"
                elif "without sending complete message body" in str(event):
                    caller.outcome = "cut"  # a response the proxy could not finish
                else:
                    caller.outcome = f"misframed: {event}"
                return
            if isinstance(event, h11.ConnectionClosed):
                caller.outcome = caller.outcome or "closed"
                return
            if isinstance(event, h11.Response):
                caller.status = event.status_code
                names = {name.lower() for name, _ in event.headers}
                caller.framed = b"content-length" in names or b"transfer-encoding" in names
                if caller.stall_s:
                    transport.pause_reading()
                    if caller.stall_s != FOREVER:
                        self.loop.call_later(caller.stall_s, transport.resume_reading)
            elif isinstance(event, h11.Data):
                caller.body_read += bytes(event.data)
                chunks += 1
                if caller.leave == "first" or (caller.leave == "mid" and chunks > 1):
                    self._leave(caller, transport)
                    return
            elif isinstance(event, h11.EndOfMessage):
                caller.outcome = "answered"
                return

    def _leave(self, caller: HttpCaller, transport: asyncio.Transport) -> None:
        """The client goes away: its connection is dropped at once."""
        if caller.outcome is None:
            caller.outcome = "left"
            self.left(caller.index)
            transport.abort()

    # ------------------------------------------------------------- the invariants

    def check_http(self) -> None:
        for caller in self.http_callers:
            if caller.stall_s == FOREVER and caller.outcome in (None, "hung"):
                continue  # it never reads: the proxy's side of it is checked below
            check(caller.outcome is not None and caller.outcome != "hung",
                  "every request ends",
                  f"HTTP client {caller.index} ({caller.method}, body {caller.body}) got no "
                  f"end of its response in {CLIENT_PATIENCE_S} s (status {caller.status})")
            if caller.trickle_s and caller.body > 100 and caller.status == 408:
                bound = 2 * self.options.client_timeout_s + 2 * caller.trickle_s + 1.0
                check(caller.waited is not None and caller.waited <= bound,
                      "a body that trickles is refused in time",
                      f"HTTP client {caller.index} trickled its body a byte every "
                      f"{caller.trickle_s:.3f} s and got 408 only after {caller.waited} s")
            check(not (caller.outcome or "").startswith("misframed"),
                  "every response is well framed",
                  f"HTTP client {caller.index}: {caller.outcome}")
            check(not (caller.outcome or "").startswith("closed before"),
                  "every request that stays gets a response",
                  f"HTTP client {caller.index} ({caller.method}, body {caller.body}): "
                  f"{caller.outcome}")
            if caller.outcome == "answered" and caller.status == 500 and not self.injected \
                    and caller.app_kind != "raise":
                check(False, "a request fails only for a reason",
                      f"HTTP client {caller.index} got {caller.status} with no fault "
                      f"injected: {caller.body_read[:200]!r}")
            if caller.outcome == "answered":
                check(caller.framed, "every response is well framed",
                      f"HTTP client {caller.index}'s response ({caller.status}) says neither "
                      "its length nor its encoding: the client reads until the connection "
                      "closes")
            wrong_length = caller.app_kind == "one" and caller.content_length in ("short",
                                                                                  "long")
            if caller.outcome == "answered" and caller.status == 200 and wrong_length:
                check(False, "a response whose length is wrong never reaches the client",
                      f"HTTP client {caller.index} got 200 and {caller.body_read!r} from an "
                      f"app whose Content-Length was {caller.content_length}")
            if caller.outcome == "answered" and caller.status == 200 and \
                    caller.app_kind == "one":
                check(caller.body_read == app_body(caller.index),
                      "a response carries what the backend returned",
                      f"HTTP client {caller.index} read {caller.body_read[:80]!r}")
            if caller.outcome == "answered" and caller.status == 200 and \
                    not caller.method.endswith("stream") and not caller.app_kind:
                check(json.loads(caller.body_read) == caller.index,
                      "a response carries what the backend returned",
                      f"HTTP client {caller.index} read {caller.body_read[:80]!r}")
        check(self.budget.held == 0, "an ended request holds no payload",
              f"the proxy still counts {self.budget.held} bytes of request bodies held")


async def _clients_and_faults(world: ProxyWorld) -> None:
    """Seeded HTTP clients and faults; then, once all is quiet, the invariants."""
    world.http_callers = [world.draw_http_caller(i) for i in range(world.settings.callers)]
    tasks = [asyncio.ensure_future(world.http_call(c)) for c in world.http_callers]
    tasks += [asyncio.ensure_future(world.inject()) for _ in range(world.settings.faults)]
    await asyncio.gather(*tasks)
    await asyncio.sleep(PROXY_QUIET_S)
    world.check_http()
    world.check_user_code()
    world.check_left_work()
    world.check_places()


@scenario("proxy")
def proxy(seed: int) -> None:
    """HTTP clients through the real proxy to real replicas, under seeded faults."""
    logging.getLogger("servekit").setLevel(logging.CRITICAL)
    logging.getLogger("uvicorn").setLevel(logging.CRITICAL)
    run(lambda loop: live(loop, ProxyWorld, _clients_and_faults), seed)

