"""The state store port: the durable ledger, read and written one transaction per handled message.

A `Store` opens transactions; a `Tx` is the unit of work: everything a handler reads and writes
for one message goes through it and becomes durable together on `commit()` (or not at all).
The records here are plain data; the decisions about them live in the handlers and the policy.
Adapters: `SqliteStore` (embedded default), `MemoryStore` (the fake for unit tests) and
`TableStore` (Azure Table Storage).

Bounded commits: no transaction writes more than `MAX_WRITES_PER_COMMIT` records, so every
commit fits one Azure Table entity group transaction (100 operations, one partition). That is
why image state is not stored per image: every image version gets a per-model arrival sequence
number (`seq`), a run freezes a watermark (the highest `seq` it covers) and names its manifest
by digest (a content-addressed blob, not rows), and an image's state follows from the
watermarks: trained up to the last successful run's watermark, in a run up to the in-flight
run's, pending above. Planning, finishing or failing a run therefore writes one run record and
the model's head, whatever the number of images. Open requests are consumed the same way, by a
request watermark.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_random_exponential

from shared.redact import printable
from shared.run_ids import make_backend_run_id
from worker.crashpoints import crashpoint

DETAIL_CHARS = 2000  # a reason or detail kept in the ledger and its events


def clipped(text: str) -> str:
    """Text from anywhere as the ledger keeps it: one printable line of at most DETAIL_CHARS."""
    return printable(text)[:DETAIL_CHARS]


class ConcurrencyConflict(RuntimeError):  # noqa: N818 - a condition to retry on, not a program error
    """Another writer changed the same state first (or holds the lock); retrying the whole transaction resolves it."""


def retry_lost_races(attempts: int = 40, max_wait: float = 0.25, within_seconds: float = 60) -> Retrying:
    """How a transaction that lost an optimistic race (ConcurrencyConflict, and nothing else) is
    redone on fresh state: at once at first (jittered waits from max_wait/50, doubling up to
    `max_wait`), for `attempts` tries or `within_seconds`, whichever ends first; then the last
    conflict is raised as itself."""
    return Retrying(
        retry=retry_if_exception_type(ConcurrencyConflict),
        wait=wait_random_exponential(multiplier=max_wait / 50, max=max_wait),
        stop=stop_after_attempt(attempts) | stop_after_delay(within_seconds),
        reraise=True,
    )


class CommitTooLargeError(RuntimeError):
    """A transaction wrote more than one atomic batch can hold: a design error, never retried."""


# One Azure Table entity group transaction: 100 operations in one partition, the head among them.
MAX_WRITES_PER_COMMIT = 99
# Backfills register images in chunks, each its own transaction (an image costs up to 4 writes).
IMAGES_PER_COMMIT = 20


ImageState = Literal["pending", "in_run", "trained", "superseded"]
RunState = Literal["planned", "submitted", "running", "succeeded", "failed", "canceled", "finalized"]
# A succeeded run is still in flight until its completion (gate, registration) finalizes it: the
# next run must warm-start from the champion that completion may produce.
IN_FLIGHT_STATES: frozenset[str] = frozenset({"planned", "submitted", "running", "succeeded"})


@dataclass
class ImageRow:
    model: str
    path: str
    etag: str
    label: str
    split: str  # "train" | "val", from the stable hash of the path
    size: int = 0
    state: ImageState = "pending"  # derived from `latest` and the watermarks when read
    seq: int = 0  # the per-model arrival sequence number, given by the store
    occurred_at: dt.datetime | None = None  # when the source says the version was written
    first_seen_at: dt.datetime | None = None
    latest: bool = True  # the newest known version of its path
    source: str = "folder"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.model, self.path, self.etag)


def is_stale(row: ImageRow, newest_occurred_at: dt.datetime | None, newest_first_seen_at: dt.datetime | None) -> bool:
    """An out-of-order delivery: `row` was written before the newest version already known."""
    known_at = newest_occurred_at or newest_first_seen_at
    mine = row.occurred_at or row.first_seen_at
    return known_at is not None and mine is not None and mine < known_at


def image_state(latest: bool, seq: int, trained_watermark: int, in_flight_watermark: int | None) -> ImageState:
    """An image version's state, from the watermarks (the one definition every store uses)."""
    if not latest:
        return "superseded"
    if seq <= trained_watermark:
        return "trained"
    if in_flight_watermark is not None and seq <= in_flight_watermark:
        return "in_run"
    return "pending"


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    etag: str
    label: str
    split: str
    is_new: bool  # counted as a new image by this run (pending when it was planned)


