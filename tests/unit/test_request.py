"""Tests for servekit.request: HTTP <-> backend conversions."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pickle
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)

from servekit._private.http_request import request_from_wire
from servekit._private.http_wire import (
    HTTPRequestWire,
    HTTPResponseWire,
    error_response,
    http_stream,
    json_dumps,
    json_response,
    plain,
    request_fields,
    response_from_wire,
    text_response,
    to_http_response,
    wire_from_scope,
)
from servekit.exceptions import ServeError
from servekit.request import KwargParams, ServeRequest


def make_scope(**overrides: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/predict",
        "raw_path": b"/api/predict",
        "query_string": b"a=1&b=two&a=3",
        "root_path": "",
        "headers": [
            [b"host", b"example.com:8000"],
            (b"content-type", b"application/json"),
            (b"x-trace-id", b"abc"),
        ],
        "server": ["127.0.0.1", 8000],
        "client": ("10.0.0.5", 51234),
    }
    scope.update(overrides)
    return scope


def headers_of(wire: HTTPResponseWire) -> dict[bytes, bytes]:
    names = [name for name, _ in wire.headers]
    assert len(names) == len(set(names)), f"duplicate headers: {wire.headers}"
    return dict(wire.headers)


def convert(value: Any) -> HTTPResponseWire:
    return asyncio.run(to_http_response(value))


async def _chunks_of(chunks: Any) -> AsyncIterator[Any]:
    """As the replica iterates a body (here sync iterators on the loop, for the test)."""
    if hasattr(chunks, "__aiter__"):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk


def streamed(value: Any) -> HTTPResponseWire:
    """What ``http_stream`` makes of ``value``, the chunks joined into one body."""
    async def main() -> HTTPResponseWire:
        stream = http_stream(value, _chunks_of)
        assert stream is not None, f"{value!r} is not streamed"
        items = [item async for item in stream]
        (status, headers), chunks = items[0], items[1:]
        assert all(isinstance(chunk, bytes) for chunk in chunks)
        return HTTPResponseWire(status, headers, b"".join(chunks))

    return asyncio.run(main())


# --------------------------------------------------------------------------- requests


def test_wire_from_scope_normalizes_lists_to_tuples() -> None:
    wire = wire_from_scope(make_scope(), b'{"x": 1}')
    assert wire.method == "POST"
    assert wire.path == "/api/predict"
    assert wire.query_string == b"a=1&b=two&a=3"
    assert wire.headers == [
        (b"host", b"example.com:8000"),
        (b"content-type", b"application/json"),
        (b"x-trace-id", b"abc"),
    ]
    assert all(type(header) is tuple for header in wire.headers)
    assert wire.body == b'{"x": 1}'
    assert wire.server == ("127.0.0.1", 8000)
    assert wire.client == ("10.0.0.5", 51234)
    assert wire.scheme == "http"
    assert wire.root_path == ""
    assert wire.http_version == "1.1"


def test_wire_from_scope_fills_optional_keys() -> None:
    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    wire = wire_from_scope(scope, b"")
    assert wire == HTTPRequestWire("GET", "/", b"", [], b"", "http", None, None, "", "1.1")


def test_request_round_trip() -> None:
    wire = wire_from_scope(make_scope(), b'{"x": [1, 2]}')
    wire = pickle.loads(pickle.dumps(wire))
    request = request_from_wire(wire)

    async def read() -> tuple[bytes, Any]:
        return await request.body(), await request.json()

    body, data = asyncio.run(read())
    assert body == b'{"x": [1, 2]}'
    assert data == {"x": [1, 2]}
    assert request.method == "POST"
    assert request.url.path == "/api/predict"
    assert str(request.url) == "http://example.com:8000/api/predict?a=1&b=two&a=3"
    assert request.query_params.getlist("a") == ["1", "3"]
    assert request.query_params["b"] == "two"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["x-trace-id"] == "abc"
    assert request.client is not None and request.client.host == "10.0.0.5"


def test_request_receive_gives_body_once_then_disconnect() -> None:
    wire = wire_from_scope(make_scope(), b"payload")
    request = request_from_wire(wire)

    async def read() -> list[dict[str, Any]]:
        return [await request.receive(), await request.receive(), await request.receive()]

    first, second, third = asyncio.run(read())
    assert first == {"type": "http.request", "body": b"payload", "more_body": False}
    assert second == third == {"type": "http.disconnect"}


def test_request_stream_reads_body() -> None:
    request = request_from_wire(wire_from_scope(make_scope(), b"abc"))

    async def read() -> bytes:
        return b"".join([chunk async for chunk in request.stream()])

    assert asyncio.run(read()) == b"abc"


def test_sync_code_reads_the_body_without_awaiting() -> None:
    request = request_from_wire(wire_from_scope(make_scope(), b'{"x": [1, 2]}'))
    assert isinstance(request, Request)
    assert request.data == b'{"x": [1, 2]}'
    assert request.json_data() == {"x": [1, 2]}
    assert asyncio.run(request.json()) is request.json_data()  # one parse, both ways


def test_a_body_that_is_not_json_is_a_value_error_for_json_data() -> None:
    request = request_from_wire(wire_from_scope(make_scope(), b"not json"))
    with pytest.raises(ValueError):
        request.json_data()
    assert request_from_wire(wire_from_scope(make_scope(), b"")).data == b""


def test_request_path_with_spaces_and_root_path() -> None:
    scope = make_scope(path="/app/a b/ü", root_path="/app", query_string=b"")
    request = request_from_wire(wire_from_scope(scope, b""))
    assert request.scope["raw_path"] == b"/app/a%20b/%C3%BC"
    assert request.url.path == "/app/a b/ü"
    assert request.scope["root_path"] == "/app"


# --------------------------------------------------------------------------- ServeRequest


def test_serve_request_attributes() -> None:
    request = ServeRequest({"x": 1}, kwargs={"n": 3, "flag": True}, method="POST")
    assert request.data == {"x": 1}
    assert request.method == "POST"
    assert request.query_params == {"n": 3, "flag": True}
    assert request.query_params["n"] == 3  # not stringified
    assert asyncio.run(request.body()) == {"x": 1}
    assert asyncio.run(request.json()) == {"x": 1}
    assert asyncio.run(request.form()) == {"x": 1}


def test_serve_request_defaults() -> None:
    request = ServeRequest()
    assert request.data is None
    assert request.method == "GET"
    assert isinstance(request.query_params, KwargParams)
    assert request.query_params == {}
    assert dict(request.headers) == {}


def test_serve_request_does_not_share_kwargs() -> None:
    kwargs = {"a": 1}
    request = ServeRequest(kwargs=kwargs)
    kwargs["a"] = 2
    assert request.query_params["a"] == 1


@pytest.mark.parametrize("method", ["json", "form"])
@pytest.mark.parametrize(
    ("data", "type_name"), [([1, 2], "list"), (None, "NoneType"), ("s", "str")]
)
def test_serve_request_json_rejects_non_dict(method: str, data: Any, type_name: str) -> None:
    request = ServeRequest(data)
    with pytest.raises(ServeError) as info:
        asyncio.run(getattr(request, method)())
    assert str(info.value) == (
        f"Request data is not a dictionary. It is {type_name}. "
        "Pass a dict as the positional argument to use .json()."
    )


def test_serve_request_json_data_is_the_dict_from_sync_code() -> None:
    assert ServeRequest({"x": 1}).json_data() == {"x": 1}
    with pytest.raises(ServeError, match="not a dictionary"):
        ServeRequest([1]).json_data()


def test_kwarg_params_getlist() -> None:
    params = KwargParams({"a": [1, 2], "b": 0})
    assert params.getlist("a") == [[1, 2]]
    assert params.getlist("b") == [0]
    assert params.getlist("missing") == []


def test_serve_request_headers_case_insensitive() -> None:
    request = ServeRequest(headers={"Content-Type": "text/plain", "X-Id": "7"})
    assert request.headers["content-type"] == "text/plain"
    assert request.headers["CONTENT-TYPE"] == "text/plain"
    assert request.headers.get("x-id") == "7"
    assert "x-ID" in request.headers
    assert "missing" not in request.headers
    assert 3 not in request.headers
    assert request.headers.get("missing") is None
    assert len(request.headers) == 2
    with pytest.raises(KeyError):
        request.headers["missing"]


def test_serve_request_pickles() -> None:
    request = ServeRequest(np.arange(3), kwargs={"k": "v"}, headers={"X-A": "b"}, method="PUT")
    copy = pickle.loads(pickle.dumps(request))
    assert np.array_equal(copy.data, np.arange(3))
    assert copy.method == "PUT"
    assert copy.headers["x-a"] == "b"
    assert isinstance(copy.query_params, KwargParams)
    assert copy.query_params.getlist("k") == ["v"]
    empty = pickle.loads(pickle.dumps(ServeRequest()))
    assert dict(empty.headers) == {}


def test_serve_request_repr() -> None:
    text = repr(ServeRequest([1], method="POST"))
    assert "POST" in text
    assert "list" in text


# --------------------------------------------------------------------------- to_http_response


def test_json_response_sent_as_is() -> None:
    wire = convert(JSONResponse({"a": 1}, status_code=201, headers={"X-Extra": "1"}))
    assert wire.status == 201
    assert wire.body == b'{"a":1}'
    headers = headers_of(wire)
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == b"7"
    assert headers[b"x-extra"] == b"1"


def test_html_response() -> None:
    wire = convert(HTMLResponse("<h1>hé</h1>"))
    assert wire.status == 200
    assert wire.body == "<h1>hé</h1>".encode()
    headers = headers_of(wire)
    assert headers[b"content-type"] == b"text/html; charset=utf-8"
    assert headers[b"content-length"] == str(len(wire.body)).encode()


def test_plain_text_response() -> None:
    wire = convert(PlainTextResponse("nope", status_code=418))
    assert wire.status == 418
    assert wire.body == b"nope"
    assert headers_of(wire)[b"content-type"] == b"text/plain; charset=utf-8"
    assert headers_of(wire)[b"content-length"] == b"4"


def test_redirect_response() -> None:
    wire = convert(RedirectResponse("/elsewhere"))
    assert wire.status == 307
    assert wire.body == b""
    assert headers_of(wire)[b"location"] == b"/elsewhere"
    assert headers_of(wire)[b"content-length"] == b"0"


def test_response_with_body_changed_after_init_gets_accurate_length() -> None:
    response = Response(b"short")
    response.body = b"much longer body"
    wire = convert(response)
    assert wire.body == b"much longer body"
    assert headers_of(wire)[b"content-length"] == b"16"


def test_response_with_memoryview_body_is_picklable() -> None:
    wire = convert(Response(memoryview(b"view")))
    assert type(wire.body) is bytes
    assert pickle.loads(pickle.dumps(wire)) == HTTPResponseWire(200, wire.headers, b"view")


def test_no_content_response_gets_no_length() -> None:
    wire = convert(Response(status_code=204))
    assert wire.status == 204
    assert wire.body == b""
    assert b"content-length" not in headers_of(wire)


def test_streaming_response_sync_generator() -> None:
    def numbers() -> Iterator[str | bytes]:
        yield "é,"
        yield b"2,"
        yield "3"

    response = StreamingResponse(
        numbers(), status_code=202, media_type="text/csv", headers={"X-Kind": "sync"}
    )
    wire = streamed(response)
    assert wire.status == 202
    assert wire.body == "é,2,3".encode()
    headers = headers_of(wire)
    assert headers[b"content-type"] == b"text/csv; charset=utf-8"
    assert headers[b"x-kind"] == b"sync"
    assert b"content-length" not in headers  # sent with chunked transfer encoding


def test_streaming_response_async_generator_drops_length_and_encoding() -> None:
    async def chunks() -> AsyncIterator[str | bytes | memoryview]:
        yield b"ab"
        await asyncio.sleep(0)
        yield memoryview(b"cd")
        yield "ef"

    response = StreamingResponse(
        chunks(),
        headers={"Content-Length": "999", "Transfer-Encoding": "chunked"},
        media_type="application/octet-stream",
    )
    wire = streamed(response)
    assert wire.status == 200
    assert wire.body == b"abcdef"
    headers = headers_of(wire)
    assert b"content-length" not in headers  # the proxy's server frames the stream itself
    assert b"transfer-encoding" not in headers
    assert headers[b"content-type"] == b"application/octet-stream"


def test_streaming_response_with_plain_sync_iterator_attribute() -> None:
    response = StreamingResponse(iter([b"x"]))
    response.body_iterator = iter([b"a", "b"])  # type: ignore[assignment]
    assert streamed(response).body == b"ab"


def test_streaming_response_charset_used_for_str_chunks() -> None:
    class Latin1Streaming(StreamingResponse):
        charset = "latin-1"

    wire = streamed(Latin1Streaming(iter(["é"]), media_type="text/plain"))
    assert wire.body == "é".encode("latin-1")


def test_file_response(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(b"file contents")
    wire = convert(FileResponse(path, media_type="text/plain"))
    assert wire.status == 200
    assert wire.body == b"file contents"
    headers = headers_of(wire)
    assert headers[b"content-length"] == b"13"
    assert headers[b"content-type"].startswith(b"text/plain")


def test_str() -> None:
    wire = convert("héllo")
    assert wire == HTTPResponseWire(
        200,
        [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"6")],
        "héllo".encode(),
    )


@pytest.mark.parametrize("value", [b"\x00\xff", bytearray(b"\x00\xff"), memoryview(b"\x00\xff")])
def test_bytes_like(value: bytes | bytearray | memoryview) -> None:
    wire = convert(value)
    assert wire.status == 200
    assert type(wire.body) is bytes
    assert wire.body == b"\x00\xff"
    headers = headers_of(wire)
    assert headers[b"content-type"] == b"application/octet-stream"
    assert headers[b"content-length"] == b"2"
    pickle.dumps(wire)


def test_none() -> None:
    wire = convert(None)
    assert wire.status == 200
    assert wire.body == b""
    assert headers_of(wire)[b"content-length"] == b"0"


@pytest.mark.parametrize(
    ("value", "body"),
    [
        ({"a": 1, "b": "é"}, '{"a":1,"b":"é"}'.encode()),
        ([1, 2.5, None, True], b"[1,2.5,null,true]"),
        (7, b"7"),
        (np.array([[1, 2], [3, 4]]), b"[[1,2],[3,4]]"),
        (np.int64(5), b"5"),
        (np.float32(0.5), b"0.5"),
        (np.bool_(True), b"true"),
        ({"arr": np.array([1.5]), "n": np.int32(2)}, b'{"arr":[1.5],"n":2}'),
    ],
)
def test_json_values(value: Any, body: bytes) -> None:
    wire = convert(value)
    assert wire.status == 200
    assert wire.body == body
    headers = headers_of(wire)
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == str(len(body)).encode()


class Point(BaseModel):
    x: int
    label: str
    tags: set[str] = set()


@dataclasses.dataclass
class Box:
    name: str
    corners: list[Any]


def test_pydantic_model() -> None:
    wire = convert(Point(x=1, label="p"))
    assert json.loads(wire.body) == {"x": 1, "label": "p", "tags": []}
    assert headers_of(wire)[b"content-type"] == b"application/json"


def test_dataclass_nested() -> None:
    box = Box("b", [Point(x=1, label="p"), np.float32(1.5), (1, 2)])
    wire = convert(box)
    assert json.loads(wire.body) == {
        "name": "b",
        "corners": [{"x": 1, "label": "p", "tags": []}, 1.5, [1, 2]],
    }


def test_dataclass_class_is_not_serialized() -> None:
    with pytest.raises(TypeError, match="Object of type type is not JSON serializable"):
        json_dumps(Box)


# --------------------------------------------------------------------------- json_dumps


def test_json_dumps_extra_types() -> None:
    value = {
        "bytes": b"ok\xff",
        "set": {3},
        "frozen": frozenset(["a"]),
        "error": ValueError("bad input"),
    }
    assert json.loads(json_dumps(value)) == {
        "bytes": "ok\ufffd",
        "set": [3],
        "frozen": ["a"],
        "error": "bad input",
    }


def test_json_dumps_is_compact_utf8() -> None:
    assert json_dumps({"k": ["ü", 1]}) == '{"k":["ü",1]}'.encode()


def test_json_dumps_unsupported_type() -> None:
    class Opaque:
        pass

    with pytest.raises(TypeError) as info:
        json_dumps({"x": Opaque()})
    assert str(info.value) == (
        "Object of type Opaque is not JSON serializable. Return a str, bytes, "
        "a starlette Response, or a JSON-encodable value."
    )


def test_to_http_response_unsupported_type() -> None:
    with pytest.raises(TypeError, match="Object of type object is not JSON serializable"):
        convert(object())


# --------------------------------------------------------------------------- helpers


def test_error_response() -> None:
    wire = error_response(KeyError("missing"))
    assert wire.status == 500
    assert wire.body == b"KeyError: 'missing'"
    headers = headers_of(wire)
    assert headers[b"content-type"] == b"text/plain; charset=utf-8"
    assert headers[b"content-length"] == str(len(wire.body)).encode()


def test_error_response_custom_status_and_empty_message() -> None:
    wire = error_response(TimeoutError(), status=503)
    assert wire.status == 503
    assert wire.body == b"TimeoutError"


def test_text_response() -> None:
    wire = text_response(404, "Path '/x' not found")
    assert wire == HTTPResponseWire(
        404,
        [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"19")],
        b"Path '/x' not found",
    )


def test_json_response() -> None:
    wire = json_response(200, {"/a": "endpoint_a"})
    assert wire.status == 200
    assert wire.body == b'{"/a":"endpoint_a"}'
    headers = headers_of(wire)
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == str(len(wire.body)).encode()


def test_generators_stream_as_text_and_other_values_as_json_lines() -> None:
    def words() -> Iterator[Any]:
        yield "a"
        yield b"b"
        yield {"n": 1}

    wire = streamed(words())
    assert (wire.status, wire.body) == (200, b'ab{"n":1}\n')
    assert headers_of(wire)[b"content-type"] == b"text/plain; charset=utf-8"
    assert http_stream("not a stream", _chunks_of) is None
    assert http_stream(Response(b"whole"), _chunks_of) is None


def test_requests_and_responses_cross_the_wire_as_plain_tuples() -> None:
    """No class is named in their pickles (finding it again costs more than the rest of
    the pickle), and each side rebuilds the named tuple it had."""
    scope = {"type": "http", "method": "POST", "path": "/x", "query_string": b"a=1",
             "headers": [(b"host", b"h")], "client": ["1.2.3.4", 5]}
    fields = request_fields(scope, b"body")
    assert type(fields) is tuple and b"HTTPRequestWire" not in pickle.dumps(fields, 5)
    assert HTTPRequestWire._make(fields) == wire_from_scope(scope, b"body")
    response = HTTPResponseWire(201, [(b"x", b"y")], b"made", "/items/{id}")
    sent = plain(response)
    assert b"HTTPResponseWire" not in pickle.dumps(sent, 5)
    assert response_from_wire(pickle.loads(pickle.dumps(sent, 5))) == response
    assert response_from_wire(response) is response  # (one that came as a named tuple)
    assert plain("a stream") == "a stream" == response_from_wire("a stream")
