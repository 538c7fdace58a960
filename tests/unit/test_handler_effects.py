"""What each handler hands back and records, exactly: the effects the bus acts on (runs to submit,
runs to complete), the details people read in logs, and the message each decision came from.
Written against the survivors of `make mutate` in worker/handlers.py (docs/mutation.md)."""

from __future__ import annotations

import datetime as dt

import pytest

from shared.messages import ImageRef, ImageUploaded, ModelControl, RetrainRequested, RunStatusChanged, Tick
from tests.fakes.adapters import FakeBlobStore
from tests.fakes.harness import make_harness, small_config
from tests.fakes.memory_store import MemoryStore
from worker import handlers
from worker.backfill import resolve_backfill
from worker.context import Context
from worker.handlers import handle_image_uploaded, handle_retrain_requested, handle_run_status_changed, handle_tick

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def upload(h, path: str, etag: str = "e1", message_id: str | None = None):
    message = ImageUploaded.of("birds", path, etag, 100)
    if message_id:
        message = message.model_copy(update={"message_id": message_id})
    return h.worker.handle(message)


def test_an_upload_reports_what_it_did_and_its_decision_names_the_message(tmp_path):
    h = make_harness(tmp_path, quiet_period=0, min_new_images=4, min_per_class=1)
    first = upload(h, "chicken/1.jpg", message_id="up-1")
    assert (first.outcome, first.detail, first.planned_runs) == ("ok", "registered chicken/1.jpg", [])
    assert h.decisions()[0].message_id == "up-1"
    again = upload(h, "chicken/1.jpg")
    assert (again.outcome, again.detail) == ("duplicate", "chicken/1.jpg (e1) is already known")
    for i, label in enumerate(["turkey", "chicken", "turkey"], start=2):
        last = upload(h, f"{label}/{i}.jpg")
    [run] = h.runs()
    assert last.planned_runs == [run.run_id]  # the upload that crossed the threshold hands its run to the bus
    assert h.backend.calls_to("submit") == [run.backend_run_id]  # submitted after the commit, no tick needed


def test_an_older_version_delivered_late_is_reported_as_stale(tmp_path):
    h = make_harness(tmp_path)
    newer = ImageUploaded.of("birds", "chicken/1.jpg", "e2", 100, occurred_at=NOW)
    older = ImageUploaded.of("birds", "chicken/1.jpg", "e1", 100, occurred_at=NOW - dt.timedelta(minutes=1))
    h.worker.handle(newer)
    effects = h.worker.handle(older)
    assert (effects.outcome, effects.detail) == ("stale", "chicken/1.jpg (e1) is older than the known version")


def test_a_request_is_recorded_with_who_asked_and_why(tmp_path):
    h = make_harness(tmp_path, in_flight="drop")
    h.uploads(10)
    h.worker.handle(RetrainRequested(message_id="force-1", model="birds", force=True, requested_by="ops", reason="new camera"))
    h.worker.handle(RetrainRequested(message_id="force-2", model="birds", force=True, requested_by="cron", reason="nightly"))
    rejected = [e.payload["data"] for e in h.events() if e.type == "retrain.request.rejected"]
    assert rejected == [{"request_id": "force-2", "model": "birds", "reason": rejected[0]["reason"], "requested_by": "cron"}]
    [run] = h.runs()
    assert run.request_ids == ["force-1"]
    with h.store.transaction() as tx:
        assert [(r.requested_by, r.reason) for r in tx.open_requests("birds")] in ([], [("ops", "new camera")])


@pytest.mark.parametrize(("failed_runs", "backoff"), [(1, False), (0, True), (3, True)])
def test_a_forced_request_ends_any_failure_backoff(tmp_path, failed_runs, backoff):
    h = make_harness(tmp_path)
    with h.store.transaction() as tx:
        head = tx.model_head("birds")
        head.failed_runs, head.backoff_until = failed_runs, (NOW + dt.timedelta(hours=1)) if backoff else None
        tx.save_model_head(head)
        tx.commit()
    h.worker.handle(RetrainRequested(message_id="f", model="birds", force=True))
    head = h.head()
    assert (head.failed_runs, head.backoff_until) == (0, None)


def test_a_backfill_reports_registered_missing_and_skipped_images_with_examples(tmp_path):
    h = make_harness(tmp_path)
    h.blobs.blobs.update({"chicken/a.jpg": b"a", "turkey/b.jpg": b"b", "chicken/c.jpg": b"c", "notes.txt": b"n"})
    by_prefix = h.worker.handle(RetrainRequested(message_id="bf-1", model="birds", prefix=""))
    assert by_prefix.detail == "registered 3 images; 1 skipped: not <label>/<file> images (e.g. notes.txt)"
    listed = [ImageRef(path="chicken/gone.jpg"), ImageRef(path="chicken/z.jpg"), ImageRef(path="turkey/q.jpg", etag="given")]
    h.blobs.blobs["chicken/z.jpg"] = b"z"
    effects = h.worker.handle(RetrainRequested(message_id="bf-2", model="birds", images=listed))
    assert effects.detail == "registered 2 images; 1 not found (e.g. chicken/gone.jpg)"
    reject = next(d for d in h.decisions() if d.outcome == "reject")
    assert (reject.message_id, reject.reason) == ("bf-2", "request bf-2: 1 listed images do not exist, e.g. 'chicken/gone.jpg'")
    images = h.images()
    assert images["turkey/q.jpg"].size == 0  # an etag given by the sender: the size is not looked up
    assert images["chicken/z.jpg"].size == 1


