"""Streaming responses against real processes: chunks reach the HTTP client and handle
callers as they are produced, a slow reader slows the generator, and a reader that leaves
stops it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from typing import Any, Iterator

import httpx
import pytest
from robustness_backends import async_wait_for_file, wait_for_file
from starlette.responses import StreamingResponse

import servekit as serve
from conftest import free_port, wait_for
from servekit._private.transport import STREAM_WINDOW

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


class Streams:
    """Streaming methods; each notes in ``<dir>`` how far it got."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _note(self, name: str, value: Any = "") -> None:
        with open(os.path.join(self.directory, name), "w") as f:
            f.write(str(value))

    def held(self, request: Any) -> Iterator[str]:
        """A sync generator: its first chunk, then it waits for ``<dir>/release``."""
        yield "first\n"
        wait_for_file(os.path.join(self.directory, "release"))
        yield "second\n"

    async def events(self, request: Any) -> StreamingResponse:
        """Server-sent events whose second event waits for ``<dir>/release``."""
        async def produce() -> Any:
            yield "data: one\n\n"
            await async_wait_for_file(os.path.join(self.directory, "release"))
            yield "data: two\n\n"
        return StreamingResponse(produce(), media_type="text/event-stream")

    def short(self, request: Any) -> Iterator[str]:
        """Three chunks, then a note naming the replica that produced them."""
        yield from ("a", "b", "c")
        self._note(f"short-done-{serve.get_current_replica_tag()}")

    async def endless(self, request: Any) -> Any:
        """Counts the chunks it produced (in ``<dir>/produced``) and notes when closed."""
        produced = 0
        try:
            while True:
                produced += 1
                self._note("produced", produced)
                yield b"x" * int(getattr(request, "data", None) or 16)
        finally:
            self._note("closed")


def produced(directory: Any) -> int:
    try:
        return int((directory / "produced").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


@pytest.fixture
def streams(tmp_path: Any) -> Iterator[tuple]:
    port = free_port()
    client = serve.start(http_options={"port": port})
    client.create_backend("streams", Streams, str(tmp_path))
    for method in ("held", "events", "endless"):
        client.create_endpoint(method, backend="streams", route=f"/{method}")
    yield client, f"http://127.0.0.1:{port}", port, tmp_path
    client.shutdown()


def on(method: str) -> dict:
    """httpx arguments that call ``method`` of the backend."""
    return {"headers": {"X-SERVE-CALL-METHOD": method}, "timeout": TIMEOUT}


def test_the_first_chunk_reaches_the_http_client_before_the_generator_ends(
        streams: tuple) -> None:
    _, url, _, directory = streams
    with httpx.stream("GET", f"{url}/held", **on("held")) as response:
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        lines = response.iter_lines()
        assert next(lines) == "first"  # while the generator still waits
        (directory / "release").touch()
        assert list(lines) == ["second"]


def test_server_sent_events_stream(streams: tuple) -> None:
    _, url, _, directory = streams
    with httpx.stream("GET", f"{url}/events", **on("events")) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = response.iter_text()
        assert next(chunks) == "data: one\n\n"
        (directory / "release").touch()
        assert "".join(chunks) == "data: two\n\n"


def test_a_handle_streams_chunks_as_they_are_yielded(streams: tuple) -> None:
    client, _, _, directory = streams
    handle = client.get_handle("held").options(method_name="held", stream=True)
    chunks = iter(handle.remote())
    assert next(chunks) == "first\n"
    (directory / "release").touch()
    assert list(chunks) == ["second\n"]


def test_an_async_handle_streams_with_async_for(streams: tuple) -> None:
    client, _, _, directory = streams

    async def main() -> list:
        handle = client.get_handle("held", sync=False).options(method_name="held",
                                                                stream=True)
        got = []
        async for chunk in await handle.remote():
            got.append(chunk)
            (directory / "release").touch()
        return got

    assert asyncio.run(main()) == ["first\n", "second\n"]


def test_a_slow_reader_slows_the_generator(streams: tuple) -> None:
    client, _, _, directory = streams
    handle = client.get_handle("endless").options(method_name="endless", stream=True)
    stream = iter(handle.remote())
    for read in range(1, 4):
        next(stream)
        # The generator runs ahead of the reader by the stream's window (and one chunk it
        # holds while it waits for room), never more.
        wait_for(lambda read=read: produced(directory) == read + STREAM_WINDOW + 1, TIMEOUT,
                 "the generator to fill the window")
        assert produced(directory) == read + STREAM_WINDOW + 1
    stream.close()  # type: ignore[attr-defined]
    wait_for(lambda: (directory / "closed").exists(), TIMEOUT, "the generator closed")


def test_an_http_client_that_leaves_mid_stream_stops_the_generator(streams: tuple) -> None:
    _, _, port, directory = streams
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\nX-SERVE-CALL-METHOD: endless\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    wait_for(lambda: (directory / "closed").exists(), TIMEOUT,
             "the generator stopped after the client left")
    stopped_at = produced(directory)
    assert stopped_at < 100_000  # bounded by the window and the socket buffers


def test_a_non_generator_method_called_with_stream_is_a_type_error(tmp_path: Any) -> None:
    client = serve.start(http_options={"port": free_port()})
    try:
        client.create_backend("plain", lambda request: "whole")
        client.create_endpoint("plain", backend="plain")
        with pytest.raises(TypeError, match="needs a method that returns a generator"):
            list(client.get_handle("plain").options(stream=True).remote())
        with pytest.raises(TypeError, match="stream must be a bool"):
            client.get_handle("plain").options(stream="yes")
    finally:
        client.shutdown()


def test_a_shadow_copy_of_a_stream_is_read_to_its_end(streams: tuple) -> None:
    client, url, _, directory = streams
    client.create_backend("shadow", Streams, str(directory))
    client.create_endpoint("short", backend="streams", route="/short")
    client.shadow_traffic("short", "shadow", 1.0)
    response = httpx.get(f"{url}/short", **on("short"))
    assert response.text == "abc"
    wait_for(lambda: any(name.startswith("short-done-shadow#")
                         for name in os.listdir(directory)), TIMEOUT,
             "the shadow's generator run to its end")
    wait_for(lambda: httpx.get(f"{url}/-/shadows", timeout=TIMEOUT).json()
             .get("short", {}).get("shadow", {}).get("sent") == 1, TIMEOUT,
             "the shadow copy counted as sent")
    assert httpx.get(f"{url}/-/shadows", timeout=TIMEOUT).json()["short"]["shadow"][
        "failed"] == 0


def test_a_stream_dropped_unread_frees_its_replica(streams: tuple) -> None:
    client, _, _, directory = streams
    handle = client.get_handle("endless").options(method_name="endless", stream=True)
    stream = handle.remote()
    wait_for(lambda: produced(directory) > 0, TIMEOUT, "the generator to start")
    del stream  # never read, never cancelled by hand
    wait_for(lambda: (directory / "closed").exists(), TIMEOUT, "the generator closed")


def test_a_replica_that_dies_mid_stream_ends_the_stream_with_a_clear_error(
        streams: tuple) -> None:
    client, _, _, directory = streams
    from servekit.exceptions import BackendUnavailableError

    handle = client.get_handle("endless").options(method_name="endless", stream=True)
    chunks = iter(handle.remote())
    next(chunks)
    [replica] = [p for p in client._call("status")["processes"] if p["role"] == "replica"]
    os.kill(replica["pid"], signal.SIGKILL)
    with pytest.raises(BackendUnavailableError, match="went away"):
        for _ in range(100_000):  # the chunks already sent, then the error
            next(chunks)
