"""Autoscaling: how the replicas of a backend follow a load profile, and what clients see.

A backend whose requests each take 50 ms (a sync ``time.sleep``; two at a time per replica,
so at ``target_ongoing_requests=2`` a request is never queued) is autoscaled between 0 and 6
replicas with short delays. Offered load is a number of closed-loop HTTP clients (each sends
a request, waits for its answer, sends the next) against 127.0.0.1, following a profile:
warm, ramp (rising clients), step (a sudden jump), hold, ease (a partial drop, so replicas
leave under traffic), drop (to zero: scale down, then to zero), burst (from zero), end.

Every ``--interval`` seconds it samples the offered load, the running and target replicas
(from ``status``), and the requests that finished since the last sample (throughput, p50,
p99, errors: any answer but 200). At the end it prints a table, per-phase reactions, every
scaling decision with its reason, and a summary (reaction times, most replicas, failed
requests: there should be none), and saves a plot of load, replicas and latency against time.

    python benchmarks/autoscaling.py                  # full profile, about 2.5 minutes
    python benchmarks/autoscaling.py --quick          # about 40 s
    python benchmarks/autoscaling.py --plot /tmp/a.png --json /tmp/a.json

Needs ``pip install -e ".[bench]"`` (matplotlib, httpx). Numbers are never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import httpx
from suite import free_port  # (benchmarks/ is on the path of a script run from it)

import servekit as serve

SERVICE_TIME_S = 0.05
PER_REPLICA = 2  # requests one replica runs at once: its sync threads and its query cap
BACKEND = "sleeper"
ROUTE = "/sleep"
DEFAULT_PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "autoscaling.png")

Record = Tuple[float, float, str]  # (finished at s since start, latency s, outcome)


@dataclasses.dataclass(frozen=True)
class Phase:
    """``seconds`` of load going linearly from ``clients_from`` to ``clients_to`` clients."""

    name: str
    seconds: float
    clients_from: int
    clients_to: int


@dataclasses.dataclass(frozen=True)
class Profile:
    """A load profile and the autoscaling config it runs against."""

    phases: Tuple[Phase, ...]
    autoscaling: Dict[str, Any]

    def starts(self) -> List[float]:
        """The start of each phase, in seconds since the profile began."""
        return [sum(p.seconds for p in self.phases[:i]) for i in range(len(self.phases))]

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    def at(self, t: float) -> Tuple[str, int]:
        """The phase and the number of clients at ``t`` seconds."""
        for phase, start in zip(self.phases, self.starts(), strict=True):
            if t < start + phase.seconds:
                share = (t - start) / phase.seconds
                return phase.name, round(phase.clients_from
                                         + share * (phase.clients_to - phase.clients_from))
        return self.phases[-1].name, self.phases[-1].clients_to


FULL = Profile(
    phases=(Phase("warm", 10, 2, 2), Phase("ramp", 30, 2, 8), Phase("step", 12, 12, 12),
            Phase("hold", 18, 12, 12), Phase("ease", 20, 4, 4), Phase("drop", 35, 0, 0),
            Phase("burst", 20, 10, 10), Phase("end", 5, 0, 0)),
    autoscaling={"min_replicas": 0, "max_replicas": 6, "initial_replicas": 1,
                 "target_ongoing_requests": PER_REPLICA, "upscale_delay_s": 3,
                 "downscale_delay_s": 10, "downscale_to_zero_delay_s": 20,
                 "look_back_period_s": 3, "metrics_interval_s": 0.5})

QUICK = Profile(
    phases=(Phase("warm", 3, 2, 2), Phase("ramp", 6, 2, 6), Phase("step", 4, 12, 12),
            Phase("hold", 4, 12, 12), Phase("ease", 5, 4, 4), Phase("drop", 10, 0, 0),
            Phase("burst", 5, 8, 8), Phase("end", 2, 0, 0)),
    autoscaling={"min_replicas": 0, "max_replicas": 6, "initial_replicas": 1,
                 "target_ongoing_requests": PER_REPLICA, "upscale_delay_s": 1,
                 "downscale_delay_s": 3, "downscale_to_zero_delay_s": 6,
                 "look_back_period_s": 1.5, "metrics_interval_s": 0.25})


def sleeper(request: Any) -> str:
    """The model: a fixed service time that holds its thread, as inference would."""
    time.sleep(SERVICE_TIME_S)
    return "ok"


# --------------------------------------------------------------------------- load


class ClosedLoop:
    """Closed-loop HTTP clients; ``set_clients`` changes how many. A client told to leave
    finishes the request it has in flight (nothing is cancelled)."""

    def __init__(self, session: httpx.AsyncClient, url: str, start: float) -> None:
        self.clients = 0
        self.records: List[Record] = []
        self._session = session
        self._url = url
        self._start = start
        self._workers: Dict[int, asyncio.Task] = {}

    def set_clients(self, clients: int) -> None:
        self.clients = clients
        for index in range(clients):
            worker = self._workers.get(index)
            if worker is None or worker.done():
                self._workers[index] = asyncio.ensure_future(self._client(index))

    async def stop(self) -> None:
        """Let every client finish its request, then leave."""
        self.clients = 0
        await asyncio.gather(*self._workers.values())

    async def _client(self, index: int) -> None:
        while index < self.clients:
            began = time.monotonic()
            try:
                outcome = str((await self._session.get(self._url)).status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            done = time.monotonic()
            self.records.append((done - self._start, done - began, outcome))


async def sample_forever(client: serve.Client, load: ClosedLoop, profile: Profile,
                         start: float, interval: float, samples: List[Dict[str, Any]]) -> None:
    """Append a sample of load and replicas to ``samples`` every ``interval`` seconds."""
    for tick in range(1, math.ceil(profile.seconds / interval) + 1):
        await asyncio.sleep(max(0.0, start + tick * interval - time.monotonic()))
        status = await asyncio.to_thread(client._call, "status")
        backend = status["backends"][BACKEND]
        t = time.monotonic() - start
        samples.append({"t": round(t, 3), "phase": profile.at(t)[0], "offered": load.clients,
                        "running": backend["running"], "target": backend["target"],
                        "reason": backend["autoscaling"]})


async def drive(client: serve.Client, url: str, profile: Profile,
                interval: float) -> Tuple[List[Dict[str, Any]], List[Record]]:
    """Run the profile against ``url``; the samples and every request's record."""
    samples: List[Dict[str, Any]] = []
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as session:
        start = time.monotonic()
        load = ClosedLoop(session, url, start)
        sampler = asyncio.ensure_future(
            sample_forever(client, load, profile, start, interval, samples))
        try:
            while (t := time.monotonic() - start) < profile.seconds:
                load.set_clients(profile.at(t)[1])
                await asyncio.sleep(0.05)
            await sampler
        finally:
            sampler.cancel()
            await load.stop()
    return samples, load.records


