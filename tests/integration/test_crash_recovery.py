"""kill -9 at each named point of the submit protocol; the restarted worker makes exactly one run."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, child_env
from worker.adapters.local.sqlite_store import SqliteStore

pytestmark = pytest.mark.integration

FAKE_TRAIN = """\
import json, os, sys
from pathlib import Path
argv = sys.argv[1:]
out = Path(argv[argv.index("--output_dir") + 1])
with open(os.environ["LAUNCHES"], "a") as f:
    f.write(f"{os.getpid()}\\n")
(out / "metrics.json").write_text(json.dumps({"best_val_acc": 1.0}))
"""


def test_a_crash_between_backfill_chunks_is_finished_by_the_redelivery(tmp_path):
    fake, launches, state = tmp_path / "fake_train.py", tmp_path / "launches.txt", tmp_path / "state"
    fake.write_text(FAKE_TRAIN)
    launches.touch()
    fed = _life(state, fake, "backfill", launches, crash_at="after_backfill_chunk")
    assert fed.returncode == -signal.SIGKILL, fed.stderr[-2000:]
    store = SqliteStore(state / "ledger.db")
    with store.transaction() as tx:
        assert tx.count_images("birds") == {"pending": 20}, "one chunk of 20 landed before the kill"
        assert tx.runs("birds") == []
    recovered = _life(state, fake, "recover", launches)
    assert recovered.returncode == 0, recovered.stdout[-2000:] + recovered.stderr[-2000:]
    assert "registered 40 images" in recovered.stdout
    with store.transaction() as tx:
        runs = tx.runs("birds")
        counts = tx.count_images("birds")
    assert len(runs) == 1
    assert runs[0].new_image_count == 60
    assert counts == {"trained": 60}
    assert len(launches.read_text().split()) == 1


def _life(state_dir, fake, mode, launches, crash_at=None):
    env = child_env(PYTHONPATH=str(ROOT), LAUNCHES=str(launches))
    if crash_at:
        env["RETRAIN_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "tests.integration.crash_client", str(state_dir), str(fake), mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# Three different durable states: planned only; at the backend but still planned in the ledger;
# marked submitted with its event queued but not relayed.
@pytest.mark.parametrize("point", ["after_plan", "after_backend_submit", "after_mark_submitted", None])
def test_a_crash_anywhere_in_submission_is_repaired_with_exactly_one_run(tmp_path, point):
    fake, launches, state = tmp_path / "fake_train.py", tmp_path / "launches.txt", tmp_path / "state"
    fake.write_text(FAKE_TRAIN)
    launches.touch()
    fed = _life(state, fake, "feed", launches, crash_at=point)
    if point:
        assert fed.returncode == -signal.SIGKILL, fed.stderr[-2000:]
    else:
        assert fed.returncode == 0, fed.stderr[-2000:]
    recovered = _life(state, fake, "recover", launches)
    assert recovered.returncode == 0, recovered.stdout[-2000:] + recovered.stderr[-2000:]
    store = SqliteStore(state / "ledger.db")
    with store.transaction() as tx:
        runs = tx.runs("birds")
        counts = tx.count_images("birds")
        events = [e.type for e in store.all_events()]
    assert len(runs) == 1
    assert runs[0].state == "finalized"  # completed (rejected: the stand-in training writes no model.pt)
    assert counts == {"trained": 20}, "no image lost"
    assert len(launches.read_text().split()) == 1, "the training ran exactly once"
    assert len(list((state / "runs").iterdir())) == 1
    assert events.count("retrain.run.submitted") == 1
