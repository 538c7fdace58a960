"""A run's transitions in the ledger, exactly: the retry schedule, what a failure returns and
records, the events' data (a contract with their consumers) and the decisions people read.
Written against the survivors of `make mutate` in worker/runs.py (docs/mutation.md)."""

from __future__ import annotations

import datetime as dt

import pytest

from shared.messages import RetrainRequested
from tests.fakes.harness import make_harness

pytestmark = pytest.mark.unit


def planned(h):
    h.uploads(10)
    h.clock.advance(11)
    h.worker.tick()
    [run] = h.runs()
    return run


def test_a_failed_attempt_is_retried_after_a_doubling_backoff_and_each_step_is_recorded(tmp_path):
    h = make_harness(tmp_path, max_attempts=3, retry_backoff=5, backoff_after_failed_runs=5)
    run = planned(h)
    start = h.clock.now()
    h.status(run.backend_run_id, "failed", message_id="fail-1", detail="CUDA out of memory")
    [retry] = h.runs()
    assert (retry.state, retry.attempt, retry.detail) == ("planned", 2, "CUDA out of memory")
    assert retry.next_attempt_at == start + dt.timedelta(seconds=5)  # retry_backoff x 2^0
    decision = h.decisions()[0]
    assert (decision.outcome, decision.run_id, decision.message_id) == ("retry", run.run_id, "fail-1")
    assert decision.reason == f"run {run.run_id} failed; attempt 2/3 at {retry.next_attempt_at:%H:%M:%S} UTC"
    h.clock.advance(5)
    h.worker.tick()
    second = h.runs()[0]
    assert (second.state, second.attempt) == ("submitted", 2), "submitted at the very second its backoff ends"
    h.status(second.backend_run_id, "failed", message_id="fail-2", detail="y" * 2100)
    third = h.runs()[0]
    assert third.next_attempt_at == h.clock.now() + dt.timedelta(seconds=10)  # retry_backoff x 2^1
    assert third.detail == "y" * 2000, "a long failure detail is cut to 2000 characters"


def test_a_run_that_fails_for_good_returns_its_images_and_says_so_in_its_event_and_decision(tmp_path):
    h = make_harness(tmp_path, max_attempts=1, backoff_after_failed_runs=1, failure_backoff=60, failure_backoff_max=600)
    run = planned(h)
    detail = "x" * 2100
    effects = h.status(run.backend_run_id, "failed", message_id="fail-1", detail=detail)
    [finalized] = h.runs()
    assert (finalized.state, finalized.outcome, finalized.detail) == ("finalized", "failed", "x" * 2000)
    head = h.head()
    assert (head.failed_runs, head.backoff_until, head.last_run_finished_at) == (1, h.clock.now() + dt.timedelta(seconds=60), h.clock.now())
    [event] = [e.payload["data"] for e in h.events() if e.type == "retrain.run.failed"]
    assert event == {
        "run_id": run.run_id,
        "model": "birds",
        "status": "failed",
        "attempts": 1,
        "detail": "x" * 2000,
        "images_returned_to_pending": run.new_image_count,
        "consecutive_failed_runs": 1,
        "backoff_until": head.backoff_until.isoformat(),
    }
    failed = next(d for d in h.decisions() if d.outcome == "failed")
    assert (failed.run_id, failed.message_id) == (run.run_id, "fail-1")
    assert failed.reason == (
        f"run {run.run_id} failed after 1 attempt(s); {run.new_image_count} images back to pending; "
        f"1 failed runs in a row: no new run before {head.backoff_until:%Y-%m-%d %H:%M:%S} UTC"
    )
    after = h.decisions()[0]  # the evaluation that follows names the same message
    assert after.message_id == "fail-1"
    assert effects.planned_runs == []


