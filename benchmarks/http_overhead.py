"""How much latency servekit adds on top of the model, over HTTP and through handles.

Runs a no-op backend and measures, with sequential requests on one keep-alive connection:
  - a bare uvicorn app (uvloop + httptools) returning the same body: the HTTP floor;
  - servekit over HTTP (proxy -> replica -> proxy);
  - servekit through a sync handle.
Prints medians and p99 in microseconds and the overhead ratio against the bare app.
Usage: python benchmarks/http_overhead.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import httpx
from suite import free_port, serve_raw_asgi  # (benchmarks/ is on the path of a script run from it)

import servekit as serve


def noop(request: object) -> str:
    return "ok"


def _time_http(url: str, n: int) -> list:
    samples = []
    with httpx.Client() as client:
        for _ in range(50):
            client.get(url)
        for _ in range(n):
            start = time.perf_counter()
            response = client.get(url)
            samples.append(time.perf_counter() - start)
            assert response.text == "ok"
    return samples


def _time_handle(handle: serve.ServeSyncHandle, n: int) -> list:
    samples = []
    for _ in range(50):
        handle.remote().result()
    for _ in range(n):
        start = time.perf_counter()
        handle.remote().result()
        samples.append(time.perf_counter() - start)
    return samples


def _wait_http(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    n = parser.parse_args().requests

    bare_port = free_port()
    bare = multiprocessing.get_context("spawn").Process(target=serve_raw_asgi, args=(bare_port,))
    bare.start()
    try:
        _wait_http(f"http://127.0.0.1:{bare_port}/")
        rows = [("bare uvicorn app", _time_http(f"http://127.0.0.1:{bare_port}/", n))]
    finally:
        bare.terminate()
        bare.join()

    port = free_port()
    client = serve.start(http_options={"port": port})
    try:
        client.create_backend("noop", noop)
        client.create_endpoint("noop", backend="noop", route="/noop")
        rows.append(("servekit HTTP", _time_http(f"http://127.0.0.1:{port}/noop", n)))
        rows.append(("servekit sync handle", _time_handle(client.get_handle("noop"), n)))
    finally:
        client.shutdown()

    floor = statistics.median(rows[0][1])
    print(f"{'path':<24}{'median us':>12}{'p99 us':>10}{'vs bare':>10}")
    for name, samples in rows:
        samples.sort()
        median = statistics.median(samples)
        p99 = samples[int(len(samples) * 0.99) - 1]
        print(f"{name:<24}{median * 1e6:>12.0f}{p99 * 1e6:>10.0f}{median / floor:>9.2f}x")


if __name__ == "__main__":
    main()
