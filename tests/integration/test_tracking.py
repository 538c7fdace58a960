"""MLflow tracking from train.py against a real local MLflow store (sqlite), and the process
environment Azure ML SDK v2 gives a PyTorch command job."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TRAINING, child_env, read_metrics, run_ranks_on_a_free_port

pytestmark = pytest.mark.integration

TINY = ["--image_size", "32", "--batch_size", "4", "--workers", "0", "--weights", "none"]


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"


def _store(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    return conn


def test_two_ranks_log_one_mlflow_run_with_a_point_per_epoch_from_rank_0(tiny_birds, tmp_path):
    db, out = tmp_path / "mlflow.db", tmp_path / "out"
    env = child_env(MLFLOW_TRACKING_URI=f"sqlite:///{db}", MLFLOW_EXPERIMENT_NAME="retrain-birds", RETRAIN_RUN_ID="birds-0001-abcd1234-a1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAINING / "train.py"),
         "--data_dir", str(tiny_birds), "--output_dir", str(out), "--num_epochs", "3", *TINY],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    _ok(proc)
    metrics = read_metrics(out)
    with _store(db) as conn:
        [experiment] = conn.execute("SELECT experiment_id FROM experiments WHERE name = 'retrain-birds'").fetchall()
        runs = conn.execute("SELECT * FROM runs WHERE experiment_id = ?", (experiment["experiment_id"],)).fetchall()
        assert len(runs) == 1, "rank 1 must not log a run of its own"
        run = runs[0]
        assert (run["name"], run["status"]) == ("birds-0001-abcd1234-a1", "FINISHED")
        uid = run["run_uuid"]
        steps = [r["step"] for r in conn.execute("SELECT step FROM metrics WHERE run_uuid = ? AND key = 'val_acc' ORDER BY step", (uid,))]
        assert steps == [1, 2, 3]
        for key in ("train_loss", "lr", "images_per_s", "data_wait_fraction"):
            per_epoch = conn.execute("SELECT step FROM metrics WHERE run_uuid = ? AND key = ? AND step > 0 ORDER BY step", (uid, key))
            assert [r["step"] for r in per_epoch] == [1, 2, 3]
        best = conn.execute("SELECT value FROM metrics WHERE run_uuid = ? AND key = 'best_val_acc'", (uid,)).fetchone()[0]
        assert best == pytest.approx(metrics["best_val_acc"])
        params = dict(conn.execute("SELECT key, value FROM params WHERE run_uuid = ?", (uid,)).fetchall())
        assert (params["world_size"], params["num_epochs"], params["distributed"]) == ("2", "3", "ddp")
        tags = dict(conn.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (uid,)).fetchall())
        assert tags["manifest_sha256"] == metrics["manifest_sha256"]
        assert tags["retrain.run_id"] == "birds-0001-abcd1234-a1"
        artifacts = Path(run["artifact_uri"].removeprefix("file://"))
    assert (artifacts / "metrics.json").is_file()


def test_without_a_tracking_uri_nothing_is_tracked(tiny_birds, tmp_path):
    env = child_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, str(TRAINING / "train.py"), "--data_dir", str(tiny_birds), "--output_dir", str(tmp_path / "out"), "--num_epochs", "1", *TINY],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    _ok(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no mlruns/, no mlflow.db


def test_train_py_accepts_the_environment_azure_ml_v2_gives_each_pytorch_process(tiny_birds, tmp_path):
    """Azure ML (SDK v2, PyTorchDistribution) starts the command once per process with RANK,
    WORLD_SIZE, LOCAL_RANK, NODE_RANK, MASTER_ADDR and MASTER_PORT set (no LOCAL_WORLD_SIZE, no
    torchrun): the same here, two processes on one node."""

    def launch(port: int) -> list[subprocess.Popen]:
        procs = []
        for rank in (0, 1):
            env = child_env(
                RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
            )
            for name in ("LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MLFLOW_TRACKING_URI"):
                env.pop(name, None)
            procs.append(subprocess.Popen(
                [sys.executable, str(TRAINING / "train.py"), "--data_dir", str(tiny_birds), "--output_dir", str(tmp_path / "out"),
                 "--num_epochs", "1", "--distributed", "ddp", *TINY],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
            ))  # fmt: skip
        return procs

    codes, outputs = run_ranks_on_a_free_port(launch)
    assert codes == [0, 0], outputs
    metrics = read_metrics(tmp_path / "out")
    assert (metrics["distributed"], metrics["world_size"]) == ("ddp", 2)
    assert os.path.exists(tmp_path / "out" / "model.pt")
