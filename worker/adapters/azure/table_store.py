"""The ledger on Azure Table Storage, for several Functions instances sharing one state.

Layout: one table; every record of a model lives in the partition named after the model
(records without a model in `_global`). RowKeys are `<kind>|<key>` with keys base64url-encoded,
because blob paths may hold characters a RowKey may not. Image versions are stored twice: under
`img|<path>|<etag>` (to find a path's versions and drop duplicates) and under `sq|<seq>` (the
arrival order the watermarks cut: pending images are one range read).

Concurrency: each partition has a `head` entity (the sequence counters, the watermarks, the
champion, the counts the policy reads). A transaction reads the head first, buffers every write,
and commits them in ONE entity group transaction together with the head, updated with
`MatchConditions.IfNotModified` on the ETag it read. If another writer committed in between, the
head's ETag changed, the whole batch fails (412) and the bus retries the handler on fresh state:
two instances crossing the threshold at once make exactly one run.

Every commit is one batch: the ledger's design keeps a transaction within 100 operations in one
partition (see worker.store), and `commit` refuses anything larger with `CommitTooLargeError` before
sending it, so a design error cannot turn into a partial commit.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any, Literal, cast

from shared.run_ids import model_of
from worker.store import (
    IN_FLIGHT_STATES,
    CommitTooLargeError,
    ConcurrencyConflict,
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

GLOBAL = "_global"
BATCH = 100  # operations in one entity group transaction, the head included
BATCH_BYTES = 4 * 1024 * 1024  # one entity group transaction's payload
PROPERTY_CHARS = 30_000  # one string property (the service allows 32K UTF-16 characters)
FOLD_OPS = 84  # writes a transaction may hold after a fold, leaving room for what the evaluation writes
ARRIVALS_PER_FOLD = 30  # staged images read per fold (3-4 writes each)
PATHS_PER_QUERY = 14  # `RowKey eq` comparisons per filter (the service allows 15 comparisons)
STAGE_BATCH = 49  # images staged per batch by a backfill (2 entities each)
MERGE = "__merge__"  # marks a buffered write that updates some properties of an existing entity
KEY_PART_CHARS = 300  # an encoded key component; a RowKey holds at most two plus a short prefix, within 1 KiB
ENTITY_BYTES = 1024 * 1024  # the service's limit for one entity, counted as UTF-16 here (2 bytes a character)
OUTBOX_PAYLOAD_CHARS = 300_000  # an event's JSON above this is kept in the outbox without its data (see enqueue_event)


def _k(text: str) -> str:
    """A key component: the text base64url-encoded, or for long text `~` + its sha256 (the service
    limits a RowKey to 1 KiB, and an image key holds a path of up to 1,024 characters and an etag).
    Deterministic either way, so lookups and prefix reads find what was written; `~` is outside the
    base64url alphabet, so the two forms never collide."""
    encoded = base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")
    if len(encoded) <= KEY_PART_CHARS:
        return encoded
    return "~" + hashlib.sha256(text.encode()).hexdigest()


def _ts(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _dt(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


def _prefix_filter(prefix: str) -> str:
    return f"PartitionKey eq @pk and RowKey ge '{prefix}' and RowKey lt '{prefix[:-1]}{chr(ord(prefix[-1]) + 1)}'"


def _doc_props(doc: dict[str, Any]) -> dict[str, str]:
    """A document as properties d000, d001, ... each within the service's per-property limit."""
    text = json.dumps(doc, sort_keys=True)
    return {f"d{i:03d}": text[n : n + PROPERTY_CHARS] for i, n in enumerate(range(0, max(1, len(text)), PROPERTY_CHARS))}


def _doc_of(entity: dict[str, Any]) -> dict[str, Any]:
    document: dict[str, Any] = json.loads("".join(entity[k] for k in sorted(k for k in entity if re.fullmatch(r"d\d{3}", k))))
    return document


# -- record <-> document -----------------------------------------------------------------------


def _image_doc(r: ImageRow) -> dict[str, Any]:
    return {
        "model": r.model, "path": r.path, "etag": r.etag, "label": r.label, "split": r.split, "size": r.size, "seq": r.seq,
        "occurred_at": _ts(r.occurred_at), "first_seen_at": _ts(r.first_seen_at), "latest": r.latest, "source": r.source,
    }  # fmt: skip


def _image(d: dict[str, Any], state: str) -> ImageRow:
    return ImageRow(**{**d, "state": state, "occurred_at": _dt(d["occurred_at"]), "first_seen_at": _dt(d["first_seen_at"])})


_RUN_TIMES = ("created_at", "submitted_at", "started_at", "finished_at", "next_attempt_at", "oldest_image_at")


def _run_doc(r: RunRow) -> dict[str, Any]:
    doc = dataclasses.asdict(r)
    for key in _RUN_TIMES:
        doc[key] = _ts(doc[key])
    return doc


def _run(d: dict[str, Any]) -> RunRow:
    d = dict(d)
    for key in _RUN_TIMES:
        d[key] = _dt(d.get(key))
    return RunRow(**d)