def test_a_canceled_run_is_not_a_failure_of_the_model(tmp_path):
    h = make_harness(tmp_path, backoff_after_failed_runs=1)
    run = planned(h)
    h.status(run.backend_run_id, "canceled", message_id="cancel-1")
    head = h.head()
    assert (head.failed_runs, head.backoff_until) == (0, None)
    [event] = [e.payload["data"] for e in h.events() if e.type == "retrain.run.failed"]
    assert (event["status"], event["consecutive_failed_runs"], event["backoff_until"]) == ("canceled", 0, None)
    reason = next(d for d in h.decisions() if d.outcome == "failed").reason
    assert reason == f"run {run.run_id} canceled after 1 attempt(s); {run.new_image_count} images back to pending"


def test_a_success_ends_the_failure_count_and_starts_the_cooldown(tmp_path):
    h = make_harness(tmp_path, max_attempts=1, backoff_after_failed_runs=5)
    run = planned(h)
    h.status(run.backend_run_id, "failed")
    assert h.head().failed_runs == 1
    h.uploads(6)
    h.clock.advance(40)
    h.worker.tick()
    second = next(r for r in h.runs() if r.state != "finalized")
    h.clock.advance(1)
    finished_at = h.clock.now()
    completer, h.worker.completer = h.worker.completer, None  # look at the ledger between success and completion
    h.succeed(second)
    head = h.head()
    assert (head.failed_runs, head.backoff_until) == (0, None)
    assert head.last_run_finished_at == finished_at
    with h.store.transaction() as tx:
        succeeded = tx.get_run(second.run_id)
    assert (succeeded.state, succeeded.outcome, succeeded.finished_at) == ("succeeded", "succeeded", finished_at)
    h.worker.completer = completer


def test_a_rejected_forced_request_is_recorded_and_announced_with_its_reason(tmp_path):
    h = make_harness(tmp_path, in_flight="drop")
    run = planned(h)
    h.worker.handle(RetrainRequested(message_id="force-2", model="birds", force=True, requested_by="cron"))
    [event] = [e.payload["data"] for e in h.events() if e.type == "retrain.request.rejected"]
    reason = f"run {run.run_id} in flight: the trigger is dropped (in_flight = drop)"
    assert event == {"request_id": "force-2", "model": "birds", "reason": reason, "requested_by": "cron"}
    with h.store.transaction() as tx:
        assert [r.request_id for r in tx.open_requests("birds")] == []  # rejected, not left open


def test_a_request_s_overrides_reach_the_run_s_training_arguments_and_the_rest_come_from_the_config(tmp_path):
    from shared.messages import TrainingOverrides
    from worker.ports import TrainingArgs

    h = make_harness(tmp_path)
    h.uploads(10)
    overrides = TrainingOverrides(epochs=3, batch_size=48, image_size=96, learning_rate=0.02)
    h.worker.handle(RetrainRequested(message_id="f", model="birds", force=True, overrides=overrides))
    [run] = h.runs()
    t = h.worker.config.model("birds").training
    assert h.backend.specs[run.backend_run_id].training == TrainingArgs(
        epochs=3,
        batch_size=48,
        image_size=96,
        learning_rate=0.02,
        nproc=t.nproc,
        distributed=t.distributed,
        arch=t.arch,
        extra=tuple(t.extra),
    )
    plain = make_harness(tmp_path / "plain")
    plain.uploads(10)
    plain.worker.handle(RetrainRequested(message_id="g", model="birds", force=True))
    [other] = plain.runs()
    assert plain.backend.specs[other.backend_run_id].training == TrainingArgs(
        epochs=t.epochs, batch_size=t.batch_size, image_size=t.image_size, learning_rate=t.learning_rate, nproc=t.nproc,
        distributed=t.distributed, arch=t.arch, extra=tuple(t.extra),
    )  # fmt: skip


def test_a_submission_the_backend_refuses_for_good_fails_the_run_and_returns_its_images(tmp_path):
    from worker.ports import PermanentBackendError

    h = make_harness(tmp_path, quiet_period=0)
    h.backend.fail_next_submit(PermanentBackendError("403: the identity may not create jobs"))
    h.uploads(10)
    [run] = h.runs()
    assert (run.state, run.outcome) == ("finalized", "submit_failed")
    assert run.detail == "403: the identity may not create jobs"
    [event] = [e.payload["data"] for e in h.events() if e.type == "retrain.run.failed"]
    assert (event["status"], event["images_returned_to_pending"]) == ("submit_failed", run.new_image_count)