@dataclass
class RunRow:
    run_id: str
    model: str
    seq: int
    state: RunState
    manifest_sha256: str
    image_count: int
    new_image_count: int
    classes: list[str]
    created_at: dt.datetime
    watermark: int = 0  # the highest image seq the manifest covers
    base_watermark: int = 0  # the trained watermark when it was planned: images above it are new to it
    attempt: int = 1
    reason: str = ""
    request_ids: list[str] = field(default_factory=list)  # the first REQUEST_IDS_KEPT of them
    overrides: dict[str, Any] = field(default_factory=dict)
    submitted_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    next_attempt_at: dt.datetime | None = None  # a planned retry waits until then
    outcome: str | None = None  # what the run ended as (kept once finalized)
    detail: str = ""
    completion_failures: int = 0  # completions that raised; the run fails after worker.bus.COMPLETION_ATTEMPTS
    traceparent: str | None = None  # the trace of the message that planned it: submission and completion continue it
    oldest_image_at: dt.datetime | None = None  # when its oldest new image arrived (time to champion)

    @property
    def backend_run_id(self) -> str:
        """The id of the current attempt at the backend: a retry is a new backend run, same manifest."""
        return make_backend_run_id(self.run_id, self.attempt)

    @property
    def in_flight(self) -> bool:
        return self.state in IN_FLIGHT_STATES


@dataclass
class RequestRow:
    request_id: str
    model: str
    force: bool
    created_at: dt.datetime
    overrides: dict[str, Any] = field(default_factory=dict)
    state: Literal["open", "consumed", "rejected"] = "open"
    run_id: str | None = None
    requested_by: str = ""
    reason: str = ""
    seq: int = 0  # per-model arrival order, given by the store; consumed when <= the head's request watermark
    override_budget: bool = False  # a forced request that may run past max_gpu_hours_per_day


@dataclass(frozen=True)
class DecisionRow:
    model: str
    at: dt.datetime
    outcome: str  # "wait" | "submit" | "retry" | "coalesce" | "reject" | ...
    reason: str
    run_id: str | None = None
    message_id: str | None = None


@dataclass(frozen=True)
class OutboxRow:
    event_id: str
    type: str
    subject: str
    payload: dict[str, Any]  # the whole CloudEvent, JSON-ready
    created_at: dt.datetime
    published_at: dt.datetime | None = None


@dataclass
class ModelHead:
    """Per-model state that is not derivable from the other records."""

    model: str
    next_seq: int = 1
    followup_wanted: bool = False  # a trigger arrived while a run was in flight (coalesce)
    last_run_finished_at: dt.datetime | None = None
    champion_version: int | None = None  # the `champion` alias
    champion_sha256: str | None = None  # of the champion's model.pt
    trained_watermark: int = 0  # images with seq <= it were in a successful run
    request_watermark: int = 0  # requests with seq <= it were consumed by a run (or rejected)
    failed_runs: int = 0  # consecutive runs that ended failed (reset by a success or an operator request)
    backoff_until: dt.datetime | None = None  # no new run before then, after repeated failures
    paused: dict[str, str] | None = None  # {"by", "reason", "at"}: an operator stopped new runs
    previous_champions: list[int] = field(default_factory=list)  # earlier champions, newest last (rollback pops)


@dataclass(frozen=True)
class ModelVersionRow:
    model: str
    version: int
    run_id: str
    created_at: dt.datetime
    location: str
    metrics: dict[str, Any]
    card: dict[str, Any]  # lineage: manifest, parent version, config, code version, artifacts


