"""Per-request latency of servekit embedded, servekit on Ray, and Ray Serve itself.

Runs a no-op backend on each system in turn and measures, with sequential requests (after a
warm-up), over HTTP on one keep-alive connection and through a handle:
  - servekit embedded (Ray not initialized);
  - servekit on the Ray runtime (after ``ray.init``: servekit picks Ray by itself);
  - Ray Serve 2.x (``ray.serve``), on the same Ray instance.
Prints a markdown table of medians and p99 in microseconds, and the ratios of Ray Serve's
medians to servekit-on-Ray's. Needs ``pip install "ray[serve]"``. Only talks to 127.0.0.1;
gives up (and still shuts everything down) after --budget seconds.
Usage: python benchmarks/ray_runtimes.py [--requests 2000] [--budget 780]
"""

from __future__ import annotations

import _thread
import argparse
import logging
import os
import statistics
import threading
import time
from typing import Callable, Dict, List, Optional

from http_overhead import _free_port, _time_http, _wait_http, noop

import servekit as serve

WARMUP = 50
TIMEOUT_S = 30.0  # for any one request
QUIET = {"log_level": "WARNING", "enable_access_log": False}


def _time_calls(call: Callable[[], object], n: int) -> List[float]:
    samples = []
    for _ in range(WARMUP):
        call()
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def _servekit(n: int, on_ray: bool) -> Dict[str, List[float]]:
    """Both scenarios on servekit, on the runtime ``serve.start`` picks (Ray if initialized)."""
    port = _free_port()
    client = serve.start(http_options={"port": port})
    try:
        if on_ray:  # make sure servekit did pick the Ray runtime: its controller is an actor
            import ray

            ray.get_actor("servekit-controller", namespace="servekit")
        client.create_backend("noop", noop)
        client.create_endpoint("noop", backend="noop", route="/noop")
        url = f"http://127.0.0.1:{port}/noop"
        _wait_http(url)
        handle = client.get_handle("noop")
        return {"http": _time_http(url, n),
                "handle": _time_calls(lambda: handle.remote().result(TIMEOUT_S), n)}
    finally:
        client.shutdown()


def _ray_serve(n: int) -> Dict[str, List[float]]:
    """Both scenarios on Ray Serve 2.x; Ray must be initialized."""
    from ray import serve as ray_serve
    from starlette.requests import Request

    @ray_serve.deployment(logging_config=QUIET)
    class Noop:
        def __call__(self, request: Optional[Request] = None) -> str:
            return "ok"

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's own messages
    port = _free_port()
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
    try:
        handle = ray_serve.run(Noop.bind(), name="noop", route_prefix="/noop",
                               logging_config=QUIET)
        url = f"http://127.0.0.1:{port}/noop"
        _wait_http(url)
        return {"http": _time_http(url, n),
                "handle": _time_calls(lambda: handle.remote().result(timeout_s=TIMEOUT_S), n)}
    finally:
        ray_serve.shutdown()


def _stats(samples: List[float]) -> tuple:
    samples = sorted(samples)
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def _print_table(rows: Dict[str, Dict[str, List[float]]]) -> None:
    print("| system | HTTP median µs | HTTP p99 µs | handle median µs | handle p99 µs |")
    print("|---|---:|---:|---:|---:|")
    for name, results in rows.items():
        http_median, http_p99 = _stats(results["http"])
        handle_median, handle_p99 = _stats(results["handle"])
        print(f"| {name} | {http_median * 1e6:.0f} | {http_p99 * 1e6:.0f} "
              f"| {handle_median * 1e6:.0f} | {handle_p99 * 1e6:.0f} |")
    ours, theirs = rows.get("servekit on Ray"), rows.get("Ray Serve")
    if ours and theirs:
        ratios = [statistics.median(theirs[kind]) / statistics.median(ours[kind])
                  for kind in ("http", "handle")]
        print(f"\nRay Serve / servekit on Ray, median: HTTP {ratios[0]:.2f}x, "
              f"handle {ratios[1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--budget", type=float, default=780.0,
                        help="seconds after which the run stops (cleaning up)")
    args = parser.parse_args()
    n = args.requests

    # Past the budget, raise KeyboardInterrupt in the main thread: the finally blocks still
    # shut down what was started.
    watchdog = threading.Timer(args.budget, _thread.interrupt_main)
    watchdog.daemon = True
    watchdog.start()
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")  # inherited by Ray's workers

    import ray

    rows: Dict[str, Dict[str, List[float]]] = {}
    try:
        rows["servekit embedded"] = _servekit(n, on_ray=False)
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
        try:
            rows["servekit on Ray"] = _servekit(n, on_ray=True)
            rows["Ray Serve"] = _ray_serve(n)
        finally:
            ray.shutdown()
    finally:
        watchdog.cancel()
        if rows:
            _print_table(rows)


if __name__ == "__main__":
    main()
