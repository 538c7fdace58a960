"""The worker driven through its bus: thresholds, single flight, duplicates, retries, recovery.

Every test runs against the in-memory fake store and the real SQLite store.
"""

import datetime as dt

import pytest

from shared import events as ev
from tests.fakes.harness import make_harness

pytestmark = [pytest.mark.unit, pytest.mark.on_table_storage]  # also on Azure Table Storage (Azurite)


@pytest.fixture
def h(new_store, tmp_path):
    return make_harness(tmp_path, store=new_store())


def ready(h, per_class=6):
    """Enough images of both classes, then a quiet period: the policy wants a run."""
    h.uploads(per_class)
    h.clock.advance(11)
    return h.worker.tick()


def test_the_policy_waits_and_says_why_until_the_threshold_is_crossed(h):
    h.upload("chicken")
    assert "waiting for data" in h.decisions()[0].reason
    effects = ready(h)
    assert len(effects.planned_runs) == 1
    runs = h.runs()
    assert [r.state for r in runs] == ["submitted"]
    assert h.backend.calls_to("submit") == [runs[0].backend_run_id]
    assert runs[0].new_image_count == runs[0].image_count == 13


def test_the_same_image_delivered_twice_is_counted_once(h):
    h.upload("chicken", "a")
    h.upload("chicken", "a")  # same path and etag: a duplicate
    with h.store.transaction() as tx:
        assert tx.pending_stats("birds").count == 1


def test_an_overwritten_image_is_a_new_version_and_replaces_the_pending_one(h):
    h.upload("chicken", "a", etag="v1")
    h.upload("chicken", "a", etag="v2")
    with h.store.transaction() as tx:
        assert tx.pending_stats("birds").count == 1
        assert tx.count_images("birds") == {"pending": 1, "superseded": 1}
        assert [i.etag for i in tx.manifest_candidates("birds", 0, tx.image_watermark("birds"))] == ["v2"]


def test_every_handler_delivered_twice_has_one_effect(h):
    from shared.messages import ImageUploaded, RetrainRequested, RunStatusChanged

    h.uploads(6)
    h.clock.advance(11)
    upload = ImageUploaded.of("birds", "turkey/late.jpg", "e9")
    request = RetrainRequested(message_id="req-dup", model="birds", force=True)
    assert h.worker.handle(upload).outcome == "ok"
    assert h.worker.handle(upload).outcome == "duplicate"
    h.worker.handle(request)
    assert h.worker.handle(request).outcome == "duplicate"
    assert len(h.runs()) == 1
    run = h.runs()[0]
    h.succeed(run)  # writes outputs, delivers "succeeded" once
    done = RunStatusChanged(
        message_id=f"st-{run.backend_run_id}-succeeded", model="birds", backend_run_id=run.backend_run_id, status="Completed"
    )
    assert h.worker.handle(done).outcome == "duplicate"
    assert h.worker.handle(done.model_copy(update={"message_id": "done-2"})).outcome == "ignored"  # same fact, other id
    assert [e.type for e in h.events()] == [ev.RUN_SUBMITTED, ev.MODEL_REGISTERED]
    assert len(h.versions()) == 1


def test_only_one_run_is_in_flight_and_later_triggers_coalesce_into_one_follow_up(h):
    ready(h)
    first = h.runs()[0]
    h.uploads(6)  # threshold crossed again while the first run trains
    h.clock.advance(11)
    h.worker.tick()
    h.request(force=True)
    assert len(h.runs()) == 1
    assert "coalescing into one follow-up" in h.decisions()[0].reason
    h.succeed(first)
    h.clock.advance(31)  # cooldown
    h.worker.tick()
    runs = h.runs()
    assert len(runs) == 2
    assert runs[0].new_image_count == 12
    assert runs[0].request_ids  # the forced request was folded into the follow-up
    h.clock.advance(60)
    h.worker.tick()
    assert len(h.runs()) == 2, "exactly one follow-up"


def test_a_coalesced_follow_up_starts_after_the_cooldown_without_waiting_for_quiet(h):
    """Images that crossed the threshold while a run trained are owed a run: once the cooldown
    ends it starts at once, even while more images are still arriving."""
    ready(h)
    first = h.runs()[0]
    h.uploads(6)
    h.clock.advance(11)
    h.worker.tick()
    assert h.head().followup_wanted is True
    h.succeed(first)
    h.clock.advance(31)  # cooldown over
    h.upload("chicken")  # just now: the quiet period alone would hold a new run back
    [follow_up, _] = h.runs()
    assert follow_up.reason == "coalesced follow-up: 13 new images arrived during the last run"
    assert h.head().followup_wanted is False


