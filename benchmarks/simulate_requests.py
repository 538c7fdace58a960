"""How `retrain simulate` scales with forced requests: N requests that stay open behind a long run.

    python benchmarks/simulate_requests.py [--requests 10000 20000 100000]

Each evaluation used to scan every open request (100k took 75-139 s); they are now read in O(1).
Prints seconds per size; docs/simulate.md has the figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "training")]

from worker.config import load_config  # noqa: E402
from worker.simulate import Arrival, DurationModel, History, Request, simulate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, nargs="+", default=[10_000, 20_000, 100_000])
    args = parser.parse_args()
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cfg = load_config(None, env={}).model("birds")
    for n in args.requests:
        history = History()
        history.arrivals = [Arrival(t0 + dt.timedelta(seconds=i), f"{'chicken' if i % 2 else 'turkey'}/{i}.jpg", "e") for i in range(200)]
        history.requests = [Request(t0 + dt.timedelta(seconds=300 + i), f"r{i}", "bench", False) for i in range(n)]
        started = time.perf_counter()
        result = simulate(history, cfg, tick_seconds=60, durations=DurationModel("fixed", [], minutes=600), gpus_per_run=1, label="bench")
        print(f"{n:>8} forced requests: {time.perf_counter() - started:6.2f} s ({len(result.runs)} runs)")


if __name__ == "__main__":
    main()
