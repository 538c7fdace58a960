"""How long the console's pages take to build and render for a model with 200 runs and 200 versions.

    python benchmarks/dashboard_page.py [--runs 200]

A real SQLite ledger filled directly (runs, versions with metrics, decisions, events), then the
overview, the model page and a run page (`respond`) timed over several calls. Target: well under a second.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.adapters.local.sqlite_store import SqliteStore
from worker.app.dashboard import respond
from worker.config import load_config
from worker.store import DecisionRow, ModelVersionRow, OutboxRow, RunRow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, env={"RETRAIN__WORKER__STATE_DIR": tmp})
        store = SqliteStore(Path(tmp) / "ledger.db")
        start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
        with store.transaction() as tx:
            for i in range(1, args.runs + 1):
                at = start + dt.timedelta(hours=i)
                run_id = f"birds-{i:04d}-{i:08x}"
                tx.insert_run(RunRow(run_id=run_id, model="birds", seq=i, state="finalized", manifest_sha256=f"{i:064x}", image_count=100 * i,
                                     new_image_count=100, classes=["chicken", "turkey"], created_at=at, submitted_at=at,
                                     finished_at=at + dt.timedelta(minutes=20), outcome="registered", reason="200/200 new images"))  # fmt: skip
                tx.add_model_version(ModelVersionRow(model="birds", version=i, run_id=run_id, created_at=at, location=f"{tmp}/registry/birds/{i}",
                                                     metrics={"best_val_acc": 0.5 + i / (4 * args.runs)}, card={"manifest": {"images": 100 * i}}))  # fmt: skip
                tx.record_decision(
                    DecisionRow(model="birds", at=at, outcome="submit", reason="200/200 new images and quiet for 2h", run_id=run_id)
                )
                tx.enqueue_event(OutboxRow(event_id=f"evt-{i}", type="retrain.model.registered", subject=f"models/birds/versions/{i}",
                                           payload={}, created_at=at))  # fmt: skip
            head = tx.model_head("birds")
            head.champion_version = args.runs
            tx.save_model_head(head)
            tx.commit()
        for name, query in (
            ("overview", {}),
            ("model page", {"model": "birds"}),
            ("run page", {"run": f"birds-{args.runs:04d}-{args.runs:08x}"}),
        ):
            times, size = [], 0
            for _ in range(10):
                t0 = time.perf_counter()
                status, _, page = respond(query, store, config)
                times.append(time.perf_counter() - t0)
                size = len(page.encode())
            assert status == 200, (name, status)
            print(f"{name} for {args.runs} runs/versions: median {statistics.median(times) * 1000:.0f} ms, "
                  f"worst {max(times) * 1000:.0f} ms, page {size / 1024:.0f} KiB")  # fmt: skip


if __name__ == "__main__":
    main()
