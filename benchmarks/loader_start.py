"""What each DataLoader worker start method costs: time to the first training batch, to the first
validation batch, and per later epoch, for fork (unsafe once the process has threads: only measured
here), forkserver (train.py's default) and spawn. Each method runs in a fresh process, so a fork
server started by an earlier measurement is not reused.

    python benchmarks/loader_start.py [--workers 2] [--images 40] [--image_size 64] [--epochs 3]

Prints one line per method; the figures are in docs/training.md ("Loader workers").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ROOT / "training"

MEASURE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from imagedata import build_data
from manifests import scan_image_folder

root, method, workers, size, epochs = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
manifest = scan_image_folder(root, 0.2)
data = build_data(root, manifest, {}, image_size=size, batch_size=4, workers=workers, rank=0, world_size=1, seed=0,
                  pin_memory=False, cache_bytes=64 * 2**20, cache_dir=None, start_method=method)
result = {"method": method}
for epoch in range(epochs):
    data.train_sampler.set_epoch(epoch)
    start = time.perf_counter()
    for i, _ in enumerate(data.train_loader):
        if epoch == 0 and i == 0:
            result["first_train_batch_s"] = time.perf_counter() - start
    result.setdefault("train_epoch_s", []).append(time.perf_counter() - start)
    start = time.perf_counter()
    for i, _ in enumerate(data.val_loader):
        if epoch == 0 and i == 0:
            result["first_val_batch_s"] = time.perf_counter() - start
    result.setdefault("val_epoch_s", []).append(time.perf_counter() - start)
print(json.dumps(result))
"""


def measure(data: Path, method: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, "-c", MEASURE, str(TRAINING), str(data), method, str(args.workers), str(args.image_size), str(args.epochs)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workers", type=int, default=2, help="workers per loader")
    parser.add_argument("--images", type=int, default=40, help="images per class")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per method (the median is printed)")
    args = parser.parse_args()
    sys.path.insert(0, str(TRAINING))
    from synthetic_birds import generate

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "birds"
        generate(data, args.images, layout="flat", seed=0)
        print(f"{args.images * 2} images, {args.workers} workers per loader, {args.image_size} px, {args.epochs} epochs, "
              f"median of {args.repeats}, {os.cpu_count()} cores")  # fmt: skip
        for method in ("fork", "forkserver", "spawn"):
            runs = [measure(data, method, args) for _ in range(args.repeats)]

            def median(values: list[float]) -> float:
                return sorted(values)[len(values) // 2]

            first_train = median([r["first_train_batch_s"] for r in runs])
            first_val = median([r["first_val_batch_s"] for r in runs])
            later = median([r["train_epoch_s"][-1] + r["val_epoch_s"][-1] for r in runs])
            print(f"{method:>10}: first train batch {first_train:6.2f} s, first val batch {first_val:6.2f} s, "
                  f"a later epoch (train + val) {later:6.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
