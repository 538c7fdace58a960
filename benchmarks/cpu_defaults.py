"""The CPU default before and after issue 17, on the same data: fp32 decoding every JPEG every epoch
(`--amp off --decode_cache_mb 0`, the old default) against the new default (bf16 autocast on CPUs
with native bf16, the decoded cache).

    python benchmarks/cpu_defaults.py [--per-class 80] [--image-size 112] [--epochs 3]

Runs train.py as one process for each setting (same seed, same synthetic data) and prints each
epoch's seconds (training + validation), the speed-up from the second epoch on, and the final
validation accuracy of both. It asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "training"))

from synthetic_birds import generate  # noqa: E402


def run(data: Path, out: Path, extra: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(ROOT / "training" / "train.py"), "--data_dir", str(data), "--output_dir", str(out),
           "--num_epochs", str(args.epochs), "--image_size", str(args.image_size), "--batch_size", "16", "--weights", "none",
           "--workers", "0", "--seed", "1", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=3600)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=80)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "birds"
        generate(data, args.per_class, layout="flat", seed=4)
        results = {
            "old default (fp32, decode every epoch)": run(data, Path(tmp) / "old", ["--amp", "off", "--decode_cache_mb", "0"], args),
            "new default (--amp auto, decoded cache)": run(data, Path(tmp) / "new", [], args),
        }
    rows = {}
    for name, m in results.items():
        epochs = [r["seconds"] for r in m["history"]]
        rows[name] = epochs
        print(f"{name}: precision {m['precision']}, epochs {', '.join(f'{s:.1f} s' for s in epochs)}, "
              f"best_val_acc {m['best_val_acc']:.3f}, final_val_acc {m['final_val_acc']:.3f}")  # fmt: skip
    old, new = rows.values()
    later = statistics.fmean(old[1:] or old) / statistics.fmean(new[1:] or new)
    print(f"speed-up: first epoch {old[0] / new[0]:.2f}x, later epochs {later:.2f}x, whole run {sum(old) / sum(new):.2f}x")


if __name__ == "__main__":
    main()