def test_an_unchanged_verdict_is_recorded_once_and_a_changed_one_again(h):
    h.uploads(2)  # waiting for the count
    before = len(h.decisions())
    for _ in range(3):
        h.worker.tick()
    assert len(h.decisions()) == before, "the same verdict at every tick: not recorded again"
    h.upload("chicken")
    assert len(h.decisions()) == before + 1
    assert h.decisions()[0].reason.startswith("waiting: 5/6 new images")


def test_a_forced_request_starts_a_run_the_policy_would_still_wait_for(h):
    h.uploads(6)  # enough data, but the last upload was just now: the quiet period holds it
    assert h.decisions()[0].outcome == "wait"
    h.request(force=True, overrides={"epochs": 2}, requested_by="ops")
    runs = h.runs()
    assert len(runs) == 1
    assert runs[0].reason.startswith("forced by request")
    assert runs[0].overrides == {"epochs": 2}
    spec = h.backend.specs[runs[0].backend_run_id]
    assert spec.training.epochs == 2


def test_every_training_setting_of_the_model_reaches_the_run_and_overrides_win(new_store, tmp_path):
    from worker.ports import TrainingArgs

    settings = {"epochs": 5, "batch_size": 8, "image_size": 96, "learning_rate": 0.5, "nproc": 4, "distributed": "horovod",
                "arch": "resnet34", "extra": '["--bn", "frozen"]'}  # fmt: skip
    h = make_harness(tmp_path, store=new_store(), **{f"training__{key}": value for key, value in settings.items()})
    h.uploads(6)
    h.request(force=True, overrides={"epochs": 2, "learning_rate": 0.1})
    [run] = h.runs()
    spec = h.backend.specs[run.backend_run_id]
    assert spec.data_dir == str(tmp_path / "images" / "birds")
    assert spec.tags == {"model": "birds", "run_id": run.run_id, "manifest_sha256": run.manifest_sha256, "attempt": "1"}
    assert spec.training == TrainingArgs(
        epochs=2, batch_size=8, image_size=96, learning_rate=0.1, nproc=4, distributed="horovod", arch="resnet34", extra=("--bn", "frozen")
    )


def test_submitting_a_run_that_is_no_longer_planned_does_nothing(h):
    ready(h)
    [run] = h.runs()
    assert run.state == "submitted"
    assert h.worker.submitter.submit(run.run_id) is None
    assert h.worker.submitter.submit("birds-9999-00000000") is None
    assert h.backend.calls_to("submit") == [run.backend_run_id], "the backend is not asked again"


def test_drop_mode_rejects_a_forced_request_while_a_run_is_in_flight(new_store, tmp_path):
    h = make_harness(tmp_path, store=new_store(), in_flight="drop")
    ready(h)
    h.request(force=True, message_id="req-late")
    rejected = [e for e in h.events() if e.type == ev.REQUEST_REJECTED]
    assert len(rejected) == 1
    assert rejected[0].payload["data"]["request_id"] == "req-late"
    assert len(h.runs()) == 1


def test_queue_mode_runs_each_forced_request_in_turn(new_store, tmp_path):
    h = make_harness(tmp_path, store=new_store(), in_flight="queue", cooldown=0)
    ready(h)
    h.request(force=True, message_id="q1", overrides={"epochs": 1})
    h.request(force=True, message_id="q2", overrides={"epochs": 2})
    for expected in (["q1"], ["q2"]):
        h.succeed()
        assert h.runs()[0].request_ids == expected
    assert len(h.runs()) == 3


def test_a_failed_run_is_retried_with_the_same_manifest_after_a_backoff(h):
    ready(h)
    run = h.runs()[0]
    h.status(run.backend_run_id, "failed", detail="OOM")
    retry = h.runs()[0]
    assert (retry.state, retry.attempt) == ("planned", 2)
    assert h.worker.tick().planned_runs == []  # backoff not over
    h.clock.advance(6)
    h.worker.tick()
    resubmitted = h.runs()[0]
    assert resubmitted.state == "submitted"
    assert h.backend.calls_to("submit") == [f"{run.run_id}-a1", f"{run.run_id}-a2"]
    assert h.backend.specs[f"{run.run_id}-a2"].manifest == h.backend.specs[f"{run.run_id}-a1"].manifest
    submitted = [e.payload["data"] for e in h.events() if e.type == ev.RUN_SUBMITTED]
    assert [(d["attempt"], d["backend_run_id"]) for d in submitted] == [(1, f"{run.run_id}-a1"), (2, f"{run.run_id}-a2")], (
        "each attempt announces its own submission"
    )


