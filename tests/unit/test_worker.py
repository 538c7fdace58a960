"""The worker driven through its bus: thresholds, single flight, duplicates, retries, recovery; and
the bus's effects exactly (completion failures to their budget, the poll's verdicts to the second,
rejected messages, the relay's batches, inbox pruning, the cancel command's answers, lost races).

Every ledger test runs on the in-memory fake, SQLite and Azure Table Storage (the behaviours through
`new_store` also on staged memory), but for the lost-race tests, which fake SQLite's and memory's commit."""

import datetime as dt
from contextlib import contextmanager

import pytest

from shared import events as ev
from shared.messages import RetrainRequested
from tests.fakes.commit_faults import CommitFaults, RetryClock, conflicts
from tests.fakes.harness import make_harness
from worker.bus import COMPLETION_ATTEMPTS
from worker.effects import Remember
from worker.store import ConcurrencyConflict

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


# -- the bus's effects, exactly: completion failures to their budget, the poll's verdicts, rejected
# messages, the relay's batches, inbox pruning, the cancel command's answers, lost races retried --


def _submitted(h):
    h.uploads(6)
    h.clock.advance(11)
    h.worker.tick()
    [run] = h.runs()
    return run


def test_a_failing_completion_is_retried_to_its_budget_then_fails_the_run_with_the_redacted_reason(store, tmp_path, monkeypatch):
    h = make_harness(tmp_path, store=store, max_attempts=1, cooldown=86400)
    run = _submitted(h)

    def unreadable(run_id):
        raise PermissionError("outputs unreadable with AccountKey=c2VjcmV0c2VjcmV0")

    monkeypatch.setattr(h.worker.completer, "complete", unreadable)
    h.succeed(run)  # the first attempt
    for attempt in range(2, COMPLETION_ATTEMPTS):
        h.clock.advance(60)
        h.worker.tick()
        [current] = h.runs()
        assert (current.state, current.completion_failures) == ("succeeded", attempt)
    [current] = h.runs()
    reason = current.detail
    assert reason.startswith("completion failed: PermissionError: outputs unreadable with AccountKey=")
    assert "c2VjcmV0c2VjcmV0" not in reason
    h.clock.advance(60)
    h.worker.tick()  # attempt COMPLETION_ATTEMPTS
    [final] = h.runs()
    assert (final.state, final.outcome) == ("finalized", "completion_failed")
    assert final.detail == f"{reason} ({COMPLETION_ATTEMPTS} attempts)"


def test_a_completion_failure_reason_is_cut_to_2000_characters_in_the_detail(store, tmp_path, monkeypatch):
    h = make_harness(tmp_path, store=store, max_attempts=1)
    run = _submitted(h)
    monkeypatch.setattr(h.worker.completer, "complete", lambda run_id: (_ for _ in ()).throw(OSError("y" * 3000)))
    h.succeed(run)
    assert h.runs()[0].detail == ("completion failed: OSError: " + "y" * 3000)[:2000]


def test_a_run_is_timed_out_one_second_after_run_timeout_not_at_it(store, tmp_path):
    h = make_harness(tmp_path, store=store, run_timeout=3600, max_attempts=1)
    run = _submitted(h)
    h.backend.finish(run.backend_run_id, "running")
    h.clock.advance(3600)
    h.worker.poll()
    assert h.runs()[0].state == "running"
    assert h.backend.calls_to("cancel") == []
    h.clock.advance(1)
    h.worker.poll()
    [final] = h.runs()
    assert (final.state, final.outcome) == ("finalized", "failed")
    assert final.detail == "timed out: still running 3600s after submission (run_timeout); canceled"
    assert h.backend.calls_to("cancel") == [run.backend_run_id]


def test_a_runs_timeout_counts_from_its_submission_not_from_when_it_was_planned(store, tmp_path):
    h = make_harness(tmp_path, store=store, run_timeout=100, max_attempts=1)
    h.backend.fail_next_submit(ConnectionError("backend down"))
    run = _submitted(h)  # planned; the submission failed
    assert run.state == "planned"
    h.clock.advance(50)
    h.worker.tick()  # submitted now, 50 s after it was planned
    h.backend.finish(run.backend_run_id, "running")
    h.clock.advance(60)  # 110 s after planning, 60 s after submission
    h.worker.poll()
    assert h.runs()[0].state == "running"