def test_running_is_recorded_once_and_durations_and_the_gpu_budget_count_from_it(tmp_path):
    from worker.views import runs_view

    h = make_harness(tmp_path, quiet_period=0)
    h.uploads(10)
    [run] = h.runs()
    submitted = h.clock.now()
    h.clock.advance(600)  # ten minutes in the queue
    h.status(run.backend_run_id, "running")
    started = h.clock.now()
    h.clock.advance(60)
    h.status(run.backend_run_id, "running", message_id="again")
    [running] = h.runs()
    assert (running.state, running.submitted_at, running.started_at) == ("running", submitted, started)
    h.clock.advance(1740)
    h.succeed(running)
    [row] = runs_view(h.store, h.worker.config, "birds")["birds"]
    assert row["duration_s"] == 1800.0  # from running to the end, not from submission


def test_a_run_never_seen_running_counts_from_its_submission_for_the_budget(tmp_path):
    from worker.runs import snapshot_of

    h = make_harness(tmp_path, quiet_period=0, max_gpu_hours_per_day=100)
    h.uploads(10)
    [run] = h.runs()
    h.clock.advance(1800)
    h.succeed(run)  # no running status ever arrived
    with h.store.read() as tx:
        snapshot = snapshot_of(tx, "birds", h.worker.config, h.clock.now())
    assert snapshot.gpu_hours_24h == 0.5 * h.worker.config.gpus_per_run("birds")


def test_a_backend_that_starts_a_run_at_once_has_it_marked_running(tmp_path):
    h = make_harness(tmp_path, quiet_period=0)
    h.backend.start_state = "running"
    h.uploads(10)
    [run] = h.runs()
    assert (run.state, run.started_at) == ("running", h.clock.now())


def test_the_submitter_marks_only_the_attempt_it_submitted_and_only_while_it_is_planned(tmp_path):
    import dataclasses

    from worker.ports import BackendStatus

    h = make_harness(tmp_path, quiet_period=0)
    h.backend.fail_next_submit(ConnectionError("down"), times=5)
    h.uploads(10)
    [planned] = h.runs()
    assert planned.state == "planned"
    submitter = h.worker.submitter
    older = dataclasses.replace(planned, attempt=planned.attempt + 1)  # not the attempt in the ledger
    submitter._mark_submitted(older, BackendStatus(older.backend_run_id, "queued"))
    assert h.runs()[0].state == "planned"
    h.status(planned.backend_run_id, "running")  # a status event overtook the submitter
    submitter._mark_submitted(planned, BackendStatus(planned.backend_run_id, "queued"))
    assert h.runs()[0].state == "running"  # not put back to submitted


def test_with_no_cooldown_a_refused_submission_is_followed_by_a_new_run_at_once(tmp_path):
    from worker.ports import PermanentBackendError

    h = make_harness(tmp_path, quiet_period=0, cooldown=0, backoff_after_failed_runs=5)
    h.backend.fail_next_submit(PermanentBackendError("400: bad compute name"))
    h.uploads(10)
    runs = sorted(h.runs(), key=lambda r: r.seq)
    assert [(r.outcome, r.state) for r in runs] == [("submit_failed", "finalized"), (None, "planned")]
    assert runs[1].new_image_count == runs[0].new_image_count  # the refused run's images, planned again
    h.worker.tick()  # submitted by the next tick
    assert sorted(h.runs(), key=lambda r: r.seq)[1].state == "submitted"


