"""`retrain demo` end to end with a tiny configuration: real data, real torchrun, real ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, child_env

pytestmark = pytest.mark.e2e


def _demo(workspace: Path) -> subprocess.CompletedProcess:
    # `python -m worker` is what the `retrain` console script runs; invoking it from this
    # checkout tests this checkout's code whatever the shared environment has installed.
    cmd = [
        sys.executable,
        "-m",
        "worker",
        "demo",
        "--workspace",
        str(workspace),
        "--per-class",
        "16",
        "--epochs",
        "2",
        "--image-size",
        "32",
    ]
    env = child_env(COLUMNS="200", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False, cwd=ROOT)


def test_demo_trains_with_two_ranks_exports_onnx_and_says_where_things_are(tmp_path):
    proc = _demo(tmp_path / "ws")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = list((tmp_path / "ws" / "runs").iterdir())
    assert len(runs) == 1
    outputs = runs[0] / "outputs"
    metrics = json.loads((outputs / "metrics.json").read_text())
    assert (metrics["distributed"], metrics["world_size"]) == ("ddp", 2)
    assert metrics["skipped_images"] == 3
    report = json.loads((outputs / "onnx_report.json").read_text())
    assert report["passed"]
    assert report["max_abs_diff"] < 1e-4
    torch.load(outputs / "model.pt", weights_only=True)
    assert str(outputs / "model.onnx") in proc.stdout
    assert "epoch 2/2" in proc.stdout  # progress is shown while training runs


def test_running_the_demo_again_reuses_the_data_and_keeps_both_runs(tmp_path):
    workspace = tmp_path / "ws"
    assert _demo(workspace).returncode == 0
    second = _demo(workspace)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "reusing the synthetic set" in second.stdout
    assert len(list((workspace / "runs").iterdir())) == 2
    shutil.rmtree(workspace)
