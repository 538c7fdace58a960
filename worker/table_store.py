"""The ledger on Azure Table Storage, for several Functions instances sharing one state.

Layout: one table; every record of a model lives in the partition named after the model
(records without a model in `_global`). RowKeys are `<kind>|<key>` with keys base64url-encoded,
because blob paths may hold characters a RowKey may not.

Concurrency: each partition has a `head` entity (the sequence counter, the champion, the
counts the policy reads). A transaction reads the head first, buffers every write, and commits
them in one entity group transaction together with the head, updated with
`MatchConditions.IfNotModified` on the ETag it read. If another writer committed in between the
head's ETag changed, the whole transaction fails (412) and the bus retries the handler on fresh
state: two instances crossing the threshold at once make exactly one run.

A transaction with more than the 100 operations one entity group transaction allows (freezing a
large manifest, a backfill) commits through a redo journal: the operations are written as
journal entities first, then one guarded head update makes the commit decision, then the
operations are applied and the journal cleared. Whoever next reads a head with a pending journal
(the same process after a retry, or another instance after a crash) applies it first, so the
commit completes exactly once.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Literal

from worker.store import (
    ConcurrencyConflict,
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

GLOBAL = "_global"
BATCH = 100
MANIFEST_CHUNK = 100  # entries per entity: a string property holds at most 32K characters
JOURNAL_ENTITY_CHARS = 600_000  # one journal entity (the service allows 1 MB per entity)
PROPERTY_CHARS = 30_000  # one string property (the service allows 32K UTF-16 characters)
RUN_ID = re.compile(r"^(?P<model>[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)-\d{4,}-[0-9a-f]{8}$")


def _k(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _ts(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _dt(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


def _prefix_filter(prefix: str) -> str:
    return f"PartitionKey eq @pk and RowKey ge '{prefix}' and RowKey lt '{prefix[:-1]}{chr(ord(prefix[-1]) + 1)}'"


# -- record <-> document -----------------------------------------------------------------------


def _image_doc(r: ImageRow) -> dict[str, Any]:
    return {
        "model": r.model, "path": r.path, "etag": r.etag, "label": r.label, "split": r.split, "size": r.size, "state": r.state, "run_id": r.run_id,
        "occurred_at": _ts(r.occurred_at), "first_seen_at": _ts(r.first_seen_at), "latest": r.latest, "source": r.source,
    }  # fmt: skip


def _image(d: dict[str, Any]) -> ImageRow:
    return ImageRow(**{**d, "occurred_at": _dt(d["occurred_at"]), "first_seen_at": _dt(d["first_seen_at"])})


def _run_doc(r: RunRow) -> dict[str, Any]:
    doc = dict(r.__dict__)
    for key in ("created_at", "submitted_at", "started_at", "finished_at", "next_attempt_at"):
        doc[key] = _ts(doc[key])
    return doc


def _run(d: dict[str, Any]) -> RunRow:
    d = dict(d)
    for key in ("created_at", "submitted_at", "started_at", "finished_at", "next_attempt_at"):
        d[key] = _dt(d[key])
    return RunRow(**d)


def _request_doc(r: RequestRow) -> dict[str, Any]:
    return {**r.__dict__, "created_at": _ts(r.created_at)}


def _request(d: dict[str, Any]) -> RequestRow:
    return RequestRow(**{**d, "created_at": _dt(d["created_at"])})


def _image_key(path: str, etag: str) -> str:
    return f"img|{_k(path)}|{_k(etag)}"


def _split(text: str) -> dict[str, str]:
    """A long string as properties p000, p001, ... each within the service's per-property limit."""
    return {f"p{i:03d}": text[n : n + PROPERTY_CHARS] for i, n in enumerate(range(0, len(text), PROPERTY_CHARS))}


def _join(entity: dict[str, Any]) -> str:
    return "".join(entity[k] for k in sorted(k for k in entity if re.fullmatch(r"p\d{3}", k)))


