"""The HTTP proxy process: an ASGI app on uvicorn (or granian, ``granian_server``) that
forwards requests to replicas."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import logging
import pickle
import socket
import time
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import uvicorn

from servekit._private import constants, metrics
from servekit._private.context import MODEL_ID_HEADER, new_request_id
from servekit._private.http_wire import (
    HTTPResponseWire,
    error_response,
    json_response,
    loggable,
    request_fields,
    response_from_wire,
    text_response,
)
from servekit._private.proxy.asgi_proxy import (
    ShadowCopies,
    WebSocketSession,
    app_scope,
    deny_websocket,
    forward_body,
)
from servekit._private.proxy.http_protocol import (
    HELD_BODY,
    ON_DISCONNECT,
    BodyBudget,
    ConnectionRoom,
    ProxyHttpProtocol,
)
from servekit._private.routing.router import Router
from servekit._private.specs import ProxySettings, ProxySpec, WorkerSpec
from servekit._private.wire.transport import ReplyStream, RpcServer, dumps, encode_call
from servekit.exceptions import (
    BackendOverloadedError,
    BackendUnavailableError,
    RequestTimeoutError,
)

logger = logging.getLogger("servekit.proxy")
# One line per request: method, path, status, latency, endpoint, backend, replica, id.
access_log = logging.getLogger("servekit.access")



class Route(NamedTuple):
    """What a route leads to: its endpoint, the methods it allows, and whether it is the
    prefix of an ASGI app (which gets every path under it, and answers every method)."""

    route: str
    endpoint: str
    methods: List[str]
    prefix: bool


RouteTable = Dict[str, Route]
_SYSTEM_PATHS = ("/-/routes", "/-/healthz", "/-/ready", "/-/shadows", "/-/metrics")
# Endpoints a /-/ready answer names at most.
_NOT_READY_SHOWN = 10
# Seconds a client shed for overload is told to wait before it retries.
_RETRY_AFTER_S = b"1"


class HTTPProxy:
    """Routes by path to an endpoint, checks the method, forwards over the data plane.

    A route is an exact path, or, for an endpoint whose backend is an ASGI app, a prefix:
    the longest one that holds the path wins, and the app gets the request passed through
    as it comes (``asgi_proxy``), WebSockets included. A body over ``max_body_bytes`` gets
    413 without being read whole. A request that outlives ``request_timeout_s``, or whose
    client disconnects, is cancelled. ``/-/healthz`` is liveness: 200, or 503 while the
    proxy drains. ``/-/ready`` is readiness: 200 when every routed endpoint can serve, else
    503 naming what cannot (learnt by long poll like the routes: it asks nobody).
    """

    def __init__(self, router: Router, max_body_bytes: int = 100 * 1024 * 1024,
                 request_timeout_s: Optional[float] = None) -> None:
        self.router = router
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.access_log = AccessLog()
        # (route, method, status) -> its metric series, looked up once.
        self._series: Dict[Tuple[str, str, str], Tuple[Any, Any, Any]] = {}
        self._scrape: Optional[asyncio.Future] = None  # the last gathering of /-/metrics
        self._scraped_at = 0.0
        self.routes: RouteTable = {}
        self.prefixes: RouteTable = {}  # the routes of ASGI apps, by prefix
        self.draining = False
        self._routes_changed = asyncio.Event()
        self._removed_at: Dict[str, float] = {}
        router.on_update.append(self._update_routes)
        self._update_routes(router)

    def _update_routes(self, router: Router) -> None:
        old = self.routes
        self.routes = {info.route: Route(info.route, name, info.methods, info.asgi)
                       for name, info in router.endpoints.items() if info.route is not None}
        self.prefixes = {path: route for path, route in self.routes.items() if route.prefix}
        now = time.monotonic()
        for route in old.keys() - self.routes.keys():
            self._removed_at[route] = now
        self._removed_at = {route: at for route, at in self._removed_at.items()
                            if now - at < constants.ROUTE_GRACE_S and route not in self.routes}
        self._routes_changed.set()
        self._routes_changed = asyncio.Event()

    def find(self, path: str) -> Optional[Route]:
        """The route of ``path``: its exact route, else the longest ASGI prefix that holds
        it (whole segments: "/api" holds "/api/x", not "/apix")."""
        match = self.routes.get(path)
        if match is not None or not self.prefixes or path.startswith("/-/"):
            return match  # (servekit's own paths are never an app's)
        prefix = path
        while prefix:
            prefix = prefix[:prefix.rfind("/")]
            match = self.prefixes.get(prefix or "/")
            if match is not None:
                return match
        return None

    async def _match(self, path: str) -> Optional[Route]:
        """The route of ``path``. A route removed moments ago (an endpoint being
        re-created) gets a short grace: the request waits for it to come back."""
        match = self.find(path)
        removed_at = self._removed_at.get(path)
        while match is None and removed_at is not None:
            remaining = removed_at + constants.ROUTE_GRACE_S - time.monotonic()
            if remaining <= 0:
                break
            try:
                # (not wait_for: on 3.11 it drops a cancellation that lands as the routes
                # change, and a request whose client left would be served all the same)
                async with asyncio.timeout(remaining):
                    await self._routes_changed.wait()
            except TimeoutError:
                break
            match = self.find(path)
        return match

    def route_table(self) -> Dict[str, list]:
        """Route -> [endpoint, methods], headless endpoints under their name (an ASGI
        app's route is a prefix)."""
        table: Dict[str, list] = {}
        for name, info in self.router.endpoints.items():
            table[info.route if info.route is not None else name] = [name, list(info.methods)]
        return table

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        trace: Dict[str, str] = {}
        if kind == "websocket":
            status = await self._serve_websocket(scope, receive, send, trace)
        else:
            status = await self._serve(scope, receive, send, request_id, trace)
        self._account(scope, status, started, trace, request_id)

    def _account(self, scope: Dict[str, Any], status: str, started: float,
                 trace: Dict[str, str], request_id: str) -> None:
        """Count an answered request in the metrics and write its access-log line."""
        took_ms = (time.perf_counter() - started) * 1e3
        route, method = trace.get("route", "-"), scope.get("method", "WEBSOCKET")
        key = (route, method, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (
                metrics.HTTP_REQUESTS.labels(*key), metrics.HTTP_LATENCY.labels(*key),
                # three digits, or "-" (the client left): both compare as wanted
                metrics.HTTP_ERRORS.labels(*key) if status >= "400" else None)
        requests, latency, errors = series
        requests.inc()
        latency.observe(took_ms)
        if errors is not None:
            errors.inc()
        if self.access_log.enabled:
            self.access_log.write(
                f"{method} {loggable(scope['path'])} {status} {took_ms:.1f}ms "
                f"endpoint={trace.get('endpoint', '-')} backend={trace.get('backend', '-')} "
                f"replica={trace.get('replica', '-')} request_id={request_id}")

    async def _serve(self, scope: Dict[str, Any], receive: Any, send: Any, request_id: str,
                     trace: Dict[str, str]) -> str:
        """Answer one request; the status sent ("-": none, the client left)."""
        watch = _RequestWatch(self.request_timeout_s)
        id_header = (b"x-request-id", request_id.encode("latin-1"))
        try:
            response = await self._respond(scope, receive, watch, trace)
            if isinstance(response, ReplyStream):
                watch.responding()  # the timeout is for the response to start
                return str(await _send_stream(response, send, trace, id_header))
        except ClientDisconnected:
            return "-"  # nobody to answer; the truncated request was never sent on
        except asyncio.CancelledError:
            if watch.ended is None:
                raise  # the server is stopping
            watch.uncancel()
            if watch.ended == _DISCONNECTED:
                return "-"  # the client left; its request was cancelled wherever it was
            response = self._timed_out(watch)
        finally:
            watch.close()
        if response.route is not None:  # the route template an ASGI app matched
            trace["route"] = response.route
        head = scope["method"] == "HEAD"
        try:
            length = content_length(response, head)
        except Misframed as exc:
            response = misframed(scope["path"], exc)
            length = content_length(response, head)
        headers = [header for header in response.headers if header[0] not in _FRAMING]
        if length is not None and response.status != 304:  # (uvicorn sends no such length)
            headers.append((b"content-length", length))
        await send({"type": "http.response.start", "status": response.status,
                    "headers": [*headers, id_header]})
        await send({"type": "http.response.body", "body": response.body})
        return str(response.status)

    def _timed_out(self, watch: "_RequestWatch") -> HTTPResponseWire:
        if watch.reading_body:
            response = text_response(408, f"The request body did not arrive within "
                                          f"{self.request_timeout_s}s "
                                          "(HTTPOptions.request_timeout_s).")
            response.headers.append((b"connection", b"close"))
            return response
        return self._timed_out_response()

    def _timed_out_response(self) -> HTTPResponseWire:
        return text_response(504, f"No response within {self.request_timeout_s}s "
                                  "(HTTPOptions.request_timeout_s); the request was "
                                  "cancelled.")

    async def _respond(self, scope: Dict[str, Any], receive: Any, watch: "_RequestWatch",
                       trace: Dict[str, str]) -> Union[HTTPResponseWire, ReplyStream]:
        path: str = scope["path"]
        if path.startswith("/-/"):
            if path in _SYSTEM_PATHS:
                trace["route"] = path
            if path == "/-/metrics":
                return await self._metrics()
            return self._system_path(path)
        match = self.routes.get(path) or await self._match(path)
        if match is None:
            return text_response(404, f"Path '{path}' not found. The route table is at "
                                      "/-/routes.")
        endpoint = match.endpoint
        trace["endpoint"], trace["route"] = endpoint, match.route
        method = scope["method"]
        if method not in match.methods and not match.prefix:
            return text_response(405, f"Method {method} is not allowed for {path}. Allowed "
                                      f"methods: {', '.join(match.methods)}.")
        method_name, shard_key, length, model_id = _routing_headers(scope["headers"])
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return self._too_large()
        if match.prefix:
            return await self._pass_through(scope, receive, watch, trace, match, shard_key,
                                            model_id)
        watch.reading_body = True
        try:  # (the body is copied once, into the payload, and dropped)
            payload = _http_payload(scope, method_name,
                                    await _read_body(receive, self.max_body_bytes))
        except BodyTooLarge:
            return self._too_large()
        watch.reading_body = False
        watch.until_disconnect(scope)
        try:
            reply = await self.router.send(endpoint, "http", shard_key, (), trace=trace,
                                           payload=payload, model_id=model_id)
        except Exception as exc:
            return _failure(exc, path)
        del payload  # (the request holds it while it may be sent)
        return await _answer(reply, path)

    # ------------------------------------------------------------- ASGI apps

    async def _pass_through(self, scope: Dict[str, Any], receive: Any,
                            watch: "_RequestWatch", trace: Dict[str, str], match: Route,
                            shard_key: Optional[str], model_id: Optional[str],
                            ) -> Union[HTTPResponseWire, ReplyStream]:
        """Pass a request through to an ASGI app: its first body message goes with it, the
        rest follows as it arrives (``forward_body``); within ``max_body_bytes``."""
        watch.reading_body = True
        message = await receive()
        watch.reading_body = False
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        body, more = message.get("body", b""), message.get("more_body", False)
        if len(body) > self.max_body_bytes:
            return self._too_large()
        watch.until_disconnect(scope)
        first = {"type": "http.request", "body": body, "more_body": more}
        payload = encode_call("asgi", (app_scope(scope, match.route), first))
        held = scope.get(HELD_BODY)
        taken = _nothing_taken if held is None else held.taken
        try:
            reply = await self.router.send(match.endpoint, "http", shard_key, (), trace=trace,
                                           payload=payload, shadows=not more,
                                           model_id=model_id)
        except Exception as exc:
            return _failure(exc, scope["path"])
        taken(len(body))
        if not more:
            return await _answer(reply, scope["path"])
        # Copies of a request whose body is still to come get the body as it comes.
        shadows = ShadowCopies(self.router.shadow(match.endpoint, "http", payload, model_id))
        pump = asyncio.ensure_future(forward_body(
            reply.request, receive, self.max_body_bytes - len(body), taken,  # type: ignore[attr-defined]
            shadows))
        watch.on_close(pump.cancel)  # once answered, the rest of the body is not needed
        try:
            await asyncio.wait((reply, pump), return_when=asyncio.FIRST_COMPLETED)
            if pump.done() and not pump.cancelled() and pump.exception() is None and \
                    pump.result() is False:
                _drop(reply)
                return self._too_large()
            return response_from_wire(await reply)
        except asyncio.CancelledError:
            _drop(reply)
            raise
        except Exception as exc:
            return _failure(exc, scope["path"])

    async def _serve_websocket(self, scope: Dict[str, Any], receive: Any, send: Any,
                               trace: Dict[str, str]) -> str:
        """Pass a WebSocket connection through to the ASGI app at its route; its status."""
        path: str = scope["path"]
        match = None if path.startswith("/-/") else await self._match(path)
        if match is None or not match.prefix:
            return await deny_websocket(scope, send, text_response(
                404, f"No WebSocket route for '{path}': WebSockets go to ASGI backends "
                     "(/-/routes)."))
        trace["endpoint"], trace["route"] = match.endpoint, match.route
        message = await receive()
        if message["type"] != "websocket.connect":
            return "-"
        _, shard_key, _, model_id = _routing_headers(scope["headers"])
        payload = encode_call("asgi", (app_scope(scope, match.route), message))
        try:
            # The timeout bounds the wait for the app's first message (its accept).
            reply = await self.router.send(match.endpoint, "websocket", shard_key, (),
                                           trace=trace, payload=payload, shadows=False,
                                           timeout_s=self.request_timeout_s,
                                           model_id=model_id)
        except Exception as exc:
            reply = asyncio.get_running_loop().create_future()
            reply.set_exception(exc)
            shadows = ShadowCopies()
        else:  # copies of the connection get the client's messages as they come
            shadows = ShadowCopies(self.router.shadow(match.endpoint, "websocket", payload,
                                                      model_id))
        return await WebSocketSession(scope, receive, send,
                                      functools.partial(_failure, path=path),
                                      shadows).run(reply)

    # ------------------------------------------------------------- the fast lane

    def serve_now(self, protocol: "ProxyHttpProtocol", cycle: Any) -> bool:
        """Serve a request whose body is complete without an ASGI task: route it, place it
        on a replica, and write the reply from the reply's callback in one write (an ASGI
        app's request too: its whole body goes with it). False (nothing done) for anything
        the ASGI path must handle: system paths, unknown routes (404, or the grace of a
        route being re-created), wrong methods."""
        scope = cycle.scope
        path: str = scope["path"]
        match = self.routes.get(path) or (self.find(path) if self.prefixes else None)
        if match is None or (scope["method"] not in match.methods and not match.prefix):
            return False
        started = time.perf_counter()
        request_id = _request_id(scope)
        method_name, shard_key, _, model_id = _routing_headers(scope["headers"])
        trace = {"endpoint": match.endpoint, "route": match.route}
        served = _Served(self, protocol, cycle, started, trace, request_id)
        if match.prefix:
            payload = encode_call("asgi", (app_scope(scope, match.route), {
                "type": "http.request", "body": _as_bytes(cycle.body), "more_body": False}))
        else:
            payload = _http_payload(scope, method_name, cycle.body)
        try:
            request = self.router.place(match.endpoint, "http", shard_key, payload, trace,
                                        model_id=model_id)
        except Exception as exc:
            served.respond(_failure(exc, path))
            return True
        assert request is not None  # the route table is made from the router's endpoints
        served.watch(request.reply, self.request_timeout_s)
        return True

    def _too_large(self) -> HTTPResponseWire:
        response = text_response(413, f"The request body is larger than the "
                                      f"{self.max_body_bytes} bytes this server accepts "
                                      "(HTTPOptions.max_body_bytes).")
        response.headers.append((b"connection", b"close"))  # the rest is never read
        return response

    def _system_path(self, path: str) -> HTTPResponseWire:
        if path == "/-/routes":
            return json_response(200, self.route_table())
        if path == "/-/healthz":
            if self.draining:
                return text_response(503, "draining: this proxy is shutting down")
            return text_response(200, "success")
        if path == "/-/ready":
            return self.readiness()
        if path == "/-/shadows":
            return json_response(200, self.shadow_table())
        return text_response(404, f"System path '{path}' not found. System paths: "
                                  f"{', '.join(_SYSTEM_PATHS)}.")

    def readiness(self) -> HTTPResponseWire:
        """200 when every routed endpoint can serve: each backend it sends traffic to has
        a running replica, or scales to zero and starts one on demand; else 503 naming the
        endpoints that cannot (and 503 while the proxy drains, or while no endpoint has a
        route: an instance whose deploy has not made one yet would answer only 404s)."""
        if self.draining:
            return text_response(503, "draining: this proxy is shutting down")
        if not self.routes:
            return text_response(503, "not ready: no endpoint has a route yet")
        waiting = []
        for route in sorted(self.routes.values()):
            info = self.router.endpoints.get(route.endpoint)
            backends = [] if info is None else [
                tag for tag, weight in sorted(info.traffic.items())
                if weight > 0 and self.router.cannot_serve(tag)]
            if backends:
                waiting.append(f"endpoint {route.endpoint} ({route.route}): no running "
                               f"replica of {', '.join(backends)}")
        if not waiting:
            return text_response(200, f"ready: {len(self.routes)} routed endpoint(s) can "
                                      "serve")
        more = len(waiting) - _NOT_READY_SHOWN
        lines = waiting[:_NOT_READY_SHOWN] + ([f"and {more} more"] if more > 0 else [])
        return text_response(503, "not ready:\n" + "\n".join(lines))

    async def _metrics(self) -> HTTPResponseWire:
        """Prometheus metrics of this proxy, its routers, the replicas and the controller,
        gathered at most once per ``METRICS_CACHE_S``: scrapes in between (concurrent ones
        too) share one gathering, so scraping cannot load the proxy or the replicas."""
        now = time.monotonic()
        if self._scrape is None or now - self._scraped_at >= constants.METRICS_CACHE_S:
            self._scrape = asyncio.ensure_future(self._gather_metrics())
            self._scraped_at = now
        return await asyncio.shield(self._scrape)

    async def _gather_metrics(self) -> HTTPResponseWire:
        replicas, controller = await asyncio.gather(self.router.replica_metrics(),
                                                    self.router.controller_metrics())
        texts = [metrics.exposition(), *replicas]
        if controller is not None:
            texts.append(controller)
        return HTTPResponseWire(200, [(b"content-type", metrics.CONTENT_TYPE.encode())],
                                metrics.merge(texts).encode())

    def shadow_table(self) -> Dict[str, Dict[str, Dict[str, int]]]:
        """Shadow copies of HTTP requests: {endpoint: {backend: {sent, dropped, failed}}}."""
        table: Dict[str, Dict[str, Dict[str, int]]] = {}
        for (endpoint, backend), counts in self.router.shadow_stats.counts.items():
            table.setdefault(endpoint, {})[backend] = dict(counts)
        return table


_MODEL_ID_HEADER = MODEL_ID_HEADER.encode()


def _routing_headers(headers: List[Tuple[bytes, bytes]]) -> Tuple[
        Optional[str], Optional[str], Optional[bytes], Optional[str]]:
    """(X-SERVE-CALL-METHOD, X-SERVE-SHARD-KEY, Content-Length, serve_multiplexed_model_id)
    of a request, each None when absent (an empty model id too)."""
    method_name = shard_key = model_id = None
    length = None
    for name, value in headers:
        if name == b"x-serve-call-method":
            method_name = value.decode("latin-1")
        elif name == b"x-serve-shard-key":
            shard_key = value.decode("latin-1")
        elif name == b"content-length":
            length = value
        elif name == _MODEL_ID_HEADER:
            model_id = value.decode("latin-1") or None
    return method_name, shard_key, length, model_id


async def _answer(reply: asyncio.Future, path: str) -> Union[HTTPResponseWire, ReplyStream]:
    """What ``reply`` settles as, or the response for its error; if the wait is cancelled,
    the reply is dropped (a stream it settled as in that same loop turn is stopped)."""
    try:
        return response_from_wire(await reply)
    except asyncio.CancelledError:
        _drop(reply)
        raise
    except Exception as exc:
        return _failure(exc, path)


def _failure(exc: Exception, path: str) -> HTTPResponseWire:
    """The response for a request that failed before its backend answered."""
    if isinstance(exc, BackendOverloadedError):
        # Shed at once, without a log line each: under overload there are many.
        response = error_response(exc, status=503)
        response.headers.append((b"retry-after", _RETRY_AFTER_S))
        return response
    logger.warning("Request to %s failed: %r", loggable(path), exc)
    if isinstance(exc, RequestTimeoutError):
        return error_response(exc, status=504)
    status = 503 if isinstance(exc, BackendUnavailableError) else 500
    return error_response(exc, status=status)


_STATUS_LINES = {status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()
                 for status in http.HTTPStatus}


# The headers a one-message response is framed by: the proxy writes its Content-Length.
_FRAMING = (b"content-length", b"transfer-encoding")


class Misframed(Exception):
    """A one-message response whose headers disagree with its body (what, in its text)."""


def content_length(response: HTTPResponseWire, head: bool) -> Optional[bytes]:
    """The Content-Length a one-message response is sent with (``head``: it answers a
    HEAD request): the backend's when it matches the body, else the body's; None for a
    response that has none (1xx, 204, 304 without a body). A Transfer-Encoding is ignored
    (the one body is not encoded in it).

    Raises:
        Misframed: the backend's Content-Length disagrees with the body, or a response
            that has no body carries one. Sent as it is, the client would wait for bytes
            that never come, or read the rest as the next response.
    """
    status, body = response.status, response.body
    length = None
    for name, value in response.headers:
        if name == b"content-length":
            length = value if length is None or value == length else b"?"  # (two differ)
    if length is None:
        if status >= 200 and status != 204 and status != 304:
            return b"%d" % len(body)
        if body:
            raise Misframed(f"a {status} response with a body of {len(body)} bytes")
        return None
    if head or status == 304:
        return length if length.isdigit() else None  # (the length of the body not sent)
    if not length.isdigit() or int(length) != len(body):
        raise Misframed(f"Content-Length {length!r} and a body of {len(body)} bytes")
    return length


def misframed(path: str, error: Misframed) -> HTTPResponseWire:
    """The 502 that replaces a misframed response (logged)."""
    logger.error("The backend's response to %s is malformed: %s. Answering 502.",
                 loggable(path), error)
    return text_response(502, f"The backend sent a malformed response ({error}).")


class _Served:
    """One request of the fast lane, from its placement to the last byte of its response:
    the reply's callback writes the response, a timeout or the client leaving cancels it,
    and a streamed reply is sent by a task (the only one the request gets)."""

    __slots__ = ("proxy", "protocol", "cycle", "started", "trace", "request_id", "timer",
                 "timed_out")

    def __init__(self, proxy: HTTPProxy, protocol: "ProxyHttpProtocol", cycle: Any,
                 started: float, trace: Dict[str, str], request_id: str) -> None:
        self.proxy = proxy
        self.protocol = protocol
        self.cycle = cycle
        self.started = started
        self.trace = trace
        self.request_id = request_id
        self.timer: Optional[asyncio.TimerHandle] = None
        self.timed_out = False

    def watch(self, reply: asyncio.Future, timeout: Optional[float]) -> None:
        """Wait for ``reply``: counted among the requests in progress (limit_concurrency,
        graceful shutdown), cancelled by the client leaving or the timeout."""
        self.protocol.tasks.add(reply)  # type: ignore[arg-type]  # (until it settles)
        self.cycle.scope[ON_DISCONNECT].append(reply.cancel)
        if timeout is not None:
            self.timer = asyncio.get_running_loop().call_later(timeout, self._time_out, reply)
        reply.add_done_callback(self._replied)

    def _time_out(self, reply: asyncio.Future) -> None:
        self.timed_out = True
        reply.cancel()

    def _replied(self, reply: asyncio.Future) -> None:
        self.protocol.tasks.discard(reply)  # (no longer in progress: answered now)
        if self.timer is not None:
            self.timer.cancel()
        if self.cycle.disconnected or self.timed_out:
            # The client left, or the deadline passed, in the turn the reply settled (a
            # settled reply cannot be cancelled): a stream is cancelled here instead.
            _drop(reply)
            if self.cycle.disconnected:
                self._done("-")
            else:
                self.respond(self.proxy._timed_out_response())
        elif reply.cancelled():
            self._done("-")  # (the server is stopping)
        elif reply.exception() is not None:
            self.respond(_failure(reply.exception(), self.cycle.scope["path"]))  # type: ignore[arg-type]
        elif isinstance(reply.result(), ReplyStream):
            stream = reply.result()
            # From now on the client leaving cancels the stream, even before the task that
            # sends it first runs.
            self.cycle.scope[ON_DISCONNECT].append(stream.cancel)
            task = asyncio.ensure_future(self._stream(stream))
            self.protocol.tasks.add(task)
            task.add_done_callback(self.protocol.tasks.discard)
        else:
            response = response_from_wire(reply.result())
            if response.route is not None:  # the route template an ASGI app matched
                self.trace["route"] = response.route
            self.respond(response)

    def respond(self, response: HTTPResponseWire) -> None:
        """Write ``response`` in one write and end the request's cycle as uvicorn would.

        The response is framed by its Content-Length, set from its body when the backend
        gave none (an ASGI app's one-message response may have none, or a Transfer-Encoding
        its one body is not encoded in); one that disagrees with its body is answered 502,
        never sent as it is (the client would wait for bytes that never come, or read the
        rest as the next response)."""
        cycle = self.cycle
        if cycle.disconnected:
            self._done("-")
            return
        status, body = response.status, response.body
        head = cycle.scope["method"] == "HEAD"
        try:
            length = content_length(response, head)
        except Misframed as exc:
            self.respond(misframed(cycle.scope["path"], exc))
            return
        parts = [_STATUS_LINES.get(status) or f"HTTP/1.1 {status} \r\n".encode()]
        for name, value in response.headers:
            if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
                logger.error("Backend response header %r has a line break; answering 500.",
                             name)
                self.respond(text_response(500, "Internal Server Error"))
                return
            if name in _FRAMING:
                continue  # (one body in one write: framed by its length, written below)
            if name == b"connection" and b"close" in value.lower():
                cycle.keep_alive = False
            parts += (name, b": ", value, b"\r\n")
        if length is not None:
            parts += (b"content-length: ", length, b"\r\n")
        parts += (b"x-request-id: ", self.request_id.encode("latin-1"), b"\r\n")
        if not cycle.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if not head:
            parts.append(body)
        cycle.response_started = cycle.response_complete = True
        cycle.transport.write(b"".join(parts))
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()
        self._done(str(response.status))

    async def _stream(self, stream: ReplyStream) -> None:
        if self.cycle.disconnected:  # (it left before this task ran: the stream was cancelled)
            self._done("-")
            return
        try:
            status = str(await _send_stream(stream, self.cycle.send, self.trace, (
                b"x-request-id", self.request_id.encode("latin-1"))))
        except Exception:
            logger.exception("Streaming the response to %s failed",
                             loggable(self.cycle.scope["path"]))
            self.cycle.transport.close()
            status = "-"
        self._done("-" if self.cycle.disconnected else status)

    def _done(self, status: str) -> None:
        self.proxy._account(self.cycle.scope, status, self.started, self.trace,
                            self.request_id)


class AccessLog:
    """The ``servekit.access`` log, one line per request, written in batches: a request
    only formats its line; the lines of the last 0.2 s go out in one write."""

    def __init__(self) -> None:
        self.enabled = access_log.isEnabledFor(logging.INFO)
        self._lines: List[str] = []
        self._second = -1
        self._stamp = ""

    def write(self, line: str) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        if not self._lines:
            asyncio.get_running_loop().call_later(_ACCESS_LOG_FLUSH_S, self.flush)
        self._lines.append(f"{self._stamp},{int((now - second) * 1000):03d} {line}")

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        if lines:
            access_log.info("%s", "\n".join(lines))


_ACCESS_LOG_FLUSH_S = 0.2
_TIMED_OUT, _DISCONNECTED = "timed out", "disconnected"


class _RequestWatch:
    """Cancels the task serving a request when its deadline passes or, once its body is
    read, when its client disconnects; ``ended`` says which (None: neither)."""

    def __init__(self, timeout: Optional[float]) -> None:
        self._task = asyncio.current_task()
        self.ended: Optional[str] = None
        self.reading_body = False
        self._on_close: Optional[Any] = None  # called once answered (a body still sent on)
        loop = asyncio.get_running_loop()
        self._deadline = None if timeout is None else \
            loop.call_later(timeout, self._end, _TIMED_OUT)

    def until_disconnect(self, scope: Dict[str, Any]) -> None:
        """From now on, the client leaving cancels the request (``ProxyHttpProtocol`` calls
        what is in the scope's ``ON_DISCONNECT`` list)."""
        callbacks = scope.get(ON_DISCONNECT)
        if callbacks is not None:  # (None: a middleware handed on a scope of its own)
            callbacks.append(self._disconnected)

    def _disconnected(self) -> None:
        self._end(_DISCONNECTED)

    def _end(self, why: str) -> None:
        if self.ended is None and self._task is not None:
            self.ended = why
            self._task.cancel()

    def responding(self) -> None:
        """The response has started: no deadline any more (a client leaving still counts)."""
        if self._deadline is not None:
            self._deadline.cancel()

    def on_close(self, callback: Any) -> None:
        """Call ``callback`` once the request is answered (``close``)."""
        self._on_close = callback

    def uncancel(self) -> None:
        """The cancellation was ours and is handled: the task goes on (to answer)."""
        uncancel = getattr(self._task, "uncancel", None)  # Python 3.11+
        if uncancel is not None:
            uncancel()

    def close(self) -> None:
        """The request is answered: nothing cancels its task any more."""
        self._task = None
        if self._deadline is not None:
            self._deadline.cancel()
        if self._on_close is not None:
            self._on_close()


async def _send_stream(stream: ReplyStream, send: Any, trace: Dict[str, str],
                       *extra_headers: Any) -> int:
    """Send a streamed response chunk by chunk, as the replica produces them; its status.
    ``send`` waits while the client reads slower than the chunks come, and so the
    replica's generator waits too; if anything stops it, the replica is told to stop. The
    route template an ASGI app matched (its head's third item) goes in ``trace``."""
    try:
        head = await stream.__anext__()
        status, headers = head[0], head[1]
        if len(head) > 2 and head[2] is not None:
            trace["route"] = head[2]
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, *extra_headers]})
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return status
    except BaseException:
        stream.cancel()
        raise


