"""Streaming responses against real processes: chunks reach the HTTP client and handle
callers as they are produced, a slow reader slows the generator, and a reader that leaves
stops it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import time
from typing import Any, Iterator

import httpx
import pytest
from robustness_backends import async_wait_for_file, wait_for_file
from starlette.responses import StreamingResponse

import servekit as serve
from conftest import free_port, wait_for
from servekit._private.wire.transport import STREAM_WINDOW, STREAM_WINDOW_BYTES
from servekit.exceptions import ServeError

pytestmark = pytest.mark.integration

# The proxies of this run are on granian (SERVEKIT_HTTP_SERVER=granian): a test of what
# granian does not keep is expected to fail there, and says why.
GRANIAN = serve.HTTPOptions().server == "granian"
STREAM_NEVER_WAITS = (
    "granian 2.8's response stream never waits for its client: a reader that reads "
    "nothing is not found, and what is streamed to it is queued in memory")

TIMEOUT = 30.0


class Streams:
    """Streaming methods; each notes in ``<dir>`` how far it got."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.config: Any = None

    def _note(self, name: str, value: Any = "") -> None:
        with open(os.path.join(self.directory, name), "w") as f:
            f.write(str(value))

    def _log(self, line: str) -> None:
        with open(os.path.join(self.directory, "log"), "a") as f:
            f.write(line + "\n")

    def reconfigure(self, config: Any) -> None:
        self._log(f"reconfigure {config}")
        self.config = config

    def pid(self, request: Any) -> int:
        return os.getpid()

    def configured(self, request: Any) -> Iterator[str]:
        """Three chunks of the user_config and request id it sees, logging its steps; the
        second step waits for ``<dir>/release``."""
        self._log("step-1")
        yield f"{self.config} {serve.get_request_id()}"
        self._log("step-2-start")
        wait_for_file(os.path.join(self.directory, "release"))
        self._log("step-2-end")
        yield f"{self.config} {serve.get_request_id()}"
        self._log("step-3")
        yield f"{self.config} {serve.get_request_id()}"

    def exits(self, request: Any) -> Iterator[str]:
        """A chunk, then ``SystemExit`` from the generator."""
        yield "before"
        raise SystemExit(3)

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

    def wide(self, request: Any) -> Iterator[bytes]:
        """64 KiB chunks for ever; notes when it was closed."""
        try:
            while True:
                yield b"w" * 65536
        finally:
            self._note("wide-closed")


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


def test_a_slow_reader_of_large_chunks_holds_a_window_of_bytes_not_of_chunks(
        streams: tuple) -> None:
    """Chunks of 1.5 MB: the generator runs ahead by the two that fit in the window's bytes
    (and the one it holds), not by eight (12 MB more in the reader's process)."""
    client, _, _, directory = streams
    size = 1_500_000
    ahead = STREAM_WINDOW_BYTES // (size + 64)
    assert ahead == 2
    handle = client.get_handle("endless").options(method_name="endless", stream=True)
    stream = iter(handle.remote(size))
    for read in range(1, 4):
        assert len(next(stream)) == size
        wait_for(lambda read=read: produced(directory) == read + ahead + 1, TIMEOUT,
                 "the generator to fill the window")
        assert produced(directory) == read + ahead + 1
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


@pytest.mark.xfail(GRANIAN, strict=True, reason=STREAM_NEVER_WAITS)
def test_a_client_that_stops_reading_is_closed_and_its_stream_stopped(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client reads nothing of an endless stream: once the proxy could write nothing
    more to it for SERVEKIT_SEND_TIMEOUT_S, the connection is closed and the generator
    stopped, and the replica's only place comes back (the stream held it for ever)."""
    monkeypatch.setenv("SERVEKIT_SEND_TIMEOUT_S", "1")
    port = free_port()
    client = serve.start(http_options={"port": port})
    try:
        client.create_backend("streams", Streams, str(tmp_path),
                              config={"max_concurrent_queries": 1})
        client.create_endpoint("wide", backend="streams", route="/wide")
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /wide HTTP/1.1\r\nHost: x\r\nX-SERVE-CALL-METHOD: wide\r\n\r\n")
            wait_for(lambda: (tmp_path / "wide-closed").exists(), TIMEOUT,
                     "the generator stopped while its client read nothing")
        handle = client.get_handle("wide").options(method_name="pid")
        assert handle.remote().result(timeout=TIMEOUT) > 0  # the replica has room again
    finally:
        client.shutdown()


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


def test_reconfigure_runs_between_two_chunks_of_a_stream_never_during_one(
        tmp_path: Any) -> None:
    """A user_config change waits for the chunk being produced, then runs before the next
    one; every chunk of a sync generator sees the request's id."""
    client = serve.start(http_options={"port": free_port()})
    log = tmp_path / "log"
    try:
        client.create_backend("configured", Streams, str(tmp_path), config={"user_config": 1})
        client.create_endpoint("configured", backend="configured")
        handle = client.get_handle("configured").options(method_name="configured",
                                                          stream=True)
        chunks = iter(handle.remote())
        first = next(chunks)
        wait_for(lambda: "step-2-start" in log.read_text(), TIMEOUT,
                 "the generator to be inside its second step")
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            update = executor.submit(client.update_backend_config, "configured",
                                     {"user_config": 2})
            wait_for(lambda: client.get_backend_config("configured").user_config == 2,
                     TIMEOUT, "the controller to take the update")
            time.sleep(0.5)  # not synchronisation: a window for reconfigure to start in
            assert not update.done(), "reconfigure ran while the generator produced a chunk"
            (tmp_path / "release").touch()
            update.result(timeout=TIMEOUT)
        rest = list(chunks)
    finally:
        client.shutdown()
    assert log.read_text().splitlines() == [
        "reconfigure 1", "step-1", "step-2-start", "step-2-end", "reconfigure 2", "step-3"]
    configs = [chunk.split()[0] for chunk in [first, *rest]]
    ids = {chunk.split()[1] for chunk in [first, *rest]}
    assert configs == ["1", "1", "2"]
    assert len(ids) == 1 and ids != {"None"}, ids


def test_a_generator_that_raises_system_exit_fails_its_stream_only(tmp_path: Any) -> None:
    client = serve.start(http_options={"port": free_port()})
    try:
        client.create_backend("exits", Streams, str(tmp_path))
        client.create_endpoint("exits", backend="exits")
        handle = client.get_handle("exits")
        pid = handle.options(method_name="pid").remote().result(timeout=TIMEOUT)
        chunks = iter(handle.options(method_name="exits", stream=True).remote())
        assert next(chunks) == "before"
        with pytest.raises(ServeError, match="SystemExit"):
            next(chunks)
        assert handle.options(method_name="pid").remote().result(timeout=TIMEOUT) == pid
    finally:
        client.shutdown()
