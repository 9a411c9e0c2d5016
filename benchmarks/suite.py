"""servekit's benchmark suite: every scenario side by side in one run, one table.

    python benchmarks/suite.py                 # full run (several minutes on 2 cores)
    python benchmarks/suite.py --quick         # a few seconds per scenario (what CI runs)
    python benchmarks/suite.py --only http,handles --runs 5 --json after.json
    python benchmarks/suite.py --compare before.json after.json
    python benchmarks/suite.py --only http,asgi,bodies,proxies --server granian
    python benchmarks/suite.py --quick --results-md benchmarks/RESULTS.md

Each metric is measured ``--runs`` times; the table shows the median, min and max, and the
target beside it (PASS/MISS: issue 26's where it set one, else issue 14's). Numbers are
never asserted: these machines are shared and noisy, so compare ratios measured in one
run, or two JSON files of runs made on the same machine back to back (``--compare``). HTTP
load comes from ``wrk`` (127.0.0.1 only, bounded in time); without ``wrk`` the HTTP
scenarios are skipped with a line saying so. Ray Serve is measured when ``ray[serve]`` is
importable, in full runs only; LitServe (the ``peers`` scenario: servekit and LitServe on
one JSON POST) when ``litserve`` is. ``--server`` picks the proxies' HTTP server
(``HTTPOptions.server``: uvicorn, the default, or granian); the no-op's ceilings are bare
uvicorn (ASGI) and, when granian is installed, bare granian (RSGI), both whatever the
proxies run on. ``--results-md`` writes the run's table, with its date, commit and
machine, as the latest figures of benchmarks/RESULTS.md (between the two marker lines
there); the rest of the file is left as it was. """

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import httpx

import servekit as serve

Results = Dict[str, List[float]]

