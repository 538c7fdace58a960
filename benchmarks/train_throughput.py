"""Measures train.py's training throughput and how close it gets to this machine's limit.

For each image size it prints:
- pure compute: fwd+bwd+SGD on an in-memory batch (NCHW and channels_last, fp32 and, on CPU,
  bf16 autocast): step time and images/s;
- train.py for real (JPEGs on disk through the DataLoader), one process and 2-rank DDP under
  torchrun: images/s, step time, data-loading wait per step and its share, peak memory;
- achieved FLOP/s of the model's forward+backward (counted with FlopCounterMode) against a
  matmul peak measured on the same cores, and how much the data path adds to the pure step.

It prints figures; it asserts nothing about time.

    python benchmarks/train_throughput.py                 # 224 px and 112 px, ~5 minutes on 2 cores
    python benchmarks/train_throughput.py --sizes 64 --steps 6 --no-ddp
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ROOT / "training"
sys.path.insert(0, str(TRAINING))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from modelio import build_model  # noqa: E402
from synthetic_birds import generate  # noqa: E402


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def train_step_flops(size: int, batch: int) -> float:
    model = build_model("resnet18", 2)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return float(counter.get_total_flops())


def pure_compute(size: int, batch: int, steps: int, channels_last: bool, bf16: bool) -> float:
    """Seconds per step of fwd+bwd+SGD with data already in memory."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model("resnet18", 2).to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def run_train_py(data: Path, size: int, batch: int, steps: int, nproc: int, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-out-"))
    args = [
        "--data_dir", str(data), "--output_dir", str(out), "--image_size", str(size), "--batch_size", str(batch),
        "--num_epochs", "2", "--max_steps_per_epoch", str(steps), "--weights", "none", *extra,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if nproc == 1:
        cmd = [sys.executable, str(TRAINING / "train.py"), *args]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(TRAINING / "train.py"),
            *args,
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["history"][-1]  # epoch 1 warms up workers and allocator
    steps = last["steps"]  # may be fewer than asked when the data set is small
    step_s = last["train_seconds"] / steps
    return {
        "images_per_s": last["images_per_s"],
        "step_ms": 1000 * step_s,
        "data_wait_ms": 1000 * last["data_wait_s"] / steps,
        "data_wait_pct": 100 * last["data_wait_fraction"],
        "peak_mb": metrics["peak_memory_mb"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 112], help="image sizes to measure")
    p.add_argument("--batch_size", type=int, default=16, help="images per step per process")
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    p.add_argument("--no-ddp", action="store_true", help="skip the 2-rank torchrun measurement")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="also measure bf16 autocast on CPU")
    args = p.parse_args()

    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} cpus")
    peak32 = matmul_peak_gflops(torch.float32)
    peak16 = matmul_peak_gflops(torch.bfloat16)
    print(f"matmul peak (2048^3): fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        data = Path(tmp)
        # Enough images for `steps` full batches per rank on the ~80% train split.
        generate(data, per_class=max(64, args.batch_size * args.steps * 2), layout="flat", seed=0)
        for size in args.sizes:
            flops = train_step_flops(size, args.batch_size)
            print(f"\n== {size} px, batch {args.batch_size}: {flops / args.batch_size / 1e9:.2f} GFLOP per image (fwd+bwd)")
            rows = []
            for cl in (False, True):
                for bf16 in (False, True) if args.bf16 else (False,):
                    s = pure_compute(size, args.batch_size, args.steps, cl, bf16)
                    peak = peak16 if bf16 else peak32
                    rows.append((f"compute {'NHWC' if cl else 'NCHW'} {'bf16' if bf16 else 'fp32'}", s, flops / s / 1e9, peak))
            for name, s, achieved, peak in rows:
                print(
                    f"  {name:<24} step {1000 * s:7.1f} ms  {args.batch_size / s:6.1f} img/s  {achieved:6.0f} GFLOP/s = {100 * achieved / peak:4.0f}% of matmul peak"
                )
            pure_cl = next(s for name, s, _, _ in rows if name == "compute NHWC fp32")
            runs = [("train.py 1 process", 1)] + ([] if args.no_ddp else [("train.py DDP 2 ranks", 2)])
            for name, nproc in runs:
                r = run_train_py(data, size, args.batch_size, args.steps, nproc, ["--amp", "none"])
                achieved = flops * nproc / (r["step_ms"] / 1000) / 1e9
                overhead = 100 * (r["step_ms"] / 1000 - pure_cl) / pure_cl if nproc == 1 else float("nan")
                print(
                    f"  {name:<24} step {r['step_ms']:7.1f} ms  {r['images_per_s']:6.1f} img/s  {achieved:6.0f} GFLOP/s = {100 * achieved / peak32:4.0f}% of matmul peak  "
                    f"data wait {r['data_wait_ms']:.1f} ms/step ({r['data_wait_pct']:.1f}%)  peak mem {r['peak_mb']:.0f} MB"
                    + (f"  (+{overhead:.1f}% over pure compute NHWC fp32)" if nproc == 1 else "")
                )


if __name__ == "__main__":
    main()
