"""An in-memory `Store` for unit tests: the same semantics as SQLite, kept in dicts.

Each transaction works on a deep copy of the state and swaps it in on commit, under a lock, so
rollback and serialisation behave like the real store's.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from worker.adapters.azure.table_store import ARRIVALS_PER_FOLD, FOLD_OPS
from worker.store import (
    MAX_WRITES_PER_COMMIT,
    CommitTooLargeError,
    DataStats,
    DecisionRow,
    ImageRow,
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


@dataclass
class _State:
    images: dict[tuple[str, str, str], ImageRow] = field(default_factory=dict)
    runs: dict[str, RunRow] = field(default_factory=dict)
    requests: dict[str, RequestRow] = field(default_factory=dict)
    inbox: dict[str, tuple[str, str | None, dt.datetime]] = field(default_factory=dict)
    outbox: list[OutboxRow] = field(default_factory=list)
    decisions: list[DecisionRow] = field(default_factory=list)
    heads: dict[str, ModelHead] = field(default_factory=dict)
    versions: list[ModelVersionRow] = field(default_factory=list)
    idempotency: dict[tuple[str, str], tuple[str, dict, dt.datetime]] = field(default_factory=dict)
    staged: list[ImageRow] = field(default_factory=list)  # arrivals not folded yet (StagedMemoryStore), oldest first
    staged_keys: set[tuple[str, str, str]] = field(default_factory=set)  # every version ever staged (the Table's markers)


class MemoryTx(Tx):
    def __init__(self, state: _State):
        self.s = state
        self.committed = False
        self.writes = 0

    def _write(self, n: int = 1) -> None:
        """Count writes like the Table store's batch does, so unit tests catch an unbounded commit."""
        self.writes += n
        if self.writes > MAX_WRITES_PER_COMMIT:
            raise CommitTooLargeError(f"a transaction wrote more than {MAX_WRITES_PER_COMMIT} records")

    def claim_message(self, message_id: str, kind: str, model: str | None, at: dt.datetime) -> bool:
        if message_id in self.s.inbox:
            return False
        self._write()
        self.s.inbox[message_id] = (kind, model, at)
        return True

    def add_image(self, row: ImageRow) -> Literal["new", "duplicate", "stale"]:
        if row.key in self.s.images or row.key in self.s.staged_keys:
            return "duplicate"
        return self._register(row)

    def _register(self, row: ImageRow) -> Literal["new", "stale"]:
        same_path = [i for i in self.s.images.values() if i.model == row.model and i.path == row.path]
        newest = next((i for i in same_path if i.latest), None)
        stale = newest is not None and is_stale(row, newest.occurred_at, newest.first_seen_at)
        if not stale:
            for other in same_path:
                self._write()
                other.latest = False
        self._write(2)  # the version and its seq index, as the Table store writes them
        seq = self.image_watermark(row.model) + 1
        self.s.images[row.key] = dataclasses.replace(row, latest=not stale, seq=seq)
        return "stale" if stale else "new"

    def image_watermark(self, model: str) -> int:
        return max((i.seq for i in self.s.images.values() if i.model == model), default=0)

    def _with_state(self, model: str) -> list[ImageRow]:
        head = self.s.heads.get(model) or ModelHead(model=model)
        flying = next((r.watermark for r in self.s.runs.values() if r.model == model and r.in_flight), None)
        return [
            dataclasses.replace(i, state=image_state(i.latest, i.seq, head.trained_watermark, flying))
            for i in self.s.images.values()
            if i.model == model
        ]

    def pending_stats(self, model: str) -> PendingStats:
        pending = [i for i in self._with_state(model) if i.state == "pending"]
        if not pending:
            return PendingStats()
        per_class: dict[str, int] = {}
        for i in pending:
            per_class[i.label] = per_class.get(i.label, 0) + 1
        seen = [i.first_seen_at for i in pending if i.first_seen_at]
        return PendingStats(count=len(pending), per_class=per_class, oldest_at=min(seen, default=None), newest_at=max(seen, default=None))

    def data_stats(self, model: str) -> DataStats:
        usable = [i for i in self.s.images.values() if i.model == model and i.latest]
        train: dict[str, int] = {}
        for i in usable:
            if i.split == "train":
                train[i.label] = train.get(i.label, 0) + 1
        return DataStats(train_per_class=train, val_count=sum(1 for i in usable if i.split == "val"))

    def image_arrivals(self, model: str) -> list[ImageRow]:
        return sorted(self._with_state(model), key=lambda i: i.seq)

    def manifest_candidates(self, model: str, after_seq: int, upto_seq: int) -> list[ImageRow]:
        found = [i for i in self._with_state(model) if i.latest and after_seq < i.seq <= upto_seq]
        return sorted(found, key=lambda i: i.path)

    def count_images(self, model: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for i in self._with_state(model):
            counts[i.state] = counts.get(i.state, 0) + 1
        return counts

    def insert_run(self, run: RunRow) -> None:
        if run.run_id in self.s.runs or any(r.model == run.model and r.seq == run.seq for r in self.s.runs.values()):
            raise KeyError(f"run {run.run_id} (or seq {run.seq}) exists")
        self._write()
        self.s.runs[run.run_id] = copy.deepcopy(run)

    def get_run(self, run_id: str) -> RunRow | None:
        run = self.s.runs.get(run_id)
        return copy.deepcopy(run) if run else None

    def update_run(self, run: RunRow) -> None:
        if run.run_id not in self.s.runs:
            raise KeyError(f"run {run.run_id} does not exist")
        self._write()
        self.s.runs[run.run_id] = copy.deepcopy(run)

    def runs(self, model: str | None = None, states: frozenset[str] | None = None, limit: int | None = None) -> list[RunRow]:
        found = [r for r in self.s.runs.values() if (model is None or r.model == model) and (states is None or r.state in states)]
        found.sort(key=lambda r: (r.created_at, r.seq), reverse=True)
        return [copy.deepcopy(r) for r in found[:limit]]

    def add_request(self, row: RequestRow) -> None:
        if row.request_id in self.s.requests:
            raise KeyError(f"request {row.request_id} exists")
        self._write()
        row.seq = max((r.seq for r in self.s.requests.values() if r.model == row.model), default=0) + 1
        self.s.requests[row.request_id] = copy.deepcopy(row)

    def open_requests(self, model: str) -> list[RequestRow]:
        upto = (self.s.heads.get(model) or ModelHead(model=model)).request_watermark
        found = [r for r in self.s.requests.values() if r.model == model and r.state == "open" and r.seq > upto]
        return [copy.deepcopy(r) for r in sorted(found, key=lambda r: r.seq)]

    def all_requests(self, model: str) -> list[RequestRow]:
        return [copy.deepcopy(r) for r in sorted((r for r in self.s.requests.values() if r.model == model), key=lambda r: r.seq)]

    def reject_request(self, row: RequestRow) -> None:
        self._write()
        self.s.requests[row.request_id].state = "rejected"

    def record_decision(self, row: DecisionRow) -> None:
        self._write()
        self.s.decisions.append(row)

    def decisions(self, model: str, limit: int = 20) -> list[DecisionRow]:
        return [d for d in reversed(self.s.decisions) if d.model == model][:limit]

    def prune_decisions(self, model: str, keep: int) -> None:
        mine = [d for d in self.s.decisions if d.model == model]
        drop = {id(d) for d in mine[: max(0, len(mine) - keep)]}
        self.s.decisions = [d for d in self.s.decisions if id(d) not in drop]

    def enqueue_event(self, row: OutboxRow) -> bool:
        if any(e.event_id == row.event_id for e in self.s.outbox):
            return False
        self._write(2)  # the event and its id marker
        self.s.outbox.append(row)
        return True

    def add_model_version(self, row: ModelVersionRow) -> bool:
        if any(v.run_id == row.run_id for v in self.s.versions):
            return False
        if any(v.model == row.model and v.version == row.version for v in self.s.versions):
            raise KeyError(f"{row.model} v{row.version} exists")
        self._write(2)
        self.s.versions.append(row)
        return True

    def model_versions(self, model: str) -> list[ModelVersionRow]:
        return sorted((v for v in self.s.versions if v.model == model), key=lambda v: v.version, reverse=True)

    def remember_response(self, model: str, key: str, fingerprint: str, response: dict, at: dt.datetime) -> tuple[str, dict] | None:
        if (model, key) in self.s.idempotency:
            return copy.deepcopy(self.s.idempotency[(model, key)][:2])
        self._write()
        self.s.idempotency[(model, key)] = (fingerprint, copy.deepcopy(response), at)
        return None

    def model_head(self, model: str) -> ModelHead:
        return copy.deepcopy(self.s.heads.get(model) or ModelHead(model=model))

    def save_model_head(self, head: ModelHead) -> None:
        self.s.heads[head.model] = copy.deepcopy(head)

    def commit(self) -> None:
        self.committed = True


class MemoryStore(Store):
    _tx = MemoryTx

    def __init__(self) -> None:
        self._state = _State()
        self._lock = threading.RLock()

    @contextmanager
    def transaction(self) -> Iterator[MemoryTx]:
        with self._lock:
            tx = self._tx(copy.deepcopy(self._state))
            yield tx
            if tx.committed:
                self._state = tx.s

    def unpublished_events(self, limit: int = 100) -> list[OutboxRow]:
        with self._lock:
            return [e for e in self._state.outbox if e.published_at is None][:limit]

    def mark_published(self, event_ids: list[str], at: dt.datetime) -> None:
        wanted = set(event_ids)
        with self._lock:
            self._state.outbox = [
                dataclasses.replace(e, published_at=at) if e.event_id in wanted and e.published_at is None else e
                for e in self._state.outbox
            ]

    def all_events(self) -> Iterator[OutboxRow]:
        with self._lock:
            yield from list(self._state.outbox)

    def prune_outbox(self, before: dt.datetime, limit: int = 1000, keep: frozenset[str] = frozenset()) -> int:
        with self._lock:
            old = {e.event_id for e in self._state.outbox if e.published_at is not None and e.published_at < before and e.type not in keep}
            old = set(sorted(old)[:limit]) if len(old) > limit else old
            self._state.outbox = [e for e in self._state.outbox if e.event_id not in old]
            return len(old)

    def prune_inbox(self, model: str | None, before: dt.datetime, limit: int = 1000) -> int:
        with self._lock:
            old = [k for k, (_, m, at) in self._state.inbox.items() if m == model and at < before][:limit]
            for key in old:
                del self._state.inbox[key]
            keys = [k for k, (_, _, at) in self._state.idempotency.items() if k[0] == model and at < before][: limit - len(old)]
            for key in keys:
                del self._state.idempotency[key]
            return len(old) + len(keys)


class StagedMemoryTx(MemoryTx):
    def fold(self, model: str, budget: int = FOLD_OPS) -> int:
        """Like the Table ledger's fold: up to ARRIVALS_PER_FOLD staged arrivals, oldest first, each
        given its seq, stopping before the transaction would hold more than `budget` writes."""
        folded = 0
        for row in [r for r in self.s.staged if r.model == model][:ARRIVALS_PER_FOLD]:
            if folded and self.writes + 4 > budget:
                break
            self.s.staged.remove(row)
            self._register(row)
            folded += 1
        return folded

    def pending_stats(self, model: str) -> PendingStats:
        self.fold(model)  # as the Table ledger's evaluation does
        return super().pending_stats(model)

    def count_images(self, model: str) -> dict[str, int]:
        counts = super().count_images(model)
        staged = sum(r.model == model for r in self.s.staged)
        return {**counts, "staged": staged} if staged else counts


class StagedMemoryStore(MemoryStore):
    """The in-memory ledger with the Table ledger's staged ingest: an arriving image is one
    idempotent write outside any transaction, folded in by the next evaluation or tick, so unit
    tests cover the bus's staged path (`_stage`, `_drain`) without Azurite."""

    staged_ingest = True
    _tx = StagedMemoryTx

    def stage_image(self, row: ImageRow) -> Literal["staged", "duplicate"]:
        with self._lock:  # (never called inside a transaction of this store, which holds the lock)
            if row.key in self._state.images or row.key in self._state.staged_keys:
                return "duplicate"
            self._state.staged_keys.add(row.key)
            self._state.staged.append(row)
            return "staged"

    def stage_images(self, rows: list[ImageRow]) -> int:
        return sum(self.stage_image(row) == "staged" for row in rows)
