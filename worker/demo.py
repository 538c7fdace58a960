"""`retrain demo`: the training path on one machine, end to end, on embedded defaults.

Makes a synthetic two-class image set (with a few corrupt files), trains it with a 2-process DDP
run under torchrun (gloo on CPU), exports ONNX, checks parity with onnxruntime and prints what
happened and where everything is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.snapshot import training_dir


@dataclass(frozen=True)
class DemoConfig:
    workspace: Path
    per_class: int = 120
    corrupt: int = 3
    image_size: int = 64
    epochs: int = 8
    batch_size: int = 16
    learning_rate: float = 0.01
    nproc: int = 2
    seed: int = 0


@dataclass
class DemoResult:
    data_dir: Path
    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    onnx_report: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.metrics) and bool(self.onnx_report.get("passed"))


class DemoError(RuntimeError):
    """A demo step failed; the message names the step and its log."""


def _stream(cmd: list[str], log_path: Path, echo: Callable[[str], None], env: dict[str, str]) -> int:
    """Run `cmd`, echoing its output line by line and keeping a copy in `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(log_path, "w", encoding="utf-8") as log,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            echo(line.rstrip("\n"))
        return proc.wait()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # One intra-op thread per rank: two ranks share this machine's cores. Setting it also
    # silences torchrun's warning that it chose this for us.
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> DemoResult:
    snapshot = training_dir()
    workspace = cfg.workspace.resolve()
    data_dir = workspace / "data" / f"birds-{cfg.per_class}-{cfg.corrupt}-{cfg.seed}"
    run_dir = workspace / "runs" / time.strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while run_dir.exists():  # two demos in the same second get separate folders
        suffix += 1
        run_dir = workspace / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    result = DemoResult(data_dir=data_dir, run_dir=run_dir)
    env = _child_env()

    started = time.perf_counter()
    if not (data_dir / ".complete").exists():
        echo(f"== making a synthetic chickens-vs-turkeys set in {data_dir}")
        sys.path.insert(0, str(snapshot))
        try:
            from synthetic_birds import generate
        finally:
            sys.path.remove(str(snapshot))
        paths = generate(data_dir, cfg.per_class, layout="flat", corrupt=cfg.corrupt, seed=cfg.seed)
        (data_dir / ".complete").write_text(f"{len(paths)}\n")
    else:
        echo(f"== reusing the synthetic set in {data_dir}")
    result.timings["data_s"] = time.perf_counter() - started

    echo(f"== training: {cfg.nproc}-process DDP with torchrun ({'gloo on CPU' if not _cuda() else 'nccl on GPU'})")
    outputs = run_dir / "outputs"
    train_cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
        str(snapshot / "train.py"),
        "--data_dir", str(data_dir),
        "--output_dir", str(outputs),
        "--num_epochs", str(cfg.epochs),
        "--image_size", str(cfg.image_size),
        "--batch_size", str(cfg.batch_size),
        "--learning_rate", str(cfg.learning_rate),
        "--step_size", str(max(1, cfg.epochs * 3 // 4)),
        "--seed", str(cfg.seed),
    ]  # fmt: skip
    started = time.perf_counter()
    code = _stream(train_cmd, run_dir / "train.log", lambda line: echo(f"  {line}"), env)
    result.timings["train_s"] = time.perf_counter() - started
    if code != 0:
        raise DemoError(f"training exited with status {code}; see {run_dir / 'train.log'}")
    result.metrics = json.loads((outputs / "metrics.json").read_text())

    echo("== exporting ONNX and checking parity with onnxruntime")
    export_cmd = [
        sys.executable, str(snapshot / "export_onnx.py"),
        "--model", str(outputs / "model.pt"),
        "--data_dir", str(data_dir),
        "--samples", "32",
    ]  # fmt: skip
    started = time.perf_counter()
    code = _stream(export_cmd, run_dir / "export.log", lambda line: echo(f"  {line}"), env)
    result.timings["export_s"] = time.perf_counter() - started
    report_path = outputs / "onnx_report.json"
    if report_path.exists():
        result.onnx_report = json.loads(report_path.read_text())
    if code != 0:
        raise DemoError(f"ONNX export/parity exited with status {code}; see {run_dir / 'export.log'}")
    return result


def _cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()