def test_a_planned_runs_timeout_counts_from_its_creation_when_it_has_no_submission_time(store, tmp_path):
    h = make_harness(tmp_path, store=store, run_timeout=100, max_attempts=1)
    run = _submitted(h)
    with h.store.transaction() as tx:
        current = tx.get_run(run.run_id)
        current.submitted_at = None
        tx.update_run(current)
        tx.commit()
    h.clock.advance(101)
    h.worker.poll()
    assert h.runs()[0].outcome == "failed"


def test_a_run_the_backend_has_no_record_of_fails_with_that_reason(store, tmp_path):
    h = make_harness(tmp_path, store=store, max_attempts=1)
    run = _submitted(h)
    del h.backend.runs[run.backend_run_id]
    h.worker.poll()
    [final] = h.runs()
    assert (final.outcome, final.detail) == ("failed", "the backend has no record of this run")


def test_the_poll_reports_only_changes_and_carries_the_backends_detail(store, tmp_path):
    h = make_harness(tmp_path, store=store, max_attempts=1)
    run = _submitted(h)
    assert h.worker.poll() == [], "queued while submitted: nothing to report"
    h.backend.finish(run.backend_run_id, "running")
    assert [e.outcome for e in h.worker.poll()] != []
    assert h.worker.poll() == [], "running while running: nothing to report"
    h.backend.finish(run.backend_run_id, "failed", detail="x" * 5000)
    h.worker.poll()
    assert h.runs()[0].detail.startswith("x" * 100)


def test_a_rejected_message_records_its_event_and_decision_exactly(store, tmp_path):
    h = make_harness(tmp_path, store=store)
    description = "body was not JSON: " + "z" * 3000
    assert h.worker.reject("msg-1", "birds", "invalid", description, "servicebus") is True
    assert h.worker.reject("msg-1", "birds", "invalid", description, "servicebus") is False, "a redelivery is rejected once"
    [event] = [e for e in h.events() if e.type == ev.REQUEST_REJECTED]
    assert event.payload["subject"] == "requests/msg-1"
    assert event.payload["data"] == {
        "request_id": "msg-1",
        "model": "birds",
        "reason": "invalid",
        "description": description[:2000],
        "source": "servicebus",
    }
    [decision] = [d for d in h.decisions() if d.outcome == "reject"]
    assert decision.reason == f"servicebus message msg-1 rejected: invalid: {description[:300]}"
    assert decision.message_id == "msg-1"


def test_a_rejected_message_for_an_unknown_model_names_it_only_as_given(store, tmp_path):
    h = make_harness(tmp_path, store=store)
    assert h.worker.reject("msg-2", "Cats/" + "c" * 200, "invalid", "no such model", "http")
    [event] = [e for e in h.events() if e.type == ev.REQUEST_REJECTED]
    assert event.payload["data"]["model"] is None
    assert event.payload["data"]["given_model"] == ("Cats/" + "c" * 200)[:100]
    assert [d for d in h.decisions() if d.outcome == "reject"] == []


def test_the_relay_publishes_in_batches_oldest_first_and_counts_them(store, tmp_path):
    h = make_harness(tmp_path, store=store)
    for i in range(7):
        h.worker.reject(f"m-{i}", "birds", "invalid", f"bad {i}", "test")
    sizes: list[int] = []
    real = h.publisher.publish

    def publish(events):
        sizes.append(len(events))
        real(events)

    h.publisher.publish = publish
    assert h.worker.relay(batch=3) == 7
    assert sizes == [3, 3, 1]
    assert [e["data"]["request_id"] for e in h.publisher.published] == [f"m-{i}" for i in range(7)]
    assert h.worker.relay(batch=3) == 0