# metric -> (unit, target, "min" if higher is better else "max", what it is)
METRICS: Dict[str, Tuple[str, Optional[float], str, str]] = {
    "http.ceiling.rps32": ("req/s", None, "min", "raw ASGI app, 32 connections"),
    "http.rsgi_ceiling.rps32": ("req/s", None, "min", "raw RSGI app on granian, 32 conns"),
    "http.rsgi_ceiling.p50_ms": ("ms", None, "max", "the same, p50 at 1 connection"),
    "http.sync.rps32": ("req/s", None, "min", "servekit, sync no-op, 32 connections"),
    "http.sync.ratio32": ("x", 0.6, "min", "servekit sync no-op / raw ASGI, 32 conns"),
    "http.async.rps32": ("req/s", None, "min", "servekit, async no-op, 32 connections"),
    "http.async.ratio32": ("x", 0.6, "min", "servekit async no-op / raw ASGI, 32 conns"),
    "http.sync.added_p50_ms": ("ms", 0.1, "max", "servekit p50 - raw ASGI p50, 1 conn"),
    "http.async.added_p50_ms": ("ms", 0.1, "max", "the same, async no-op"),
    "http.sync.vs_rsgi32": ("x", 0.4, "min", "servekit sync no-op / raw RSGI, 32 conns"),
    "http.ray.rps32": ("req/s", None, "min", "Ray Serve no-op, 32 connections"),
    "http.vs_ray32": ("x", 50.0, "min", "servekit sync no-op / Ray Serve, 32 conns"),
    "handles.sync_seq_p50_us": ("us", 120.0, "max", "sync handle round trip, sync no-op"),
    "handles.sync_pipelined": ("calls/s", 12_000.0, "min",
                               "sync handle, 1000 in flight, median of 5 rounds"),
    "handles.async_pipelined": ("calls/s", 30_000.0, "min",
                                "async handle, async no-op, median of 5 rounds"),
    "cold_start_s": ("s", 0.5, "max", "serve.start() to first HTTP answer (issue 26)"),
    "rss.supervisor_mb": ("MB", 30.0, "max", "idle resident memory (issue 26)"),
    "rss.controller_mb": ("MB", 30.0, "max", "idle resident memory (issue 26)"),
    "rss.proxy_mb": ("MB", 30.0, "max", "idle resident memory (issue 26)"),
    "rss.replica_mb": ("MB", 30.0, "max", "idle resident memory (issue 26)"),
    "batching.rps_batch1": ("calls/s", None, "min", "numpy model, max_batch_size 1"),
    "batching.rps_batch16": ("calls/s", None, "min", "numpy model, max_batch_size 16"),
    "batching.speedup": ("x", 5.0, "min", "batch 16 / batch 1"),
    "batch_route.rps_unbatched": ("req/s", None, "min", "numpy model, FastAPI route, HTTP"),
    "batch_route.rps_batch16": ("req/s", None, "min", "the same, @serve.batch 16"),
    "batch_route.speedup": ("x", None, "min", "@serve.batch 16 / unbatched"),
    "batch_route.rps_backend16": ("req/s", None, "min", "1.x max_batch_size 16, HTTP"),
    "proxies.rps_1": ("req/s", None, "min", "one proxy, 32 connections"),
    "proxies.rps_2": ("req/s", None, "min", "two proxies, 32 connections"),
    "scale.create_endpoints_s": ("s", None, "max", "create the endpoints of the table"),
    "scale.create_replicas_s": ("s", None, "max", "start the replicas"),
    "scale.route_update_ms": ("ms", None, "max", "create_endpoint to first HTTP answer"),
    "scale.p50_ratio": ("x", 1.1, "max", "proxy p50, big table / table of 1"),
    "transport.unix_seq_p50_us": ("us", None, "max", "echo RPC round trip, Unix socket"),
    "transport.tls_seq_p50_us": ("us", None, "max", "the same over TCP + TLS (Ray runtime)"),
    "transport.unix_rps": ("calls/s", None, "min", "1 KB echo RPCs, 1000 in flight, Unix"),
    "transport.tls_rps": ("calls/s", None, "min", "the same over TCP + TLS"),
    "transport.tls_cost": ("x", None, "max", "Unix calls/s / TLS calls/s"),
    "asgi.bare.rps32": ("req/s", None, "min", "FastAPI app on bare uvicorn, 32 conns"),
    "asgi.servekit.rps32": ("req/s", None, "min", "the same app as a servekit backend"),
    "asgi.ratio32": ("x", 0.85, "min", "servekit / bare uvicorn, the FastAPI app"),
    "asgi.added_p50_ms": ("ms", None, "max", "servekit p50 - bare p50, 1 conn"),
    "asgi.ws.bare_p50_us": ("us", None, "max", "WebSocket echo round trip, bare uvicorn"),
    "asgi.ws.servekit_p50_us": ("us", None, "max", "the same through servekit"),
    "bodies.stream_rps8": ("req/s", None, "min", "100 x 1 KiB chunks streamed, 8 conns"),
    "bodies.upload_rps8": ("req/s", None, "min", "1 MiB POST bodies, 8 conns"),
    "bodies.upload_mb_s": ("MB/s", None, "min", "the same, request bytes per second"),
    "peers.servekit_post_rps": ("req/s", None, "min", "servekit, JSON POST no-op, 32 conns"),
    "peers.litserve_rps": ("req/s", None, "min", "LitServe, the same POST, 32 conns"),
    "peers.servekit_over_litserve": ("x", None, "min", "servekit / LitServe, JSON POST"),
    "peers.servekit_post_p50_ms": ("ms", None, "max", "servekit, JSON POST, p50 at 1 conn"),
    "peers.litserve_p50_ms": ("ms", None, "max", "LitServe, the same, p50 at 1 conn"),
    "floor.process_rtt_us": ("us", None, "max", "1 byte there and back, two processes"),
    "floor.thread_rtt_us": ("us", None, "max", "1 item there and back, two threads"),
}


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, deadline_s: float = 30.0,
              process: Optional[subprocess.Popen] = None) -> None:
    """Wait for ``url`` to answer below 500; fail if ``process`` (serving it) exits first."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode} before "
                               f"{url} answered")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {deadline_s}s")
        time.sleep(0.05)


def wrk(url: str, connections: int, seconds: float,
        script: Optional[str] = None) -> Tuple[float, float]:
    """(requests per second, p50 latency in ms) of ``wrk`` against ``url`` (with the Lua
    file ``script``, if given)."""
    out = subprocess.run(
        ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
         "--latency", *(["-s", script] if script else []), url],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"50%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return rps, float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def serve_raw_asgi(port: int) -> None:
    """The raw-ASGI ceiling: uvicorn + httptools + uvloop serving the no-op in-process."""
    import uvicorn

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": b"ok"})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False)


def serve_raw_rsgi(port: int) -> None:
    """The RSGI ceiling: granian serving the no-op in-process, embedded in a uvloop loop
    as the proxy runs it (its worker processes cannot start from the daemonic process)."""
    import uvloop
    from granian.constants import HTTPModes, Interfaces
    from granian.log import LogLevels
    from granian.server.embed import Server
    from rsgi_noop import app

    server = Server(app, address="127.0.0.1", port=port, interface=Interfaces.RSGI,
                    http=HTTPModes.http1, log_level=LogLevels.error)
    uvloop.run(server.serve())


def have_granian() -> bool:
    try:
        import granian  # noqa: F401
    except ImportError:
        return False
    return True


def serve_fastapi(port: int) -> None:
    """The FastAPI app of the ``asgi`` scenario on bare uvicorn (uvloop, httptools)."""
    import uvicorn
    from fastapi_ping import app

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False)


@contextlib.contextmanager
def ceiling(target: Callable[[int], None] = serve_raw_asgi, path: str = "/") -> Iterator[str]:
    """A process serving ``target`` (the raw-ASGI no-op by default); the URL of ``path``."""
    port = free_port()
    process = multiprocessing.get_context("spawn").Process(target=target, args=(port,),
                                                           daemon=True)
    process.start()
    try:
        url = f"http://127.0.0.1:{port}{path}"
        wait_http(url)
        yield url
    finally:
        process.terminate()
        process.join(10)


# The proxies' HTTP server (--server); None: HTTPOptions' default.
SERVER: Optional[str] = None


@contextlib.contextmanager
def instance(**http_options: Any) -> Iterator[Tuple[serve.Client, str]]:
    port = free_port()
    if SERVER is not None:
        http_options.setdefault("server", SERVER)
    client = serve.start(http_options={"host": "127.0.0.1", "port": port, **http_options})
    try:
        yield client, f"http://127.0.0.1:{port}"
    finally:
        client.shutdown()


def noop(request: Any) -> str:
    return "ok"


async def async_noop(request: Any) -> str:
    return "ok"


# --------------------------------------------------------------------------- scenarios


def scenario_http(runs: int, quick: bool) -> Results:
    seconds = 2 if quick else 5
    results: Results = {}
    with ceiling() as bare, instance() as (client, base):
        client.create_backend("noop", noop)
        client.create_endpoint("noop", backend="noop", route="/noop")
        client.create_backend("anoop", async_noop)
        client.create_endpoint("anoop", backend="anoop", route="/anoop")
        for url in (bare, f"{base}/noop", f"{base}/anoop"):
            wait_http(url)
            wrk(url, 32, 1)  # warm up
        for _ in range(runs):
            ceiling32, ceiling1 = wrk(bare, 32, seconds), wrk(bare, 1, seconds)
            results.setdefault("http.ceiling.rps32", []).append(ceiling32[0])
            for kind, path in (("sync", "noop"), ("async", "anoop")):
                at32, at1 = wrk(f"{base}/{path}", 32, seconds), wrk(f"{base}/{path}", 1, seconds)
                results.setdefault(f"http.{kind}.rps32", []).append(at32[0])
                results.setdefault(f"http.{kind}.ratio32", []).append(at32[0] / ceiling32[0])
                results.setdefault(f"http.{kind}.added_p50_ms", []).append(at1[1] - ceiling1[1])
    if have_granian():
        results.update(rsgi_ceiling(runs, seconds, results["http.sync.rps32"]))
    else:
        print("  (granian is not installed: the RSGI ceiling is skipped)")
    if not quick:
        ray_rps = ray_serve_rps(runs, seconds)
        if ray_rps:
            results["http.ray.rps32"] = ray_rps
            results["http.vs_ray32"] = [s / r for s, r in zip(results["http.sync.rps32"],
                                                              ray_rps, strict=True)]
    return results


def rsgi_ceiling(runs: int, seconds: float, sync_rps: List[float]) -> Results:
    """The no-op on bare granian (RSGI), and servekit's sync no-op as a share of it (the
    servekit runs measured before, in the same order)."""
    results: Results = {}
    with ceiling(serve_raw_rsgi) as bare:
        wrk(bare, 32, 1)  # warm up
        for run in range(runs):
            at32, at1 = wrk(bare, 32, seconds), wrk(bare, 1, seconds)
            results.setdefault("http.rsgi_ceiling.rps32", []).append(at32[0])
            results.setdefault("http.rsgi_ceiling.p50_ms", []).append(at1[1])
            results.setdefault("http.sync.vs_rsgi32", []).append(sync_rps[run] / at32[0])
    return results


def ray_serve_rps(runs: int, seconds: float) -> List[float]:
    """Ray Serve 2.x serving the same no-op, with access logs off and room for every
    connection (its fastest documented settings); [] when Ray Serve is not importable."""
    try:
        import ray
        from ray import serve as ray_serve
    except ImportError:
        print("  (Ray Serve is not installed: its column is skipped)")
        return []
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port},
                        logging_config={"enable_access_log": False, "log_level": "WARNING"})

        @ray_serve.deployment(max_ongoing_requests=256)
        class Noop:
            def __call__(self, request: Any) -> str:
                return "ok"

        ray_serve.run(Noop.bind(), route_prefix="/noop")
        url = f"http://127.0.0.1:{port}/noop"
        wait_http(url, 120)
        wrk(url, 32, 1)
        return [wrk(url, 32, seconds)[0] for _ in range(runs)]
    finally:
        ray_serve.shutdown()
        ray.shutdown()


def have_litserve() -> bool:
    try:
        import litserve  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def litserve_noop() -> Iterator[str]:
    """benchmarks/litserve_noop.py served in a session of its own (LitServe spawns its API
    server and worker processes), stopped with its whole process group; its URL. Its output
    is shown only if it fails to start (LitServe logs a traceback for every request whose
    connection wrk closes as it stops)."""
    port = free_port()
    directory = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen([sys.executable, "litserve_noop.py", str(port)],
                                   cwd=directory, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            try:
                wait_http(f"http://127.0.0.1:{port}/health", 120, process)
            except (RuntimeError, TimeoutError) as error:
                output.seek(0)
                said = output.read()[-4000:].decode(errors="replace")
                raise RuntimeError(f"LitServe did not start: {error}; it said:\n{said}") \
                    from error
            yield f"http://127.0.0.1:{port}/predict"
        finally:
            stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """Stop the process group ``process`` leads (started with ``start_new_session``):
    SIGTERM, then SIGKILL to whatever of the group is left after 10 s (none if it has
    exited)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def post_script(body: str, content_type: str) -> Iterator[str]:
    """A wrk script POSTing ``body`` (a Lua expression) as ``content_type``; its path."""
    directory = tempfile.mkdtemp(prefix="servekit-bench-")
    path = os.path.join(directory, "post.lua")
    with open(path, "w") as script:
        script.write(f'wrk.method = "POST"\nwrk.body = {body}\n'
                     f'wrk.headers["Content-Type"] = "{content_type}"\n')
    try:
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


