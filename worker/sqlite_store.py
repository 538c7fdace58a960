"""The ledger in one SQLite file (WAL): the embedded default state store.

Several processes may share the file. Every transaction starts with BEGIN IMMEDIATE, which takes
the write lock up front, so two writers serialise instead of both reading a state and one losing
its update. Writers first queue on an flock of `<db>.lock`: the kernel wakes the next waiter the
moment the lock is free, where SQLite's own busy handler polls with sleeps of up to 100 ms (with
4 processes that cut throughput 4x and starved a writer for 25 s). A writer that still cannot
get SQLite's lock within `busy_timeout` (another program holding it) gets
`sqlite3.OperationalError("database is locked")`, which the message bus retries with jitter.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from worker.store import (
    DataStats,
    DecisionRow,
    ImageRow,
    ImageState,
    ManifestEntry,
    ModelHead,
    ModelVersionRow,
    OutboxRow,
    PendingStats,
    RequestRow,
    RunRow,
    Store,
    Tx,
    is_stale,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    model TEXT NOT NULL, path TEXT NOT NULL, etag TEXT NOT NULL,
    label TEXT NOT NULL, split TEXT NOT NULL, size INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL, run_id TEXT, occurred_at TEXT, first_seen_at TEXT NOT NULL,
    latest INTEGER NOT NULL, source TEXT NOT NULL,
    PRIMARY KEY (model, path, etag)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS images_by_age ON images (model, state, latest, first_seen_at);
-- Counts per (label, split, state, latest) kept by triggers, so the policy's snapshot costs the
-- same with 10 or 10 million images.
CREATE TABLE IF NOT EXISTS image_counts (
    model TEXT NOT NULL, label TEXT NOT NULL, split TEXT NOT NULL, state TEXT NOT NULL, latest INTEGER NOT NULL,
    n INTEGER NOT NULL, PRIMARY KEY (model, label, split, state, latest)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS images_count_insert AFTER INSERT ON images BEGIN
    INSERT INTO image_counts VALUES (new.model, new.label, new.split, new.state, new.latest, 1)
        ON CONFLICT (model, label, split, state, latest) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS images_count_update AFTER UPDATE OF state, latest ON images
    WHEN old.state != new.state OR old.latest != new.latest BEGIN
    UPDATE image_counts SET n = n - 1
        WHERE model = old.model AND label = old.label AND split = old.split AND state = old.state AND latest = old.latest;
    INSERT INTO image_counts VALUES (new.model, new.label, new.split, new.state, new.latest, 1)
        ON CONFLICT (model, label, split, state, latest) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS images_count_delete AFTER DELETE ON images BEGIN
    UPDATE image_counts SET n = n - 1
        WHERE model = old.model AND label = old.label AND split = old.split AND state = old.state AND latest = old.latest;
END;
CREATE INDEX IF NOT EXISTS images_run ON images (run_id) WHERE run_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, model TEXT NOT NULL, seq INTEGER NOT NULL, state TEXT NOT NULL,
    attempt INTEGER NOT NULL, manifest_sha256 TEXT NOT NULL, image_count INTEGER NOT NULL,
    new_image_count INTEGER NOT NULL, classes TEXT NOT NULL, created_at TEXT NOT NULL,
    reason TEXT NOT NULL, request_ids TEXT NOT NULL, overrides TEXT NOT NULL,
    submitted_at TEXT, started_at TEXT, finished_at TEXT, next_attempt_at TEXT,
    outcome TEXT, detail TEXT NOT NULL,
    UNIQUE (model, seq)
);
CREATE INDEX IF NOT EXISTS runs_model_state ON runs (model, state);
CREATE TABLE IF NOT EXISTS run_images (
    run_id TEXT NOT NULL, path TEXT NOT NULL, etag TEXT NOT NULL, label TEXT NOT NULL,
    split TEXT NOT NULL, is_new INTEGER NOT NULL,
    PRIMARY KEY (run_id, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, model TEXT NOT NULL, force INTEGER NOT NULL,
    created_at TEXT NOT NULL, overrides TEXT NOT NULL, state TEXT NOT NULL, run_id TEXT,
    requested_by TEXT NOT NULL, reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_open ON requests (model, state, created_at);
CREATE TABLE IF NOT EXISTS inbox (
    message_id TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT, processed_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, type TEXT NOT NULL,
    subject TEXT NOT NULL, payload TEXT NOT NULL, created_at TEXT NOT NULL, published_at TEXT
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox (published_at, seq);
CREATE TABLE IF NOT EXISTS decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, at TEXT NOT NULL,
    outcome TEXT NOT NULL, reason TEXT NOT NULL, run_id TEXT, message_id TEXT
);
CREATE INDEX IF NOT EXISTS decisions_model ON decisions (model, seq);
CREATE TABLE IF NOT EXISTS model_heads (
    model TEXT PRIMARY KEY, next_seq INTEGER NOT NULL, followup_wanted INTEGER NOT NULL,
    last_run_finished_at TEXT, champion_version INTEGER, champion_sha256 TEXT
);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, response TEXT NOT NULL, created_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS model_versions (
    model TEXT NOT NULL, version INTEGER NOT NULL, run_id TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL,
    location TEXT NOT NULL, metrics TEXT NOT NULL, card TEXT NOT NULL,
    PRIMARY KEY (model, version)
);
"""