def test_the_relay_stops_after_a_full_batch_only_when_nothing_is_left(store, tmp_path):
    h = make_harness(tmp_path, store=store)
    for i in range(6):
        h.worker.reject(f"m-{i}", "birds", "invalid", f"bad {i}", "test")
    assert h.worker.relay(batch=3) == 6
    assert h.store.unpublished_events(10) == []


def test_the_inbox_forgets_ids_after_retention_including_those_under_no_model(store, tmp_path):
    h = make_harness(tmp_path, store=store)
    retention = h.worker.config.worker.inbox_retention
    h.worker.reject("old-known", "birds", "invalid", "x", "test")
    h.worker.reject("old-unknown", "nope", "invalid", "x", "test")
    h.clock.advance(retention + 1)
    h.worker.reject("new-known", "birds", "invalid", "x", "test")
    assert h.worker.prune_inbox() == 2
    assert h.worker.reject("old-known", "birds", "invalid", "x", "test") is True, "forgotten, so accepted again"
    assert h.worker.reject("old-unknown", "nope", "invalid", "x", "test") is True
    assert h.worker.reject("new-known", "birds", "invalid", "x", "test") is False, "still remembered"


def test_the_cancel_command_answers_what_happened(store, tmp_path):
    h = make_harness(tmp_path, store=store, max_attempts=1)
    run = _submitted(h)
    assert h.worker.cancel(run.run_id) == f"{run.run_id}: cancel requested (backend says canceled)"
    assert h.runs()[0].outcome == "canceled", "the poll after the cancel recorded it"
    assert h.worker.cancel(run.run_id) == f"{run.run_id} is not in flight (finalized)"
    with pytest.raises(KeyError, match="no run 'birds-9999"):
        h.worker.cancel("birds-9999-00000000-a1")


def test_a_tick_repairs_the_registry_alias_of_every_model(store, tmp_path):
    h = make_harness(tmp_path, store=store, cooldown=0)
    run = _submitted(h)
    h.succeed(run, best=0.9)
    (h.root / "registry" / "birds" / "champion").unlink()  # e.g. a crash between the commit and the alias move
    h.worker.tick()
    assert h.registry.champion_alias("birds") == 1


def test_a_tick_message_carries_the_time_and_is_unique(store, tmp_path):
    h = make_harness(tmp_path, store=store)
    seen = []
    real = h.worker.handle

    def handle(message, remember=None):
        seen.append(message)
        return real(message, remember)

    h.worker.handle = handle
    h.worker.tick()
    h.worker.tick()
    ticks = [m for m in seen if m.kind == "tick" and m.model is None]
    assert len({t.message_id for t in ticks}) == 2
    assert ticks[0].message_id.startswith(f"tick-{h.clock.now():%Y%m%dT%H%M%S}")
    assert ticks[0].occurred_at == h.clock.now()
    assert isinstance(ticks[0].occurred_at, dt.datetime)


def _record_claims(h, monkeypatch) -> list[tuple[str, str, str | None]]:
    """The inbox claims made through the store's transactions: (message id, kind, model)."""
    claims: list[tuple[str, str, str | None]] = []
    real = h.store.transaction

    @contextmanager
    def transaction():
        with real() as tx:
            claim = tx.claim_message

            def recording(message_id, kind, model, at):
                claims.append((message_id, kind, model))
                return claim(message_id, kind, model, at)

            tx.claim_message = recording
            yield tx

    monkeypatch.setattr(h.store, "transaction", transaction)
    return claims


def test_inbox_claims_are_made_in_the_models_partition(store, tmp_path, monkeypatch):
    """A partitioned ledger (Table Storage) keeps a model's inbox in the model's partition: a claim
    under another model would miss a redelivery."""
    h = make_harness(tmp_path, store=store)
    for i in range(3):
        h.blobs.blobs[f"chicken/{i}.jpg"] = b"x"
    claims = _record_claims(h, monkeypatch)
    h.worker.reject("bad-1", "birds", "invalid", "x", "test")
    h.worker.handle(RetrainRequested(message_id="req-1", model="birds", prefix="chicken/"))
    assert ("bad-1", "rejected", "birds") in claims
    assert {c for c in claims if c[0] == "req-1"} == {("req-1", "retrain.requested", "birds")}