class TableTx(Tx):
    def __init__(self, store: TableStore):
        self.store = store
        self.heads: dict[str, tuple[dict[str, Any], str | None, str]] = {}  # pk -> (head doc, etag read, doc as read)
        self.writes: dict[tuple[str, str], dict[str, Any] | None] = {}  # (pk, rk) -> entity, None = delete
        self.committed = False
        self.prune: list[tuple[str, int]] = []

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
            return None if entity is None else json.loads(entity["doc"])
        entity = self.store.get(pk, rk)
        return None if entity is None else json.loads(entity["doc"])

    def _query(self, pk: str, prefix: str, where: str = "", params: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
        """Entities under `prefix`, with this transaction's own writes applied, sorted by RowKey."""
        self._head(pk)
        found = {
            e["RowKey"]: e
            for e in self.store.query(_prefix_filter(prefix) + (f" and {where}" if where else ""), {"pk": pk, **(params or {})})
        }
        for (wpk, rk), entity in self.writes.items():
            if wpk == pk and rk.startswith(prefix):
                if entity is None:
                    found.pop(rk, None)
                else:
                    found[rk] = entity
        rows = [(rk, json.loads(e["doc"]), e) for rk, e in sorted(found.items())]
        return [(rk, doc) for rk, doc, e in rows if self._matches(e, where, params or {})]

    @staticmethod
    def _matches(entity: dict[str, Any], where: str, params: dict[str, Any]) -> bool:
        # Our own buffered writes must pass the same filter the service applied to stored ones.
        return all(entity.get(prop) == params.get(name) for prop, name in re.findall(r"(\w+) eq @(\w+)", where))

    def _put(self, pk: str, rk: str, doc: dict[str, Any], **indexed: Any) -> None:
        self._head(pk)
        self.writes[(pk, rk)] = {"PartitionKey": pk, "RowKey": rk, "doc": json.dumps(doc, sort_keys=True), **indexed}

    def _count(self, head: dict[str, Any], d: dict[str, Any], sign: int) -> None:
        counts = head.setdefault("counts", {"pending": {}, "train": {}, "val": 0, "by_state": {}})
        counts["by_state"][d["state"]] = counts["by_state"].get(d["state"], 0) + sign
        if d["latest"] and d["state"] == "pending":
            counts["pending"][d["label"]] = counts["pending"].get(d["label"], 0) + sign
        if d["latest"] and d["state"] in ("pending", "in_run", "trained"):
            if d["split"] == "train":
                counts["train"][d["label"]] = counts["train"].get(d["label"], 0) + sign
            else:
                counts["val"] = counts.get("val", 0) + sign

    def _save_image(self, before: dict[str, Any] | None, after: dict[str, Any]) -> None:
        head = self._head(after["model"])
        if before is not None:
            self._count(head, before, -1)
        self._count(head, after, +1)
        if after["state"] == "pending" and after["latest"]:
            seen = after["first_seen_at"]
            head["pending_oldest"] = min(filter(None, [head.get("pending_oldest"), seen]), default=None)
            head["pending_newest"] = max(filter(None, [head.get("pending_newest"), seen]), default=None)
        if sum(head["counts"]["pending"].values()) == 0:
            head["pending_oldest"] = head["pending_newest"] = None
        self._put(
            after["model"],
            _image_key(after["path"], after["etag"]),
            after,
            state=after["state"],
            latest=after["latest"],
            run_id=after["run_id"] or "",
        )

    # -- inbox ---------------------------------------------------------------------------------

    def claim_message(self, message_id: str, kind: str, model: str | None, at: dt.datetime) -> bool:
        pk = model or GLOBAL
        rk = f"in|{_k(message_id)}"
        if self._get(pk, rk) is not None:
            return False
        self._put(pk, rk, {"message_id": message_id, "kind": kind, "at": _ts(at)})
        return True

    # -- images --------------------------------------------------------------------------------

    def add_image(self, row: ImageRow) -> Literal["new", "duplicate", "stale"]:
        if self._get(row.model, _image_key(row.path, row.etag)) is not None:
            return "duplicate"
        versions = [d for _, d in self._query(row.model, f"img|{_k(row.path)}|")]
        newest = next((v for v in versions if v["latest"]), None)
        stale = newest is not None and is_stale(row, _dt(newest["occurred_at"]), _dt(newest["first_seen_at"]))
        if newest is not None and not stale:
            for version in versions:
                if version["latest"] or version["state"] == "pending":
                    after = {**version, "latest": False, "state": "superseded" if version["state"] == "pending" else version["state"]}
                    self._save_image(version, after)
        doc = _image_doc(row)
        doc.update(state="superseded" if stale else row.state, latest=not stale)
        self._save_image(None, doc)
        return "stale" if stale else "new"

    def pending_stats(self, model: str) -> PendingStats:
        head = self._head(model)
        per_class = {k: v for k, v in head.get("counts", {}).get("pending", {}).items() if v > 0}
        if not per_class:
            return PendingStats()
        return PendingStats(
            count=sum(per_class.values()),
            per_class=per_class,
            oldest_at=_dt(head.get("pending_oldest")),
            newest_at=_dt(head.get("pending_newest")),
        )

    def data_stats(self, model: str) -> DataStats:
        counts = self._head(model).get("counts", {})
        return DataStats(train_per_class={k: v for k, v in counts.get("train", {}).items() if v > 0}, val_count=counts.get("val", 0))

    def manifest_candidates(self, model: str, only_pending: bool) -> list[ImageRow]:
        rows = [_image(d) for _, d in self._query(model, "img|", "latest eq @latest", {"latest": True})]
        states = ("pending",) if only_pending else ("pending", "in_run", "trained")
        return sorted((r for r in rows if r.state in states), key=lambda r: r.path)

    def set_image_state(self, model: str, keys: list[tuple[str, str]], state: ImageState, run_id: str | None) -> None:
        for path, etag in keys:
            before = self._get(model, _image_key(path, etag))
            if before is not None:
                self._save_image(before, {**before, "state": state, "run_id": run_id})

    def images_in_run(self, run_id: str) -> list[ImageRow]:
        model = self._model_of(run_id)
        rows = self._query(model, "img|", "run_id eq @run", {"run": run_id})
        return sorted((_image(d) for _, d in rows if d["state"] == "in_run"), key=lambda r: r.path)

    def count_images(self, model: str) -> dict[str, int]:
        return {k: v for k, v in self._head(model).get("counts", {}).get("by_state", {}).items() if v > 0}

    # -- runs ----------------------------------------------------------------------------------

    @staticmethod
    def _model_of(run_id: str) -> str:
        match = RUN_ID.match(run_id)
        return match["model"] if match else GLOBAL

    def insert_run(self, run: RunRow, entries: list[ManifestEntry]) -> None:
        if self._get(run.model, f"run|{run.run_id}") is not None:
            raise KeyError(f"run {run.run_id} exists")
        self._put(run.model, f"run|{run.run_id}", _run_doc(run), state=run.state)
        docs = [e.__dict__ for e in entries]
        for n in range(0, max(1, len(docs)), MANIFEST_CHUNK):
            self._put(run.model, f"mf|{run.run_id}|{n // MANIFEST_CHUNK:05d}", {"entries": docs[n : n + MANIFEST_CHUNK]})

    def manifest_entries(self, run_id: str) -> list[ManifestEntry]:
        chunks = self._query(self._model_of(run_id), f"mf|{run_id}|")
        return sorted((ManifestEntry(**e) for _, d in chunks for e in d["entries"]), key=lambda e: e.path)

    def get_run(self, run_id: str) -> RunRow | None:
        doc = self._get(self._model_of(run_id), f"run|{run_id}")
        return _run(doc) if doc else None

    def update_run(self, run: RunRow) -> None:
        if self._get(run.model, f"run|{run.run_id}") is None:
            raise KeyError(f"run {run.run_id} does not exist")
        self._put(run.model, f"run|{run.run_id}", _run_doc(run), state=run.state)

    def runs(self, model: str | None = None, states: frozenset[str] | None = None, limit: int | None = None) -> list[RunRow]:
        models = [model] if model else self.store.partitions()
        found = [_run(d) for m in models for _, d in self._query(m, "run|")]
        found = [r for r in found if states is None or r.state in states]
        found.sort(key=lambda r: (r.created_at, r.seq), reverse=True)
        return found[:limit]

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, row: RequestRow) -> None:
        if self._get(row.model, f"rq|{_k(row.request_id)}") is not None:
            raise KeyError(f"request {row.request_id} exists")
        self._put(row.model, f"rq|{_k(row.request_id)}", _request_doc(row), state=row.state)

    def open_requests(self, model: str) -> list[RequestRow]:
        rows = [_request(d) for _, d in self._query(model, "rq|", "state eq @state", {"state": "open"})]
        return sorted(rows, key=lambda r: (r.created_at, r.request_id))

    def update_request(self, row: RequestRow) -> None:
        doc = self._get(row.model, f"rq|{_k(row.request_id)}")
        if doc is not None:
            doc.update(state=row.state, run_id=row.run_id)
            self._put(row.model, f"rq|{_k(row.request_id)}", doc, state=row.state)

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

    def decisions(self, model: str, limit: int = 20) -> list[DecisionRow]:
        rows = self._query(model, "dc|")[:limit]
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
            "payload": row.payload,
            "created_at": _ts(row.created_at),
        }
        self._put(pk, rk, doc, published=False)
        return True

    # -- model versions and head ---------------------------------------------------------------

    def add_model_version(self, row: ModelVersionRow) -> bool:
        if self._get(row.model, f"verrun|{_k(row.run_id)}") is not None:
            return False
        if self._get(row.model, f"ver|{row.version:06d}") is not None:
            raise KeyError(f"{row.model} v{row.version} exists")
        doc = {**row.__dict__, "created_at": _ts(row.created_at)}
        self._put(row.model, f"ver|{row.version:06d}", doc)
        self._put(row.model, f"verrun|{_k(row.run_id)}", {"version": row.version})
        return True

    def model_versions(self, model: str) -> list[ModelVersionRow]:
        rows = [ModelVersionRow(**{**d, "created_at": _dt(d["created_at"])}) for _, d in self._query(model, "ver|")]
        return sorted(rows, key=lambda v: v.version, reverse=True)

    def model_head(self, model: str) -> ModelHead:
        h = self._head(model)
        return ModelHead(
            model=model, next_seq=h.get("next_seq", 1), followup_wanted=h.get("followup_wanted", False),
            last_run_finished_at=_dt(h.get("last_run_finished_at")), champion_version=h.get("champion_version"), champion_sha256=h.get("champion_sha256"),
        )  # fmt: skip

    def save_model_head(self, head: ModelHead) -> None:
        h = self._head(head.model)
        h.update(
            next_seq=head.next_seq, followup_wanted=head.followup_wanted, last_run_finished_at=_ts(head.last_run_finished_at),
            champion_version=head.champion_version, champion_sha256=head.champion_sha256,
        )  # fmt: skip

    def remember_response(self, key: str, fingerprint: str, response: dict, at: dt.datetime) -> tuple[str, dict] | None:
        doc = self._get(GLOBAL, f"idem|{_k(key)}")
        if doc is not None:
            return doc["fingerprint"], doc["response"]
        self._put(GLOBAL, f"idem|{_k(key)}", {"fingerprint": fingerprint, "response": response, "at": _ts(at)})
        return None

    def commit(self) -> None:
        changed = {pk for pk, (doc, _, original) in self.heads.items() if json.dumps(doc, sort_keys=True) != original}
        for pk in sorted({pk for pk, _ in self.writes} | changed):
            ops = [
                (("delete" if e is None else "upsert"), e or {"PartitionKey": pk, "RowKey": rk})
                for (wpk, rk), e in self.writes.items()
                if wpk == pk
            ]
            doc, etag, _ = self.heads[pk]
            self.store.commit_partition(pk, ops, doc, etag)
        self.committed = True
        for model, keep in self.prune:
            self.store.prune_decisions(model, keep)