# --------------------------------------------------------------------------- statistics


def percentile(values: List[float], q: float) -> Optional[float]:
    """The nearest-rank ``q`` quantile (0..1) of ``values``; None if there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def window(records: List[Record], begin: float, end: float) -> Dict[str, Any]:
    """Throughput, p50 and p99 (ms) of the successes and the errors among the requests
    that finished in (begin, end]."""
    inside = [r for r in records if begin < r[0] <= end]
    ok = [latency for _, latency, outcome in inside if outcome == "200"]
    p50, p99 = percentile(ok, 0.5), percentile(ok, 0.99)
    return {"completed": len(inside), "rps": round(len(inside) / (end - begin), 1),
            "p50_ms": None if p50 is None else round(p50 * 1e3, 1),
            "p99_ms": None if p99 is None else round(p99 * 1e3, 1),
            "errors": len(inside) - len(ok)}


def add_windows(samples: List[Dict[str, Any]], records: List[Record]) -> None:
    """Give each sample the statistics of the requests finished since the one before."""
    previous = 0.0
    for sample in samples:
        sample.update(window(records, previous, sample["t"]))
        previous = sample["t"]


def scaling_events(samples: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every change of the target replicas: when, from, to, and the autoscaler's reason."""
    events = []
    for before, after in zip(samples, samples[1:], strict=False):
        if after["target"] != before["target"]:
            events.append({"t": after["t"], "from": before["target"], "to": after["target"],
                           "reason": after["reason"]})
    return events