def test_after_the_retry_budget_the_images_return_to_pending_and_run_failed_is_published(h):
    ready(h)
    run = h.runs()[0]
    h.status(run.backend_run_id, "failed")
    h.clock.advance(6)
    h.worker.tick()
    h.status(h.runs()[0].backend_run_id, "failed", detail="again")
    final = h.runs()[0]
    assert (final.state, final.outcome) == ("finalized", "failed")
    with h.store.transaction() as tx:
        assert tx.pending_stats("birds").count == 12
    failed = [e for e in h.events() if e.type == ev.RUN_FAILED]
    assert len(failed) == 1
    assert failed[0].payload["data"]["images_returned_to_pending"] == 12


def test_a_stale_or_unknown_status_changes_nothing(h):
    ready(h)
    run = h.runs()[0]
    assert h.status("someone-else-0001-a1", "failed").outcome == "ignored"
    h.succeed(run)
    assert h.status(run.backend_run_id, "running", message_id="late-running").outcome == "ignored"
    assert (h.runs()[0].state, h.runs()[0].outcome) == ("finalized", "registered")


def test_a_submit_that_fails_leaves_the_run_planned_and_the_next_tick_submits_it(h):
    h.backend.fail_next_submit(ConnectionError("backend down"))
    ready(h)
    assert h.runs()[0].state == "planned"
    h.worker.tick()
    assert h.runs()[0].state == "submitted"
    assert len(h.backend.runs) == 1


def test_a_lost_completion_event_is_recovered_by_polling(h):
    ready(h)
    run = h.runs()[0]
    h.backend.finish(run.backend_run_id, "succeeded")  # no event arrives; the outputs are missing
    h.worker.tick()
    assert (h.runs()[0].state, h.runs()[0].outcome) == ("finalized", "rejected")
    detail = h.runs()[0].detail  # the fake says it has no outputs; Azure ML gives a folder without the files
    assert "no outputs" in detail or "outputs lack model.pt, metrics.json" in detail


def test_a_run_the_backend_forgot_is_treated_as_failed(h):
    ready(h)
    h.backend.runs.clear()
    h.worker.tick()
    assert h.runs()[0].state == "planned"  # first attempt failed, retry planned
    assert "no record" in h.runs()[0].detail


def test_a_backfill_by_prefix_registers_what_the_blob_store_holds(h):
    for i in range(4):
        h.blobs.blobs[f"chicken/b{i}.jpg"] = b"c%d" % i
        h.blobs.blobs[f"turkey/b{i}.jpg"] = b"t%d" % i
    h.blobs.blobs["turkey/b0.jpg.txt"] = b"x"
    h.blobs.blobs["chicken/notes.txt"] = b"not an image"
    h.blobs.blobs["chicken/bad\x07name.jpg"] = b"hostile"
    effects = h.request(prefix="chicken/")
    assert effects.detail.startswith("registered 4 images; 2 skipped")
    h.request(images=[{"path": "turkey/b1.jpg"}, {"path": "turkey/missing.jpg"}])
    with h.store.transaction() as tx:
        assert tx.pending_stats("birds").per_class == {"chicken": 4, "turkey": 1}
    assert any("do not exist" in d.reason for d in h.decisions())


def test_the_outbox_relay_publishes_each_event_once_even_after_a_failure(h):
    ready(h)
    h.publisher.fail_times = 1
    with pytest.raises(ConnectionError):
        h.worker.relay()
    assert h.worker.relay() == 1
    assert h.worker.relay() == 0
    assert [e["type"] for e in h.publisher.published] == [ev.RUN_SUBMITTED]


def test_every_run_id_is_deterministic_and_names_its_manifest(h):
    ready(h)
    run = h.runs()[0]
    assert run.run_id == f"birds-0001-{run.manifest_sha256[:8]}"
    spec = h.backend.specs[run.backend_run_id]
    assert spec.manifest["sha256"] == run.manifest_sha256


def test_canceling_a_run_returns_its_images_to_pending_without_a_retry(h):
    ready(h)
    run = h.runs()[0]
    h.worker.cancel(run.run_id)
    final = h.runs()[0]
    assert (final.state, final.outcome, final.attempt) == ("finalized", "canceled", 1)
    with h.store.transaction() as tx:
        assert tx.pending_stats("birds").count == 12
    assert h.backend.calls_to("cancel") == [run.backend_run_id]
    assert [e.type for e in h.events()] == [ev.RUN_SUBMITTED, ev.RUN_FAILED]