_PEER_BODY = '{"input": 1}'


async def json_noop(request: Any) -> Dict[str, str]:
    """servekit's side of the peers' no-op: parse the JSON body, answer a small dict."""
    await request.json()
    return {"output": "ok"}


def check_json_noop(url: str) -> None:
    """Fail unless ``url`` answers the peers' POST as the no-op does (an error answered
    fast would pass for throughput)."""
    answer = httpx.post(url, content=_PEER_BODY, headers={"content-type": "application/json"},
                        timeout=30)
    if answer.status_code != 200 or answer.json() != {"output": "ok"}:
        raise RuntimeError(f"{url} answered the JSON no-op with {answer.status_code} "
                           f"{answer.text[:200]!r}, not 200 {{'output': 'ok'}}")


def scenario_peers(runs: int, quick: bool) -> Results:
    """servekit beside LitServe (benchmarks/litserve_noop.py: one API server, one worker,
    ``fast_queue``) on the same JSON POST, both up and measured in turn; skipped when
    LitServe is not installed. (Ray Serve's no-op is in the ``http`` scenario.)"""
    if not have_litserve():
        print("  peers: skipped (LitServe is not installed: pip install litserve==0.2.19)")
        return {}
    seconds = 2 if quick else 5
    results: Results = {}
    with post_script(f"'{_PEER_BODY}'", "application/json") as script, \
            litserve_noop() as peer, instance() as (client, base):
        client.create_backend("json", json_noop)
        client.create_endpoint("json", backend="json", route="/json", methods=["POST"])
        served = f"{base}/json"
        for url in (peer, served):
            check_json_noop(url)
            wrk(url, 32, 1, script)  # warm up
        for _ in range(runs):
            peer32, peer1 = wrk(peer, 32, seconds, script), wrk(peer, 1, seconds, script)
            at32, at1 = wrk(served, 32, seconds, script), wrk(served, 1, seconds, script)
            results.setdefault("peers.servekit_post_rps", []).append(at32[0])
            results.setdefault("peers.litserve_rps", []).append(peer32[0])
            results.setdefault("peers.servekit_over_litserve", []).append(at32[0] / peer32[0])
            results.setdefault("peers.servekit_post_p50_ms", []).append(at1[1])
            results.setdefault("peers.litserve_p50_ms", []).append(peer1[1])
    return results


