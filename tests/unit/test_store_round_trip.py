"""Every field a ledger stores reads back as it was written (a field dropped on the way back is
caught here), and each write says what it did. Runs on the in-memory fake, SQLite and Table Storage."""

from __future__ import annotations

import datetime as dt

import pytest

from worker.store import DecisionRow, ImageRow, ModelHead, ModelVersionRow, OutboxRow, RequestRow, RunRow

pytestmark = [pytest.mark.unit, pytest.mark.on_table_storage]  # also on Azure Table Storage (Azurite)

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


def test_published_events_older_than_the_cutoff_are_pruned_and_nothing_unpublished_ever_is(store):
    events = [_event(n) for n in range(6)]
    with store.transaction() as tx:
        assert all(tx.enqueue_event(e) for e in events)
        tx.commit()
    store.mark_published([e.event_id for e in events[:2]], T0 + dt.timedelta(days=1))
    store.mark_published([events[2].event_id], T0 + dt.timedelta(days=5))
    # events[3:] stay unpublished (the broker was down): they are never dropped, however old
    assert store.prune_outbox(T0 + dt.timedelta(days=3)) == 2
    assert [e.event_id for e in store.all_events()] == ["ev-002", "ev-003", "ev-004", "ev-005"]
    assert [e.event_id for e in store.unpublished_events()] == ["ev-003", "ev-004", "ev-005"]
    assert store.prune_outbox(T0 + dt.timedelta(days=30), limit=0) == 0
    assert store.prune_outbox(T0 + dt.timedelta(days=30)) == 1
    assert [e.event_id for e in store.all_events()] == ["ev-003", "ev-004", "ev-005"]


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


def test_a_version_is_new_a_duplicate_or_stale_and_only_the_newest_written_is_latest(store):
    with store.transaction() as tx:
        assert tx.add_image(_image("chicken/a.jpg", "v1", occurred_at=T0)) == "new"
        assert tx.add_image(_image("chicken/a.jpg", "v1", occurred_at=T0)) == "duplicate"
        assert tx.add_image(_image("chicken/a.jpg", "v2", occurred_at=T0 + dt.timedelta(seconds=5))) == "new"
        assert tx.add_image(_image("chicken/a.jpg", "v0", occurred_at=T0 - dt.timedelta(seconds=5))) == "stale", "written before v2"
        # Without the source's time, the first-seen time decides.
        assert tx.add_image(_image("turkey/b.jpg", "w1", occurred_at=None, first_seen_at=T0)) == "new"
        assert tx.add_image(_image("turkey/b.jpg", "w0", occurred_at=None, first_seen_at=T0 - dt.timedelta(seconds=1))) == "stale"
        assert tx.add_image(_image("turkey/b.jpg", "w2", occurred_at=None, first_seen_at=T0 + dt.timedelta(seconds=1))) == "new"
        tx.commit()
    with store.transaction() as tx:
        latest = {r.path: r.etag for r in tx.manifest_candidates("birds", 0, tx.image_watermark("birds"))}
        states = {r.etag: (r.latest, r.state) for r in tx.image_arrivals("birds")}
    assert latest == {"chicken/a.jpg": "v2", "turkey/b.jpg": "w2"}
    assert {etag: states[etag] for etag in ("v2", "w2")} == {"v2": (True, "pending"), "w2": (True, "pending")}
    if len(states) > 2:  # the ledgers that keep every version for `retrain simulate --export`
        assert {etag: states[etag] for etag in ("v1", "v0", "w1", "w0")} == dict.fromkeys(("v1", "v0", "w1", "w0"), (False, "superseded"))


def test_arrivals_carry_their_state_from_the_watermarks(store):
    _add(store, *[_image(f"chicken/{i}.jpg") for i in range(1, 7)])  # seq 1..6
    with store.transaction() as tx:
        tx.save_model_head(ModelHead(model="birds", trained_watermark=2))
        tx.insert_run(_run("birds-r1", 1, watermark=4, state="submitted"))
        tx.commit()
    with store.transaction() as tx:
        assert [(r.seq, r.state) for r in tx.image_arrivals("birds")] == [
            (1, "trained"), (2, "trained"), (3, "in_run"), (4, "in_run"), (5, "pending"), (6, "pending"),
        ]  # fmt: skip