def test_canceling_a_run_that_never_reached_the_backend_finalizes_it(h):
    h.backend.fail_next_submit(ConnectionError("down"))
    ready(h)
    assert h.runs()[0].state == "planned"
    h.worker.cancel(h.runs()[0].run_id)
    assert h.runs()[0].outcome == "canceled"


def test_secrets_in_a_failure_detail_never_reach_the_published_event(h):
    ready(h)
    run = h.runs()[0]
    leak = "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=SUPERSECRET123;EndpointSuffix=core.windows.net"
    h.status(run.backend_run_id, "canceled", detail=f"train.py crashed reading {leak}")
    failed = next(e for e in h.events() if e.type == ev.RUN_FAILED)
    assert "SUPERSECRET123" not in str(failed.payload)
    assert "AccountKey=***" in failed.payload["data"]["detail"]


def test_a_backend_and_registry_out_of_reach_do_not_stop_the_tick(tmp_path):
    """Polling a run and checking the registry's champion tag need the training service; when it
    cannot be reached the tick still folds images, decides and relays events, and asks again next time."""
    from tests.fakes.harness import make_harness

    h = make_harness(tmp_path, cooldown=0)
    h.uploads(6)
    h.clock.advance(11)
    h.worker.tick()
    [first] = h.runs()
    h.succeed(first, best=0.8)  # a champion exists: the tick checks its tag in the registry
    h.uploads(6)
    h.clock.advance(11)
    h.worker.tick()
    in_flight = [r for r in h.runs() if r.in_flight]
    assert in_flight, "a second run is in flight: the tick polls it"

    def unreachable(*_args, **_kwargs):
        raise ConnectionError("the training service cannot be reached")

    h.backend.status = unreachable
    h.registry.champion_alias = unreachable
    before = len(h.decisions())
    h.upload("chicken")
    h.clock.advance(11)
    h.worker.tick()  # does not raise

    assert len(h.decisions()) > before  # the policy still ran
    assert [r.state for r in h.runs() if r.run_id == in_flight[0].run_id] == [in_flight[0].state]  # untouched, polled again later


def test_a_run_whose_submission_keeps_failing_says_why_until_it_is_submitted(h):
    h.backend.fail_next_submit(ConnectionError("the training service cannot be reached"))
    h.uploads(6)
    h.clock.advance(11)
    h.worker.tick()
    [run] = h.runs()
    assert run.state == "planned"
    assert run.detail == "not submitted yet, retried at every tick: ConnectionError: the training service cannot be reached"
    h.worker.tick()  # the service is back
    [run] = h.runs()
    assert run.state == "submitted"
    assert run.detail == ""


def test_the_tick_prunes_events_published_longer_ago_than_the_inbox_retention(h):
    h.uploads(6)
    h.clock.advance(11)
    h.worker.tick()  # a run: retrain.run.submitted is queued
    h.worker.relay()
    assert h.events()
    assert all(e.published_at is not None for e in h.events())
    h.clock.advance(h.worker.config.worker.inbox_retention + 60)
    h.worker.tick()
    h.worker.relay()
    assert [e for e in h.events() if e.published_at is not None and e.published_at < h.clock.now() - dt.timedelta(days=1)] == []


def test_the_models_onnx_gate_reaches_every_runs_training_arguments(tmp_path):
    from tests.fakes.harness import make_harness

    h = make_harness(tmp_path, gate__onnx_tolerance=1e-6, gate__onnx_samples=7)
    h.uploads(6)
    h.clock.advance(11)
    h.worker.tick()
    [run] = h.runs()
    training = h.backend.specs[run.backend_run_id].training
    assert (training.onnx_tolerance, training.onnx_samples) == (1e-6, 7)
    args = training.train_py_args()
    assert args[args.index("--onnx_tolerance") + 1] == "1e-06"
    assert args[args.index("--onnx_samples") + 1] == "7"


def test_pruning_keeps_the_operators_controls_they_are_the_audit_trail(h):
    from shared.messages import ModelControl

    h.worker.handle(ModelControl(message_id="p-1", model="birds", action="pause", requested_by="ops"))
    h.worker.handle(ModelControl(message_id="r-1", model="birds", action="resume", requested_by="ops"))
    h.uploads(6)
    h.clock.advance(11)
    h.worker.tick()
    h.worker.relay()
    h.clock.advance(h.worker.config.worker.inbox_retention + 60)
    h.worker.tick()
    assert sorted(e.type for e in h.events() if e.published_at is not None and e.published_at < h.clock.now() - dt.timedelta(days=1)) == [
        ev.MODEL_PAUSED,
        ev.MODEL_RESUMED,
    ]
