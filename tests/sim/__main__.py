"""Run the simulator: ``python tests/sim [--seeds N] [--scenario NAME] [--seed S]``.

Runs every scenario (or one) on seeds ``start .. start+N-1`` and prints, per scenario, the
seeds run, the failures and the seeds per second. A failure prints its invariant and the one
command that replays it exactly (``--seed S --scenario NAME``, with the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runner


def main(argv: list) -> int:
    parser = argparse.ArgumentParser(prog="python tests/sim", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1000, help="how many seeds (default 1000)")
    parser.add_argument("--start", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--seed", type=int, help="replay this one seed, with its traceback")
    parser.add_argument("--scenario", help="only this scenario (default: all)")
    parser.add_argument("--max-failures", type=int, default=5,
                        help="stop a scenario after this many failing seeds (default 5)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes sharing the seeds (default: one per CPU)")
    args = parser.parse_args(argv)
    names = runner.scenario_names(args.scenario)
    if args.seed is not None:
        for name in names:
            try:
                runner.run_one(name, args.seed, collect=True)
            except AssertionError:
                traceback.print_exc()
                return 1
            print(f"{name}: seed {args.seed} passed")
        return 0
    failed = False
    for name in names:
        began = time.perf_counter()
        report = runner.sweep_in_parallel(name, range(args.start, args.start + args.seeds),
                                          args.jobs, max_failures=args.max_failures)
        elapsed = time.perf_counter() - began
        print(f"{name}: {report.runs} seeds, {len(report.failures)} failed, "
              f"{report.runs / elapsed:.0f} seeds/s")
        for failure in report.failures:
            failed = True
            print(f"  seed {failure.seed}: {failure.message}")
            print(f"    replay: python tests/sim --scenario {name} --seed {failure.seed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