def _request_doc(r: RequestRow) -> dict[str, Any]:
    return {**dataclasses.asdict(r), "created_at": _ts(r.created_at)}


def _request(d: dict[str, Any]) -> RequestRow:
    return RequestRow(**{**d, "created_at": _dt(d["created_at"])})


def _image_key(path: str, etag: str) -> str:
    return f"img|{_k(path)}|{_k(etag)}"


def _seq_key(seq: int) -> str:
    return f"sq|{seq:012d}"


def _path_key(path: str) -> str:
    return f"pth|{_k(path)}"


def _arrival_key() -> str:
    """Roughly arrival-ordered and unique; the fold, not this key, decides the order that counts."""
    return f"ar|{time.time_ns():020d}|{uuid.uuid4().hex[:12]}"


def _fitting_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """The CloudEvent as stored in the outbox: whole, or over OUTBOX_PAYLOAD_CHARS without its data.

    An entity holds at most 1 MiB, and the event shares its commit with the change it reports: an
    event too big would fail that commit on every retry and block the model. Its envelope (id,
    type, subject, time) and the data's small scalar fields are kept, with a note of what was cut.
    """
    text = json.dumps(payload, sort_keys=True)
    if len(text) <= OUTBOX_PAYLOAD_CHARS:
        return payload
    data = payload.get("data")
    kept = (
        {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool, type(None))) and len(str(v)) <= 200}
        if isinstance(data, dict)
        else {}
    )
    note = {"truncated": True, "original_chars": len(text), "reason": f"event over the ledger's {OUTBOX_PAYLOAD_CHARS} characters"}
    return {**{k: v for k, v in payload.items() if k != "data"}, "data": {**kept, "retrain_outbox": note}}


def _staged_doc(row: ImageRow) -> dict[str, Any]:
    doc = _image_doc(row)
    doc.pop("seq"), doc.pop("latest")
    return doc


Operation = tuple[Any, ...]  # a TableClient.submit_transaction operation: (kind, entity[, options])
_HEAD_TIMES = ("last_run_finished_at", "backoff_until")
_HEAD_FIELDS = tuple(f.name for f in dataclasses.fields(ModelHead) if f.name != "model")


def _operation(pk: str, rk: str, entity: dict[str, Any] | None) -> Operation:
    from azure.data.tables import UpdateMode

    if entity is None:
        return ("delete", {"PartitionKey": pk, "RowKey": rk})
    if entity.get(MERGE):
        return ("update", {k: v for k, v in entity.items() if k != MERGE}, {"mode": UpdateMode.MERGE})
    # REPLACE, not the SDK's default MERGE: a document that shrinks from d000-d002 to d000 must not
    # keep the old d001 and d002, which _doc_of would read back as part of it.
    return ("upsert", entity, {"mode": UpdateMode.REPLACE})