def first_change(samples: List[Dict[str, Any]], key: str, since: float,
                 until: float) -> Optional[Dict[str, Any]]:
    """The first sample in [since, until) whose ``key`` differs from the last one before
    ``since``, with the delay from ``since``."""
    before = [s for s in samples if s["t"] < since]
    if not before:
        return None
    baseline = before[-1][key]
    for sample in samples:
        if since <= sample["t"] < until and sample[key] != baseline:
            return {"after_s": round(sample["t"] - since, 1), "from": baseline,
                    "to": sample[key]}
    return None


def phase_reactions(profile: Profile, samples: List[Dict[str, Any]],
                    records: List[Record]) -> List[Dict[str, Any]]:
    """Per phase: the first target and running changes after it began, the replicas at its
    end, and its requests (count, failures, p99 of the successes)."""
    rows = []
    for phase, start in zip(profile.phases, profile.starts(), strict=True):
        end = start + phase.seconds
        inside = [s for s in samples if start <= s["t"] < end]
        stats = window(records, start, end)
        rows.append({"phase": phase.name, "start_s": start,
                     "clients": f"{phase.clients_from}->{phase.clients_to}"
                     if phase.clients_from != phase.clients_to else str(phase.clients_to),
                     "target_change": first_change(samples, "target", start, end),
                     "running_change": first_change(samples, "running", start, end),
                     "running_at_end": inside[-1]["running"] if inside else None,
                     "requests": stats["completed"], "failed": stats["errors"],
                     "p99_ms": stats["p99_ms"]})
    return rows


def reversals(events: List[Dict[str, Any]], profile: Profile) -> int:
    """Scaling decisions that went the other way from the one before within one phase (an
    oscillation: the offered load does not change direction within a phase)."""
    count = 0
    for before, after in zip(events, events[1:], strict=False):
        same_phase = profile.at(before["t"])[0] == profile.at(after["t"])[0]
        if same_phase and (before["to"] > before["from"]) != (after["to"] > after["from"]):
            count += 1
    return count


def summarize(profile: Profile, samples: List[Dict[str, Any]],
              records: List[Record]) -> Dict[str, Any]:
    """The headline numbers of a run."""
    reactions = {row["phase"]: row for row in phase_reactions(profile, samples, records)}
    starts = dict(zip((p.name for p in profile.phases), profile.starts(), strict=True))
    drop, burst = starts["drop"], starts["burst"]
    zero = next((s for s in samples if drop <= s["t"] < burst and s["running"] == 0), None)
    first_answer = min((r[0] for r in records if r[0] > burst), default=None)
    failures: Dict[str, int] = {}
    for _, _, outcome in records:
        if outcome != "200":
            failures[outcome] = failures.get(outcome, 0) + 1
    events = scaling_events(samples)
    return {
        "requests": len(records), "failed": sum(failures.values()), "failures": failures,
        "max_running": max(s["running"] for s in samples),
        "max_target": max(s["target"] for s in samples),
        "step_to_target_raised_s": _delay(reactions["step"]["target_change"]),
        "step_to_first_added_ready_s": _delay(reactions["step"]["running_change"]),
        "ease_to_first_scale_down_s": _delay(reactions["ease"]["running_change"]),
        "drop_to_first_scale_down_s": _delay(reactions["drop"]["running_change"]),
        "drop_to_zero_s": None if zero is None else round(zero["t"] - drop, 1),
        "burst_to_first_answer_s": None if first_answer is None
        else round(first_answer - burst, 2),
        "scaling_decisions": len(events), "reversals_within_a_phase": reversals(events, profile),
    }


def _delay(change: Optional[Dict[str, Any]]) -> Optional[float]:
    return None if change is None else change["after_s"]


# --------------------------------------------------------------------------- output


