"""The SQLite ledger's own settings and life cycle: where it lives, WAL with synchronous NORMAL
(or FULL when asked), its busy timeout, one connection per thread, UTC timestamps on disk and the
errors it explains."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time

import pytest

from worker.adapters.local.sqlite_store import SCHEMA_VERSION, LedgerSchemaError, SqliteStore, is_busy_error
from worker.store import DecisionRow

pytestmark = pytest.mark.unit


def _pragma(store: SqliteStore, name: str):
    return store._conn.execute(f"PRAGMA {name}").fetchone()[0]


def test_a_new_ledger_makes_its_folders_and_runs_in_wal_with_synchronous_normal(tmp_path):
    store = SqliteStore(tmp_path / "a" / "b" / "ledger.db")
    assert (tmp_path / "a" / "b" / "ledger.db").is_file()
    assert (_pragma(store, "journal_mode"), _pragma(store, "synchronous")) == ("wal", 1), "NORMAL: survives a crash, not a power cut"
    assert (_pragma(store, "busy_timeout"), _pragma(store, "foreign_keys")) == (10_000, 1)
    store.close()


def test_synchronous_full_and_the_busy_timeout_are_settings(tmp_path):
    store = SqliteStore(tmp_path / "ledger.db", synchronous="FULL", busy_timeout_s=2.5)
    assert (_pragma(store, "synchronous"), _pragma(store, "busy_timeout")) == (2, 2500)
    store.close()
    lower = SqliteStore(tmp_path / "other.db", synchronous="full")
    assert _pragma(lower, "synchronous") == 2
    lower.close()


@pytest.mark.parametrize("value", ["FAST", "OFF", "NORMAL; DROP TABLE images", ""])
def test_a_synchronous_value_sqlite_would_silently_ignore_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match="synchronous must be NORMAL or FULL"):
        SqliteStore(tmp_path / "ledger.db", synchronous=value)
    assert not (tmp_path / "ledger.db").exists()


def test_each_thread_keeps_one_connection_and_a_closed_store_reconnects_on_use(tmp_path):
    store = SqliteStore(tmp_path / "ledger.db")
    mine = store._conn
    assert store._conn is mine
    theirs: list[sqlite3.Connection] = []
    worker = threading.Thread(target=lambda: theirs.append(store._conn))
    worker.start()
    worker.join()
    assert theirs[0] is not mine
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        mine.execute("SELECT 1")
    with store.transaction() as tx:  # used again after close: a new connection
        assert tx.image_watermark("birds") == 0
    store.close()


def test_timestamps_are_written_in_utc_whatever_the_machines_zone(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        store = SqliteStore(tmp_path / "ledger.db")
        at = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
        with store.transaction() as tx:
            tx.record_decision(DecisionRow(model="birds", at=at, outcome="wait", reason="r"))
            tx.commit()
        [(text,)] = store._conn.execute("SELECT at FROM decisions").fetchall()
        store.close()
    finally:
        monkeypatch.undo()
        time.tzset()
    assert text == "2026-11-30T12:00:00.000000+00:00", "text sorts as time only in one zone"


def test_a_ledger_from_a_newer_retrain_is_refused_with_both_schema_versions(tmp_path):
    SqliteStore(tmp_path / "ledger.db").close()
    newer = sqlite3.connect(tmp_path / "ledger.db")
    newer.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    newer.close()
    with pytest.raises(
        LedgerSchemaError, match=rf"has schema {SCHEMA_VERSION + 1}, newer than this retrain understands \({SCHEMA_VERSION}\)"
    ):
        SqliteStore(tmp_path / "ledger.db")


def test_a_read_that_tries_to_commit_says_how_to_write(tmp_path):
    store = SqliteStore(tmp_path / "ledger.db")
    with store.read() as tx, pytest.raises(RuntimeError) as refused:
        tx.commit()
    assert str(refused.value) == "a read (Store.read) cannot commit; use Store.transaction to write"
    store.close()


@pytest.mark.parametrize(
    ("error", "busy"),
    [
        (sqlite3.OperationalError("database is locked"), True),
        (sqlite3.OperationalError("database table is locked: images"), True),
        (sqlite3.OperationalError("database is busy"), True),
        (sqlite3.OperationalError("no such table: images"), False),
        (sqlite3.IntegrityError("UNIQUE constraint failed: images.path"), False),
        (OSError("locked"), False),
    ],
)
def test_only_sqlites_lock_contention_counts_as_busy_and_is_retried(error, busy):
    assert is_busy_error(error) is busy