def test_images_registered_by_a_backfill_are_recorded_as_backfill(store, tmp_path):
    h = make_harness(tmp_path, store=store)
    h.blobs.blobs["chicken/1.jpg"] = b"x"
    h.worker.handle(RetrainRequested(message_id="req-1", model="birds", prefix="chicken/"))
    with h.store.transaction() as tx:
        [image] = tx.image_arrivals("birds")
    assert (image.path, image.source) == ("chicken/1.jpg", "backfill")


def test_a_completion_failure_after_another_instance_finalized_the_run_changes_nothing(store, tmp_path, monkeypatch):
    h = make_harness(tmp_path, store=store, max_attempts=1)
    run = _submitted(h)

    def finalized_elsewhere_then_fails(run_id):
        with h.store.transaction() as tx:
            current = tx.get_run(run_id)
            current.state, current.outcome, current.detail = "finalized", "registered", "by the other instance"
            tx.update_run(current)
            tx.commit()
        raise OSError("this instance could not read the outputs")

    monkeypatch.setattr(h.worker.completer, "complete", finalized_elsewhere_then_fails)
    h.succeed(run)
    [final] = h.runs()
    assert (final.outcome, final.detail, final.completion_failures) == ("registered", "by the other instance", 0)


def test_canceling_a_planned_run_finalizes_it_as_canceled_before_submission(store, tmp_path):
    h = make_harness(tmp_path, store=store, max_attempts=1)
    h.backend.fail_next_submit(ConnectionError("backend down"))
    run = _submitted(h)
    assert run.state == "planned"
    h.worker.cancel(run.run_id)
    [final] = h.runs()
    assert (final.outcome, final.detail) == ("canceled", "canceled before submission")
    assert [e.type for e in h.events() if e.type.startswith("retrain.run.")] == [ev.RUN_FAILED], "never announced as submitted"


def test_canceling_a_submitted_run_the_backend_forgot_records_what_the_poll_finds(store, tmp_path):
    h = make_harness(tmp_path, store=store, max_attempts=1)
    run = _submitted(h)
    del h.backend.runs[run.backend_run_id]
    assert h.worker.cancel(run.run_id) == f"{run.run_id}: cancel requested (backend says unknown)"
    [final] = h.runs()
    assert (final.outcome, final.detail) == ("failed", "the backend has no record of this run")


def test_the_relay_sends_batches_of_100_by_default_and_nothing_without_a_publisher(store, tmp_path):
    h = make_harness(tmp_path, store=store)
    for i in range(101):
        h.worker.reject(f"m-{i}", "birds", "invalid", "x", "test")
    sizes: list[int] = []
    real = h.publisher.publish
    h.publisher.publish = lambda events: (sizes.append(len(events)), real(events))
    publisher, h.worker.publisher = h.worker.publisher, None
    assert h.worker.relay() == 0
    h.worker.publisher = publisher
    assert h.worker.relay() == 101
    assert sizes == [100, 1]


def test_the_poll_goes_on_past_a_run_that_has_not_changed(store, tmp_path):
    import dataclasses

    from worker.ports import BackendStatus

    h = make_harness(tmp_path, store=store, max_attempts=1)
    older = _submitted(h)
    newer = dataclasses.replace(older, run_id=older.run_id.replace("-0001-", "-0002-"), seq=older.seq + 1)
    with h.store.transaction() as tx:
        tx.insert_run(newer)
        tx.commit()
    h.backend.runs[newer.backend_run_id] = BackendStatus(newer.backend_run_id, "queued")  # unchanged: nothing to report
    h.backend.finish(older.backend_run_id, "failed", detail="boom")
    with h.store.transaction() as tx:
        assert [r.run_id for r in tx.runs(states=frozenset({"submitted", "running"}))] == [newer.run_id, older.run_id]
    assert len(h.worker.poll()) == 1
    assert {r.run_id: r.state for r in h.runs()}[older.run_id] == "finalized"