@dataclass(frozen=True)
class PendingStats:
    count: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    oldest_at: dt.datetime | None = None
    newest_at: dt.datetime | None = None


@dataclass(frozen=True)
class DataStats:
    """Latest versions of the model's usable images (pending, in a run, trained), by class and split."""

    train_per_class: dict[str, int] = field(default_factory=dict)
    val_count: int = 0


class Tx(abc.ABC):
    """One unit of work. Nothing is durable until `commit()`; leaving without it rolls back."""

    # inbox ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def claim_message(self, message_id: str, kind: str, model: str | None, at: dt.datetime) -> bool:
        """Record the message as processed; False if it already was (then do nothing)."""

    # images ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def add_image(self, row: ImageRow) -> Literal["new", "duplicate", "stale"]:
        """Insert a version with the model's next arrival seq; "duplicate" if (model, path, etag) is
        known; "stale" if a newer version of the path is already known (kept, not latest). A new
        latest version makes the older ones not latest."""

    def fold(self, model: str) -> int:
        """Fold images staged outside a transaction (`Store.stage_image`) into the ledger; returns how
        many. Stores without staged ingest register images directly and have nothing to fold."""
        return 0

    @abc.abstractmethod
    def image_watermark(self, model: str) -> int:
        """The highest arrival seq given to the model's images (0 when there are none)."""

    @abc.abstractmethod
    def pending_stats(self, model: str) -> PendingStats:
        """Latest versions above the in-flight run's watermark (or the trained one when none is in flight)."""

    @abc.abstractmethod
    def data_stats(self, model: str) -> DataStats: ...

    def image_arrivals(self, model: str) -> list[ImageRow]:
        """Every image version in arrival (seq) order, for `retrain simulate --export`. This default
        knows only the latest versions; the SQLite and in-memory ledgers return superseded ones too."""
        return sorted(self.manifest_candidates(model, 0, self.image_watermark(model)), key=lambda i: i.seq)

    @abc.abstractmethod
    def manifest_candidates(self, model: str, after_seq: int, upto_seq: int) -> list[ImageRow]:
        """Latest versions with after_seq < seq <= upto_seq, sorted by path."""

    @abc.abstractmethod
    def count_images(self, model: str) -> dict[str, int]:
        """Image versions by (derived) state."""

    # runs -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def insert_run(self, run: RunRow) -> None: ...

    @abc.abstractmethod
    def get_run(self, run_id: str) -> RunRow | None: ...

    @abc.abstractmethod
    def update_run(self, run: RunRow) -> None: ...

    @abc.abstractmethod
    def runs(self, model: str | None = None, states: frozenset[str] | None = None, limit: int | None = None) -> list[RunRow]:
        """Newest first."""

    # requests -------------------------------------------------------------------------------
    @abc.abstractmethod
    def add_request(self, row: RequestRow) -> None:
        """Insert with the model's next request seq (set on `row`)."""

    @abc.abstractmethod
    def open_requests(self, model: str) -> list[RequestRow]:
        """Requests above the head's request watermark and not rejected, oldest first."""

    def all_requests(self, model: str) -> list[RequestRow]:
        """Every request, oldest first, for `retrain simulate --export` (this default: the open ones;
        the SQLite and in-memory ledgers return all)."""
        return self.open_requests(model)

    @abc.abstractmethod
    def reject_request(self, row: RequestRow) -> None:
        """Mark one request rejected (it never reaches a run)."""

    # decisions ------------------------------------------------------------------------------
    @abc.abstractmethod
    def record_decision(self, row: DecisionRow) -> None: ...

    def decided(
        self, model: str, at: dt.datetime, outcome: str, reason: str, run_id: str | None = None, message_id: str | None = None
    ) -> None:
        """Record a decision, its reason kept as the ledger keeps text (`clipped`)."""
        self.record_decision(DecisionRow(model=model, at=at, outcome=outcome, reason=clipped(reason), run_id=run_id, message_id=message_id))

    @abc.abstractmethod
    def decisions(self, model: str, limit: int = 20) -> list[DecisionRow]:
        """Newest first."""

    @abc.abstractmethod
    def prune_decisions(self, model: str, keep: int) -> None:
        """Forget all but the newest `keep` decisions of the model."""

    # outbox ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def enqueue_event(self, row: OutboxRow) -> bool:
        """Queue an event for publishing; False if an event with that id is already queued."""

    # model versions -------------------------------------------------------------------------
    @abc.abstractmethod
    def add_model_version(self, row: ModelVersionRow) -> bool:
        """Record a registered version; False if the run already has one (nothing changes)."""

    @abc.abstractmethod
    def model_versions(self, model: str) -> list[ModelVersionRow]:
        """Newest first."""

    # idempotency keys (HTTP) ---------------------------------------------------------------
    @abc.abstractmethod
    def remember_response(
        self, model: str, key: str, fingerprint: str, response: dict[str, Any], at: dt.datetime
    ) -> tuple[str, dict[str, Any]] | None:
        """Store the response for an idempotency key (in the transaction that carries out the
        request), or return the (fingerprint, response) stored before."""

    # model head -----------------------------------------------------------------------------
    @abc.abstractmethod
    def model_head(self, model: str) -> ModelHead: ...

    @abc.abstractmethod
    def save_model_head(self, head: ModelHead) -> None: ...

    @abc.abstractmethod
    def commit(self) -> None: ...