def print_table(samples: List[Dict[str, Any]], records: List[Record], row_s: float) -> None:
    """One row per ``row_s`` seconds: load and replicas at its end, requests within it."""
    print(f"\n{'t s':>6} {'phase':>6} {'offered':>7} {'running':>7} {'target':>6} "
          f"{'rps':>6} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}")
    begin = 0.0
    for sample in samples:
        if sample["t"] - begin < row_s - 1e-6 and sample is not samples[-1]:
            continue
        stats = window(records, begin, sample["t"])
        print(f"{sample['t']:6.1f} {sample['phase']:>6} {sample['offered']:7d} "
              f"{sample['running']:7d} {sample['target']:6d} {stats['rps']:6.1f} "
              f"{_ms(stats['p50_ms']):>7} {_ms(stats['p99_ms']):>7} {stats['errors']:6d}")
        begin = sample["t"]


def _ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_reactions(rows: List[Dict[str, Any]]) -> None:
    """One row per phase: how fast target and running replicas followed it."""
    print(f"\n{'phase':>6} {'start s':>7} {'clients':>7} {'target changed':>16} "
          f"{'running changed':>16} {'at end':>6} {'requests':>8} {'failed':>6} "
          f"{'p99 ms':>6}")
    for row in rows:
        print(f"{row['phase']:>6} {row['start_s']:7.0f} {row['clients']:>7} "
              f"{_change(row['target_change']):>16} {_change(row['running_change']):>16} "
              f"{row['running_at_end']!s:>6} {row['requests']:8d} {row['failed']:6d} "
              f"{_ms(row['p99_ms']):>6}")


def _change(change: Optional[Dict[str, Any]]) -> str:
    return "-" if change is None else f"+{change['after_s']:.1f}s {change['from']}->" \
                                      f"{change['to']}"


def print_summary(summary: Dict[str, Any], events: List[Dict[str, Any]]) -> None:
    """Every scaling decision, the headline numbers, and the failed requests, last."""
    print("\nscaling decisions (target changes as sampled; the reason is the autoscaler's "
          "latest at that sample):")
    for event in events:
        print(f"  {event['t']:6.1f}s  {event['from']} -> {event['to']}: {event['reason']}")
    print("\nsummary:")
    for key, value in summary.items():
        if key not in ("failed", "failures"):
            print(f"  {key.replace('_', ' ')}: {value}")
    verdict = "none" if summary["failed"] == 0 else f"{summary['failed']} {summary['failures']}"
    print(f"\n*** FAILED REQUESTS (any answer but 200) out of {summary['requests']}: "
          f"{verdict} ***")


