"""Time from the threshold-crossing image to the `retrain.model.registered` event, by phase.

Runs the demo configuration (two rounds, 2-rank DDP under torchrun) with no quiet period, then
reads the ledger and prints, per run: decision (image dropped -> run planned), submit (planned ->
backend accepted), training (accepted -> success observed; train.py's own time in brackets),
completion (success observed -> registered: verification, gate, ONNX export + parity,
registration), publish (event queued -> published) and the total. Prints figures only.

    python benchmarks/end_to_end.py [--per-class 120] [--epochs 4] [--image-size 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.adapters.local.sqlite_store import SqliteStore  # noqa: E402
from worker.app.demo import DemoConfig, run_demo  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--per-class", type=int, default=120)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="retrain-e2e-") as tmp:
        cfg = DemoConfig(workspace=Path(tmp), per_class=args.per_class, epochs=args.epochs, image_size=args.image_size, quiet_period=0.0)
        result = run_demo(cfg, echo=lambda line: None)
        store = SqliteStore(result.state_dir / "ledger.db")
        events = {(e.payload["data"].get("run_id"), e.type): e for e in store.all_events()}
        print(
            f"demo configuration: {args.per_class} images per class, {args.epochs} epochs at {args.image_size} px, 2-rank DDP (gloo, CPU)"
        )
        header = f"{'run':<22}{'decision':>10}{'submit':>9}{'training (train.py)':>22}{'completion':>12}{'publish':>9}{'total':>9}{'non-training':>14}"
        print(header)
        for mark, run in zip(result.timeline, result.runs, strict=True):
            done = events.get((run["run_id"], "retrain.model.registered")) or events.get((run["run_id"], "retrain.model.rejected"))
            if done is None or done.published_at is None or run["submitted_at"] is None:
                print(f"{run['run_id']:<22} incomplete: {run['outcome']}")
                continue
            finished = run["finished_at"]
            decision = run["created_at"] - mark["dropped_at"]
            submit = run["submitted_at"] - run["created_at"]
            training = finished - run["submitted_at"]
            completion = done.created_at.timestamp() - finished
            publish = (done.published_at - done.created_at).total_seconds()
            total = done.published_at.timestamp() - mark["dropped_at"]
            own = run["train_s"] or 0.0
            non_training = total - own
            print(
                f"{run['run_id']:<22}{decision:>9.2f}s{submit:>8.2f}s{training:>12.2f}s ({own:>5.2f}s){completion:>11.2f}s{publish:>8.2f}s"
                f"{total:>8.2f}s{non_training:>8.2f}s = {100 * non_training / total:4.1f}%"
            )
        print("non-training = total - train.py's own duration (torchrun start-up, polling, ONNX export, registration, publish, decision)")


if __name__ == "__main__":
    main()
