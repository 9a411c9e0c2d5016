"""Overload: what a backend does with four times the load it can serve.

A backend that takes 10 ms per request with ``max_concurrent_queries`` of 1 serves about
100 requests/s. Requests arrive at a fixed rate (open loop, like real users, who do not wait
for each other): first at that capacity, then at four times it. Prints, per phase, the
accepted requests per second, their median and p99 latency, how many were shed with 503, and
the proxy's memory; then the ratio of accepted throughput under overload to the peak.
Usage: python benchmarks/overload.py [--seconds 5] [--capacity 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Dict, List

import httpx
from http_overhead import _free_port, _wait_http

import servekit as serve

SERVICE_TIME_S = 0.01


async def slow(request: object) -> str:
    await asyncio.sleep(SERVICE_TIME_S)
    return "ok"


def _proxy_rss_mib(client: serve.Client) -> float:
    [proxy] = [p for p in client._call("status")["processes"] if p["role"] == "proxy"]
    with open(f"/proc/{proxy['pid']}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def _phase(url: str, rate: float, seconds: float) -> Dict[str, List[float]]:
    """Send ``rate`` requests per second for ``seconds``; latencies of the 200s, and the
    count of 503s (each in a list, for one shape)."""
    accepted: List[float] = []
    shed: List[float] = []
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as session:
        async def one() -> None:
            start = time.perf_counter()
            response = await session.get(url)
            took = time.perf_counter() - start
            (accepted if response.status_code == 200 else shed).append(took)

        tasks = []
        begin = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
    return {"accepted": accepted, "shed": shed, "elapsed": [elapsed]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--capacity", type=float, default=100.0,
                        help="requests/s the backend serves (1 / service time)")
    args = parser.parse_args()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/slow"
    client = serve.start(http_options={"port": port})
    try:
        client.create_backend("slow", slow, config={"max_concurrent_queries": 1,
                                                    "max_queued_requests": 10})
        client.create_endpoint("slow", backend="slow", route="/slow")
        _wait_http(url)
        rows = []
        for name, factor in (("at capacity", 1.0), ("4x capacity", 4.0)):
            before = _proxy_rss_mib(client)
            result = asyncio.run(_phase(url, args.capacity * factor, args.seconds))
            latencies = sorted(result["accepted"])
            rows.append((name, args.capacity * factor, len(latencies) / result["elapsed"][0],
                         statistics.median(latencies) * 1e3,
                         latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1e3,
                         len(result["shed"]), before, _proxy_rss_mib(client)))
    finally:
        client.shutdown()
    print("| phase | offered req/s | accepted req/s | median ms | p99 ms | shed (503) "
          "| proxy RSS before → after MiB |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, offered, accepted, median, p99, shed, before, after in rows:
        print(f"| {name} | {offered:.0f} | {accepted:.0f} | {median:.1f} | {p99:.1f} | {shed} "
              f"| {before:.0f} → {after:.0f} |")
    print(f"\naccepted throughput under 4x load / at capacity: {rows[1][2] / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