class TableTx(Tx):
    def __init__(self, store: TableStore):
        self.store = store
        self.heads: dict[str, tuple[dict[str, Any], str | None, str]] = {}  # pk -> (head doc, etag read, doc as read)
        self.writes: dict[tuple[str, str], dict[str, Any] | None] = {}  # (pk, rk) -> entity, None = delete
        self.committed = False
        self.prune: list[tuple[str, int]] = []
        self._stored_runs: dict[str, dict[str, dict[str, Any]]] = {}

    # -- plumbing ------------------------------------------------------------------------------

    def _head(self, pk: str) -> dict[str, Any]:
        if pk not in self.heads:
            doc, etag = self.store.read_head(pk)
            self.heads[pk] = (doc, etag, json.dumps(doc, sort_keys=True))
        return self.heads[pk][0]

    def _get(self, pk: str, rk: str) -> dict[str, Any] | None:
        self._head(pk)
        if (pk, rk) in self.writes:
            entity = self.writes[(pk, rk)]
            return None if entity is None else _doc_of(entity)
        entity = self.store.get(pk, rk)
        return None if entity is None else _doc_of(entity)

    def _query(
        self,
        pk: str,
        prefix: str,
        where: str = "",
        params: dict[str, Any] | None = None,
        after: str | None = None,
        top: int | None = None,
    ) -> list[tuple[str, dict[str, Any]]]:
        """Entities under `prefix` (RowKey > `after` when given; the first `top`), with this
        transaction's own writes applied, sorted by RowKey."""
        self._head(pk)
        params = params or {}
        flt = _prefix_filter(prefix) + (" and RowKey gt @after" if after else "")
        # The service filters on RowKey only: a buffered MERGE can change a property a filter reads.
        stored = self.store.query(flt, {"pk": pk, **({"after": after} if after else {})}, top=top)
        found = {e["RowKey"]: e for e in stored}
        for (wpk, rk), entity in self.writes.items():
            if wpk == pk and rk.startswith(prefix) and (after is None or rk > after):
                if entity is None:
                    found.pop(rk, None)
                elif entity.get(MERGE):
                    if rk in found:
                        found[rk] = {**found[rk], **{k: v for k, v in entity.items() if k != MERGE}}
                else:
                    found[rk] = entity
        rows = [(rk, e) for rk, e in sorted(found.items()) if self._matches(e, where, params)]
        return [(rk, _doc_of(e)) for rk, e in rows[:top]]

    @staticmethod
    def _matches(entity: dict[str, Any], where: str, params: dict[str, Any]) -> bool:
        # Stored and buffered entities pass the same filter, applied here.
        eq = all(entity.get(prop) == params.get(name) for prop, name in re.findall(r"(\w+) eq @(\w+)", where))
        le = all(cast(Any, entity.get(prop)) <= params.get(name) for prop, name in re.findall(r"(\w+) le @(\w+)", where))
        return eq and le

    def _put(self, pk: str, rk: str, doc: dict[str, Any], **indexed: Any) -> None:
        self._head(pk)
        self.writes[(pk, rk)] = {"PartitionKey": pk, "RowKey": rk, **_doc_props(doc), **indexed}

    def _counts(self, head: dict[str, Any]) -> dict[str, Any]:
        counts: dict[str, Any] = head.setdefault("counts", {"latest": {"train": {}, "val": {}}, "versions": 0})
        return counts

    def _count_latest(self, head: dict[str, Any], d: dict[str, Any], sign: int) -> None:
        by_label = self._counts(head)["latest"][d["split"]]
        by_label[d["label"]] = by_label.get(d["label"], 0) + sign

    def _watermarks(self, model: str) -> tuple[int, int | None]:
        trained = self._head(model).get("trained_watermark", 0)
        flying = next(iter(self.runs(model, IN_FLIGHT_STATES, limit=1)), None)
        return trained, (flying.watermark if flying else None)

    def _latest_above(self, model: str, after_seq: int, upto_seq: int | None = None) -> list[dict[str, Any]]:
        """Latest versions with after_seq < seq (<= upto_seq): a range read on the seq index."""
        until = {"until": _seq_key(upto_seq)} if upto_seq is not None else {}
        rows = self._query(
            model,
            "sq|",
            "latest eq @latest" + (" and RowKey le @until" if until else ""),
            {"latest": True, **until},
            after=_seq_key(after_seq),
        )
        return [{**d, "latest": True} for _, d in rows if upto_seq is None or d["seq"] <= upto_seq]

    # -- inbox ---------------------------------------------------------------------------------

    def claim_message(self, message_id: str, kind: str, model: str | None, at: dt.datetime) -> bool:
        pk = model or GLOBAL
        rk = f"in|{_k(message_id)}"
        if self._get(pk, rk) is not None:
            return False
        self._put(pk, rk, {"message_id": message_id, "kind": kind}, at=_ts(at))
        return True

    # -- images --------------------------------------------------------------------------------

    def add_image(self, row: ImageRow) -> Literal["new", "duplicate", "stale"]:
        """Register and fold one version in this transaction (the direct path; ingest stages instead)."""
        marker = _image_key(row.path, row.etag)
        if self._get(row.model, marker) is not None:
            return "duplicate"
        self._put(row.model, marker, {"ar": None})
        [outcome] = self._fold(row.model, [(None, _staged_doc(row))], budget=BATCH)
        return cast(Literal["new", "stale"], outcome)

    def fold(self, model: str, budget: int = FOLD_OPS) -> int:
        """Fold staged arrivals (oldest first) into the ledger: give each its arrival seq, settle which
        version of its path is latest, update the counts. Stops before the transaction would hold
        more than `budget` writes; returns how many were folded."""
        arrivals = self._query(model, "ar|", top=ARRIVALS_PER_FOLD)
        return len(self._fold(model, arrivals, budget)) if arrivals else 0

    def _fold(self, model: str, arrivals: Sequence[tuple[str | None, dict[str, Any]]], budget: int) -> list[str]:
        head = self._head(model)
        counts = self._counts(head)
        pending = head.get("pending")
        pointers = self._pointers(model, sorted({d["path"] for _, d in arrivals}))
        outcomes: list[str] = []
        for arrival, d in arrivals:
            if outcomes and len(self.writes) + 4 > budget:
                break
            pointer = pointers.get(d["path"])
            stale = pointer is not None and is_stale(_image(d, "pending"), _dt(pointer["occurred_at"]), _dt(pointer["first_seen_at"]))
            head["image_seq"] = head.get("image_seq", 0) + 1
            seq = head["image_seq"]
            self._put(model, _seq_key(seq), {**d, "seq": seq, "latest": not stale}, latest=not stale)
            if arrival is not None:
                self._delete(model, arrival)
            counts["versions"] += 1
            if not stale:
                if pointer is not None:  # the new version replaces the path's latest one
                    self._unlatest(model, _seq_key(pointer["seq"]))
                    self._count_latest(head, pointer, -1)
                    if pending is not None and pointer["seq"] > pending["floor"]:
                        pending["per_class"][d["label"]] = pending["per_class"].get(d["label"], 0) - 1
                self._count_latest(head, d, +1)
                if pending is not None:
                    pending["per_class"][d["label"]] = pending["per_class"].get(d["label"], 0) + 1
                    pending["oldest"] = min(filter(None, [pending.get("oldest"), d["first_seen_at"]]), default=None)
                    pending["newest"] = max(filter(None, [pending.get("newest"), d["first_seen_at"]]), default=None)
                pointer = {k: d[k] for k in ("etag", "occurred_at", "first_seen_at", "label", "split")} | {"seq": seq}
                pointers[d["path"]] = pointer
                self._put(model, _path_key(d["path"]), pointer)
            outcomes.append("stale" if stale else "new")
        return outcomes

    def _pointers(self, model: str, paths: list[str]) -> dict[str, dict[str, Any]]:
        """The newest folded version of each path (`pth|` entities), a few paths per query."""
        found: dict[str, dict[str, Any]] = {}
        wanted = {_path_key(p): p for p in paths}
        for (wpk, rk), entity in self.writes.items():
            if wpk == model and rk in wanted and entity is not None:
                found[wanted[rk]] = _doc_of(entity)
        remaining = [rk for rk in wanted if wanted[rk] not in found]

        def lookup(chunk: list[str]) -> list[dict[str, Any]]:
            params = {"pk": model, **{f"r{i}": rk for i, rk in enumerate(chunk)}}
            flt = "PartitionKey eq @pk and ( " + " or ".join(f"RowKey eq @r{i}" for i in range(len(chunk))) + " )"
            return list(self.store.query(flt, params))

        chunks = [remaining[n : n + PATHS_PER_QUERY] for n in range(0, len(remaining), PATHS_PER_QUERY)]  # 15 comparisons a filter
        for entities in self.store.lookups.map(lookup, chunks) if len(chunks) > 1 else map(lookup, chunks):  # one round trip
            for entity in entities:
                found[wanted[entity["RowKey"]]] = _doc_of(entity)
        return found

    def _delete(self, pk: str, rk: str) -> None:
        self._head(pk)
        self.writes[(pk, rk)] = None

    def _unlatest(self, pk: str, rk: str) -> None:
        """Mark a version not latest: a MERGE of one property (no read), or an edit of our own insert."""
        buffered = self.writes.get((pk, rk))
        if buffered is not None and not buffered.get(MERGE):
            self.writes[(pk, rk)] = {**buffered, **_doc_props({**_doc_of(buffered), "latest": False}), "latest": False}
        else:
            self.writes[(pk, rk)] = {"PartitionKey": pk, "RowKey": rk, "latest": False, MERGE: True}

    def image_watermark(self, model: str) -> int:
        return int(self._head(model).get("image_seq", 0))

    def pending_stats(self, model: str) -> PendingStats:
        """From the head's counters, kept by the folds; recounted (a range read) when the watermark
        they were counted above has moved (a run planned, failed, or its completion failed)."""
        self.fold(model)
        head = self._head(model)
        trained, flying = self._watermarks(model)
        floor = max(trained, flying or 0)
        pending = head.get("pending")
        if pending is None or pending["floor"] != floor:
            rows = self._latest_above(model, floor)
            per_class: dict[str, int] = {}
            for d in rows:
                per_class[d["label"]] = per_class.get(d["label"], 0) + 1
            seen = [d["first_seen_at"] for d in rows]
            pending = {"floor": floor, "per_class": per_class, "oldest": min(seen, default=None), "newest": max(seen, default=None)}
            head["pending"] = pending
        per_class = {k: v for k, v in pending["per_class"].items() if v > 0}
        if not per_class:
            return PendingStats()
        return PendingStats(
            count=sum(per_class.values()), per_class=per_class, oldest_at=_dt(pending["oldest"]), newest_at=_dt(pending["newest"])
        )

    def data_stats(self, model: str) -> DataStats:
        latest = self._counts(dict(self._head(model)))["latest"]
        return DataStats(
            train_per_class={k: v for k, v in latest["train"].items() if v > 0}, val_count=sum(v for v in latest["val"].values() if v > 0)
        )

    def manifest_candidates(self, model: str, after_seq: int, upto_seq: int) -> list[ImageRow]:
        trained, flying = self._watermarks(model)
        rows = [_image(d, image_state(True, d["seq"], trained, flying)) for d in self._latest_above(model, after_seq, upto_seq)]
        return sorted(rows, key=lambda r: r.path)

    def count_images(self, model: str) -> dict[str, int]:
        counts = self._counts(dict(self._head(model)))
        latest_total = sum(n for split in counts["latest"].values() for n in split.values())
        trained, flying = self._watermarks(model)
        states = [image_state(True, d["seq"], trained, flying) for d in self._latest_above(model, trained)]
        found = {
            "pending": states.count("pending"),
            "in_run": states.count("in_run"),
            "trained": latest_total - len(states),
            "superseded": counts["versions"] - latest_total,
            "staged": len(self._query(model, "ar|")),  # arrived, not folded yet (the next evaluation folds them)
        }
        return {k: v for k, v in found.items() if v > 0}

    # -- runs ----------------------------------------------------------------------------------

    @staticmethod
    def _model_of(run_id: str) -> str:
        return model_of(run_id) or GLOBAL

    def insert_run(self, run: RunRow) -> None:
        if self._get(run.model, f"run|{run.run_id}") is not None:
            # Planned by a writer that committed after we read the head: retry on fresh state.
            raise ConcurrencyConflict(f"run {run.run_id} was planned by another writer")
        self._put(run.model, f"run|{run.run_id}", _run_doc(run), state=run.state)

    def get_run(self, run_id: str) -> RunRow | None:
        doc = self._get(self._model_of(run_id), f"run|{run_id}")
        return _run(doc) if doc else None

    def update_run(self, run: RunRow) -> None:
        if self._get(run.model, f"run|{run.run_id}") is None:
            raise KeyError(f"run {run.run_id} does not exist")
        self._put(run.model, f"run|{run.run_id}", _run_doc(run), state=run.state)

    def runs(self, model: str | None = None, states: frozenset[str] | None = None, limit: int | None = None) -> list[RunRow]:
        models = [model] if model else self.store.partitions()
        found = [_run(d) for m in models for _, d in self._run_docs(m)]
        found = [r for r in found if states is None or r.state in states]
        found.sort(key=lambda r: (r.created_at, r.seq), reverse=True)
        return found[:limit]

    def _run_docs(self, model: str) -> list[tuple[str, dict[str, Any]]]:
        """The model's run records: read from the service once per transaction, this transaction's writes applied."""
        if model not in self._stored_runs:
            self._head(model)
            self._stored_runs[model] = {e["RowKey"]: e for e in self.store.query(_prefix_filter("run|"), {"pk": model})}
        found = dict(self._stored_runs[model])
        for (wpk, rk), entity in self.writes.items():
            if wpk == model and rk.startswith("run|") and entity is not None:
                found[rk] = entity
        return [(rk, _doc_of(e)) for rk, e in sorted(found.items())]

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, row: RequestRow) -> None:
        head = self._head(row.model)
        head["request_seq"] = head.get("request_seq", 0) + 1
        row.seq = head["request_seq"]
        self._put(row.model, f"rq|{row.seq:012d}", _request_doc(row), state=row.state)

    def open_requests(self, model: str) -> list[RequestRow]:
        head = self._head(model)
        upto = head.get("request_watermark", 0)
        if head.get("request_seq", 0) <= upto:
            return []  # none arrived since the last run consumed them: no need to ask the service
        rows = [_request(d) for _, d in self._query(model, "rq|", "state eq @state", {"state": "open"}, after=f"rq|{upto:012d}")]
        return sorted(rows, key=lambda r: r.seq)

    def reject_request(self, row: RequestRow) -> None:
        doc = self._get(row.model, f"rq|{row.seq:012d}")
        if doc is not None:
            self._put(row.model, f"rq|{row.seq:012d}", {**doc, "state": "rejected"}, state="rejected")

    # -- decisions -----------------------------------------------------------------------------

    def record_decision(self, row: DecisionRow) -> None:
        head = self._head(row.model)
        head["decision_seq"] = head.get("decision_seq", 0) + 1
        doc = {
            "model": row.model,
            "at": _ts(row.at),
            "outcome": row.outcome,
            "reason": row.reason,
            "run_id": row.run_id,
            "message_id": row.message_id,
        }
        self._put(row.model, f"dc|{10**12 - head['decision_seq']:012d}", doc)  # newest first in RowKey order
        head["last_decision"] = doc  # what the next evaluation compares with, without a query

    def decisions(self, model: str, limit: int = 20) -> list[DecisionRow]:
        last = self._head(model).get("last_decision")
        if limit == 1 and last is not None:
            return [DecisionRow(**{**last, "at": _dt(last["at"])})]
        rows = self._query(model, "dc|", top=limit)
        return [DecisionRow(**{**d, "at": _dt(d["at"])}) for _, d in rows]

    def prune_decisions(self, model: str, keep: int) -> None:
        self.prune.append((model, keep))  # housekeeping after the commit, outside the transaction

    # -- outbox --------------------------------------------------------------------------------

    def enqueue_event(self, row: OutboxRow) -> bool:
        model = row.payload.get("data", {}).get("model")
        pk = model if isinstance(model, str) and model else GLOBAL  # the partition of the change it reports
        if self._get(pk, f"ev|{_k(row.event_id)}") is not None:
            return False
        head = self._head(pk)
        head["outbox_seq"] = head.get("outbox_seq", 0) + 1
        rk = f"ob|{_ts(row.created_at)}|{head['outbox_seq']:012d}"
        self._put(pk, f"ev|{_k(row.event_id)}", {"rk": rk})
        doc = {
            "event_id": row.event_id,
            "type": row.type,
            "subject": row.subject,
            "payload": _fitting_payload(row.payload),
            "created_at": _ts(row.created_at),
        }
        self._put(pk, rk, doc, published=False)
        return True

    # -- model versions and head ---------------------------------------------------------------

    def add_model_version(self, row: ModelVersionRow) -> bool:
        if self._get(row.model, f"verrun|{_k(row.run_id)}") is not None:
            return False
        if self._get(row.model, f"ver|{row.version:06d}") is not None:
            raise ConcurrencyConflict(f"{row.model} v{row.version} was recorded by another writer")
        doc = {**row.__dict__, "created_at": _ts(row.created_at)}
        self._put(row.model, f"ver|{row.version:06d}", doc)
        self._put(row.model, f"verrun|{_k(row.run_id)}", {"version": row.version})
        return True

    def model_versions(self, model: str) -> list[ModelVersionRow]:
        rows = [ModelVersionRow(**{**d, "created_at": _dt(d["created_at"])}) for _, d in self._query(model, "ver|")]
        return sorted(rows, key=lambda v: v.version, reverse=True)

    def model_head(self, model: str) -> ModelHead:
        h = self._head(model)
        fields = {k: h[k] for k in _HEAD_FIELDS if k in h}
        for key in _HEAD_TIMES:
            fields[key] = _dt(fields.get(key))
        return ModelHead(model=model, **fields)

    def save_model_head(self, head: ModelHead) -> None:
        h = self._head(head.model)
        for key in _HEAD_FIELDS:
            value = getattr(head, key)
            h[key] = _ts(value) if key in _HEAD_TIMES else value

    def remember_response(
        self, model: str, key: str, fingerprint: str, response: dict[str, Any], at: dt.datetime
    ) -> tuple[str, dict[str, Any]] | None:
        doc = self._get(model, f"idem|{_k(key)}")
        if doc is not None:
            return doc["fingerprint"], doc["response"]
        self._put(model, f"idem|{_k(key)}", {"fingerprint": fingerprint, "response": response}, at=_ts(at))
        return None

    def commit(self) -> None:
        changed = {pk for pk, (doc, _, original) in self.heads.items() if json.dumps(doc, sort_keys=True) != original}
        partitions = sorted({pk for pk, _ in self.writes} | changed)
        if len(partitions) > 1:
            raise CommitTooLargeError(f"a transaction wrote to {len(partitions)} partitions ({', '.join(partitions)}); one batch holds one")
        for pk in partitions:
            ops = [_operation(pk, rk, e) for (wpk, rk), e in self.writes.items() if wpk == pk]
            doc, etag, _ = self.heads[pk]
            self.store.commit_partition(pk, ops, doc, etag)
        self.committed = True
        for model, keep in self.prune:
            self.store.prune_decisions(model, keep)


