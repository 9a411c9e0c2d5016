"""The HTTP proxy against real processes: routing, errors, request and response conversion."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from typing import List, Tuple

import httpx
import numpy as np
import pydantic
import pytest
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    StreamingResponse,
)

import servekit as serve
from conftest import BOTH_RUNTIMES, free_port, wait_for

pytestmark = pytest.mark.integration
RUNTIMES = BOTH_RUNTIMES

TIMEOUT = 10.0


# --------------------------------------------------------------------------- backends


def hello(request: Request) -> str:
    return "hello"


def echo(request: Request) -> dict:
    """Report what arrived, so a test can check it survived the proxy."""
    body = asyncio.run(request.body())
    return {
        "starlette_request": isinstance(request, Request),
        "sync_body": request.data.decode("utf-8"),  # (what sync code reads)
        "method": request.method,
        "path": request.url.path,
        "query": dict(request.query_params),
        "query_list": request.query_params.getlist("tag"),
        "header": request.headers.get("x-custom-header"),
        "body": body.decode("utf-8"),
    }


async def async_json_echo(request: Request) -> dict:
    payload = await request.json()
    return {"received": payload, "doubled": [2 * x for x in payload["numbers"]]}


def fails_on_demand(request: Request) -> str:
    if request.query_params.get("fail") == "1":
        raise ValueError("the kaboom happened here")
    return "still serving"


class Point(pydantic.BaseModel):
    x: int
    y: float
    label: str


def _chunks():
    yield "first,"
    yield b"second,"
    yield "third"


def respond_with(request: Request):
    """Return a different kind of value depending on ``?kind=``."""
    kind = request.query_params["kind"]
    if kind == "json_response":
        return JSONResponse({"ok": True}, status_code=201, headers={"x-made-by": "backend"})
    if kind == "html":
        return HTMLResponse("<h1>Hi</h1>")
    if kind == "plain_response":
        return PlainTextResponse("plain words", status_code=202)
    if kind == "redirect":
        return RedirectResponse("/elsewhere", status_code=307)
    if kind == "streaming":
        return StreamingResponse(_chunks(), media_type="text/csv")
    if kind == "str":
        return "a string"
    if kind == "bytes":
        return b"\x00\x01binary\xff"
    if kind == "none":
        return None
    if kind == "dict":
        return {"a": [1, 2, {"b": None}], "c": "ü"}
    if kind == "numpy":
        return np.arange(6, dtype=np.int64).reshape(2, 3)
    if kind == "numpy_scalar":
        return {"mean": np.float64(2.5), "count": np.int32(4)}
    if kind == "pydantic":
        return Point(x=1, y=2.5, label="p")
    raise AssertionError(f"unknown kind {kind}")


class Greeter:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    def __call__(self, request: Request) -> str:
        return f"{self.greeting} from __call__"

    def shout(self, request: Request) -> str:
        return f"{self.greeting.upper()} from shout"

    async def whisper(self, request: Request) -> str:
        return f"{self.greeting.lower()} from whisper"


def whoami(request: Request) -> str:
    return serve.get_current_replica_tag()


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def http(serve_instance):
    client, url = serve_instance
    with httpx.Client(base_url=url, timeout=TIMEOUT) as session:
        yield client, session


# --------------------------------------------------------------------------- system paths


def test_healthz(http):
    _, session = http
    response = session.get("/-/healthz")
    assert response.status_code == 200
    assert response.text == "success"


def test_routes_lists_route_table_with_headless_endpoints(http):
    client, session = http
    client.create_backend("hello", hello)
    client.create_endpoint("greet", backend="hello", route="/greet", methods=["GET", "post"])
    client.create_endpoint("headless", backend="hello")

    def table():
        response = session.get("/-/routes")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        return response.json()

    expected = {"/greet": ["greet", ["GET", "POST"]], "headless": ["headless", ["GET"]]}
    wait_for(lambda: table() == expected, TIMEOUT, f"/-/routes to show {expected}")
    assert session.get("/greet").text == "hello"
    assert session.post("/greet").text == "hello"


def test_unknown_system_path_is_404(http):
    _, session = http
    response = session.get("/-/nothing-here")
    assert response.status_code == 404
    assert "/-/routes" in response.text


# --------------------------------------------------------------------------- routing


def test_route_served_as_soon_as_create_endpoint_returns(http):
    client, session = http
    client.create_backend("hello", hello)
    client.create_endpoint("hello", backend="hello", route="/hello")
    response = session.get("/hello")
    assert response.status_code == 200
    assert response.text == "hello"
    assert response.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("path", ["/hello/", "/hello/more", "/hell", "/HELLO", "/"])
def test_route_match_is_exact(http, path):
    client, session = http
    client.create_backend("hello", hello)
    client.create_endpoint("hello", backend="hello", route="/hello")
    response = session.get(path)
    assert response.status_code == 404
    assert path in response.text
    assert "/-/routes" in response.text


def test_wrong_method_is_405_naming_allowed_methods(http):
    client, session = http
    client.create_backend("hello", hello)
    client.create_endpoint("post-only", backend="hello", route="/post-only", methods=["POST"])
    assert session.post("/post-only").text == "hello"
    response = session.get("/post-only")
    assert response.status_code == 405
    assert "GET" in response.text
    assert "POST" in response.text
    assert session.put("/post-only").status_code == 405


def test_several_methods_allowed(http):
    client, session = http
    client.create_backend("echo", echo)
    client.create_endpoint("echo", backend="echo", route="/echo", methods=["GET", "PUT", "DELETE"])
    for method in ("GET", "PUT", "DELETE"):
        response = session.request(method, "/echo")
        assert response.status_code == 200, response.text
        assert response.json()["method"] == method
    assert session.post("/echo").status_code == 405


def test_deleted_endpoint_route_becomes_404(http):
    client, session = http
    client.create_backend("hello", hello)
    client.create_endpoint("hello", backend="hello", route="/hello")
    assert session.get("/hello").status_code == 200
    client.delete_endpoint("hello")
    wait_for(lambda: session.get("/hello").status_code == 404, TIMEOUT,
             "the deleted route to answer 404")
    assert "hello" not in json.dumps(session.get("/-/routes").json())


def test_two_routes_reach_their_own_backends(http):
    client, session = http
    client.create_backend("hello", hello)
    client.create_backend("greeter", Greeter, "Howdy")
    client.create_endpoint("a", backend="hello", route="/a")
    client.create_endpoint("b", backend="greeter", route="/b")
    assert session.get("/a").text == "hello"
    assert session.get("/b").text == "Howdy from __call__"


# --------------------------------------------------------------------------- requests


def test_body_query_and_headers_reach_backend_as_starlette_request(http):
    client, session = http
    client.create_backend("echo", echo)
    client.create_endpoint("echo", backend="echo", route="/echo", methods=["POST"])
    response = session.post(
        "/echo?name=Ada&tag=x&tag=y",
        content="body text ✓".encode(),
        headers={"X-Custom-Header": "custom value"},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "starlette_request": True,
        "sync_body": "body text ✓",
        "method": "POST",
        "path": "/echo",
        "query": {"name": "Ada", "tag": "y"},
        "query_list": ["x", "y"],
        "header": "custom value",
        "body": "body text ✓",
    }


def test_large_body_arrives_whole(http):
    client, session = http
    client.create_backend("echo", echo)
    client.create_endpoint("echo", backend="echo", route="/echo", methods=["POST"])
    payload = "0123456789abcdef" * 200_000  # 3.2 MB, more than one ASGI chunk
    response = session.post("/echo", content=payload.encode())
    assert response.status_code == 200
    assert response.json()["body"] == payload


def test_async_backend_reads_json_body(http):
    client, session = http
    client.create_backend("json", async_json_echo)
    client.create_endpoint("json", backend="json", route="/json", methods=["POST"])
    response = session.post("/json", json={"numbers": [1, 2, 3], "name": "n"})
    assert response.status_code == 200
    assert response.json() == {"received": {"numbers": [1, 2, 3], "name": "n"},
                               "doubled": [2, 4, 6]}


# --------------------------------------------------------------------------- errors


def test_backend_exception_is_500_naming_error_and_replica_keeps_serving(http):
    client, session = http
    client.create_backend("flaky", fails_on_demand)
    client.create_endpoint("flaky", backend="flaky", route="/flaky")
    response = session.get("/flaky", params={"fail": "1"})
    assert response.status_code == 500
    assert "ValueError" in response.text
    assert "the kaboom happened here" in response.text
    for _ in range(3):
        ok = session.get("/flaky")
        assert ok.status_code == 200
        assert ok.text == "still serving"
    assert session.get("/flaky", params={"fail": "1"}).status_code == 500


# --------------------------------------------------------------------------- responses


@pytest.fixture
def responder(http):
    client, session = http
    client.create_backend("respond", respond_with)
    client.create_endpoint("respond", backend="respond", route="/respond")
    return session


def test_json_response_passes_through_with_status_and_headers(responder):
    response = responder.get("/respond", params={"kind": "json_response"})
    assert response.status_code == 201
    assert response.headers["x-made-by"] == "backend"
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"ok": True}


def test_html_response(responder):
    response = responder.get("/respond", params={"kind": "html"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.text == "<h1>Hi</h1>"


def test_plain_text_response_keeps_status(responder):
    response = responder.get("/respond", params={"kind": "plain_response"})
    assert response.status_code == 202
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "plain words"


def test_redirect_response(responder):
    response = responder.get("/respond", params={"kind": "redirect"}, follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/elsewhere"


def test_streaming_response_is_streamed_whole(responder):
    response = responder.get("/respond", params={"kind": "streaming"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert response.text == "first,second,third"
    assert response.headers["transfer-encoding"] == "chunked"  # sent as produced


def test_str_is_text_plain(responder):
    response = responder.get("/respond", params={"kind": "str"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "a string"


def test_bytes_are_returned_verbatim(responder):
    response = responder.get("/respond", params={"kind": "bytes"})
    assert response.status_code == 200
    assert response.content == b"\x00\x01binary\xff"


def test_none_is_empty_body(responder):
    response = responder.get("/respond", params={"kind": "none"})
    assert response.status_code == 200
    assert response.content == b""


def test_dict_is_json(responder):
    response = responder.get("/respond", params={"kind": "dict"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"a": [1, 2, {"b": None}], "c": "ü"}


def test_numpy_array_is_json(responder):
    response = responder.get("/respond", params={"kind": "numpy"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == [[0, 1, 2], [3, 4, 5]]


def test_numpy_scalars_are_json(responder):
    response = responder.get("/respond", params={"kind": "numpy_scalar"})
    assert response.status_code == 200
    assert response.json() == {"mean": 2.5, "count": 4}


def test_pydantic_model_is_json(responder):
    response = responder.get("/respond", params={"kind": "pydantic"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"x": 1, "y": 2.5, "label": "p"}


# --------------------------------------------------------------------------- class methods


def test_call_method_header_selects_method(http):
    client, session = http
    client.create_backend("greeter", Greeter, "Hello")
    client.create_endpoint("greeter", backend="greeter", route="/greeter")
    assert session.get("/greeter").text == "Hello from __call__"
    assert session.get("/greeter", headers={"X-SERVE-CALL-METHOD": "shout"}).text == \
        "HELLO from shout"
    assert session.get("/greeter", headers={"x-serve-call-method": "whisper"}).text == \
        "hello from whisper"


class EncoderModel(json.JSONEncoder):
    """Built on a library class, as a model built on torch.nn.Module."""

    def __call__(self, request: Request) -> str:
        return "model"


def test_methods_inherited_from_a_library_class_cannot_be_called_over_http(http):
    client, session = http
    client.create_backend("encoder", EncoderModel)
    client.create_endpoint("encoder", backend="encoder", route="/encoder")
    for inherited in ("encode", "iterencode", "default"):
        response = session.get("/encoder", headers={"X-SERVE-CALL-METHOD": inherited})
        assert response.status_code == 404, inherited
        assert "Methods it serves: ['__call__']" in response.text
    assert session.get("/encoder").text == "model"


def test_call_method_header_unknown_method_is_404_listing_methods(http):
    client, session = http
    client.create_backend("greeter", Greeter, "Hello")
    client.create_endpoint("greeter", backend="greeter", route="/greeter")
    response = session.get("/greeter", headers={"X-SERVE-CALL-METHOD": "sing"})
    assert response.status_code == 404
    assert "sing" in response.text
    assert "shout" in response.text
    assert "whisper" in response.text
    assert session.get("/greeter").text == "Hello from __call__"


# --------------------------------------------------------------------------- replicas


def test_concurrent_http_requests_spread_over_replicas(http):
    client, session = http
    client.create_backend("whoami", whoami, config={"num_replicas": 2})
    client.create_endpoint("whoami", backend="whoami", route="/whoami")

    async def burst() -> set:
        async with httpx.AsyncClient(base_url=str(session.base_url), timeout=TIMEOUT) as ac:
            responses = await asyncio.gather(*(ac.get("/whoami") for _ in range(20)))
        failures = [f"{r.status_code} {r.text}" for r in responses if r.status_code != 200]
        assert not failures, failures[:3]
        return {r.text for r in responses}

    seen: set = set()

    def both_seen() -> bool:
        seen.update(asyncio.run(burst()))
        return len(seen) == 2

    wait_for(both_seen, TIMEOUT, "HTTP requests to reach both replicas")
    assert all(tag.startswith("whoami#") for tag in seen)


# --------------------------------------------------------------------------- middlewares


def test_user_cors_middleware_wraps_the_app():
    port = free_port()
    client = serve.start(http_options={
        "port": port,
        "middlewares": [Middleware(CORSMiddleware, allow_origins=["*"],
                                   allow_methods=["GET", "POST"])],
    })
    try:
        client.create_backend("hello", hello)
        client.create_endpoint("hello", backend="hello", route="/hello")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as session:
            response = session.get("/hello", headers={"Origin": "https://example.com"})
            assert response.status_code == 200
            assert response.text == "hello"
            assert response.headers["access-control-allow-origin"] == "*"

            preflight = session.options("/hello", headers={
                "Origin": "https://example.com",
                "Access-Control-Request-Method": "POST",
            })
            assert preflight.status_code == 200
            assert preflight.headers["access-control-allow-origin"] == "*"
            assert "POST" in preflight.headers["access-control-allow-methods"]

            # The middleware also wraps servekit's own answers.
            missing = session.get("/missing", headers={"Origin": "https://example.com"})
            assert missing.status_code == 404
            assert missing.headers["access-control-allow-origin"] == "*"
    finally:
        client.shutdown()


# --------------------------------------------------------------------------- HTTP/1.1 on the wire


def _exchange(url: str, data: bytes, responses: int,
              head: bool = False) -> List[Tuple[bytes, bytes]]:
    """Send raw bytes on one connection; the (head, body) of the ``responses`` that come
    back (bodies by their content-length; ``head``: responses to HEAD have none)."""
    host, port = url.removeprefix("http://").split(":")
    parsed: List[Tuple[bytes, bytes]] = []
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        buffer = b""
        while len(parsed) < responses:
            if b"\r\n\r\n" in buffer:
                head_part, rest = buffer.split(b"\r\n\r\n", 1)
                length = 0 if head else int(re.search(
                    rb"content-length: (\d+)", head_part.lower()).group(1))  # type: ignore[union-attr]
                if len(rest) >= length:
                    parsed.append((head_part, rest[:length]))
                    buffer = rest[length:]
                    continue
            chunk = sock.recv(65536)
            assert chunk, f"the connection closed after {len(parsed)} responses"
            buffer += chunk
    return parsed


def test_pipelined_requests_are_answered_in_order_on_one_connection(http):
    client, session = http
    client.create_backend("greeter", Greeter, "Hi")
    client.create_endpoint("greeter", backend="greeter", route="/greet", methods=["GET"])
    head = b"GET /greet HTTP/1.1\r\nHost: x\r\n"
    received = _exchange(str(session.base_url).rstrip("/"),
                         head + b"\r\n" + head + b"X-SERVE-CALL-METHOD: shout\r\n\r\n" + head +
                         b"X-SERVE-CALL-METHOD: whisper\r\n\r\n", 3)
    assert [body for _, body in received] == [
        b"Hi from __call__", b"HI from shout", b"hi from whisper"]
    assert all(b"\r\nx-request-id: " in head for head, _ in received)


def test_head_gets_headers_without_a_body_and_connection_close_is_honoured(http):
    client, session = http
    client.create_backend("hello", hello)
    client.create_endpoint("hello", backend="hello", route="/hello", methods=["GET", "HEAD"])
    url = str(session.base_url).rstrip("/")
    [(head, body)] = _exchange(
        url, b"HEAD /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 1, head=True)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 5" in head and b"connection: close" in head.lower()
    assert body == b""
    assert session.get("/hello").text == "hello"


def bad_header(request: Request) -> PlainTextResponse:
    return PlainTextResponse("x", headers={"x-split": "a\r\nset-cookie: evil=1"})


def test_a_response_header_with_a_line_break_is_a_500_not_a_forged_header(http):
    client, session = http
    client.create_backend("bad-header", bad_header)
    client.create_endpoint("bad-header", backend="bad-header", route="/bad-header")
    response = session.get("/bad-header")
    assert response.status_code == 500
    assert "set-cookie" not in response.headers