def _drop(reply: asyncio.Future) -> None:
    """Nobody will take ``reply`` any more (a deadline, the client leaving, the server
    stopping): cancel its request wherever it is. A reply that already settled as a stream
    (its first chunk came in the same loop turn) cannot be cancelled: its stream is, so
    the replica stops and the request's place comes back."""
    if reply.cancel() or reply.cancelled() or reply.exception() is not None:
        return
    result = reply.result()
    if isinstance(result, ReplyStream):
        result.cancel()


# Client-given request ids longer than this are replaced by one of ours.
_MAX_REQUEST_ID = 128


def _nothing_taken(size: int) -> None:
    pass


def _request_id(scope: Dict[str, Any]) -> str:
    """The client's X-Request-ID, else a new one, added to the request's headers (so the
    replica, and the backend in ``request.headers``, see it)."""
    headers = scope["headers"]
    for name, value in headers:
        if name == b"x-request-id" and 0 < len(value) <= _MAX_REQUEST_ID:
            return value.decode("latin-1")
    request_id = new_request_id()
    scope["headers"] = [*(h for h in headers if h[0] != b"x-request-id"),
                        (b"x-request-id", request_id.encode())]
    return request_id


class ClientDisconnected(Exception):
    """The HTTP client went away before its request body was complete."""


