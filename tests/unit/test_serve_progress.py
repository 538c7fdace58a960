"""`serve` shows each local run's epochs as they happen, each new attempt, and how each run ended."""

from __future__ import annotations

import logging

import pytest

from tests.fakes.harness import make_harness
from worker.app.serve import RunProgress

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


def test_a_retry_and_the_end_of_each_run_are_logged_with_their_reasons(tmp_path, caplog):
    """A run failing on a missing package was retried and failed, and serve's log said nothing."""
    h = make_harness(tmp_path, quiet_period=0, max_attempts=2)
    h.uploads(10)
    [run] = h.runs()
    progress = RunProgress(h.worker, None)
    with caplog.at_level(logging.INFO, logger="retrain.serve"):
        progress.show()
        h.status(run.backend_run_id, "failed", detail="ModuleNotFoundError: No module named 'torch'")
        progress.show()
        [retry] = h.runs()
        h.status(retry.backend_run_id, "failed", detail="ModuleNotFoundError: No module named 'torch'")
        progress.show()
        h.uploads(5)
        h.clock.advance(3600)
        h.worker.tick()
        progress.show()
        h.succeed(next(r for r in h.runs() if r.in_flight))
        progress.show()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "retrain.serve"]
    assert lines[0] == ("WARNING", f"{run.run_id}: attempt 2 of birds after: ModuleNotFoundError: No module named 'torch'")
    assert lines[1][0] == "WARNING"
    assert lines[1][1].startswith(f"{run.run_id} failed: ")
    assert "No module named 'torch'" in lines[1][1]
    assert lines[2][0] == "INFO"
    assert " registered: registered as v1: " in lines[2][1]
    assert len(lines) == 3


def test_an_inbox_message_is_kept_until_it_is_handled_and_handled_on_the_next_cycle_after_a_failure(tmp_path):
    """The file is the only copy of the request: removed after the worker handled it, never before
    (a ledger that is busy or down for one cycle must not lose it)."""
    from shared.messages import RetrainRequested
    from tests.fakes.harness import make_harness
    from worker.adapters.local.inbox import LocalInbox
    from worker.app.serve import LocalService

    h = make_harness(tmp_path)
    inbox = LocalInbox(h.worker.config.worker.state_dir / "inbox")
    request = RetrainRequested(message_id="req-1", model="birds", force=True, reason="backfill")
    inbox.put(request.message_id, request.model_dump(mode="json", exclude_none=True))
    [path] = list(inbox.pending())
    service = LocalService(h.worker, settle_seconds=0)
    real_handle = h.worker.handle
    calls: list[str] = []

    def failing_once(message, *args, **kwargs):
        if getattr(message, "message_id", "") == "req-1" and not calls:
            calls.append("failed")
            raise ConnectionError("the ledger is unreachable for a moment")
        return real_handle(message, *args, **kwargs)

    h.worker.handle = failing_once
    with pytest.raises(ConnectionError):
        service.cycle()
    assert path.exists()  # still there: nothing was done with it
    service.cycle()
    assert not path.exists()
    with h.store.transaction() as tx:
        assert [r.request_id for r in tx.open_requests("birds")] == ["req-1"]