def test_resolving_a_backfill_looks_up_every_listed_image_and_needs_a_store_for_a_prefix(tmp_path):
    blobs = FakeBlobStore({"chicken/b.jpg": b"bb"})
    msg = RetrainRequested(message_id="r", model="birds", images=[ImageRef(path="chicken/a.jpg"), ImageRef(path="chicken/b.jpg")])
    backfill = resolve_backfill(blobs, msg)
    assert backfill.missing == ["chicken/a.jpg"]  # a missing image does not end the lookup
    assert [(p, s) for p, _, s in backfill.refs] == [("chicken/b.jpg", 2)]
    no_store = None
    assert resolve_backfill(no_store, msg).missing == ["chicken/a.jpg", "chicken/b.jpg"]
    with pytest.raises(RuntimeError, match="no blob store configured for model birds"):
        resolve_backfill(no_store, RetrainRequested(message_id="p", model="birds", prefix="chicken/"))


def test_status_events_report_unknown_and_stale_runs_and_a_queued_status_marks_a_planned_run_submitted(tmp_path):
    h = make_harness(tmp_path, quiet_period=0, min_new_images=12, min_per_class=1)
    h.backend.fail_next_submit(ConnectionError("backend down"), times=10)
    h.uploads(6)
    [run] = h.runs()
    assert run.state == "planned"
    unknown = h.status("birds-9999-deadbeef-a1", "running")
    assert (unknown.outcome, unknown.detail) == ("ignored", "unknown run birds-9999-deadbeef-a1")
    stale = h.status(f"{run.run_id}-a7", "running")
    assert (stale.outcome, stale.detail) == ("ignored", f"stale status running for {run.run_id}-a7 (run is planned, attempt 1)")
    queued = h.status(run.backend_run_id, "queued")
    assert (queued.outcome, queued.detail) == ("ok", f"{run.run_id} queued")
    [run] = h.runs()
    assert run.state == "submitted"
    assert [e.type for e in h.events()].count("retrain.run.submitted") == 1


def test_a_tick_hands_back_only_this_models_due_planned_runs_and_succeeded_runs(tmp_path):
    config = small_config(tmp_path)
    store = MemoryStore()
    with store.transaction() as tx:
        for model, run_id, state, due in [("birds", "birds-0001-aaaaaaaa", "planned", NOW), ("birds", "birds-0002-bbbbbbbb", "planned", NOW + dt.timedelta(seconds=1)),
                                          ("birds", "birds-0003-cccccccc", "succeeded", None), ("birds", "birds-0004-dddddddd", "finalized", None),
                                          ("cats", "cats-0001-eeeeeeee", "planned", None), ("cats", "cats-0002-ffffffff", "succeeded", None)]:  # fmt: skip
            tx.insert_run(_run(model, run_id, state, due))
        tx.commit()
    with store.transaction() as tx:
        effects = handle_tick(Context(config, NOW), tx, Tick(message_id="t", model="birds"))
    # due exactly now: resubmitted; due a second later: not yet; another model's runs: never.
    assert effects.planned_runs == ["birds-0001-aaaaaaaa"]
    assert effects.completed_runs == ["birds-0003-cccccccc"]
    with pytest.raises(ValueError, match=r"a tick is handled per model; Worker\.handle splits a tick for every model"):
        handle_tick(Context(config, NOW), tx, Tick(message_id="t"))


def test_a_tick_prunes_this_models_decisions_to_the_kept_number(tmp_path, monkeypatch):
    from worker.store import DecisionRow

    monkeypatch.setattr(handlers, "DECISIONS_KEPT", 3)
    config = small_config(tmp_path)
    store = MemoryStore()
    with store.transaction() as tx:
        for i in range(6):
            tx.record_decision(DecisionRow(model="birds", at=NOW + dt.timedelta(seconds=i), outcome="wait", reason=f"r{i}"))
        tx.commit()
    with store.transaction() as tx:
        handle_tick(Context(config, NOW + dt.timedelta(minutes=1)), tx, Tick(message_id="tick-9", model="birds"))
        tx.commit()
    with store.transaction() as tx:
        kept = tx.decisions("birds", 50)
    assert len(kept) == 3
    assert kept[0].message_id == "tick-9"  # the tick's own verdict names the tick


def test_handlers_refuse_nothing_silently_when_called_directly(tmp_path):
    """The handlers table covers every message kind the bus accepts."""
    assert set(handlers.HANDLERS) == {ImageUploaded, RetrainRequested, ModelControl, RunStatusChanged, Tick}
    assert handlers.HANDLERS[ImageUploaded] is handle_image_uploaded
    assert handlers.HANDLERS[RetrainRequested] is handle_retrain_requested
    assert handlers.HANDLERS[RunStatusChanged] is handle_run_status_changed


def _run(model: str, run_id: str, state: str, due):
    from worker.store import RunRow

    return RunRow(run_id=run_id, model=model, seq=int(run_id.split("-")[1]), state=state, manifest_sha256="0" * 64, image_count=1,
                  new_image_count=1, classes=["chicken"], created_at=NOW, next_attempt_at=due)  # fmt: skip
