"""Views read the SQLite ledger without queuing behind a writer (a read path)."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from shared.messages import ImageUploaded
from tests.fakes.harness import small_config
from worker.adapters.local.sqlite_store import SqliteStore
from worker.views import explain_view, models_view, status_view

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def _row(path: str):
    from worker.context import Context
    from worker.handlers import image_row

    return lambda config: image_row(Context(config, NOW), "birds", path, "e1", 10, "test", None)


def test_views_answer_while_another_process_holds_the_write_lock(tmp_path):
    config = small_config(tmp_path)
    path = tmp_path / "ledger.db"
    writer, reader = SqliteStore(path), SqliteStore(path)  # two openers: two processes' view of one file
    with writer.transaction() as tx:
        tx.add_image(_row("chicken/1.jpg")(config))
        tx.commit()

    answers: dict[str, object] = {}

    def look() -> None:
        answers["status"] = status_view(reader, config)
        answers["explain"] = explain_view(reader, config)
        answers["models"] = models_view(reader, config)

    with writer.transaction() as tx:  # a long write in flight: the writers' lock and BEGIN IMMEDIATE held
        tx.add_image(_row("chicken/2.jpg")(config))
        viewer = threading.Thread(target=look, daemon=True)
        viewer.start()
        viewer.join(timeout=20)
        assert not viewer.is_alive(), "a view waited for the writer"
        tx.commit()
    # The view saw the last committed state, not the write in flight.
    assert answers["status"]["birds"]["pending"]["total"] == 1
    writer.close()
    reader.close()


def test_a_read_cannot_commit(tmp_path):
    store = SqliteStore(tmp_path / "ledger.db")
    with store.read() as tx, pytest.raises(RuntimeError, match="cannot commit"):
        tx.commit()
    store.close()


def test_the_worker_keeps_writing_while_a_read_is_open(tmp_path):
    from tests.fakes.harness import make_harness

    harness = make_harness(tmp_path, store=SqliteStore(tmp_path / "ledger.db"))
    reader = SqliteStore(tmp_path / "ledger.db")
    with reader.read() as tx:
        before = tx.pending_stats("birds").count
        harness.worker.handle(ImageUploaded.of("birds", "turkey/1.jpg", "e1", 10))  # commits while the snapshot is open
        assert tx.pending_stats("birds").count == before  # a snapshot: the read sees one state throughout
    with reader.read() as tx:
        assert tx.pending_stats("birds").count == before + 1
    reader.close()


def test_status_shows_the_policy_verdict_now_and_when_waiting_ends(tmp_path):
    from tests.fakes.harness import make_harness

    harness = make_harness(tmp_path)
    for i in range(20):
        harness.worker.handle(ImageUploaded.of("birds", f"{'chicken' if i % 2 else 'turkey'}/{i}.jpg", "e1", 10))
    now = harness.clock.now()
    verdict = status_view(harness.worker.store, harness.worker.config, "birds", now=now)["birds"]["next"]
    assert verdict["outcome"] == "wait"
    assert verdict["forced"] is False
    assert "quiet period" in verdict["reason"], verdict  # the threshold is met; the quiet period holds them
    assert dt.datetime.fromisoformat(verdict["wake_at"]) == now + dt.timedelta(seconds=10)


def test_status_weighs_the_forced_requests_still_open(tmp_path):
    from tests.fakes.harness import make_harness

    h = make_harness(tmp_path, in_flight="queue", quiet_period=0)
    h.uploads(10)  # a run in flight
    h.request(force=True, requested_by="ops")  # queued behind it, still open
    verdict = status_view(h.worker.store, h.worker.config, "birds", now=h.clock.now())["birds"]["next"]
    assert (verdict["outcome"], verdict["forced"]) == ("coalesce", True)
    assert "a forced request, queued behind it" in verdict["reason"]
