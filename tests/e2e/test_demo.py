"""`retrain demo` end to end with a tiny configuration: real torchrun, gate, registry, ONNX Runtime, events."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

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
        "24",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--min-value",
        "0",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env(PYTHONPATH=str(ROOT)), check=False, cwd=ROOT)


def test_demo_runs_the_whole_loop_and_leaves_a_champion_onnx_that_loads(tmp_path):
    proc = _demo(tmp_path / "ws")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "policy: wait: waiting:" in out  # it said why it waited
    assert "2-rank DDP under torchrun" in out
    assert "epoch 1/1" in out  # training progress is shown while it runs
    assert "warm start from the champion" in out
    state = tmp_path / "ws" / "state"
    events = [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]
    types = [e["type"] for e in events]
    assert types.count("retrain.run.submitted") == 2
    assert types.count("retrain.model.registered") >= 1
    assert types.count("retrain.model.registered") + types.count("retrain.model.rejected") == 2
    assert len({e["id"] for e in events}) == len(events)
    first = next(e for e in events if e["type"] == "retrain.model.registered")
    assert first["data"]["version"] == 1
    assert first["data"]["onnx"]["max_abs_diff"] < 1e-4
    second = [e for e in events if e["type"] in ("retrain.model.registered", "retrain.model.rejected")][1]
    assert second["data"]["gate"]["baseline"] is not None, "the second run was judged against the champion on its own validation set"
    champion = state / "registry" / "birds" / "champion"
    card = json.loads((champion / "card.json").read_text())
    assert card["version"] == int(champion.resolve().name)
    session = ort.InferenceSession(str(champion / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)})[0]
    assert logits.shape == (2, 2)
    assert "champion ONNX" in out
    # The settings it ran with are in the workspace: replaying its history with them plans its two runs.
    config = tmp_path / "ws" / "retrain.toml"
    assert f"retrain simulate birds --tick 1 -c {config}" in out
    replay = subprocess.run([sys.executable, "-m", "worker", "simulate", "birds", "--tick", "1", "--json", "-c", str(config)], capture_output=True,
                            text=True, timeout=120, env=child_env(PYTHONPATH=str(ROOT)), check=False, cwd=tmp_path)  # fmt: skip
    assert replay.returncode == 0, replay.stderr[-2000:]
    result = json.loads(replay.stdout)["results"][0]
    assert (result["runs"], result["in_flight_at_end"], result["warnings"]) == (2, 0, [])


def test_running_the_demo_again_starts_clean_and_reuses_the_data(tmp_path):
    workspace = tmp_path / "ws"
    assert _demo(workspace).returncode == 0
    again = _demo(workspace)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "reusing the synthetic set" in again.stdout
    runs = [p.name for p in (workspace / "state" / "runs").iterdir()]
    assert len(runs) == 2