def _ts(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _dt(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


def _image(r: sqlite3.Row) -> ImageRow:
    return ImageRow(
        model=r["model"], path=r["path"], etag=r["etag"], label=r["label"], split=r["split"], size=r["size"], state=r["state"],
        run_id=r["run_id"], occurred_at=_dt(r["occurred_at"]), first_seen_at=_dt(r["first_seen_at"]), latest=bool(r["latest"]), source=r["source"],
    )  # fmt: skip


def _run(r: sqlite3.Row) -> RunRow:
    return RunRow(
        run_id=r["run_id"], model=r["model"], seq=r["seq"], state=r["state"], attempt=r["attempt"], manifest_sha256=r["manifest_sha256"],
        image_count=r["image_count"], new_image_count=r["new_image_count"], classes=json.loads(r["classes"]), created_at=_dt(r["created_at"]),
        reason=r["reason"], request_ids=json.loads(r["request_ids"]), overrides=json.loads(r["overrides"]), submitted_at=_dt(r["submitted_at"]),
        started_at=_dt(r["started_at"]), finished_at=_dt(r["finished_at"]), next_attempt_at=_dt(r["next_attempt_at"]), outcome=r["outcome"],
        detail=r["detail"],
    )  # fmt: skip


class SqliteTx(Tx):
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.committed = False

    def _one(self, sql: str, params: tuple = ()) -> sqlite3.Row | None:
        return self.conn.execute(sql, params).fetchone()

    # inbox
    def claim_message(self, message_id: str, kind: str, model: str | None, at: dt.datetime) -> bool:
        cur = self.conn.execute("INSERT OR IGNORE INTO inbox VALUES (?, ?, ?, ?)", (message_id, kind, model, _ts(at)))
        return cur.rowcount == 1

    # images
    def add_image(self, row: ImageRow) -> Literal["new", "duplicate", "stale"]:
        # All versions of the path, by primary-key prefix: usually none, rarely more than one.
        versions = self.conn.execute(
            "SELECT etag, latest, occurred_at, first_seen_at FROM images WHERE model=? AND path=?", (row.model, row.path)
        ).fetchall()
        if any(v["etag"] == row.etag for v in versions):
            return "duplicate"
        newest = next((v for v in versions if v["latest"]), None)
        stale = newest is not None and is_stale(row, _dt(newest["occurred_at"]), _dt(newest["first_seen_at"]))
        if newest is not None and not stale:
            # The new version replaces older ones; an older version nobody trained on yet is obsolete.
            self.conn.execute(
                "UPDATE images SET latest=0, state=CASE WHEN state='pending' THEN 'superseded' ELSE state END WHERE model=? AND path=? AND latest=1",
                (row.model, row.path),
            )
        state = "superseded" if stale else row.state
        self.conn.execute(
            "INSERT INTO images VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                row.model,
                row.path,
                row.etag,
                row.label,
                row.split,
                row.size,
                state,
                row.run_id,
                _ts(row.occurred_at),
                _ts(row.first_seen_at),
                0 if stale else 1,
                row.source,
            ),
        )
        return "stale" if stale else "new"

    def pending_stats(self, model: str) -> PendingStats:
        rows = self.conn.execute(
            "SELECT label, SUM(n) AS n FROM image_counts WHERE model=? AND state='pending' AND latest=1 GROUP BY label HAVING SUM(n) > 0",
            (model,),
        ).fetchall()
        if not rows:
            return PendingStats()
        ages = self._one(
            "SELECT (SELECT first_seen_at FROM images WHERE model=? AND state='pending' AND latest=1 ORDER BY first_seen_at LIMIT 1) AS oldest, "
            "(SELECT first_seen_at FROM images WHERE model=? AND state='pending' AND latest=1 ORDER BY first_seen_at DESC LIMIT 1) AS newest",
            (model, model),
        )
        return PendingStats(
            count=sum(r["n"] for r in rows),
            per_class={r["label"]: r["n"] for r in rows},
            oldest_at=_dt(ages["oldest"]),
            newest_at=_dt(ages["newest"]),
        )

    def data_stats(self, model: str) -> DataStats:
        rows = self.conn.execute(
            "SELECT label, split, SUM(n) AS n FROM image_counts WHERE model=? AND latest=1 AND state IN ('pending','in_run','trained') "
            "GROUP BY label, split HAVING SUM(n) > 0",
            (model,),
        ).fetchall()
        return DataStats(
            train_per_class={r["label"]: r["n"] for r in rows if r["split"] == "train"},
            val_count=sum(r["n"] for r in rows if r["split"] == "val"),
        )

    def manifest_candidates(self, model: str, only_pending: bool) -> list[ImageRow]:
        states = "('pending')" if only_pending else "('pending','in_run','trained')"
        rows = self.conn.execute(
            f"SELECT * FROM images WHERE model=? AND latest=1 AND state IN {states} ORDER BY path", (model,)
        ).fetchall()
        return [_image(r) for r in rows]

    def set_image_state(self, model: str, keys: list[tuple[str, str]], state: ImageState, run_id: str | None) -> None:
        self.conn.executemany(
            "UPDATE images SET state=?, run_id=? WHERE model=? AND path=? AND etag=?", [(state, run_id, model, p, e) for p, e in keys]
        )

    def images_in_run(self, run_id: str) -> list[ImageRow]:
        return [_image(r) for r in self.conn.execute("SELECT * FROM images WHERE run_id=? AND state='in_run' ORDER BY path", (run_id,))]

    def count_images(self, model: str) -> dict[str, int]:
        return {
            r["state"]: r["n"] for r in self.conn.execute("SELECT state, COUNT(*) AS n FROM images WHERE model=? GROUP BY state", (model,))
        }

    # runs
    def insert_run(self, run: RunRow, entries: list[ManifestEntry]) -> None:
        self.conn.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", self._run_values(run))
        self.conn.executemany(
            "INSERT INTO run_images VALUES (?,?,?,?,?,?)", [(run.run_id, e.path, e.etag, e.label, e.split, int(e.is_new)) for e in entries]
        )

    @staticmethod
    def _run_values(r: RunRow) -> tuple:
        return (
            r.run_id, r.model, r.seq, r.state, r.attempt, r.manifest_sha256, r.image_count, r.new_image_count, json.dumps(r.classes),
            _ts(r.created_at), r.reason, json.dumps(r.request_ids), json.dumps(r.overrides), _ts(r.submitted_at), _ts(r.started_at),
            _ts(r.finished_at), _ts(r.next_attempt_at), r.outcome, r.detail,
        )  # fmt: skip

    def manifest_entries(self, run_id: str) -> list[ManifestEntry]:
        rows = self.conn.execute("SELECT * FROM run_images WHERE run_id=? ORDER BY path", (run_id,)).fetchall()
        return [ManifestEntry(path=r["path"], etag=r["etag"], label=r["label"], split=r["split"], is_new=bool(r["is_new"])) for r in rows]

    def get_run(self, run_id: str) -> RunRow | None:
        row = self._one("SELECT * FROM runs WHERE run_id=?", (run_id,))
        return _run(row) if row else None

    def update_run(self, run: RunRow) -> None:
        values = self._run_values(run)
        cur = self.conn.execute(
            "UPDATE runs SET model=?, seq=?, state=?, attempt=?, manifest_sha256=?, image_count=?, new_image_count=?, classes=?, created_at=?, "
            "reason=?, request_ids=?, overrides=?, submitted_at=?, started_at=?, finished_at=?, next_attempt_at=?, outcome=?, detail=? WHERE run_id=?",
            (*values[1:], values[0]),
        )
        if cur.rowcount != 1:
            raise KeyError(f"run {run.run_id} does not exist")

    def runs(self, model: str | None = None, states: frozenset[str] | None = None, limit: int | None = None) -> list[RunRow]:
        sql, params = "SELECT * FROM runs WHERE 1=1", []
        if model is not None:
            sql += " AND model=?"
            params.append(model)
        if states is not None:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            params.extend(sorted(states))
        sql += " ORDER BY created_at DESC, seq DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_run(r) for r in self.conn.execute(sql, params)]

    # requests
    def add_request(self, row: RequestRow) -> None:
        self.conn.execute(
            "INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,?)",
            (
                row.request_id,
                row.model,
                int(row.force),
                _ts(row.created_at),
                json.dumps(row.overrides),
                row.state,
                row.run_id,
                row.requested_by,
                row.reason,
            ),
        )

    def open_requests(self, model: str) -> list[RequestRow]:
        rows = self.conn.execute(
            "SELECT * FROM requests WHERE model=? AND state='open' ORDER BY created_at, request_id", (model,)
        ).fetchall()
        return [
            RequestRow(
                request_id=r["request_id"],
                model=r["model"],
                force=bool(r["force"]),
                created_at=_dt(r["created_at"]),
                overrides=json.loads(r["overrides"]),
                state=r["state"],
                run_id=r["run_id"],
                requested_by=r["requested_by"],
                reason=r["reason"],
            )
            for r in rows
        ]

    def update_request(self, row: RequestRow) -> None:
        self.conn.execute("UPDATE requests SET state=?, run_id=? WHERE request_id=?", (row.state, row.run_id, row.request_id))

    # decisions
    def record_decision(self, row: DecisionRow) -> None:
        self.conn.execute(
            "INSERT INTO decisions (model, at, outcome, reason, run_id, message_id) VALUES (?,?,?,?,?,?)",
            (row.model, _ts(row.at), row.outcome, row.reason, row.run_id, row.message_id),
        )

    def decisions(self, model: str, limit: int = 20) -> list[DecisionRow]:
        rows = self.conn.execute("SELECT * FROM decisions WHERE model=? ORDER BY seq DESC LIMIT ?", (model, limit)).fetchall()
        return [
            DecisionRow(
                model=r["model"], at=_dt(r["at"]), outcome=r["outcome"], reason=r["reason"], run_id=r["run_id"], message_id=r["message_id"]
            )
            for r in rows
        ]

    def prune_decisions(self, model: str, keep: int) -> None:
        self.conn.execute(
            "DELETE FROM decisions WHERE model=? AND seq <= (SELECT seq FROM decisions WHERE model=? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (model, model, keep),
        )

    # outbox
    def enqueue_event(self, row: OutboxRow) -> bool:
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO outbox (event_id, type, subject, payload, created_at) VALUES (?,?,?,?,?)",
            (row.event_id, row.type, row.subject, json.dumps(row.payload, sort_keys=True), _ts(row.created_at)),
        )
        return cur.rowcount == 1

    # model versions
    def add_model_version(self, row: ModelVersionRow) -> bool:
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO model_versions VALUES (?,?,?,?,?,?,?)",
            (
                row.model,
                row.version,
                row.run_id,
                _ts(row.created_at),
                row.location,
                json.dumps(row.metrics, sort_keys=True),
                json.dumps(row.card, sort_keys=True),
            ),
        )
        return cur.rowcount == 1

    def model_versions(self, model: str) -> list[ModelVersionRow]:
        rows = self.conn.execute("SELECT * FROM model_versions WHERE model=? ORDER BY version DESC", (model,)).fetchall()
        return [
            ModelVersionRow(
                model=r["model"],
                version=r["version"],
                run_id=r["run_id"],
                created_at=_dt(r["created_at"]),
                location=r["location"],
                metrics=json.loads(r["metrics"]),
                card=json.loads(r["card"]),
            )
            for r in rows
        ]

    # idempotency keys
    def remember_response(self, key: str, fingerprint: str, response: dict, at: dt.datetime) -> tuple[str, dict] | None:
        row = self._one("SELECT fingerprint, response FROM idempotency WHERE key=?", (key,))
        if row is not None:
            return row["fingerprint"], json.loads(row["response"])
        self.conn.execute("INSERT INTO idempotency VALUES (?,?,?,?)", (key, fingerprint, json.dumps(response, sort_keys=True), _ts(at)))
        return None

    # model head
    def model_head(self, model: str) -> ModelHead:
        row = self._one("SELECT * FROM model_heads WHERE model=?", (model,))
        if row is None:
            return ModelHead(model=model)
        return ModelHead(
            model=model, next_seq=row["next_seq"], followup_wanted=bool(row["followup_wanted"]), last_run_finished_at=_dt(row["last_run_finished_at"]),
            champion_version=row["champion_version"], champion_sha256=row["champion_sha256"],
        )  # fmt: skip

    def save_model_head(self, head: ModelHead) -> None:
        self.conn.execute(
            "INSERT INTO model_heads VALUES (?,?,?,?,?,?) ON CONFLICT(model) DO UPDATE SET next_seq=excluded.next_seq, "
            "followup_wanted=excluded.followup_wanted, last_run_finished_at=excluded.last_run_finished_at, "
            "champion_version=excluded.champion_version, champion_sha256=excluded.champion_sha256",
            (
                head.model,
                head.next_seq,
                int(head.followup_wanted),
                _ts(head.last_run_finished_at),
                head.champion_version,
                head.champion_sha256,
            ),
        )

    def commit(self) -> None:
        self.conn.execute("COMMIT")
        self.committed = True