def plot(profile: Profile, samples: List[Dict[str, Any]], path: str) -> None:
    """Three panels sharing the time axis: offered load and throughput; replicas running,
    target and ideal; p50 and p99 latency (and errors, if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    config = profile.autoscaling
    grid = [i * 0.05 for i in range(round(profile.seconds / 0.05) + 1)]
    offered = [profile.at(x)[1] for x in grid]
    ideal = [min(config["max_replicas"], max(config["min_replicas"],
                                             math.ceil(clients / PER_REPLICA)))
             for clients in offered]
    figure, (load_ax, replica_ax, latency_ax) = plt.subplots(
        3, 1, sharex=True, figsize=(11, 8), height_ratios=(1, 1, 1.1))
    load_ax.step(grid, offered, where="post", color="black",
                 label="offered load (closed-loop clients)")
    load_ax.set_ylabel("clients")
    rps_ax = load_ax.twinx()
    rps_ax.plot(t, [s["rps"] for s in samples], color="tab:green", alpha=0.6,
                label="throughput (req/s)")
    rps_ax.set_ylabel("req/s")
    _legend(load_ax, rps_ax)
    replica_ax.step(grid, ideal, where="post", color="grey", linestyle=":",
                    label=f"ideal: ceil(clients / {PER_REPLICA})")
    replica_ax.step(t, [s["running"] for s in samples], where="post", color="tab:blue",
                    linewidth=3, alpha=0.5, label="running")
    replica_ax.step(t, [s["target"] for s in samples], where="post", color="tab:orange",
                    linestyle="--", label="target")
    replica_ax.set_ylabel("replicas")
    replica_ax.set_ylim(-0.3, config["max_replicas"] + 0.7)
    replica_ax.legend(loc="upper left", fontsize="small")
    _plot_latency(latency_ax, samples)
    for phase, start in zip(profile.phases, profile.starts(), strict=True):
        for ax in (load_ax, replica_ax, latency_ax):
            ax.axvline(start, color="lightgrey", linewidth=0.8, zorder=0)
        load_ax.annotate(phase.name, (start + phase.seconds / 2, 1.02), ha="center",
                         xycoords=("data", "axes fraction"), fontsize="small")
    latency_ax.set_xlabel("seconds")
    figure.suptitle(f"servekit autoscaling: {SERVICE_TIME_S * 1e3:.0f} ms requests, "
                    f"{_config_line(config)}", fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_latency(ax: Any, samples: List[Dict[str, Any]]) -> None:
    for key, style in (("p50_ms", "tab:blue"), ("p99_ms", "tab:red")):
        # (no requests finished: a gap in the line, not a slope across it)
        values = [math.nan if s[key] is None else s[key] for s in samples]
        ax.plot([s["t"] for s in samples], values, color=style, marker=".", markersize=3,
                linewidth=1, label=key.replace("_ms", " latency (ms)"))
    ax.axhline(SERVICE_TIME_S * 1e3, color="grey", linestyle=":", label="service time")
    errors = [s for s in samples if s["errors"]]
    if errors:
        ax.scatter([s["t"] for s in errors], [SERVICE_TIME_S * 1e3] * len(errors),
                   color="black", marker="x", label="errors", zorder=3)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("ms")
    ax.legend(loc="upper left", fontsize="small")


def _legend(left: Any, right: Any) -> None:
    handles, labels = left.get_legend_handles_labels()
    more_handles, more_labels = right.get_legend_handles_labels()
    left.legend(handles + more_handles, labels + more_labels, loc="upper left",
                fontsize="small")


def _config_line(config: Dict[str, Any]) -> str:
    return (f"replicas {config['min_replicas']}..{config['max_replicas']}, "
            f"target {config['target_ongoing_requests']}/replica, up/down/zero delay "
            f"{config['upscale_delay_s']}/{config['downscale_delay_s']}/"
            f"{config['downscale_to_zero_delay_s']} s, look back "
            f"{config['look_back_period_s']} s")


# --------------------------------------------------------------------------- main


def wait_ok(url: str, deadline_s: float = 30.0) -> None:
    """Wait until ``url`` answers 200."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {deadline_s}s")
        time.sleep(0.1)


def run(profile: Profile, interval: float) -> Tuple[List[Dict[str, Any]], List[Record]]:
    """Start an instance on 127.0.0.1, run the profile against it, shut it down (also on
    an error or Ctrl-C)."""
    port = free_port()
    client = serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        client.create_backend(BACKEND, sleeper, config={
            "autoscaling_config": profile.autoscaling, "max_concurrent_queries": PER_REPLICA,
            "sync_threads": PER_REPLICA})
        client.create_endpoint(BACKEND, backend=BACKEND, route=ROUTE)
        url = f"http://127.0.0.1:{port}{ROUTE}"
        wait_ok(url)
        return asyncio.run(drive(client, url, profile, interval))
    finally:
        client.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the ~40 s profile")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--row-s", type=float, default=2.0, help="seconds per table row")
    parser.add_argument("--plot", default=DEFAULT_PLOT, help="PNG to write, default %(default)s")
    parser.add_argument("--json", help="also write the samples and summary to this file")
    args = parser.parse_args()
    profile = QUICK if args.quick else FULL
    print(f"offered load: closed-loop HTTP clients; {SERVICE_TIME_S * 1e3:.0f} ms per request, "
          f"{PER_REPLICA} at once per replica; {_config_line(profile.autoscaling)}; "
          f"{profile.seconds:.0f} s")
    samples, records = run(profile, args.interval)
    add_windows(samples, records)
    summary = summarize(profile, samples, records)
    events = scaling_events(samples)
    print_table(samples, records, args.row_s)
    print_reactions(phase_reactions(profile, samples, records))
    print_summary(summary, events)
    plot(profile, samples, args.plot)
    print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"profile": dataclasses.asdict(profile), "summary": summary,
                       "events": events, "samples": samples}, f, indent=1)
        print(f"samples: {args.json}")


if __name__ == "__main__":
    main()
