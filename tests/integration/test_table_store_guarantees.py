"""What only the Table Storage ledger has to prove: journaled commits over 100 operations, their
repair after a crash, and several processes crossing the threshold at once making one run."""

from __future__ import annotations

import random
import subprocess
import sys
import uuid

import pytest

from tests.conftest import ROOT, child_env
from tests.unit.worker_harness import make_harness
from worker.store import ConcurrencyConflict, DecisionRow
from worker.table_store import TableStore

pytestmark = pytest.mark.integration


@pytest.fixture
def store(azurite):
    s = TableStore.from_connection_string(azurite.connection_string, f"t{uuid.uuid4().hex[:16]}")
    yield s
    s.table.delete_table()
    s.close()


def test_a_backfill_and_a_plan_over_100_operations_commit_through_the_journal(store, tmp_path):
    h = make_harness(tmp_path, store=store, min_new_images=10_000)
    for i in range(130):
        h.blobs.blobs[f"{'chicken' if i % 2 else 'turkey'}/b{i:04d}.jpg"] = b"%d" % i
    assert h.request(prefix="").detail == "registered 130 images"
    with store.transaction() as tx:
        assert tx.pending_stats("birds").count == 130
        assert len(tx.manifest_candidates("birds", only_pending=True)) == 130
    h.request(force=True)
    [run] = h.runs()
    assert (run.image_count, run.new_image_count) == (130, 130)
    with store.transaction() as tx:
        assert tx.count_images("birds") == {"in_run": 130}
        assert len(tx.manifest_entries(run.run_id)) == 130
    assert not list(store.query("PartitionKey eq @pk and RowKey ge 'jr|' and RowKey lt 'jr}'", {"pk": "birds"})), "journal cleared"


def test_a_crash_after_the_commit_decision_is_finished_by_the_next_reader(store, tmp_path, monkeypatch):
    h = make_harness(tmp_path, store=store, min_new_images=10_000)
    for i in range(120):
        h.blobs.blobs[f"{'chicken' if i % 2 else 'turkey'}/c{i:04d}.jpg"] = b"%d" % i
    applied = TableStore._apply_journal

    def crash(self, pk, journal, etag):
        raise RuntimeError("process killed after the head recorded the journal")

    monkeypatch.setattr(TableStore, "_apply_journal", crash)
    with pytest.raises(RuntimeError, match="killed"):
        h.request(prefix="", message_id="bf-crash")
    monkeypatch.setattr(TableStore, "_apply_journal", applied)
    with store.transaction() as tx:  # reading the head applies the committed journal first
        assert tx.pending_stats("birds").count == 120
        assert tx.claim_message("bf-crash", "retrain.requested", "birds", h.clock.now()) is False  # the claim committed with it


def test_a_stale_writer_is_refused_and_retried_on_fresh_state(store, tmp_path):
    h = make_harness(tmp_path, store=store)
    h.upload("chicken")
    with store.transaction() as slow:
        slow.model_head("birds")  # reads the head (and its ETag) ...
        h.upload("turkey")  # ... another writer commits meanwhile
        slow.record_decision(DecisionRow(model="birds", at=h.clock.now(), outcome="wait", reason="stale"))
        with pytest.raises(ConcurrencyConflict):
            slow.commit()


def test_four_processes_on_one_table_count_each_image_once_and_make_one_run(azurite, tmp_path):
    table = f"t{uuid.uuid4().hex[:16]}"
    rng = random.Random(3)
    unique = 70
    universe = [(f"{'chicken' if i % 2 else 'turkey'}/{i:05d}.jpg", f"e{i}") for i in range(4 * unique)]
    files = []
    for p in range(4):
        events = universe[p * unique : (p + 1) * unique] + rng.choices(universe, k=30)  # 30% duplicates, across processes
        rng.shuffle(events)
        path = tmp_path / f"events-{p}.txt"
        path.write_text("\n".join(f"{a} {b}" for a, b in events))
        files.append(path)
    env = child_env(PYTHONPATH=str(ROOT), RETRAIN_TABLE_CONNECTION=azurite.connection_string)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.integration.ledger_client", f"table:{table}", str(tmp_path / "state"), str(p), str(f), "200"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p, f in enumerate(files)
    ]
    results = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [r[1][-2000:] for r in results]
    store = TableStore.from_connection_string(azurite.connection_string, table)
    with store.transaction() as tx:
        counts = tx.count_images("birds")
        runs = tx.runs("birds")
    assert sum(counts.values()) == len(universe)
    assert len(runs) == 1
    assert counts.get("in_run", 0) == runs[0].new_image_count >= 200
    store.table.delete_table()
    store.close()


def test_configuration_alone_moves_the_ledger_to_table_storage(azurite, tmp_path):
    from shared.errors import ConfigError
    from worker.bootstrap import open_ledger
    from worker.config import load_config

    config = load_config(
        None,
        env={
            "RETRAIN__WORKER__STORE": "table",
            "RETRAIN__WORKER__TABLE_NAME": f"cfg{uuid.uuid4().hex[:12]}",
            "RETRAIN__WORKER__STATE_DIR": str(tmp_path),
        },
    )
    ledger = open_ledger(config, env={"RETRAIN_TABLES": azurite.connection_string})
    assert isinstance(ledger, TableStore)
    ledger.table.delete_table()
    ledger.close()
    with pytest.raises(ConfigError, match="RETRAIN_TABLES"):
        open_ledger(config, env={})


def test_a_journaled_commit_that_loses_the_race_leaves_no_journal_behind(store, tmp_path):
    h = make_harness(tmp_path, store=store, min_new_images=10_000)
    for i in range(110):
        h.blobs.blobs[f"{'chicken' if i % 2 else 'turkey'}/r{i:04d}.jpg"] = b"%d" % i
    from shared.messages import ImageUploaded, RetrainRequested
    from worker.handlers import Context, handle_retrain_requested

    with store.transaction() as slow:
        handle_retrain_requested(
            Context(h.worker.config, h.clock.now(), {"birds": h.blobs}), slow, RetrainRequested(message_id="big", model="birds", prefix="")
        )
        h.worker.handle(ImageUploaded.of("birds", "chicken/racer.jpg", "e1"))  # commits first
        with pytest.raises(ConcurrencyConflict):
            slow.commit()
    assert not list(store.query("PartitionKey eq @pk and RowKey ge 'jr|' and RowKey lt 'jr}'", {"pk": "birds"}))
    with store.transaction() as tx:
        assert tx.pending_stats("birds").count == 1
