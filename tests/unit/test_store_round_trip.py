"""Every field a ledger stores reads back as it was written, and each write says what it did
(issue 11: the survivors of `make mutate` on the SQLite store were fields dropped on the way back).
Runs on the in-memory fake and SQLite here, and on Table Storage in the integration suite."""

from __future__ import annotations

import datetime as dt

import pytest

from worker.store import DecisionRow, ImageRow, ModelHead, ModelVersionRow, OutboxRow, RequestRow, RunRow

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 11, 30, 12, 0, 0, 123000, tzinfo=dt.UTC)


def _image(path: str, etag: str = "e1", **over) -> ImageRow:
    fields = dict(model="birds", path=path, etag=etag, label=path.split("/")[0], split="val", size=4321, source="backfill")
    fields.update(occurred_at=T0 - dt.timedelta(hours=1), first_seen_at=T0)
    fields.update(over)
    return ImageRow(**fields)


def _add(store, *rows) -> None:
    with store.transaction() as tx:
        for row in rows:
            tx.add_image(row)
        tx.commit()


def test_an_image_reads_back_with_every_field_in_both_reads(store):
    _add(store, _image("chicken/a.jpg"), _image("turkey/b.jpg", size=0, source="blob", occurred_at=None))
    with store.transaction() as tx:
        candidates = tx.manifest_candidates("birds", 0, tx.image_watermark("birds"))
        arrivals = tx.image_arrivals("birds")
    for read in (candidates, arrivals):
        a, b = sorted(read, key=lambda r: r.path)
        assert (a.model, a.path, a.etag, a.label, a.split, a.size, a.source) == (
            "birds",
            "chicken/a.jpg",
            "e1",
            "chicken",
            "val",
            4321,
            "backfill",
        )
        assert (a.occurred_at, a.first_seen_at, a.latest, a.state) == (T0 - dt.timedelta(hours=1), T0, True, "pending")
        assert (b.label, b.size, b.source, b.occurred_at) == ("turkey", 0, "blob", None)
        assert sorted([a.seq, b.seq]) == [1, 2]


def _request(request_id: str, **over) -> RequestRow:
    fields = dict(request_id=request_id, model="birds", force=True, created_at=T0, requested_by="ops@example.com", reason="backfill")
    fields.update(over)
    return RequestRow(**fields)


def test_a_request_reads_back_with_every_field_and_gets_the_next_sequence_number(store):
    budget = _request("r1", overrides={"epochs": 3, "learning_rate": 0.01}, override_budget=True)
    plain = _request("r2", force=False, requested_by="", reason="")
    with store.transaction() as tx:
        tx.add_request(budget)
        tx.add_request(plain)
        tx.commit()
    assert (budget.seq, plain.seq) == (1, 2), "add_request sets the seq it gave on the row"
    with store.transaction() as tx:
        assert tx.open_requests("birds") == [budget, plain]
    assert plain.override_budget is False, "a request without the budget override reads back without it"


def test_a_rejected_request_leaves_the_open_ones_and_reads_back_rejected(store):
    first, second = _request("r1"), _request("r2")
    with store.transaction() as tx:
        tx.add_request(first)
        tx.add_request(second)
        tx.reject_request(first)
        tx.commit()
    with store.transaction() as tx:
        assert [r.request_id for r in tx.open_requests("birds")] == ["r2"]
        everything = {r.request_id: r.state for r in tx.all_requests("birds")}
    if "r1" in everything:  # the ledgers that keep every request for `retrain simulate --export`
        assert everything == {"r1": "rejected", "r2": "open"}


def _version(version: int, run_id: str) -> ModelVersionRow:
    return ModelVersionRow(
        model="birds", version=version, run_id=run_id, created_at=T0 + dt.timedelta(minutes=version),
        location=f"registry/birds/{version}", metrics={"best_val_acc": 0.9, "val": {"n": 30}},
        card={"manifest_sha256": "ab" * 32, "parent_version": version - 1 or None},
    )  # fmt: skip