def test_a_refusal_for_a_run_canceled_meanwhile_leaves_it_canceled(tmp_path):
    from worker.ports import PermanentBackendError

    h = make_harness(tmp_path, quiet_period=0, max_attempts=1)

    def submit(spec):  # an operator cancels the planned run while the backend is deciding
        [run] = h.runs()
        h.worker.cancel(run.run_id)
        raise PermanentBackendError("403: the identity may not create jobs")

    h.backend.submit = submit
    h.uploads(10)
    [run] = h.runs()
    assert (run.state, run.outcome) == ("finalized", "canceled"), "not submit_failed: the refusal came after the cancel"
    assert [e.payload["data"]["status"] for e in h.events() if e.type == "retrain.run.failed"] == ["canceled"]


def test_a_request_is_recorded_with_who_asked_and_why_and_its_evaluation_names_it(tmp_path):
    h = make_harness(tmp_path)
    h.uploads(6)
    h.request(message_id="req-9", force=True, requested_by="ops", reason="new camera")
    with h.store.read() as tx:
        [request] = tx.all_requests("birds")
    assert (request.request_id, request.requested_by, request.reason) == ("req-9", "ops", "new camera")
    assert (h.decisions()[0].outcome, h.decisions()[0].message_id) == ("submit", "req-9")


def test_the_gpu_budget_counts_a_running_run_from_its_start_not_from_its_time_in_the_queue(tmp_path):
    from worker.runs import snapshot_of

    h = make_harness(tmp_path, quiet_period=0, max_gpu_hours_per_day=100)
    h.uploads(10)
    [run] = h.runs()
    h.clock.advance(3600)  # an hour in the queue costs no GPU
    h.status(run.backend_run_id, "running")
    h.clock.advance(1800)
    with h.store.read() as tx:
        snapshot = snapshot_of(tx, "birds", h.worker.config, h.clock.now())
    assert snapshot.gpu_hours_24h == 0.5 * h.worker.config.gpus_per_run("birds")


def test_the_submitted_event_carries_exactly_the_runs_contract(tmp_path):
    h = make_harness(tmp_path)
    h.uploads(8)  # enough data, still in the quiet period: the forced request makes the run
    h.request(message_id="req-7", force=True, overrides={"epochs": 3}, reason="new camera")
    [run] = h.runs()
    [data] = [e.payload["data"] for e in h.events() if e.type == "retrain.run.submitted"]
    assert data == {
        "run_id": run.run_id, "model": "birds", "attempt": 1, "backend_run_id": run.backend_run_id,
        "manifest_sha256": run.manifest_sha256, "image_count": run.image_count, "new_image_count": run.new_image_count,
        "classes": run.classes, "reason": run.reason, "request_ids": ["req-7"], "overrides": {"epochs": 3},
    }  # fmt: skip
    assert (run.image_count, sorted(run.classes)) == (16, ["chicken", "turkey"])


@pytest.mark.parametrize("training_data", ["all", "new"])
def test_a_runs_manifest_holds_the_images_its_training_data_setting_names_with_their_splits(tmp_path, training_data):
    h = make_harness(tmp_path, training_data=training_data, cooldown=0)
    first = planned(h)
    h.succeed(first, best=0.9)
    before = set(h.images())
    h.uploads(4)
    h.clock.advance(11)
    h.worker.tick()
    second = h.runs()[0]
    assert (second.base_watermark, second.watermark) == (first.watermark, first.watermark + 8)
    assert (first.seq, second.seq) == (1, 2), "runs are numbered one after another"
    manifest = h.backend.specs[second.backend_run_id].manifest
    expected = set(h.images()) - (before if training_data == "new" else set())
    assert {i["path"] for i in manifest["images"]} == expected
    rows = h.images()
    assert [i["split"] for i in manifest["images"]] == [rows[i["path"]].split for i in manifest["images"]]
    assert {i["split"] for i in manifest["images"]} == {"train", "val"}
    assert (second.image_count, second.new_image_count) == (len(expected), 8)


def test_planning_without_a_manifest_store_is_a_configuration_error(tmp_path):
    from worker.context import Context
    from worker.runs import plan_run

    h = make_harness(tmp_path)
    h.uploads(2)
    with h.store.transaction() as tx, pytest.raises(RuntimeError, match=r"^no manifest store configured: a run cannot be planned$"):
        plan_run(Context(h.worker.config, h.clock.now(), manifests=None), tx, "birds", "test", [])