def test_a_tick_for_one_model_handles_that_model_only(store, tmp_path, monkeypatch):
    h = make_harness(tmp_path, store=store)
    h.worker.config.models["cats"] = h.worker.config.models["birds"]
    repaired: list[str] = []
    monkeypatch.setattr(h.worker.completer, "sync_champion_alias", repaired.append)
    ticks = []
    real = h.worker.handle

    def handle(message, remember=None):
        ticks.append(message.model)
        return real(message, remember)

    h.worker.handle = handle
    h.worker.tick("birds")
    assert (ticks, repaired) == (["birds"], ["birds"])


def test_a_tick_for_every_model_reports_the_runs_each_model_planned(tmp_path):
    h = make_harness(tmp_path, cooldown=0)
    h.worker.config.models["cats"] = h.worker.config.models["birds"]
    h.worker.blobs["cats"] = h.blobs
    for model in ("birds", "cats"):
        for i in range(16):
            h.upload("chicken" if i % 2 else "turkey", name=f"{model}{i}", model=model)
    h.clock.advance(11)
    effects = h.worker.tick()
    assert sorted(r.split("-")[0] for r in effects.planned_runs) == ["birds", "cats"]


def test_a_redelivered_backfill_request_is_answered_as_a_duplicate(store, tmp_path):
    h = make_harness(tmp_path, store=store)
    h.blobs.blobs["chicken/1.jpg"] = b"x"
    request = RetrainRequested(message_id="req-1", model="birds", prefix="chicken/")
    assert h.worker.handle(request).outcome != "duplicate"
    again = h.worker.handle(request)
    assert (again.outcome, again.detail) == ("duplicate", "req-1 was already processed")


def test_a_redelivered_forced_request_is_answered_as_a_duplicate(store, tmp_path):
    h = make_harness(tmp_path, store=store)
    request = RetrainRequested(message_id="req-2", model="birds", force=True)
    assert h.worker.handle(request).outcome != "duplicate"
    again = h.worker.handle(request)
    assert (again.outcome, again.detail) == ("duplicate", "req-2 was already processed")


@pytest.mark.not_on_table_storage  # CommitFaults fakes the commit path; the Table ledger stages uploads
def test_a_message_whose_commit_loses_races_is_applied_once_on_fresh_state(store, tmp_path, monkeypatch):
    clock = RetryClock(monkeypatch)
    h = make_harness(tmp_path, store=store)
    h.worker.store = faults = CommitFaults(store, conflicts(3))
    h.upload("chicken", name="a")
    assert (faults.attempts, faults.committed) == (4, [4])
    assert list(h.images()) == ["chicken/a.jpg"]
    assert len(clock.waits) == 3
    assert all(0 <= w <= 0.25 for w in clock.waits)


@pytest.mark.not_on_table_storage  # CommitFaults fakes the commit path; the Table ledger stages uploads
def test_a_message_that_loses_every_race_gives_up_after_40_attempts_raising_the_conflict(store, tmp_path, monkeypatch):
    clock = RetryClock(monkeypatch)
    h = make_harness(tmp_path, store=store)
    h.worker.store = faults = CommitFaults(store, conflicts(200))  # bounded, so a missing stop ends too
    with pytest.raises(ConcurrencyConflict, match="another writer committed first"):
        h.upload("chicken", name="a")
    assert (faults.attempts, faults.committed) == (40, [])
    assert h.images() == {}
    assert len(clock.waits) == 39
    assert all(0 <= w <= 0.25 for w in clock.waits), "jittered, never more than a quarter of a second"
    assert clock.waits[0] <= 0.005, "a lost race is retried at once: the first wait is at most 5 ms"
    assert max(clock.waits) > 0.05, "but it backs off, exponentially"


@pytest.mark.not_on_table_storage  # CommitFaults fakes the commit path; the Table ledger stages uploads
@pytest.mark.parametrize(("seconds_per_commit", "attempts"), [(29.9, 3), (30.05, 2)])
def test_a_message_stops_retrying_lost_races_after_a_minute_whatever_the_attempts(
    store, tmp_path, monkeypatch, seconds_per_commit, attempts
):
    clock = RetryClock(monkeypatch)
    h = make_harness(tmp_path, store=store)

    def slow_conflict(n):  # each lost commit takes half a minute (a ledger under heavy contention)
        clock.offset += seconds_per_commit
        return conflicts(200)(n)

    h.worker.store = faults = CommitFaults(store, slow_conflict)
    with pytest.raises(ConcurrencyConflict):
        h.upload("chicken", name="a")
    assert faults.attempts == attempts, "no new attempt once a minute has passed, and not before"