def test_the_training_data_is_counted_by_class_for_train_and_in_total_for_validation(store):
    rows = [_image(f"chicken/t{i}.jpg", split="train") for i in range(3)] + [_image(f"turkey/t{i}.jpg", split="train") for i in range(2)]
    rows += [_image(f"chicken/v{i}.jpg", split="val") for i in range(4)]
    _add(store, *rows)
    _add(store, _image("chicken/t0.jpg", etag="e2", split="train"))  # a new version replaces the old: still 3
    with store.transaction() as tx:
        stats = tx.data_stats("birds")
    assert (stats.train_per_class, stats.val_count) == ({"chicken": 3, "turkey": 2}, 4)


def test_pending_images_are_counted_by_class_with_the_first_and_last_arrival(store):
    with store.transaction() as tx:
        assert tx.pending_stats("birds").count == 0
    for i, path in enumerate(["chicken/1.jpg", "turkey/1.jpg", "chicken/2.jpg", "chicken/3.jpg"]):
        _add(store, _image(path, first_seen_at=T0 + dt.timedelta(seconds=i)))
    with store.transaction() as tx:
        stats = tx.pending_stats("birds")
        assert (stats.count, stats.per_class) == (4, {"chicken": 3, "turkey": 1})
        assert (stats.oldest_at, stats.newest_at) == (T0, T0 + dt.timedelta(seconds=3))
        tx.insert_run(_run("birds-r1", 1, watermark=2, state="running"))  # the first two are in a run now
        tx.commit()
    with store.transaction() as tx:
        stats = tx.pending_stats("birds")
    assert (stats.count, stats.per_class) == (2, {"chicken": 2})
    assert (stats.oldest_at, stats.newest_at) == (T0 + dt.timedelta(seconds=2), T0 + dt.timedelta(seconds=3))


def test_decisions_are_read_newest_first_twenty_by_default(store):
    for n in range(21):
        with store.transaction() as tx:
            tx.record_decision(DecisionRow(model="birds", at=T0 + dt.timedelta(seconds=n), outcome="wait", reason=f"r{n}"))
            tx.commit()
    with store.transaction() as tx:
        assert [d.reason for d in tx.decisions("birds")] == [f"r{n}" for n in range(20, 0, -1)]
        assert len(tx.decisions("birds", limit=21)) == 21


def test_processed_ids_are_pruned_a_thousand_at_a_time_by_default_and_counted(store):
    for first in range(0, 1001, 90):
        with store.transaction() as tx:
            for n in range(first, min(first + 90, 1001)):
                tx.claim_message(f"m-{n}", "image.uploaded", "birds", T0)
            tx.commit()
    later = T0 + dt.timedelta(seconds=1)
    assert store.prune_inbox("birds", T0) == 0, "only ids processed before the cut"
    assert store.prune_inbox("birds", later) == 1000
    assert store.prune_inbox("birds", later) == 1
    with store.transaction() as tx:  # an HTTP idempotency key is forgotten the same way, and counted
        tx.remember_response("birds", "key-1", "fp", {"status": 202}, T0)
        tx.commit()
    assert store.prune_inbox("birds", later) == 1
    with store.transaction() as tx:
        assert tx.claim_message("m-0", "image.uploaded", "birds", later) is True, "forgotten: a new delivery is processed"


def test_an_idempotency_keys_first_response_is_stored_and_returned_to_every_later_use(store):
    first = {"status": 202, "body": {"request_id": "r1", "runs": ["birds-1"]}}
    with store.transaction() as tx:
        assert tx.remember_response("birds", "key-1", "fp-1", first, T0) is None, "a new key: carried out now"
        tx.commit()
    with store.transaction() as tx:
        assert tx.remember_response("birds", "key-1", "fp-2", {"status": 500}, T0) == ("fp-1", first), "the stored answer, as sent"
        assert tx.remember_response("birds", "key-2", "fp-1", first, T0) is None, "keys are not shared"
        tx.commit()
    with store.transaction() as tx:
        assert tx.remember_response("birds", "key-2", "fp-x", {}, T0) == ("fp-1", first)


def test_a_staged_image_is_known_at_once_and_counted_after_the_next_fold(store):
    assert store.stage_image(_image("chicken/a.jpg")) == "staged"
    assert store.stage_image(_image("chicken/a.jpg")) == "duplicate"
    with store.transaction() as tx:  # (stores without staged ingest registered it already: nothing to fold)
        assert tx.fold("birds") == (1 if store.staged_ingest else 0)
        tx.commit()
    with store.transaction() as tx:
        assert tx.count_images("birds") == {"pending": 1}
