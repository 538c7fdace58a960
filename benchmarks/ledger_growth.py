"""How the ledger grows: N images arriving over R runs with `training_data = "all"` (every run
freezes every image), on the real SQLite ledger and the real handlers (fake training backend).

    python benchmarks/ledger_growth.py [--images 25000] [--runs 200]

Prints the rows per table, the ledger file's size, the manifest blobs' total size, and the
largest number of records any single commit wrote. The ledger should hold O(images + runs) rows:
runs name their manifest by digest and a watermark instead of writing a row per image.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.messages import ImageUploaded
from tests.fakes.harness import make_harness
from worker.adapters.local.sqlite_store import SqliteStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=25_000)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ledger-growth-"))
    store = SqliteStore(root / "ledger.db")
    h = make_harness(root, store=store, training_data="all", min_new_images=10**9, cooldown=0, max_attempts=1)
    per_run = args.images // args.runs
    started = time.perf_counter()
    n = 0
    for r in range(args.runs):
        for _ in range(per_run):
            label = ("chicken", "turkey")[n % 2]
            h.worker.handle(ImageUploaded.of("birds", f"{label}/{n:06d}.jpg", "e1", 100))
            n += 1
        h.request(force=True, message_id=f"bench-{r}")
        run = next(x for x in h.runs() if x.in_flight)
        h.succeed(run, best=0.5 + r / (4 * args.runs))  # gate: registered or rejected, either finalizes
    elapsed = time.perf_counter() - started
    store.close()
    db = sqlite3.connect(root / "ledger.db")
    tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
    rows = {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}
    ledger_bytes = sum(p.stat().st_size for p in root.glob("ledger.db*"))
    manifests = list((root / "state" / "manifests").glob("*.json"))
    print(f"{n} images over {args.runs} runs (training_data = all) in {elapsed:.1f} s")
    print(f"ledger rows: {sum(rows.values())} in all")
    for table, count in sorted(rows.items()):
        print(f"  {table:16s} {count}")
    print(f"ledger file: {ledger_bytes / 1e6:.1f} MB")
    print(f"manifest blobs: {len(manifests)} files, {sum(p.stat().st_size for p in manifests) / 1e6:.1f} MB (outside the ledger)")
    print(f"rows per (image + run): {sum(rows.values()) / (n + args.runs):.2f}")


if __name__ == "__main__":
    main()