def test_model_versions_read_back_whole_newest_first_and_a_runs_second_version_is_refused(store):
    v1, v2 = _version(1, "birds-r1"), _version(2, "birds-r2")
    with store.transaction() as tx:
        assert tx.add_model_version(v1) is True
        assert tx.add_model_version(v2) is True
        tx.commit()
    with store.transaction() as tx:
        assert tx.add_model_version(_version(3, "birds-r1")) is False, "the run already has a version"
        tx.commit()
    with store.transaction() as tx:
        assert tx.model_versions("birds") == [v2, v1]


def _event(n: int) -> OutboxRow:
    return OutboxRow(
        event_id=f"ev-{n:03d}", type="retrain.model.registered", subject=f"models/birds/{n}",
        payload={"id": f"ev-{n:03d}", "data": {"version": n, "nested": [1, "two"]}}, created_at=T0 + dt.timedelta(seconds=n),
    )  # fmt: skip


def test_events_read_back_whole_oldest_first_a_hundred_at_a_time_by_default(store):
    events = [_event(n) for n in range(101)]
    for chunk in (events[n : n + 25] for n in range(0, len(events), 25)):  # (a commit holds at most 99 writes)
        with store.transaction() as tx:
            assert all(tx.enqueue_event(e) for e in chunk)
            tx.commit()
    with store.transaction() as tx:
        assert tx.enqueue_event(events[0]) is False, "an event id is queued once"
        tx.commit()
    assert store.unpublished_events() == events[:100]
    assert store.unpublished_events(limit=3) == events[:3]
    published_at = T0 + dt.timedelta(hours=1)
    store.mark_published([e.event_id for e in events[:100]], published_at)
    assert store.unpublished_events() == [events[100]]
    read = list(store.all_events())
    assert read[:100] == [OutboxRow(**{**e.__dict__, "published_at": published_at}) for e in events[:100]]
    assert read[100] == events[100]
    store.mark_published([events[0].event_id], published_at + dt.timedelta(hours=1))
    assert next(iter(store.all_events())).published_at == published_at, "published once: the first time stays"


def test_a_decision_reads_back_whole(store):
    decision = DecisionRow(model="birds", at=T0, outcome="submit", reason="12 images", run_id="birds-r1", message_id="m-1")
    with store.transaction() as tx:
        tx.record_decision(decision)
        tx.commit()
    with store.transaction() as tx:
        assert tx.decisions("birds") == [decision]


def _run(run_id: str, seq: int, watermark: int, state: str) -> RunRow:
    return RunRow(
        run_id=run_id, model="birds", seq=seq, state=state, created_at=T0, watermark=watermark, manifest_sha256="cd" * 32,
        image_count=watermark, new_image_count=watermark, classes={"chicken": watermark},
    )  # fmt: skip


def test_image_counts_follow_the_trained_and_in_flight_watermarks(store):
    _add(store, *[_image(f"chicken/{i}.jpg") for i in range(1, 8)])  # seq 1..7
    _add(store, _image("chicken/1.jpg", etag="e2"))  # seq 8: a new version, so seq 1 is superseded
    with store.transaction() as tx:
        assert tx.count_images("birds") == {"pending": 7, "superseded": 1}
        tx.save_model_head(ModelHead(model="birds", trained_watermark=3))
        tx.commit()
    with store.transaction() as tx:
        assert tx.count_images("birds") == {"trained": 2, "pending": 5, "superseded": 1}
        tx.insert_run(_run("birds-r1", 1, watermark=6, state="running"))
        tx.commit()
    with store.transaction() as tx:
        assert tx.count_images("birds") == {"trained": 2, "in_run": 3, "pending": 2, "superseded": 1}
        assert tx.count_images("cats") == {}


def test_updating_a_run_that_does_not_exist_names_it(store):
    with store.transaction() as tx, pytest.raises(KeyError, match="run birds-r9 does not exist"):
        tx.update_run(_run("birds-r9", 9, watermark=0, state="running"))