class TableStore(Store):
    """`table_client` is an azure.data.tables.TableClient (connection string or identity-based)."""

    def __init__(self, table_client: Any):
        from azure.core.exceptions import ResourceExistsError

        self.table = table_client
        with suppress(ResourceExistsError):
            self.table.create_table()
        self._partitions: set[str] = set()

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
            return self.table.get_entity(pk, rk)  # a TableEntity: a dict with .metadata["etag"]
        except ResourceNotFoundError:
            return None

    def query(self, flt: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for entity in self.table.query_entities(flt, parameters=params):
            yield dict(entity)

    def partitions(self) -> list[str]:
        heads = self.table.query_entities("RowKey eq 'head'", select=["PartitionKey"])
        self._partitions = {e["PartitionKey"] for e in heads} - {GLOBAL}
        return sorted(self._partitions)

    def read_head(self, pk: str) -> tuple[dict[str, Any], str | None]:
        entity = self.get(pk, "head")
        if entity is None:
            return {}, None
        doc = json.loads(entity["doc"])
        if doc.get("journal"):
            self._apply_journal(pk, doc["journal"], entity.metadata["etag"])
            return self.read_head(pk)
        return doc, entity.metadata["etag"]

    def _head_entity(self, pk: str, doc: dict[str, Any]) -> dict[str, Any]:
        return {"PartitionKey": pk, "RowKey": "head", "doc": json.dumps(doc, sort_keys=True)}

    def _guarded_head_op(self, pk: str, doc: dict[str, Any], etag: str | None) -> tuple:
        from azure.core import MatchConditions

        if etag is None:
            return ("create", self._head_entity(pk, doc))
        return ("update", self._head_entity(pk, doc), {"etag": etag, "match_condition": MatchConditions.IfNotModified})

    def _submit(self, ops: list[tuple]) -> None:
        from azure.data.tables import TableTransactionError

        try:
            self.table.submit_transaction(ops)
        except TableTransactionError as exc:
            if exc.status_code in (409, 412):
                raise ConcurrencyConflict(f"another writer committed first ({exc.status_code})") from None
            raise

    def commit_partition(self, pk: str, ops: list[tuple], head: dict[str, Any], etag: str | None) -> None:
        head = {k: v for k, v in head.items() if k != "journal"}
        if len(ops) + 1 <= BATCH:
            self._submit([*ops, self._guarded_head_op(pk, head, etag)])
            self._partitions.add(pk)
            return
        # Redo journal: write the operations, decide with one guarded head update, then apply.
        txid = uuid.uuid4().hex
        chunks, current, size = [], [], 0
        for op in ops:
            text = json.dumps(op)
            if current and size + len(text) > JOURNAL_ENTITY_CHARS:
                chunks.append(current)
                current, size = [], 0
            current.append(op)
            size += len(text)
        chunks.append(current)
        entities = [{"PartitionKey": pk, "RowKey": f"jr|{txid}|{n:05d}", **_split(json.dumps(chunk))} for n, chunk in enumerate(chunks)]
        for entity in entities:  # one at a time: a batch may not exceed 4 MB
            self.table.upsert_entity(entity)
        journal = {"txid": txid, "chunks": len(chunks), "head": head}
        try:
            self._submit([self._guarded_head_op(pk, {**head, "journal": journal}, etag)])
        except ConcurrencyConflict:
            for entity in entities:  # the decision went to another writer: this journal never applies
                self.table.delete_entity(pk, entity["RowKey"])
            raise
        self._partitions.add(pk)
        self._apply_journal(pk, journal, self.get(pk, "head").metadata["etag"])

    def _apply_journal(self, pk: str, journal: dict[str, Any], etag: str | None) -> None:
        """Apply a committed journal (idempotent: upserts and deletes), then clear it."""
        from azure.core.exceptions import ResourceNotFoundError

        txid = journal["txid"]
        for n in range(journal["chunks"]):
            entity = self.get(pk, f"jr|{txid}|{n:05d}")
            if entity is None:
                continue
            for kind, e in json.loads(_join(entity)):
                if kind == "delete":
                    with suppress(ResourceNotFoundError):
                        self.table.delete_entity(e["PartitionKey"], e["RowKey"])
                else:
                    self.table.upsert_entity(e)
        try:
            self._submit([self._guarded_head_op(pk, journal["head"], etag)])
        except ConcurrencyConflict:
            return  # another reader finished applying it first
        for n in range(journal["chunks"]):
            with suppress(ResourceNotFoundError):
                self.table.delete_entity(pk, f"jr|{txid}|{n:05d}")

    def prune_decisions(self, model: str, keep: int) -> None:
        rows = list(self.query(_prefix_filter("dc|"), {"pk": model}))
        for entity in rows[keep:]:
            self.table.delete_entity(model, entity["RowKey"])

    # -- the port ------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[TableTx]:
        yield TableTx(self)

    def _outbox(self, flt: str) -> list[OutboxRow]:
        rows = []
        for e in self.query(flt, {}):
            d = json.loads(e["doc"])
            row = OutboxRow(
                event_id=d["event_id"], type=d["type"], subject=d["subject"], payload=d["payload"], created_at=_dt(d["created_at"]),
                published_at=_dt(d.get("published_at")),
            )  # fmt: skip
            rows.append(((e["RowKey"], e["PartitionKey"]), row))  # RowKey: created time, then the partition's sequence
        return [row for _, row in sorted(rows, key=lambda pair: pair[0])]

    def unpublished_events(self, limit: int = 100) -> list[OutboxRow]:
        return self._outbox("RowKey ge 'ob|' and RowKey lt 'ob}' and published eq false")[:limit]

    def mark_published(self, event_ids: list[str], at: dt.datetime) -> None:
        for event_id in event_ids:
            for pk in [*self.partitions(), GLOBAL]:
                marker = self.get(pk, f"ev|{_k(event_id)}")
                if marker is None:
                    continue
                rk = json.loads(marker["doc"])["rk"]
                entity = self.get(pk, rk)
                if entity is not None and not entity.get("published"):
                    doc = json.loads(entity["doc"])
                    doc["published_at"] = _ts(at)
                    self.table.upsert_entity({"PartitionKey": pk, "RowKey": rk, "doc": json.dumps(doc, sort_keys=True), "published": True})
                break

    def all_events(self) -> Iterator[OutboxRow]:
        yield from self._outbox("RowKey ge 'ob|' and RowKey lt 'ob}'")

    def close(self) -> None:
        self.table.close()
