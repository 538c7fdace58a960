"""Measures the worker's message path on the durable SQLite ledger: events/s and latency.

- one event per transaction: ImageUploaded messages through `Worker.handle` (image insert,
  policy evaluation, decision record, commit), 1 process and 4 processes on one file, with
  `synchronous=NORMAL` (the default: durable against a crash of the process, not a power cut)
  and `synchronous=FULL` (an fsync per commit: durable against both);
- batched: a backfill RetrainRequested registering 100,000 images in one transaction.

Prints figures; asserts nothing. Targets on a 2-core machine: >= 2,000 events/s per transaction,
>= 20,000 images/s batched, p99 < 5 ms.

    python benchmarks/worker_throughput.py [--events 5000] [--backfill 100000] [--processes 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.messages import ImageUploaded, RetrainRequested  # noqa: E402
from tests.fakes.adapters import FakeBlobStore  # noqa: E402
from tests.fakes.backend import FakeTrainingBackend  # noqa: E402
from worker.adapters.local.sqlite_store import SqliteStore  # noqa: E402
from worker.app.bootstrap import build_worker  # noqa: E402
from worker.config import load_config  # noqa: E402


def make_worker(state: Path, blobs=None, synchronous: str = "NORMAL"):
    env = {
        "RETRAIN__WORKER__STATE_DIR": str(state),
        # Thresholds high enough that no run starts: this measures the message path itself.
        "RETRAIN__MODELS__BIRDS__MIN_NEW_IMAGES": "100000000",
        "RETRAIN__MODELS__BIRDS__MAX_WAIT": "100d",
    }
    config = load_config(None, env=env)
    return build_worker(
        config,
        store=SqliteStore(state / "ledger.db", synchronous=synchronous),
        backend=FakeTrainingBackend(),
        blobs={"birds": blobs or FakeBlobStore()},
    )


def feed(args: tuple[str, int, int, int]) -> list[float]:
    state, index, count, duplicate_every, synchronous = args
    worker = make_worker(Path(state), synchronous=synchronous)
    latencies = []
    for i in range(count):
        n = i - 1 if duplicate_every and i % duplicate_every == 0 and i else i
        message = ImageUploaded.of("birds", f"{'chicken' if n % 2 else 'turkey'}/p{index}-{n:07d}.jpg", "e1", 1000)
        start = time.perf_counter()
        worker.handle(message)
        latencies.append(time.perf_counter() - start)
    return latencies


def report(name: str, latencies: list[float], wall: float) -> dict:
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2] * 1000
    p99 = ordered[int(len(ordered) * 0.99)] * 1000
    rate = len(latencies) / wall
    print(
        f"  {name:<34} {rate:8.0f} events/s   p50 {p50:5.2f} ms   p99 {p99:5.2f} ms   max {ordered[-1] * 1000:6.1f} ms   ({len(latencies)} events, {wall:.1f}s)"
    )
    return {"name": name, "events_per_s": rate, "p50_ms": p50, "p99_ms": p99, "mean_ms": statistics.fmean(latencies) * 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--events", type=int, default=5000, help="events per process")
    p.add_argument("--processes", type=int, default=4, help="processes sharing the ledger in the concurrent run")
    p.add_argument("--backfill", type=int, default=100_000, help="images in the batched backfill")
    args = p.parse_args()
    results = []
    print("SQLite ledger (WAL), one transaction per event, policy evaluated each time")
    print("  synchronous=NORMAL (the worker's default): a commit survives a crash of the process, not")
    print("  a power cut (the last commits before it may be lost); FULL: fsync per commit, survives both.")
    with tempfile.TemporaryDirectory() as tmp:
        for synchronous in ("NORMAL", "FULL"):
            state = Path(tmp) / f"one-{synchronous}"
            make_worker(state, synchronous=synchronous)
            start = time.perf_counter()
            latencies = feed((str(state), 0, args.events, 10, synchronous))
            results.append(report(f"1 process, {synchronous} (10% dups)", latencies, time.perf_counter() - start))

            state = Path(tmp) / f"many-{synchronous}"
            make_worker(state, synchronous=synchronous)
            ctx = mp.get_context("spawn")
            with ctx.Pool(args.processes) as pool:
                start = time.perf_counter()
                parts = pool.map(feed, [(str(state), i, args.events, 10, synchronous) for i in range(args.processes)])
                wall = time.perf_counter() - start
            results.append(report(f"{args.processes} processes, one file, {synchronous}", [x for part in parts for x in part], wall))

        state = Path(tmp) / "backfill"
        blobs = FakeBlobStore({f"{'chicken' if i % 2 else 'turkey'}/b{i:07d}.jpg": b"x" for i in range(args.backfill)})
        worker = make_worker(state, blobs)
        start = time.perf_counter()
        effects = worker.handle(RetrainRequested(message_id="backfill-1", model="birds", prefix=""))
        wall = time.perf_counter() - start
        rate = args.backfill / wall
        print(
            f"  {'batched backfill (one transaction)':<34} {rate:8.0f} images/s   {wall:.2f}s for {args.backfill} images: {effects.detail}"
        )
        results.append({"name": "backfill", "images_per_s": rate, "seconds": wall})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