@dataclasses.dataclass
class _Staged:
    row: ImageRow
    outcome: Literal["staged", "duplicate"] | None = None
    error: BaseException | None = None


@dataclasses.dataclass
class _StagingGroup:
    cond: threading.Condition = dataclasses.field(default_factory=threading.Condition)
    queue: list[_Staged] = dataclasses.field(default_factory=list)
    flushing: bool = False


class TableStore(Store):
    """`table_client` is an azure.data.tables.TableClient (connection string or identity-based)."""

    def __init__(self, table_client: Any):
        from azure.core.exceptions import ResourceExistsError

        self.table = table_client
        with suppress(ResourceExistsError):
            self.table.create_table()
        self._partitions: set[str] = set()
        self._outbox_keys: dict[str, tuple[str, str]] = {}  # event id -> its outbox entity, from the last listing
        self._staging: dict[str, _StagingGroup] = {}
        self._lookups: ThreadPoolExecutor | None = None

    @classmethod
    def from_connection_string(cls, connection: str, table: str = "retrain") -> TableStore:
        from azure.data.tables import TableClient

        return cls(TableClient.from_connection_string(connection, table))

    @classmethod
    def from_endpoint(cls, endpoint: str, table: str = "retrain") -> TableStore:
        from azure.data.tables import TableClient
        from azure.identity import DefaultAzureCredential

        return cls(TableClient(endpoint, table, credential=DefaultAzureCredential()))

    # -- primitives ----------------------------------------------------------------------------

    def get(self, pk: str, rk: str) -> dict[str, Any] | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            entity: dict[str, Any] = self.table.get_entity(pk, rk)  # a TableEntity: a dict with .metadata["etag"]
            return entity
        except ResourceNotFoundError:
            return None

    def query(self, flt: str, params: dict[str, Any], top: int | None = None) -> Iterator[dict[str, Any]]:
        pages = (
            self.table.query_entities(flt, parameters=params, results_per_page=top)
            if top
            else self.table.query_entities(flt, parameters=params)
        )
        for n, entity in enumerate(pages):
            if top is not None and n >= top:
                return
            yield dict(entity)

    @property
    def lookups(self) -> ThreadPoolExecutor:
        """Threads for independent reads a fold sends at once (the path lookups)."""
        if self._lookups is None:
            self._lookups = ThreadPoolExecutor(4, thread_name_prefix="table-lookup")
        return self._lookups

    # -- ingest ---------------------------------------------------------------------------------

    staged_ingest = True

    def stage_image(self, row: ImageRow) -> Literal["staged", "duplicate"]:
        """Record an arrival with no head update: the version's marker (which makes a duplicate a
        409) and its arrival entity. The next evaluation folds it in.

        Group commit: deliveries handled at the same time by this instance (a Functions instance
        runs several) share one batch per model, up to STAGE_BATCH images; whoever finds no batch in
        flight sends everything queued. A batch that meets a duplicate is redone one image per call,
        so each delivery still learns its own outcome."""
        group = self._staging.setdefault(row.model, _StagingGroup())
        item = _Staged(row)
        with group.cond:
            group.queue.append(item)
            while item.outcome is None and item.error is None:
                if group.flushing:
                    group.cond.wait()
                    continue
                group.flushing = True
                batch, group.queue = group.queue[:STAGE_BATCH], group.queue[STAGE_BATCH:]
                group.cond.release()
                try:
                    self._stage_batch(batch)
                finally:
                    group.cond.acquire()
                    group.flushing = False
                    group.cond.notify_all()
        if item.error is not None:
            raise item.error
        assert item.outcome is not None, "a flushed batch sets every item's outcome or error"
        return item.outcome

    def _submit_retrying(self, ops: list[Operation]) -> None:
        """A staging batch, retried when the connection failed. Safe: if a lost response hid a
        success, the retry's 409 reports the images as already known, and they are staged."""
        from azure.core.exceptions import ServiceRequestError, ServiceResponseError
        from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

        for attempt in Retrying(
            retry=retry_if_exception_type((ServiceRequestError, ServiceResponseError)),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            stop=stop_after_attempt(4),
            reraise=True,
        ):
            with attempt:
                self.table.submit_transaction(ops)

    def _stage_batch(self, batch: list[_Staged]) -> None:
        from azure.data.tables import TableTransactionError

        try:
            self._submit_retrying([op for item in batch for op in self._stage_ops(item.row)])
            for item in batch:
                item.outcome = "staged"
        except TableTransactionError as exc:
            if exc.status_code != 409 or len(batch) == 1:
                for item in batch:
                    if exc.status_code == 409:
                        item.outcome = "duplicate"
                    else:
                        item.error = exc
                return
            for item in batch:  # a duplicate among them: each on its own
                try:
                    self._submit_retrying(self._stage_ops(item.row))
                    item.outcome = "staged"
                except TableTransactionError as single:
                    if single.status_code == 409:
                        item.outcome = "duplicate"
                    else:
                        item.error = single
        except Exception as exc:
            for item in batch:
                item.error = exc
        self._partitions.add(batch[0].row.model)

    def stage_images(self, rows: list[ImageRow]) -> int:
        """Stage many (a backfill): STAGE_BATCH per batch; a batch with a duplicate in it is redone one
        by one. Returns how many were new arrivals."""
        from azure.data.tables import TableTransactionError

        staged = 0
        for n in range(0, len(rows), STAGE_BATCH):
            chunk = rows[n : n + STAGE_BATCH]
            try:
                self.table.submit_transaction([op for row in chunk for op in self._stage_ops(row)])
                staged += len(chunk)
            except TableTransactionError as exc:
                if exc.status_code != 409:
                    raise
                staged += sum(self.stage_image(row) == "staged" for row in chunk)
        return staged

    @staticmethod
    def _stage_ops(row: ImageRow) -> list[Operation]:
        arrival = _arrival_key()
        marker = {"PartitionKey": row.model, "RowKey": _image_key(row.path, row.etag), **_doc_props({"ar": arrival})}
        return [("create", marker), ("create", {"PartitionKey": row.model, "RowKey": arrival, **_doc_props(_staged_doc(row))})]

    def partitions(self) -> list[str]:
        heads = self.table.query_entities("RowKey eq 'head'", select=["PartitionKey"])
        self._partitions = {e["PartitionKey"] for e in heads} - {GLOBAL}
        return sorted(self._partitions)

    def read_head(self, pk: str) -> tuple[dict[str, Any], str | None]:
        entity = self.get(pk, "head")
        if entity is None:
            return {}, None
        return _doc_of(entity), cast(Any, entity).metadata["etag"]  # a TableEntity

    def _guarded_head_op(self, pk: str, doc: dict[str, Any], etag: str | None) -> Operation:
        from azure.core import MatchConditions
        from azure.data.tables import UpdateMode

        entity = {"PartitionKey": pk, "RowKey": "head", **_doc_props(doc)}
        if etag is None:
            return ("create", entity)
        return ("update", entity, {"etag": etag, "match_condition": MatchConditions.IfNotModified, "mode": UpdateMode.REPLACE})

    def commit_partition(self, pk: str, ops: list[Operation], head: dict[str, Any], etag: str | None) -> None:
        """Commit the operations and the guarded head update as one entity group transaction."""
        from azure.data.tables import TableTransactionError

        batch = [*ops, self._guarded_head_op(pk, head, etag)]
        sizes = [len(json.dumps(op[1])) * 2 for op in batch]  # UTF-16 on the wire, to be safe
        if len(batch) > BATCH or sum(sizes) > BATCH_BYTES:
            raise CommitTooLargeError(f"a commit of {len(batch)} operations ({sum(sizes)} bytes) does not fit one entity group transaction")
        if max(sizes) > ENTITY_BYTES:
            raise CommitTooLargeError(f"an entity of {max(sizes)} bytes is over the service's {ENTITY_BYTES} bytes")
        if any(len(op[1]["RowKey"]) > 1024 or len(op[1]["PartitionKey"]) > 1024 for op in batch):
            raise CommitTooLargeError("a key is over the service's 1 KiB")
        try:
            self.table.submit_transaction(batch)
        except TableTransactionError as exc:
            # 412: the head moved; 409/404: an entity this commit creates or deletes was created or
            # deleted by another writer since we read (the batch fails on whichever it meets first).
            if exc.status_code in (404, 409, 412):
                raise ConcurrencyConflict(f"another writer committed first ({exc.status_code})") from None
            raise
        self._partitions.add(pk)

    def prune_decisions(self, model: str, keep: int) -> None:
        rows = list(self.query(_prefix_filter("dc|"), {"pk": model}))
        for entity in rows[keep:]:
            self.table.delete_entity(model, entity["RowKey"])

    def prune_outbox(self, before: dt.datetime, limit: int = 1000, keep: frozenset[str] = frozenset()) -> int:
        """Published events older than `before`: the outbox entity and its `ev|` marker (a re-enqueue of
        so old an event id is past every duplicate window: the inbox forgets its message as long ago)."""
        from azure.core.exceptions import ResourceNotFoundError

        removed = 0
        for e in self.query("RowKey ge 'ob|' and RowKey lt 'ob}' and published eq true", {}):
            if removed >= limit:
                break
            doc = _doc_of(e)
            published_at = _dt(doc.get("published_at"))
            if published_at is None or published_at >= before or doc.get("type") in keep:
                continue
            for rk in (f"ev|{_k(doc['event_id'])}", e["RowKey"]):
                with suppress(ResourceNotFoundError):
                    self.table.delete_entity(e["PartitionKey"], rk)
            removed += 1
        return removed

    def prune_inbox(self, model: str | None, before: dt.datetime, limit: int = 1000) -> int:
        from azure.core.exceptions import ResourceNotFoundError

        pk, removed = model or GLOBAL, 0
        for prefix in ("in|", "idem|"):
            flt = _prefix_filter(prefix) + " and at lt @before"
            for entity in self.query(flt, {"pk": pk, "before": _ts(before)}):
                if removed >= limit:
                    return removed
                with suppress(ResourceNotFoundError):
                    self.table.delete_entity(pk, entity["RowKey"])
                removed += 1
        return removed

    # -- the port ------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[TableTx]:
        yield TableTx(self)

    def _outbox(self, flt: str, *, remember: bool = False) -> list[OutboxRow]:
        rows = []
        for e in self.query(flt, {}):
            d = _doc_of(e)
            row = OutboxRow(
                event_id=d["event_id"], type=d["type"], subject=d["subject"], payload=d["payload"], created_at=dt.datetime.fromisoformat(d["created_at"]),
                published_at=_dt(d.get("published_at")),
            )  # fmt: skip
            rows.append(((e["RowKey"], e["PartitionKey"]), row))  # RowKey: created time, then the partition's sequence
            if remember:  # where each listed event lies, for mark_published
                self._outbox_keys[row.event_id] = (e["PartitionKey"], e["RowKey"])
        return [row for _, row in sorted(rows, key=lambda pair: pair[0])]

    def unpublished_events(self, limit: int = 100) -> list[OutboxRow]:
        return self._outbox("RowKey ge 'ob|' and RowKey lt 'ob}' and published eq false", remember=True)[:limit]

    def _event_location(self, event_id: str) -> tuple[str, str] | None:
        """(PartitionKey, RowKey) of an event's outbox entity: remembered from the listing that
        returned it, else one query for its marker (never a read per partition)."""
        known = self._outbox_keys.get(event_id)
        if known is not None:
            return known
        for marker in self.query(f"RowKey eq '{'ev|' + _k(event_id)}'", {}):
            return marker["PartitionKey"], _doc_of(marker)["rk"]
        return None

    def mark_published(self, event_ids: list[str], at: dt.datetime) -> None:
        from azure.data.tables import UpdateMode

        for event_id in event_ids:
            location = self._event_location(event_id)
            if location is None:
                continue
            pk, rk = location
            entity = self.get(pk, rk)
            if entity is not None and not entity.get("published"):
                doc = _doc_of(entity)
                doc["published_at"] = _ts(at)
                entity = {"PartitionKey": pk, "RowKey": rk, **_doc_props(doc), "published": True}
                self.table.upsert_entity(entity, mode=UpdateMode.REPLACE)
            self._outbox_keys.pop(event_id, None)

    def all_events(self) -> Iterator[OutboxRow]:
        yield from self._outbox("RowKey ge 'ob|' and RowKey lt 'ob}'")

    def close(self) -> None:
        if self._lookups is not None:
            self._lookups.shutdown(wait=False)
        self.table.close()