class BodyTooLarge(Exception):
    """The request body grew past the limit while it was read."""


async def _read_body(receive: Any, limit: int) -> Union[bytes, bytearray]:
    """The whole request body, up to ``limit`` bytes (else ``BodyTooLarge``, with the
    rest left unread); ``ClientDisconnected`` if the client left before its end. A body
    of several messages grows in one buffer (no list of chunks joined into a copy)."""
    body: Union[bytes, bytearray] = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        if len(body) + len(chunk) > limit:
            raise BodyTooLarge()
        more = message.get("more_body", False)
        if not body:
            body = chunk if not more else bytearray(chunk)
        else:
            body += chunk  # type: ignore[operator]  # (a bytearray, grown in place)
        if not more:
            return body


def _as_bytes(body: Union[bytes, bytearray]) -> Any:
    """``body`` as what pickles as bytes, without a copy of it (a bytearray would be
    unpickled as one)."""
    if isinstance(body, bytearray):
        return pickle.PickleBuffer(memoryview(body).toreadonly()) if body else b""
    return body


def _http_payload(scope: Dict[str, Any], method_name: Optional[str],
                  body: Union[bytes, bytearray]) -> bytes:
    """The payload of an HTTP request to a backend (``encode_call("http", ...)``): the body
    is copied once, into it. Plain data, pickled as is."""
    return dumps(("http", (method_name, request_fields(scope, _as_bytes(body)))))