@pytest.mark.not_on_table_storage  # CommitFaults fakes the commit path; the Table ledger stages uploads
def test_only_a_lost_race_is_retried_any_other_commit_error_is_raised_at_once(store, tmp_path, monkeypatch):
    RetryClock(monkeypatch)
    h = make_harness(tmp_path, store=store)
    h.worker.store = faults = CommitFaults(store, lambda n: OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        h.upload("chicken", name="a")
    assert faults.attempts == 1


def test_an_idempotency_key_is_remembered_from_its_request_and_forgotten_after_retention(store, tmp_path):
    h = make_harness(tmp_path, store=store)
    retention = h.worker.config.worker.inbox_retention
    key = Remember(key="k-1", fingerprint="fp", response={"status": 202, "request_id": "r-1"})
    assert h.worker.handle(RetrainRequested(message_id="r-1", model="birds", force=True), key).outcome != "replayed"
    replay = h.worker.handle(RetrainRequested(message_id="r-2", model="birds", force=True), key)
    assert replay.outcome == "replayed"
    h.clock.advance(retention - 1)
    h.worker.prune_inbox()
    assert h.worker.handle(RetrainRequested(message_id="r-3", model="birds", force=True), key).outcome == "replayed", "kept"
    h.clock.advance(2)  # retention has passed since the request (not since its replays)
    assert h.worker.prune_inbox() >= 1
    assert h.worker.handle(RetrainRequested(message_id="r-4", model="birds", force=True), key).outcome != "replayed", "forgotten"


def test_the_outbox_keeps_published_events_for_the_retention_and_the_controls_for_good(store, tmp_path):
    """Events published longer ago than `inbox_retention` are forgotten, never younger ones, never an
    unpublished one, and never an operator's control (the audit trail)."""
    from shared.messages import ModelControl

    h = make_harness(tmp_path, store=store)
    retention = h.worker.config.worker.inbox_retention
    h.worker.handle(ModelControl(message_id="p-1", model="birds", action="pause", requested_by="ops"))
    h.worker.handle(ModelControl(message_id="r-1", model="birds", action="resume", requested_by="ops"))
    h.uploads(6)
    h.clock.advance(11)
    h.worker.tick()  # a run.submitted event
    assert h.worker.relay() == 3
    h.worker.handle(RetrainRequested(message_id="late", model="birds", force=True))  # nothing published after this
    h.clock.advance(retention - 1)
    assert h.worker.prune_outbox() == 0  # published, but not long enough ago
    h.clock.advance(2)
    assert h.worker.prune_outbox() == 1  # the run.submitted; the pause and resume stay
    assert sorted(e.type for e in h.store.all_events()) == ["retrain.model.paused", "retrain.model.resumed"]


def test_a_decision_keeps_text_from_outside_printable_and_at_most_2000_characters(store, tmp_path):
    """Every decision goes through Tx.decided: a requester's control characters and an overlong
    reason are kept as the ledger keeps text."""
    from worker.store import DETAIL_CHARS

    h = make_harness(tmp_path, store=store, min_new_images=100)
    h.uploads(6)
    h.worker.handle(RetrainRequested(message_id="f-1", model="birds", force=True, requested_by="ops\x1b[2J\u202e"))
    reason = next(d.reason for d in h.decisions() if d.outcome == "submit")
    assert "forced by request f-1 (ops\\u001b[2J\\u202e)" in reason
    assert "\x1b" not in reason
    assert "\u202e" not in reason
    with store.transaction() as tx:
        tx.decided("birds", h.clock.now(), "wait", "y" * 3000)
        tx.commit()
    assert h.decisions()[0].reason == "y" * DETAIL_CHARS