# Rounds of pipelined handle calls a run takes the median of: one round's rate swings 3x on
# a shared 2-core machine (the caller's thread and the handle's loop share the GIL).
PIPELINED_ROUNDS = 5


def scenario_handles(runs: int, quick: bool) -> Results:
    calls = 2_000 if quick else 10_000
    results: Results = {}
    with instance(host=None) as (client, _):
        client.create_backend("noop", noop, config={"max_concurrent_queries": 1000})
        client.create_endpoint("noop", backend="noop")
        client.create_backend("anoop", async_noop)
        client.create_endpoint("anoop", backend="anoop")
        sync_handle = client.get_handle("noop")
        for _ in range(200):
            sync_handle.remote().result()

        def pipelined_sync() -> float:
            started = time.perf_counter()
            replies = [sync_handle.remote() for _ in range(calls)]
            for reply in replies:
                reply.result()
            return calls / (time.perf_counter() - started)

        async def pipelined_async() -> float:
            handle = client.get_handle("anoop", sync=False)
            for _ in range(200):
                await (await handle.remote())
            started = time.perf_counter()
            replies = [await handle.remote() for _ in range(calls)]
            await asyncio.gather(*replies)
            return calls / (time.perf_counter() - started)

        for _ in range(runs):
            samples = []
            for _ in range(calls // 4):
                started = time.perf_counter()
                sync_handle.remote().result()
                samples.append(time.perf_counter() - started)
            results.setdefault("handles.sync_seq_p50_us", []).append(
                statistics.median(samples) * 1e6)
            results.setdefault("handles.sync_pipelined", []).append(statistics.median(
                pipelined_sync() for _ in range(PIPELINED_ROUNDS)))
            results.setdefault("handles.async_pipelined", []).append(statistics.median(
                asyncio.run(pipelined_async()) for _ in range(PIPELINED_ROUNDS)))
    return results


def scenario_cold_start(runs: int, quick: bool) -> Results:
    """``serve.start()`` to the first answer of a new backend. The HTTP client is made
    before the clock starts: making one (httpx loads its CA bundle) takes a tenth of a
    second that is the client's, not the server's."""
    times = []
    for _ in range(runs):
        port = free_port()
        with httpx.Client(timeout=30) as http:
            started = time.perf_counter()
            client = serve.start(http_options={"host": "127.0.0.1", "port": port})
            try:
                client.create_backend("noop", noop)
                client.create_endpoint("noop", backend="noop", route="/noop")
                assert http.get(f"http://127.0.0.1:{port}/noop").text == "ok"
                times.append(time.perf_counter() - started)
            finally:
                client.shutdown()
    return {"cold_start_s": times}


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def scenario_rss(runs: int, quick: bool) -> Results:
    results: Results = {}
    for _ in range(runs):
        with instance() as (client, base):
            client.create_backend("noop", noop)
            client.create_endpoint("noop", backend="noop", route="/noop")
            wait_http(f"{base}/noop")
            time.sleep(0.5)  # idle: let start-up garbage settle before reading RSS
            for process in client._call("status")["processes"]:
                role = process["role"]
                if role in ("supervisor", "controller", "proxy", "replica"):
                    results.setdefault(f"rss.{role}_mb", []).append(_rss_mb(process["pid"]))
    return results


class BatchModel:
    """A batch-friendly numpy model (batch_route.forward: one pass costs the same for 1 to
    16 inputs, like a GPU kernel)."""

    def __init__(self) -> None:
        from batch_route import weights

        self.weights = weights()

    @serve.accept_batch
    def __call__(self, requests: List[Any]) -> List[float]:
        from batch_route import forward

        return forward(self.weights, [float(request.data) for request in requests])


def scenario_batching(runs: int, quick: bool) -> Results:
    calls = 500 if quick else 3_000
    results: Results = {}
    with blas_threads(1), instance(host=None) as (client, _):  # (see scenario_batch_route)
        for size in (1, 16):
            client.create_backend(f"model{size}", BatchModel, config={
                "max_batch_size": size, "batch_wait_timeout": 0.005,
                "max_concurrent_queries": 64})
            client.create_endpoint(f"model{size}", backend=f"model{size}")

        async def throughput(endpoint: str) -> float:
            handle = client.get_handle(endpoint, sync=False)
            await (await handle.remote(1.0))
            started = time.perf_counter()
            replies = [await handle.remote(float(i)) for i in range(calls)]
            await asyncio.gather(*replies)
            return calls / (time.perf_counter() - started)

        for _ in range(runs):
            one, sixteen = asyncio.run(throughput("model1")), asyncio.run(throughput("model16"))
            results.setdefault("batching.rps_batch1", []).append(one)
            results.setdefault("batching.rps_batch16", []).append(sixteen)
            results.setdefault("batching.speedup", []).append(sixteen / one)
    return results


@contextlib.contextmanager
def blas_threads(threads: int) -> Iterator[None]:
    """Processes started meanwhile (the replicas) run numpy's BLAS on ``threads`` threads."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update({name: str(threads) for name in names})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def scenario_batch_route(runs: int, quick: bool) -> Results:
    """The numpy model behind a FastAPI route: a pass per request, ``@serve.batch`` of 16,
    and the 1.x backend-wide batching of 16 at a plain route (benchmarks/batch_route.py)."""
    seconds = 2 if quick else 5  # per measurement, 32 connections (wrk)
    results: Results = {}
    # One BLAS thread per pass: passes of concurrent requests must not oversubscribe the
    # cores (OpenBLAS's spinning threads made a pass 20x slower on 2 busy cores).
    with blas_threads(1), instance() as (client, base):
        client.create_backend("route", "batch_route:RouteModel")
        client.create_endpoint("route", backend="route", route="/model")
        client.create_backend("backend16", "batch_route:BackendWideModel", config={
            "max_batch_size": 16, "batch_wait_timeout": 0.005, "max_concurrent_queries": 64})
        client.create_endpoint("backend16", backend="backend16", route="/backend16")
        urls = [f"{base}/model/unbatched/1", f"{base}/model/batched/1",
                f"{base}/backend16?x=1"]
        for url in urls:
            wrk(url, 32, 1)  # warm up
        for _ in range(runs):
            unbatched, batched, backend = (wrk(url, 32, seconds)[0] for url in urls)
            results.setdefault("batch_route.rps_unbatched", []).append(unbatched)
            results.setdefault("batch_route.rps_batch16", []).append(batched)
            results.setdefault("batch_route.speedup", []).append(batched / unbatched)
            results.setdefault("batch_route.rps_backend16", []).append(backend)
    return results


def _proxies_field() -> Optional[str]:
    fields = serve.HTTPOptions.model_fields
    return next((name for name in ("num_proxies", "proxies_per_node") if name in fields), None)


def scenario_proxies(runs: int, quick: bool) -> Results:
    field = _proxies_field()
    if field is None:
        print("  proxies: n/a (HTTPOptions has no option for several proxies per node)")
        return {}
    seconds = 2 if quick else 5
    results: Results = {}
    for count in (1, 2):
        with instance(**{field: count}) as (client, base):
            client.create_backend("anoop", async_noop, config={"num_replicas": 2})
            client.create_endpoint("anoop", backend="anoop", route="/anoop")
            wait_http(f"{base}/anoop")
            wrk(f"{base}/anoop", 32, 1)
            results[f"proxies.rps_{count}"] = [wrk(f"{base}/anoop", 32, seconds)[0]
                                              for _ in range(runs)]
    return results


def scenario_scale(runs: int, quick: bool) -> Results:
    endpoints, replicas = (100, 10) if quick else (1_000, int(os.environ.get(
        "SERVEKIT_BENCH_REPLICAS", "200")))
    seconds = 2 if quick else 5
    results: Results = {}
    with instance() as (client, base):
        client.create_backend("anoop", async_noop)
        client.create_endpoint("e0", backend="anoop", route="/e0")
        wait_http(f"{base}/e0")
        wrk(f"{base}/e0", 1, 1)
        small = [wrk(f"{base}/e0", 1, seconds)[1] for _ in range(runs)]
        started = time.perf_counter()
        for i in range(1, endpoints):
            client.create_endpoint(f"e{i}", backend="anoop", route=f"/e{i}")
        results["scale.create_endpoints_s"] = [time.perf_counter() - started]
        big = [wrk(f"{base}/e0", 1, seconds)[1] for _ in range(runs)]
        results["scale.p50_ratio"] = [b / s for b, s in zip(big, small, strict=True)]
        updates = []
        for i in range(runs):
            started = time.perf_counter()
            client.create_endpoint(f"new{i}", backend="anoop", route=f"/new{i}")
            wait_http(f"{base}/new{i}")
            updates.append((time.perf_counter() - started) * 1e3)
        results["scale.route_update_ms"] = updates
        started = time.perf_counter()
        client.create_backend("many", noop, config={"num_replicas": replicas})
        results["scale.create_replicas_s"] = [time.perf_counter() - started]
    print(f"  scale: {endpoints} endpoints, {replicas} replicas "
          "(SERVEKIT_BENCH_REPLICAS sets the replica count of a full run)")
    return results


def scenario_transport(runs: int, quick: bool) -> Results:
    """What TLS costs the data plane: servekit's RPC transport echoing 1 KB, client and
    server on one event loop, over a Unix socket (embedded) and over TCP in mutual TLS with
    the instance's certificate (the Ray runtime between nodes)."""
    from servekit._private.wire import auth
    from servekit._private.wire.transport import RpcClient, RpcServer, tcp_address

    calls = 2_000 if quick else 20_000
    payload = b"x" * 1024
    auth.set_secret(auth.new_secret())

    async def echo(value: bytes) -> bytes:
        return value

    async def measure(sock: socket.socket, address: str) -> Tuple[float, float]:
        server = RpcServer({"echo": echo})
        await server.start(sock)
        client = await RpcClient.connect(address)
        try:
            samples = []
            for _ in range(calls // 4):
                started = time.perf_counter()
                await client.call("echo", payload)
                samples.append(time.perf_counter() - started)
            started = time.perf_counter()
            for first in range(0, calls, 1000):
                await asyncio.gather(*(client.call("echo", payload)
                                       for _ in range(min(1000, calls - first))))
            return statistics.median(samples) * 1e6, calls / (time.perf_counter() - started)
        finally:
            client.close()
            server.close()

    results: Results = {}
    directory = tempfile.mkdtemp(prefix="servekit-bench-")
    try:
        for run in range(runs):
            unix = socket.socket(socket.AF_UNIX)
            path = os.path.join(directory, f"echo-{run}.sock")
            unix.bind(path)
            unix.listen()
            tcp = socket.socket()
            tcp.bind(("127.0.0.1", 0))
            tcp.listen()
            for name, sock, address in (("unix", unix, path),
                                        ("tls", tcp, tcp_address(*tcp.getsockname()[:2]))):
                p50, rps = asyncio.run(measure(sock, address))
                results.setdefault(f"transport.{name}_seq_p50_us", []).append(p50)
                results.setdefault(f"transport.{name}_rps", []).append(rps)
                sock.close()
            results.setdefault("transport.tls_cost", []).append(
                results["transport.unix_rps"][-1] / results["transport.tls_rps"][-1])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return results


def scenario_asgi(runs: int, quick: bool) -> Results:
    """A FastAPI app served by servekit (passed through to the replica) beside the same app
    on bare uvicorn in one process, the floor of what serving it can cost."""
    seconds = 2 if quick else 5
    results: Results = {}
    with ceiling(serve_fastapi, "/ping/1") as bare, instance() as (client, base):
        client.create_backend("ping", "fastapi_ping:app")
        client.create_endpoint("ping", backend="ping", route="/api")
        served = f"{base}/api/ping/1"
        for url in (bare, served):
            wait_http(url)
            wrk(url, 32, 1)  # warm up
        echoes = 200 if quick else 2000
        for _ in range(runs):
            bare32, bare1 = wrk(bare, 32, seconds), wrk(bare, 1, seconds)
            at32, at1 = wrk(served, 32, seconds), wrk(served, 1, seconds)
            results.setdefault("asgi.bare.rps32", []).append(bare32[0])
            results.setdefault("asgi.servekit.rps32", []).append(at32[0])
            results.setdefault("asgi.ratio32", []).append(at32[0] / bare32[0])
            results.setdefault("asgi.added_p50_ms", []).append(at1[1] - bare1[1])
            for name, url in (("bare", bare.replace("/ping/1", "/echo")),
                              ("servekit", f"{base}/api/echo")):
                results.setdefault(f"asgi.ws.{name}_p50_us", []).append(
                    websocket_echo_p50_us(url.replace("http://", "ws://"), echoes))
    return results


def chunks(request: Any) -> Any:
    """100 chunks of 1 KiB, streamed."""
    from starlette.responses import StreamingResponse

    def body() -> Iterator[bytes]:
        for _ in range(100):
            yield b"x" * 1024

    return StreamingResponse(body(), media_type="application/octet-stream")


async def body_size(request: Any) -> str:
    return str(len(await request.body()))


_UPLOAD_BYTES = 1024 * 1024


def scenario_bodies(runs: int, quick: bool) -> Results:
    """Streaming both ways through the proxy: a response streamed in 100 chunks, and 1 MiB
    request bodies (read by the proxy, sent to the replica whole)."""
    seconds = 2 if quick else 5
    results: Results = {}
    with post_script(f'string.rep("x", {_UPLOAD_BYTES})', "application/octet-stream") \
            as upload, instance() as (client, base):
        client.create_backend("chunks", chunks)
        client.create_endpoint("chunks", backend="chunks", route="/chunks")
        client.create_backend("size", body_size)
        client.create_endpoint("size", backend="size", route="/size", methods=["POST"])
        wait_http(f"{base}/chunks")
        wrk(f"{base}/chunks", 8, 1)
        wrk(f"{base}/size", 8, 1, upload)
        for _ in range(runs):
            results.setdefault("bodies.stream_rps8", []).append(
                wrk(f"{base}/chunks", 8, seconds)[0])
            rps = wrk(f"{base}/size", 8, seconds, upload)[0]
            results.setdefault("bodies.upload_rps8", []).append(rps)
            results.setdefault("bodies.upload_mb_s", []).append(rps * _UPLOAD_BYTES / 1e6)
    return results


def websocket_echo_p50_us(url: str, echoes: int) -> float:
    """The median round trip, in microseconds, of ``echoes`` messages over one WebSocket."""
    from websockets.sync.client import connect

    samples = []
    with connect(url) as websocket:
        for i in range(echoes + 50):
            started = time.perf_counter()
            websocket.send(str(i))
            websocket.recv()
            if i >= 50:  # (the first ones warm up)
                samples.append((time.perf_counter() - started) * 1e6)
    return statistics.median(samples)


def _echo_bytes(end: Any, rounds: int) -> None:
    """The other process of ``scenario_floor``: send back each message."""
    for _ in range(rounds):
        end.send_bytes(end.recv_bytes())


def _echo_items(there: Any, back: Any, rounds: int) -> None:
    """The other thread of ``scenario_floor``: send back each item."""
    for _ in range(rounds):
        back.put(there.get())


def scenario_floor(runs: int, quick: bool) -> Results:
    """What the machine charges for a wake-up, whatever the code: the p50 round trip of a
    byte between two processes (the proxy and its replica; the wire adds framing and an
    event loop) and of an item between two threads (a replica's loop and its sync lane, a
    sync handle's caller and its loop). A request path pays one per hop, so the latency
    targets are read against these."""
    import queue
    import threading

    rounds = 5_000 if quick else 20_000
    results: Results = {}
    for _ in range(runs):
        here, there = multiprocessing.Pipe()
        echo = multiprocessing.get_context("spawn").Process(
            target=_echo_bytes, args=(there, rounds), daemon=True)
        echo.start()
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            here.send_bytes(b"x")
            here.recv_bytes()
            samples.append(time.perf_counter() - started)
        echo.join(10)
        results.setdefault("floor.process_rtt_us", []).append(
            statistics.median(samples[rounds // 10:]) * 1e6)
        there_q: "queue.SimpleQueue[int]" = queue.SimpleQueue()
        back_q: "queue.SimpleQueue[int]" = queue.SimpleQueue()
        thread = threading.Thread(target=_echo_items, args=(there_q, back_q, rounds),
                                  daemon=True)
        thread.start()
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            there_q.put(1)
            back_q.get()
            samples.append(time.perf_counter() - started)
        thread.join(10)
        results.setdefault("floor.thread_rtt_us", []).append(
            statistics.median(samples[rounds // 10:]) * 1e6)
    return results


SCENARIOS: Dict[str, Callable[[int, bool], Results]] = {
    "http": scenario_http, "handles": scenario_handles, "cold_start": scenario_cold_start,
    "rss": scenario_rss, "batching": scenario_batching, "batch_route": scenario_batch_route,
    "proxies": scenario_proxies,
    "scale": scenario_scale, "transport": scenario_transport, "asgi": scenario_asgi,
    "bodies": scenario_bodies, "peers": scenario_peers, "floor": scenario_floor,
}
NEEDS_WRK = {"http", "batch_route", "proxies", "scale", "asgi", "bodies", "peers"}


# --------------------------------------------------------------------------- reporting


def verdict(metric: str, value: float) -> str:
    _, target, direction, _ = METRICS[metric]
    if target is None:
        return ""
    passed = value >= target if direction == "min" else value <= target
    return "PASS" if passed else "MISS"


Row = Tuple[str, float, float, float, str, str, str, str]


def rows(results: Results) -> Iterator[Row]:
    """Each measured metric, in METRICS' order: name, median, min, max, unit, target,
    verdict, what it is."""
    for metric, (unit, target, direction, what) in METRICS.items():
        values = results.get(metric)
        if not values:
            continue
        median = statistics.median(values)
        wanted = "" if target is None else f"{'>=' if direction == 'min' else '<='}{target:g}"
        yield (metric, median, min(values), max(values), unit, wanted, verdict(metric, median),
               what)


def table(results: Results) -> str:
    lines = [f"{'metric':32} {'median':>11} {'min':>11} {'max':>11} {'unit':7} "
             f"{'target':>10}  verdict  what"]
    for metric, median, low, high, unit, wanted, passed, what in rows(results):
        lines.append(f"{metric:32} {median:11.3f} {low:11.3f} {high:11.3f} "
                     f"{unit:7} {wanted:>10}  {passed:7}  {what}")
    return "\n".join(lines)


# The section of RESULTS.md that --results-md rewrites lies between these two lines.
LATEST_BEGIN = "<!-- latest figures: written by benchmarks/suite.py --results-md -->"
LATEST_END = "<!-- end of the latest figures -->"


def figure(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def latest_figures(results: Results, command: str, when: str, at: str, machine: str) -> str:
    """The latest-figures section of RESULTS.md: how, when, at which commit and where the
    run was made, then its table in Markdown."""
    how = textwrap.fill(
        f"Written by `{command}` on {when} at commit {at}; {machine}. Medians of the runs "
        "with their min and max; the targets are issue 14's and 26's. A shared machine is "
        "noisy: read the ratios, measured in this one run. Earlier measurements, with what "
        "they showed, follow as history.", 92, break_long_words=False, break_on_hyphens=False)
    lines = ["## Latest figures", "", how, "",
             "| metric | median | min | max | unit | target | verdict | what |",
             "|---|---:|---:|---:|---|---|---|---|"]
    for metric, median, low, high, unit, wanted, passed, what in rows(results):
        lines.append(f"| {metric} | {figure(median)} | {figure(low)} | {figure(high)} | "
                     f"{unit} | {wanted} | {passed} | {what} |")
    return "\n".join(lines)


def replace_latest(text: str, section: str, path: str) -> str:
    """``text`` with what lies between its LATEST_BEGIN and LATEST_END lines replaced by
    ``section``; the rest of it as it was."""
    begin, end = text.find(LATEST_BEGIN), text.find(LATEST_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{path} has no latest-figures section to replace: add the lines "
                         f"{LATEST_BEGIN!r} and {LATEST_END!r} (in that order) where it goes")
    return f"{text[:begin + len(LATEST_BEGIN)]}\n{section}\n{text[end:]}"


def write_latest(path: str, section: str) -> None:
    with open(path) as markdown:
        text = markdown.read()
    text = replace_latest(text, section, path)
    with open(path, "w") as markdown:
        markdown.write(text)


def machine() -> str:
    """The machine of a run, as RESULTS.md describes it."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                      if line.startswith("model name")), "")
    return (f"{os.cpu_count()} cores{f' ({model})' if model else ''}, "
            f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
            f"load average {os.getloadavg()[0]:.1f} at the end")


def compare(before_path: str, after_path: str) -> str:
    with open(before_path) as before_file, open(after_path) as after_file:
        before, after = json.load(before_file)["results"], json.load(after_file)["results"]
    lines = [f"{'metric':32} {'before':>11} {'after':>11} {'after/before':>13}"]
    for metric in METRICS:
        if metric in before and metric in after:
            b, a = statistics.median(before[metric]), statistics.median(after[metric])
            lines.append(f"{metric:32} {b:11.3f} {a:11.3f} {a / b if b else float('nan'):13.3f}")
    return "\n".join(lines)


def git(*args: str) -> Optional[str]:
    """What ``git args`` prints in this checkout; None without git or a checkout."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def commit() -> str:
    return git("rev-parse", "--short", "HEAD") or "unknown"


def measured_at() -> str:
    """The commit, and whether the code measured had changes in no commit yet."""
    changed = git("status", "--porcelain", "--", ":/src", ":/benchmarks")
    return f"{commit()}{' plus uncommitted changes to src/ or benchmarks/' if changed else ''}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per scenario")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per scenario (default 3, or 1 with --quick)")
    parser.add_argument("--only", default="", help="comma-separated scenarios: "
                        + ", ".join(SCENARIOS))
    parser.add_argument("--json", dest="json_path", help="write the results here")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="compare two --json files and exit")
    parser.add_argument("--server", choices=("uvicorn", "granian"), default=None,
                        help="the proxies' HTTP server (default: HTTPOptions' default)")
    parser.add_argument("--results-md", metavar="PATH", help="replace the latest figures of "
                        "this file (benchmarks/RESULTS.md) with this run's table, date, "
                        "commit and machine")
    args = parser.parse_args(argv)
    global SERVER
    SERVER = args.server
    if args.compare:
        print(compare(*args.compare))
        return 0
    if args.results_md:  # (a file that cannot take the figures fails now, not after the run)
        try:
            with open(args.results_md) as markdown:
                replace_latest(markdown.read(), "", args.results_md)
        except (OSError, ValueError) as error:
            parser.error(f"--results-md: {error}")
    names = [name for name in args.only.split(",") if name] or list(SCENARIOS)
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    runs = args.runs or (1 if args.quick else 3)
    results: Results = {}
    have_wrk = shutil.which("wrk") is not None
    for name in names:
        if name in NEEDS_WRK and not have_wrk:
            print(f"  {name}: skipped (wrk is not installed: apt-get install wrk)")
            continue
        print(f"running {name} ...", flush=True)
        started = time.perf_counter()
        results.update(SCENARIOS[name](runs, args.quick))
        print(f"  {name}: {time.perf_counter() - started:.1f}s", flush=True)
    server = SERVER or serve.HTTPOptions().server
    print(f"\nservekit benchmarks at {commit()}, {os.cpu_count()} cores, "
          f"{'quick' if args.quick else 'full'}, {runs} run(s) each, proxies on {server}\n")
    print(table(results))
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump({"commit": commit(), "quick": args.quick, "runs": runs, "server": server,
                       "cpus": os.cpu_count(), "results": results}, out, indent=1)
    if args.results_md and not results:
        print(f"\nnothing was measured: {args.results_md} is left as it was")
    elif args.results_md:
        command = shlex.join(["python", "benchmarks/suite.py",
                              *(sys.argv[1:] if argv is None else argv)])
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        mode = f"{'quick' if args.quick else 'full'}, {runs} run(s) each, proxies on {server}"
        write_latest(args.results_md, latest_figures(results, command, when, measured_at(),
                                                     f"{machine()}; {mode}"))
        print(f"\nthe latest figures of {args.results_md} are this run's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