def build_app(proxy: HTTPProxy, middlewares: list) -> Any:
    """Wrap the proxy in the user's starlette middlewares, the first one outermost."""
    app: Any = proxy
    for middleware in reversed(middlewares):
        cls, args, kwargs = middleware
        app = cls(app, *args, **kwargs)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server minus its signal handlers: the worker process owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def websocket_protocol(*args: Any, **kwargs: Any) -> Any:
    """The protocol of a connection that becomes a WebSocket: a ``ProxyWebSocketProtocol``,
    its module and the websockets library imported at the first one (a proxy that serves
    no WebSocket never holds them)."""
    from servekit._private.proxy.websocket_protocol import ProxyWebSocketProtocol

    return ProxyWebSocketProtocol(*args, **kwargs)


def server_config(proxy: HTTPProxy, options: ProxySettings) -> Tuple[uvicorn.Config, BodyBudget]:
    """uvicorn's config for serving ``proxy`` as ``options`` say, and the budget of request
    bodies its connections share."""
    budget = BodyBudget(options.max_held_body_bytes)
    protocol = functools.partial(ProxyHttpProtocol,
                                 max_header_bytes=options.max_header_bytes,
                                 max_header_count=options.max_header_count,
                                 client_timeout_s=options.client_timeout_s,
                                 body_budget=budget, room=ConnectionRoom(),
                                 fast_lane=None if options.middlewares else proxy)
    config = uvicorn.Config(build_app(proxy, options.middlewares), loop="none",
                            http=protocol,  # type: ignore[arg-type]
                            ws=functools.partial(  # type: ignore[arg-type]
                                websocket_protocol, body_budget=budget),
                            proxy_headers=False,  # backends see X-Forwarded-* as sent
                            lifespan="off", log_level="warning", access_log=False,
                            log_config=None,  # its lines go where the proxy's go
                            server_header=False, date_header=False,
                            limit_concurrency=options.limit_concurrency,
                            # WebSockets: a message is bounded as a body is
                            ws_max_size=options.max_body_bytes,
                            # what is still in flight after the drain is cancelled then
                            timeout_graceful_shutdown=_GRACE_AFTER_DRAIN_S,  # type: ignore[arg-type]
                            # a call_later delay: a float works
                            timeout_keep_alive=options.keep_alive_timeout_s)  # type: ignore[arg-type]
    return config, budget


