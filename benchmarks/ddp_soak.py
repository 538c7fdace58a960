"""Launch the case that used to deadlock over and over and count how many launches hang.

Two DDP ranks under torchrun, DataLoader workers on, several epochs with an evaluation after each:
the validation loader starts its workers while the training loader's workers, their queue threads
and the process group's threads exist. Each launch runs in a session of its own and is killed
whole (ranks and loader workers too) if it has not finished after --timeout seconds, which counts
as a hang.

    python benchmarks/ddp_soak.py [--launches 20] [--workers 2] [--epochs 3] [--timeout 180]
    python benchmarks/ddp_soak.py --training_dir OLD_COPY -- --worker_start_method fork   # compare

Prints one line per launch and the totals; docs/training.md has the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.adapters.local.process_tree import kill_tree  # noqa: E402


def launch(train_py: Path, data: Path, out: Path, args: argparse.Namespace) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(train_py),
           "--data_dir", str(data), "--output_dir", str(out), "--num_epochs", str(args.epochs), "--workers", str(args.workers),
           "--image_size", "48", "--batch_size", "4", "--weights", "none", *args.extra]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = time.monotonic()
    log = out.with_suffix(".log")
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            return "hung", time.monotonic() - started
    if code == 0:
        return "finished", time.monotonic() - started
    lines = [line for line in log.read_text(errors="replace").splitlines() if "train.py: " in line or "Error" in line]
    return f"failed ({code}): {lines[-1][:200] if lines else '?'}", time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--launches", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank and loader")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds after which a launch counts as hung")
    parser.add_argument("--training_dir", type=Path, default=ROOT / "training")
    parser.add_argument("extra", nargs="*", help="more train.py arguments (after --)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "training"))
    from synthetic_birds import generate

    outcomes: list[str] = []
    durations: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "birds"
        generate(data, 20, layout="flat", corrupt=2, seed=1)
        print(f"{args.launches} launches of 2 ranks x {args.workers} loader workers, {args.epochs} epochs, "
              f"timeout {args.timeout:g} s, {args.training_dir / 'train.py'} {' '.join(args.extra)}", flush=True)  # fmt: skip
        for i in range(1, args.launches + 1):
            outcome, seconds = launch(args.training_dir / "train.py", data, Path(tmp) / f"out-{i}", args)
            outcomes.append(outcome)
            durations.append(seconds)
            print(f"launch {i:3d}: {seconds:6.1f} s {outcome}", flush=True)
    finished = [d for o, d in zip(outcomes, durations, strict=True) if o == "finished"]
    print(f"finished {len(finished)}/{args.launches}, hung {outcomes.count('hung')}, "
          f"failed {sum(o.startswith('failed') for o in outcomes)}; "
          f"finished runs: median {statistics.median(finished) if finished else float('nan'):.1f} s, "
          f"max {max(finished) if finished else float('nan'):.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