class SqliteStore(Store):
    """`synchronous` NORMAL (default) survives a crash of the process; FULL also a power cut."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 10.0, synchronous: str = "NORMAL"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._synchronous = synchronous
        self._local = threading.local()
        with self._connect_once() as conn:
            conn.executescript(SCHEMA)

    def _connect_once(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @property
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect_once()
        return conn

    @property
    def _lock_fd(self) -> int:
        fd = getattr(self._local, "lock_fd", None)
        if fd is None:
            fd = self._local.lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        return fd

    @contextmanager
    def transaction(self) -> Iterator[SqliteTx]:
        conn, lock_fd = self._conn, self._lock_fd
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            conn.execute("BEGIN IMMEDIATE")
            tx = SqliteTx(conn)
            try:
                yield tx
            finally:
                if not tx.committed:
                    conn.execute("ROLLBACK")
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)

    def unpublished_events(self, limit: int = 100) -> list[OutboxRow]:
        rows = self._conn.execute("SELECT * FROM outbox WHERE published_at IS NULL ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [self._outbox(r) for r in rows]

    def mark_published(self, event_ids: list[str], at: dt.datetime) -> None:
        with self.transaction() as tx:
            tx.conn.executemany(
                "UPDATE outbox SET published_at=? WHERE event_id=? AND published_at IS NULL", [(_ts(at), i) for i in event_ids]
            )
            tx.commit()

    def all_events(self) -> Iterator[OutboxRow]:
        for r in self._conn.execute("SELECT * FROM outbox ORDER BY seq").fetchall():
            yield self._outbox(r)

    @staticmethod
    def _outbox(r: sqlite3.Row) -> OutboxRow:
        return OutboxRow(
            event_id=r["event_id"], type=r["type"], subject=r["subject"], payload=json.loads(r["payload"]), created_at=_dt(r["created_at"]),
            published_at=_dt(r["published_at"]),
        )  # fmt: skip

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        fd = getattr(self._local, "lock_fd", None)
        if fd is not None:
            os.close(fd)
            self._local.lock_fd = None


def is_busy_error(exc: BaseException) -> bool:
    """SQLite's lock contention, which a retry of the whole transaction resolves."""
    return isinstance(exc, sqlite3.OperationalError) and any(s in str(exc) for s in ("locked", "busy"))