class UvicornFrontEnd:
    """The proxy on uvicorn (httptools, uvloop) with servekit's bounded protocol."""

    def __init__(self, proxy: HTTPProxy, options: ProxySettings) -> None:
        config, _ = server_config(proxy, options)
        self.server = _Server(config)

    @property
    def started(self) -> bool:
        return self.server.started

    def in_progress(self) -> int:
        """Requests (and WebSockets) in progress."""
        return len(self.server.server_state.tasks)

    async def serve(self, sock: socket.socket) -> None:
        await self.server.serve(sockets=[sock])

    def stop(self) -> None:
        self.server.should_exit = True


def front_end(proxy: HTTPProxy, options: ProxySettings) -> Any:
    """The HTTP server ``proxy`` runs on, as ``HTTPOptions.server`` says (the one place
    that chooses): a ``UvicornFrontEnd`` or a ``GranianFrontEnd``."""
    if options.server == "granian":
        from servekit._private.proxy.granian_server import GranianFrontEnd

        return GranianFrontEnd(proxy, build_app(proxy, options.middlewares), options,
                               BodyBudget(options.max_held_body_bytes))
    return UvicornFrontEnd(proxy, options)


async def run_proxy(worker: WorkerSpec, sock: socket.socket, stop: asyncio.Event) -> None:
    spec: ProxySpec = worker.load_payload()
    assert worker.controller_address is not None
    options = spec.http_options
    router = await Router.start(worker.controller_address, role="proxy")
    proxy = HTTPProxy(router, options.max_body_bytes, options.request_timeout_s)
    http_socket = socket.socket(fileno=worker.extra_fds["http"])
    server = front_end(proxy, options)
    # Read when the metrics are gathered: nothing per request.
    metrics.ONGOING_HTTP.labels(router.process).set_function(server.in_progress)
    serving = asyncio.ensure_future(server.serve(http_socket))

    async def ready() -> bool:
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
        return True

    rpc = RpcServer({"ready": ready, "ping": ready, "routes": _async(proxy.route_table),
                     "metrics": _async(metrics.exposition)})
    await rpc.start(sock)
    await stop.wait()
    await _drain(proxy, server)
    server.stop()
    await serving
    proxy.access_log.flush()
    router.close()


# Seconds between two looks at what a draining proxy still serves.
_DRAIN_POLL_S = 0.05


# Seconds a stopping proxy waits, after the drain, for connections to finish before it
# cancels what they still run (the process has PROCESS_STOP_TIMEOUT_S in all).
_GRACE_AFTER_DRAIN_S = constants.PROCESS_STOP_TIMEOUT_S * 0.2


async def _drain(proxy: HTTPProxy, server: Any) -> None:
    """Before the proxy stops accepting connections: answer 503 on /-/healthz (so load
    balancers send new clients elsewhere) while requests in flight finish, for most of
    the time the process has to stop."""
    proxy.draining = True
    deadline = time.monotonic() + constants.PROCESS_STOP_TIMEOUT_S * 0.6
    # (neither server has an event to wait on for its requests in progress)
    while server.in_progress() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(_DRAIN_POLL_S)


def _async(function: Any) -> Any:
    async def call() -> Any:
        return function()
    return call

