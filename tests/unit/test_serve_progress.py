"""`serve` shows each local run's epochs as they happen (issue 15)."""

from __future__ import annotations

import logging

import pytest

from worker.app.serve import RunProgress

from .worker_harness import make_harness

pytestmark = pytest.mark.unit


def test_epoch_lines_are_logged_once_each_and_a_line_being_written_waits(tmp_path, caplog):
    h = make_harness(tmp_path, quiet_period=0)
    h.uploads(10)
    [run] = h.runs()
    log_file = tmp_path / "runs" / run.backend_run_id / "train.log"
    log_file.parent.mkdir(parents=True)
    log_file.write_text("12:00:01 [train] training resnet18 on ...\n12:00:09 [train] epoch 1/2 train_loss=0.7\n12:00:17 [train] epo")
    progress = RunProgress(h.worker, tmp_path / "runs")
    with caplog.at_level(logging.INFO, logger="retrain.serve"):
        progress.show()
        progress.show()  # nothing new: nothing logged again
        with open(log_file, "a") as fh:
            fh.write("ch 2/2 train_loss=0.5\n12:00:18 [train] best_val_acc=0.9100 (epoch 2); wrote outputs\n")
        progress.show()
    lines = [r.getMessage() for r in caplog.records if r.name == "retrain.serve"]
    assert lines == [
        f"{run.backend_run_id}: 12:00:09 [train] epoch 1/2 train_loss=0.7",
        f"{run.backend_run_id}: 12:00:17 [train] epoch 2/2 train_loss=0.5",
        f"{run.backend_run_id}: 12:00:18 [train] best_val_acc=0.9100 (epoch 2); wrote outputs",
    ]
