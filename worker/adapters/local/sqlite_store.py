"""The ledger in one SQLite file (WAL): the embedded default state store.

Several processes may share the file. Every transaction starts with BEGIN IMMEDIATE, which takes
the write lock up front, so two writers serialise instead of both reading a state and one losing
its update. Writers first queue on a lock of `<db>.lock` (flock; `file_lock` has the Windows path): the kernel wakes the next waiter the
moment the lock is free, where SQLite's own busy handler polls with sleeps of up to 100 ms (with
4 processes that cut throughput 4x and starved a writer for 25 s). A writer that still cannot
get SQLite's lock within `busy_timeout` (another program holding it) gets
`sqlite3.OperationalError("database is locked")`, which the message bus retries with jitter.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from worker.adapters.local.file_lock import FileLock
from worker.store import (
    IN_FLIGHT_STATES,
    ConcurrencyConflict,
    DataStats,
    DecisionRow,
    ImageRow,
    ImageState,
    ModelHead,
    ModelVersionRow,
    OutboxRow,
    PendingStats,
    RequestRow,
    RunRow,
    Store,
    Tx,
    image_state,
    is_stale,
)

SCHEMA_VERSION = 2
SCHEMA = """
-- One row per image version. `seq` is the model's arrival order: runs freeze a watermark on it
-- and image states follow from the watermarks (worker.store.image_state), so no commit rewrites
-- rows per image.
CREATE TABLE IF NOT EXISTS images (
    model TEXT NOT NULL, path TEXT NOT NULL, etag TEXT NOT NULL,
    label TEXT NOT NULL, split TEXT NOT NULL, size INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL, occurred_at TEXT, first_seen_at TEXT NOT NULL,
    latest INTEGER NOT NULL, source TEXT NOT NULL,
    PRIMARY KEY (model, path, etag)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS images_by_seq ON images (model, seq);
CREATE INDEX IF NOT EXISTS images_latest_by_seq ON images (model, latest, seq);
-- Latest versions per (label, split), kept by triggers: the policy's data check costs the same
-- with 10 or 10 million images.
CREATE TABLE IF NOT EXISTS image_counts (
    model TEXT NOT NULL, label TEXT NOT NULL, split TEXT NOT NULL, latest INTEGER NOT NULL,
    n INTEGER NOT NULL, PRIMARY KEY (model, label, split, latest)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS images_count_insert AFTER INSERT ON images BEGIN
    INSERT INTO image_counts VALUES (new.model, new.label, new.split, new.latest, 1)
        ON CONFLICT (model, label, split, latest) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS images_count_update AFTER UPDATE OF latest ON images WHEN old.latest != new.latest BEGIN
    UPDATE image_counts SET n = n - 1 WHERE model = old.model AND label = old.label AND split = old.split AND latest = old.latest;
    INSERT INTO image_counts VALUES (new.model, new.label, new.split, new.latest, 1)
        ON CONFLICT (model, label, split, latest) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS images_count_delete AFTER DELETE ON images BEGIN
    UPDATE image_counts SET n = n - 1 WHERE model = old.model AND label = old.label AND split = old.split AND latest = old.latest;
END;
-- Pending images per label (latest versions above the model's pending floor: the in-flight run's
-- watermark, else the trained one), kept by triggers; recounted when the floor moves.
CREATE TABLE IF NOT EXISTS pending_floor (model TEXT PRIMARY KEY, floor INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending_counts (
    model TEXT NOT NULL, label TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (model, label)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS pending_count_insert AFTER INSERT ON images
    WHEN new.latest = 1 AND new.seq > COALESCE((SELECT floor FROM pending_floor WHERE model = new.model), 0) BEGIN
    INSERT INTO pending_counts VALUES (new.model, new.label, 1) ON CONFLICT (model, label) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS pending_count_superseded AFTER UPDATE OF latest ON images
    WHEN old.latest = 1 AND new.latest = 0 AND old.seq > COALESCE((SELECT floor FROM pending_floor WHERE model = old.model), 0) BEGIN
    UPDATE pending_counts SET n = n - 1 WHERE model = old.model AND label = old.label;
END;
-- A run names its manifest by digest (a blob) and its watermarks; nothing per image.
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, model TEXT NOT NULL, seq INTEGER NOT NULL, state TEXT NOT NULL,
    created_at TEXT NOT NULL, doc TEXT NOT NULL,
    UNIQUE (model, seq)
);
CREATE INDEX IF NOT EXISTS runs_model_state ON runs (model, state);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, model TEXT NOT NULL, seq INTEGER NOT NULL, force INTEGER NOT NULL,
    created_at TEXT NOT NULL, overrides TEXT NOT NULL, state TEXT NOT NULL,
    requested_by TEXT NOT NULL, reason TEXT NOT NULL,
    UNIQUE (model, seq)
);
CREATE TABLE IF NOT EXISTS inbox (
    message_id TEXT PRIMARY KEY, kind TEXT NOT NULL, model TEXT, processed_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inbox_by_age ON inbox (processed_at);
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
CREATE TABLE IF NOT EXISTS model_heads (model TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (
    model TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL, response TEXT NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (model, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_by_age ON idempotency (created_at);
CREATE TABLE IF NOT EXISTS model_versions (
    model TEXT NOT NULL, version INTEGER NOT NULL, run_id TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL,
    location TEXT NOT NULL, metrics TEXT NOT NULL, card TEXT NOT NULL,
    PRIMARY KEY (model, version)
);
"""


class LedgerSchemaError(RuntimeError):
    """The ledger file was written by an incompatible version of retrain."""


def _ts(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _dt(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


def _at(value: str) -> dt.datetime:
    """A timestamp the schema requires (NOT NULL)."""
    return dt.datetime.fromisoformat(value)


def _image(r: sqlite3.Row, state: ImageState) -> ImageRow:
    return ImageRow(
        model=r["model"], path=r["path"], etag=r["etag"], label=r["label"], split=r["split"], size=r["size"], state=state,
        seq=r["seq"], occurred_at=_dt(r["occurred_at"]), first_seen_at=_dt(r["first_seen_at"]), latest=bool(r["latest"]), source=r["source"],
    )  # fmt: skip


_IN_FLIGHT_SQL = ",".join(f"'{state}'" for state in sorted(IN_FLIGHT_STATES))
# The request's budget override rides in its overrides column (schema v2 has no column for it).
_OVERRIDE_BUDGET = "_override_budget"
_RUN_TIMES = ("created_at", "submitted_at", "started_at", "finished_at", "next_attempt_at", "oldest_image_at")


def _run_doc(run: RunRow) -> str:
    doc = dataclasses.asdict(run)
    for key in _RUN_TIMES:
        doc[key] = _ts(doc[key])
    return json.dumps(doc, sort_keys=True)


def _run(r: sqlite3.Row) -> RunRow:
    doc = json.loads(r["doc"])
    for key in _RUN_TIMES:
        doc[key] = _dt(doc.get(key))
    return RunRow(**doc)


def _head_doc(head: ModelHead) -> str:
    doc = dataclasses.asdict(head)
    for key in ("last_run_finished_at", "backoff_until"):
        doc[key] = _ts(doc[key])
    return json.dumps(doc, sort_keys=True)


def _head(model: str, text: str | None) -> ModelHead:
    if text is None:
        return ModelHead(model=model)
    doc = json.loads(text)
    for key in ("last_run_finished_at", "backoff_until"):
        doc[key] = _dt(doc.get(key))
    return ModelHead(**doc)


class SqliteTx(Tx):
    def __init__(self, conn: sqlite3.Connection, read_only: bool = False):
        self.conn, self.read_only = conn, read_only
        self.committed = False

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(sql, params).fetchone()
        return row

    def _aggregate(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row:
        """A query that always yields one row (an aggregate, or SELECTs of scalar subqueries)."""
        row: sqlite3.Row | None = self.conn.execute(sql, params).fetchone()
        assert row is not None, sql
        return row

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
            # The new version replaces older ones: only the newest version of a path is trained on.
            self.conn.execute("UPDATE images SET latest=0 WHERE model=? AND path=? AND latest=1", (row.model, row.path))
        self.conn.execute(
            "INSERT INTO images VALUES (?,?,?,?,?,?,(SELECT COALESCE(MAX(seq), 0) + 1 FROM images WHERE model=?),?,?,?,?)",
            (
                row.model, row.path, row.etag, row.label, row.split, row.size, row.model, _ts(row.occurred_at), _ts(row.first_seen_at),
                0 if stale else 1, row.source,
            ),
        )  # fmt: skip
        return "stale" if stale else "new"

    def image_watermark(self, model: str) -> int:
        return int(self._aggregate("SELECT COALESCE(MAX(seq), 0) AS s FROM images WHERE model=?", (model,))["s"])

    def _watermarks(self, model: str) -> tuple[int, int | None]:
        """(trained watermark, the in-flight run's watermark or None)."""
        row = self._aggregate(
            "SELECT (SELECT doc FROM model_heads WHERE model=?) AS head, "
            f"(SELECT doc FROM runs WHERE model=? AND state IN ({_IN_FLIGHT_SQL}) LIMIT 1) AS run",
            (model, model),
        )
        trained = _head(model, row["head"]).trained_watermark
        return trained, (json.loads(row["run"])["watermark"] if row["run"] else None)

    def pending_stats(self, model: str) -> PendingStats:
        trained, flying = self._watermarks(model)
        floor = max(trained, flying or 0)
        kept = self._one("SELECT floor FROM pending_floor WHERE model=?", (model,))
        stale = kept is None or kept["floor"] != floor
        if stale and self.read_only:  # a view counts for itself; the next writer refreshes the kept counts
            counted = "SELECT label, COUNT(*) AS n FROM images WHERE model=? AND latest=1 AND seq>? GROUP BY label"
            rows = self.conn.execute(counted, (model, floor)).fetchall()
        elif stale:  # the floor moved (a run planned or failed): recount once
            self.conn.execute("DELETE FROM pending_counts WHERE model=?", (model,))
            self.conn.execute(
                "INSERT INTO pending_counts SELECT model, label, COUNT(*) FROM images WHERE model=? AND latest=1 AND seq>? GROUP BY label",
                (model, floor),
            )
            self.conn.execute(
                "INSERT INTO pending_floor VALUES (?, ?) ON CONFLICT (model) DO UPDATE SET floor=excluded.floor", (model, floor)
            )
        if not (stale and self.read_only):
            rows = self.conn.execute("SELECT label, n FROM pending_counts WHERE model=? AND n > 0", (model,)).fetchall()
        if not rows:
            return PendingStats()
        # Arrival order is seq order, so the oldest and newest pending are the ends of the seq range.
        ends = self._aggregate(
            "SELECT (SELECT first_seen_at FROM images WHERE model=? AND latest=1 AND seq>? ORDER BY seq LIMIT 1) AS oldest, "
            "(SELECT first_seen_at FROM images WHERE model=? AND latest=1 AND seq>? ORDER BY seq DESC LIMIT 1) AS newest",
            (model, floor, model, floor),
        )
        return PendingStats(
            count=sum(r["n"] for r in rows),
            per_class={r["label"]: r["n"] for r in rows},
            oldest_at=_dt(ends["oldest"]),
            newest_at=_dt(ends["newest"]),
        )

    def data_stats(self, model: str) -> DataStats:
        rows = self.conn.execute("SELECT label, split, n FROM image_counts WHERE model=? AND latest=1 AND n > 0", (model,)).fetchall()
        return DataStats(
            train_per_class={r["label"]: r["n"] for r in rows if r["split"] == "train"},
            val_count=sum(r["n"] for r in rows if r["split"] == "val"),
        )

    def image_arrivals(self, model: str) -> list[ImageRow]:
        trained, flying = self._watermarks(model)
        rows = self.conn.execute("SELECT * FROM images WHERE model=? ORDER BY seq", (model,)).fetchall()
        return [_image(r, image_state(bool(r["latest"]), r["seq"], trained, flying)) for r in rows]

    def manifest_candidates(self, model: str, after_seq: int, upto_seq: int) -> list[ImageRow]:
        trained, flying = self._watermarks(model)
        rows = self.conn.execute(
            "SELECT * FROM images WHERE model=? AND latest=1 AND seq>? AND seq<=? ORDER BY path", (model, after_seq, upto_seq)
        ).fetchall()
        return [_image(r, image_state(True, r["seq"], trained, flying)) for r in rows]

    def count_images(self, model: str) -> dict[str, int]:
        trained, flying = self._watermarks(model)
        flying = flying if flying is not None and flying > trained else trained
        row = self._aggregate(
            "SELECT SUM(latest=0) AS superseded, SUM(latest=1 AND seq<=?) AS trained, SUM(latest=1 AND seq>? AND seq<=?) AS in_run, "
            "SUM(latest=1 AND seq>?) AS pending FROM images WHERE model=?",
            (trained, trained, flying, flying, model),
        )
        return {k: row[k] for k in ("pending", "in_run", "trained", "superseded") if row[k]}

    # runs
    def insert_run(self, run: RunRow) -> None:
        self.conn.execute(
            "INSERT INTO runs VALUES (?,?,?,?,?,?)", (run.run_id, run.model, run.seq, run.state, _ts(run.created_at), _run_doc(run))
        )

    def get_run(self, run_id: str) -> RunRow | None:
        row = self._one("SELECT * FROM runs WHERE run_id=?", (run_id,))
        return _run(row) if row else None

    def update_run(self, run: RunRow) -> None:
        cur = self.conn.execute("UPDATE runs SET state=?, doc=? WHERE run_id=?", (run.state, _run_doc(run), run.run_id))
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
        seq = self._aggregate("SELECT COALESCE(MAX(seq), 0) + 1 AS s FROM requests WHERE model=?", (row.model,))["s"]
        self.conn.execute(
            "INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,?)",
            (
                row.request_id, row.model, seq, int(row.force), _ts(row.created_at),
                json.dumps({**row.overrides, **({_OVERRIDE_BUDGET: True} if row.override_budget else {})}), row.state,
                row.requested_by, row.reason,
            ),
        )  # fmt: skip
        row.seq = seq

    def open_requests(self, model: str) -> list[RequestRow]:
        rows = self.conn.execute(
            "SELECT * FROM requests WHERE model=? AND state='open' AND seq > COALESCE("
            "(SELECT json_extract(doc, '$.request_watermark') FROM model_heads WHERE model=?), 0) ORDER BY seq",
            (model, model),
        ).fetchall()
        return [self._request(r) for r in rows]

    def all_requests(self, model: str) -> list[RequestRow]:
        rows = self.conn.execute("SELECT * FROM requests WHERE model=? ORDER BY seq", (model,)).fetchall()
        return [self._request(r) for r in rows]

    @staticmethod
    def _request(r: sqlite3.Row) -> RequestRow:
        overrides = json.loads(r["overrides"])
        override_budget = bool(overrides.pop(_OVERRIDE_BUDGET, False))
        return RequestRow(
            request_id=r["request_id"], model=r["model"], force=bool(r["force"]), created_at=_at(r["created_at"]),
            overrides=overrides, state=r["state"], requested_by=r["requested_by"], reason=r["reason"], seq=r["seq"],
            override_budget=override_budget,
        )  # fmt: skip

    def reject_request(self, row: RequestRow) -> None:
        self.conn.execute("UPDATE requests SET state='rejected' WHERE request_id=?", (row.request_id,))

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
                model=r["model"], at=_at(r["at"]), outcome=r["outcome"], reason=r["reason"], run_id=r["run_id"], message_id=r["message_id"]
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
                created_at=_at(r["created_at"]),
                location=r["location"],
                metrics=json.loads(r["metrics"]),
                card=json.loads(r["card"]),
            )
            for r in rows
        ]

    # idempotency keys
    def remember_response(
        self, model: str, key: str, fingerprint: str, response: dict[str, Any], at: dt.datetime
    ) -> tuple[str, dict[str, Any]] | None:
        row = self._one("SELECT fingerprint, response FROM idempotency WHERE model=? AND key=?", (model, key))
        if row is not None:
            return row["fingerprint"], json.loads(row["response"])
        self.conn.execute(
            "INSERT INTO idempotency VALUES (?,?,?,?,?)", (model, key, fingerprint, json.dumps(response, sort_keys=True), _ts(at))
        )
        return None

    # model head
    def model_head(self, model: str) -> ModelHead:
        row = self._one("SELECT doc FROM model_heads WHERE model=?", (model,))
        return _head(model, row["doc"] if row else None)

    def save_model_head(self, head: ModelHead) -> None:
        self.conn.execute(
            "INSERT INTO model_heads VALUES (?,?) ON CONFLICT(model) DO UPDATE SET doc=excluded.doc", (head.model, _head_doc(head))
        )

    def commit(self) -> None:
        if self.read_only:
            raise RuntimeError("a read (Store.read) cannot commit; use Store.transaction to write")
        self.conn.execute("COMMIT")
        self.committed = True


class SqliteStore(Store):
    """`synchronous` NORMAL (default) survives a crash of the process; FULL also a power cut."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 10.0, synchronous: str = "NORMAL", portable_lock: bool = False):
        if synchronous.upper() not in ("NORMAL", "FULL"):
            # SQLite ignores a value it does not know and keeps its build's default; OFF loses commits
            # in a crash of the process. Refuse both rather than run with durability nobody chose.
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._synchronous = synchronous
        self._local = threading.local()
        # Opening a new file switches it to WAL, which takes an exclusive lock that SQLite's busy
        # handler does not wait for: a second process opening the same new ledger at that moment
        # got "database is locked" (`serve` and `explain` started together). Openers take turns.
        self._writers = FileLock(f"{self.path}.lock", portable=portable_lock)
        opener = FileLock(f"{self.path}.lock", portable=portable_lock)
        with opener:
            conn = self._connect_once()
            try:
                self._check_schema(conn)
            finally:
                conn.close()
        opener.close()

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        has_tables = conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type='table' AND name='images'").fetchone()[0]
        if has_tables and version < SCHEMA_VERSION:
            raise LedgerSchemaError(
                f"the ledger {self.path} was written by an older retrain (schema {version}, per-image run rows); this version "
                f"keeps watermarks instead (schema {SCHEMA_VERSION}) and does not convert it. Let in-flight runs finish with the "
                f"old version, then move the file aside (mv {self.path} {self.path}.v{version}); the new ledger re-registers the "
                "images from the images folder on the next scan (counted as new once)."
            )
        if version > SCHEMA_VERSION:
            raise LedgerSchemaError(f"the ledger {self.path} has schema {version}, newer than this retrain understands ({SCHEMA_VERSION})")
        if version == SCHEMA_VERSION:
            return  # opening an existing ledger writes nothing
        conn.executescript(SCHEMA)  # under the opener's file lock (see __init__)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _connect_once(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
        conn.row_factory = sqlite3.Row
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":  # persistent: set once, by the first opener
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

    @contextmanager
    def transaction(self) -> Iterator[SqliteTx]:
        conn = self._conn
        self._writers.acquire()
        try:
            conn.execute("BEGIN IMMEDIATE")
            tx = SqliteTx(conn)
            try:
                yield tx
            finally:
                if not tx.committed:
                    conn.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            # Lock contention is the port's retryable conflict: the core never sees SQLite's errors.
            if is_busy_error(exc):
                raise ConcurrencyConflict(f"the ledger is busy: {exc}") from exc
            raise
        finally:
            self._writers.release()

    @contextmanager
    def read(self) -> Iterator[SqliteTx]:
        conn = self._conn
        conn.execute("BEGIN")  # deferred: the first SELECT takes a WAL snapshot; writers carry on
        try:
            yield SqliteTx(conn, read_only=True)
        finally:
            conn.execute("ROLLBACK")

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
            event_id=r["event_id"], type=r["type"], subject=r["subject"], payload=json.loads(r["payload"]), created_at=_at(r["created_at"]),
            published_at=_dt(r["published_at"]),
        )  # fmt: skip

    def prune_outbox(self, before: dt.datetime, limit: int = 1000, keep: frozenset[str] = frozenset()) -> int:
        kept = sorted(keep) or [""]
        with self.transaction() as tx:
            removed = tx.conn.execute(
                "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE published_at IS NOT NULL AND published_at < ? "
                f"AND type NOT IN ({','.join('?' * len(kept))}) ORDER BY seq LIMIT ?)",
                (_ts(before), *kept, limit),
            ).rowcount
            tx.commit()
        return removed

    def prune_inbox(self, model: str | None, before: dt.datetime, limit: int = 1000) -> int:
        with self.transaction() as tx:
            cut = _ts(before)
            removed = tx.conn.execute(
                "DELETE FROM inbox WHERE message_id IN (SELECT message_id FROM inbox WHERE model IS ? AND processed_at < ? LIMIT ?)",
                (model, cut, limit),
            ).rowcount
            removed += tx.conn.execute(
                "DELETE FROM idempotency WHERE (model, key) IN "
                "(SELECT model, key FROM idempotency WHERE model IS ? AND created_at < ? LIMIT ?)",
                (model, cut, limit),
            ).rowcount
            tx.commit()
        return removed

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        self._writers.close()


def is_busy_error(exc: BaseException) -> bool:
    """SQLite's lock contention, which a retry of the whole transaction resolves."""
    return isinstance(exc, sqlite3.OperationalError) and any(s in str(exc) for s in ("locked", "busy"))