class Store(abc.ABC):
    # True: an image event is staged with one idempotent write and folded in by the next evaluation
    # (the Table ledger, shared by many instances); False: registered in the message's transaction.
    staged_ingest: bool = False

    def stage_image(self, row: ImageRow) -> Literal["staged", "duplicate"]:
        """Record an arriving image. The default registers it at once, in its own transaction
        (stores with `staged_ingest` defer the registration to the next evaluation's fold)."""
        with self.transaction() as tx:
            outcome = tx.add_image(row)
            tx.commit()
        return "duplicate" if outcome == "duplicate" else "staged"

    def stage_images(self, rows: list[ImageRow]) -> int:
        """Record many (a backfill), IMAGES_PER_COMMIT per transaction, each idempotent on its own and
        retried on a conflict; returns how many were new. A crash part-way leaves whole chunks."""
        new = 0
        for n in range(0, len(rows), IMAGES_PER_COMMIT):
            for attempt in retry_lost_races():
                with attempt, self.transaction() as tx:
                    chunk_new = sum(tx.add_image(row) == "new" for row in rows[n : n + IMAGES_PER_COMMIT])
                    tx.commit()
            new += chunk_new
            crashpoint("after_backfill_chunk")
        return new

    @abc.abstractmethod
    def transaction(self) -> AbstractContextManager[Tx]:
        """A write transaction, serialised against every other writer of the same ledger."""

    def read(self) -> AbstractContextManager[Tx]:
        """A consistent read for views (status, explain, models): never committed, and it does not
        queue behind writers where the adapter can avoid it (SQLite reads a WAL snapshot without the
        writers' lock). The default is a transaction that is not committed."""
        return self.transaction()

    @abc.abstractmethod
    def unpublished_events(self, limit: int = 100) -> list[OutboxRow]:
        """Oldest first."""

    @abc.abstractmethod
    def mark_published(self, event_ids: list[str], at: dt.datetime) -> None: ...

    @abc.abstractmethod
    def all_events(self) -> Iterator[OutboxRow]: ...

    @abc.abstractmethod
    def prune_inbox(self, model: str | None, before: dt.datetime, limit: int = 1000) -> int:
        """Forget processed message ids (and idempotency keys) recorded before `before`; returns how many."""

    @abc.abstractmethod
    def prune_outbox(self, before: dt.datetime, limit: int = 1000, keep: frozenset[str] = frozenset()) -> int:
        """Forget events published before `before` (never an unpublished one, never one of the types
        in `keep`); returns how many."""

    def close(self) -> None:  # noqa: B027 - optional for adapters without resources
        """Release connections."""
