"""How long `retrain simulate` takes for a year of history: 1,000,000 image arrivals, a 1-minute tick.

    python benchmarks/simulate.py [--arrivals 1000000] [--tick 60]

Arrivals come in daily bursts (busier in the day), over 4 classes; runs take a fitted time. The
simulator evaluates at every arrival and jumps over idle ticks. Target: under 30 s here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.config import ModelConfig
from worker.simulate import Arrival, DurationModel, History, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrivals", type=int, default=1_000_000)
    parser.add_argument("--tick", type=float, default=60.0)
    args = parser.parse_args()
    rng = random.Random(3)
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    year = 365 * 24 * 3600
    offsets = sorted(rng.random() ** 1.2 * year for _ in range(args.arrivals))
    labels = ("chicken", "turkey", "duck", "goose")
    history = History(arrivals=[Arrival(start + dt.timedelta(seconds=s), f"{labels[i % 4]}/{i:07d}.jpg") for i, s in enumerate(offsets)])
    cfg = ModelConfig(min_new_images=2000, quiet_period=3600, max_wait=6 * 3600, cooldown=1800)
    t0 = time.perf_counter()
    result = simulate(history, cfg, tick_seconds=args.tick, durations=DurationModel("fixed", minutes=45), gpus_per_run=8)
    seconds = time.perf_counter() - t0
    summary = result.summary()
    print(
        f"simulated {args.arrivals:,} arrivals over a year (tick {args.tick:g} s) in {seconds:.1f} s: {summary['runs']} runs, "
        f"{summary['gpu_hours']} GPU-hours, staleness median {summary['staleness_hours']['median']} h"
    )


if __name__ == "__main__":
    main()