def test_only_the_models_own_runs_count_against_its_gpu_budget(tmp_path):
    import dataclasses

    from worker.runs import snapshot_of

    h = make_harness(tmp_path, quiet_period=0, max_gpu_hours_per_day=100)
    h.uploads(10)
    [run] = h.runs()
    h.clock.advance(1800)
    h.succeed(run)
    with h.store.transaction() as tx:  # another model's run of the same half hour, in the same ledger
        tx.insert_run(dataclasses.replace(tx.get_run(run.run_id), run_id="fish-0001-00000000", model="fish", seq=1))
        tx.commit()
    with h.store.read() as tx:
        snapshot = snapshot_of(tx, "birds", h.worker.config, h.clock.now())
    assert snapshot.gpu_hours_24h == 0.5 * h.worker.config.gpus_per_run("birds")


def test_the_decision_that_plans_a_run_names_it(tmp_path):
    h = make_harness(tmp_path)
    run = planned(h)
    [decision] = [d for d in h.decisions() if d.outcome == "submit"]
    assert decision.run_id == run.run_id
    assert all(d.run_id is None for d in h.decisions() if d.outcome != "submit")


def test_a_run_queued_at_the_backend_counts_against_the_gpu_budget_from_its_submission(tmp_path):
    from worker.runs import snapshot_of

    h = make_harness(tmp_path, quiet_period=0, max_gpu_hours_per_day=100)
    h.uploads(10)
    [run] = h.runs()
    assert (run.state, run.started_at) == ("submitted", None)
    h.clock.advance(1800)
    with h.store.read() as tx:
        snapshot = snapshot_of(tx, "birds", h.worker.config, h.clock.now())
    assert snapshot.gpu_hours_24h == 0.5 * h.worker.config.gpus_per_run("birds")


def _break_manifest(path, how: str) -> None:
    import os

    if how == "truncated":  # what a crash in the middle of writing it left before writes were atomic
        path.write_bytes(path.read_bytes()[:40])
    elif how == "deleted":
        path.unlink()
    elif how == "fifo":  # reading it would have blocked the worker
        path.unlink()
        os.mkfifo(path)
    elif how == "edited":  # another image list under the same name, its own digest recomputed
        import json

        from shared.manifest_hash import manifest_sha256

        document = json.loads(path.read_text())
        document["images"] = document["images"][1:]
        document["sha256"] = manifest_sha256(document["classes"], document["images"])
        path.write_text(json.dumps(document))


@pytest.mark.parametrize("how", ["truncated", "deleted", "fifo", "edited"])
def test_a_run_whose_frozen_manifest_cannot_be_used_fails_once_and_its_images_are_planned_again(tmp_path, how):
    """It used to stay planned for ever, its submission failing with a traceback on every tick."""
    from shared import events as ev
    from tests.fakes.harness import make_harness
    from worker.manifests import manifest_path

    h = make_harness(tmp_path)
    h.backend.fail_next_submit(ConnectionError("the backend is down for a moment"))
    h.uploads(6)
    h.clock.advance(11)
    h.worker.tick()
    [run] = h.runs()
    assert run.state == "planned"
    _break_manifest(h.worker.manifests.local_path(manifest_path(run.manifest_sha256)), how)

    h.worker.tick()
    [failed] = h.runs()
    assert failed.state == "finalized" or failed.outcome == "submit_failed", failed
    assert "its frozen manifest cannot be used" in failed.detail
    assert [e.type for e in h.events()].count(ev.RUN_FAILED) == 1

    h.clock.advance(24 * 3600)  # past the failure back-off
    h.worker.tick()
    newest = h.runs()[0]
    assert newest.run_id != failed.run_id
    assert newest.state == "submitted"  # planned again over the same images, and the manifest rewritten whole
    assert newest.manifest_sha256 == failed.manifest_sha256
