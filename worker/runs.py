"""A run's life in the ledger: the policy's verdict carried out (planning a run with its frozen
manifest), submission marks, success, failure with retries and back-off, and the evaluation that
follows each. Every function runs inside the caller's transaction."""

from __future__ import annotations

import datetime as dt
from typing import Any

from shared import events as ev
from shared.redact import printable
from shared.run_ids import make_run_id
from worker import telemetry
from worker.config import RetrainConfig
from worker.context import Context
from worker.manifests import build_manifest, freeze
from worker.outbox import queue_event
from worker.policy import DAY, Decision, Snapshot, decide, gpu_usage, note_failure, note_success, weighed_request
from worker.store import IN_FLIGHT_STATES, ManifestEntry, RequestRow, RunRow, RunState, Tx, clipped

REJECTIONS_PER_COMMIT = 20  # forced requests dropped per evaluation (more wait for the next one)


REQUEST_IDS_KEPT = 20  # on the run record; the request watermark covers them all


RUNS_IN_A_DAY = 200  # the recent runs read for the GPU budget (more than a day holds at any sane pace)


def snapshot_of(tx: Tx, model: str, config: RetrainConfig, now: dt.datetime, requests: list[RequestRow] | None = None) -> Snapshot:
    """What the policy decides from: the model's pending images, data, head, run in flight, first
    forced request (of `requests`, else of the model's open ones), and (with a GPU budget
    configured) the GPU-hours its runs used in the last 24 h."""
    requests = tx.open_requests(model) if requests is None else requests
    hours, frees_at = 0.0, None
    budget = config.model(model).max_gpu_hours_per_day
    if budget is not None:
        intervals = [(gpu_held_since(r), r.finished_at) for r in tx.runs(model, limit=RUNS_IN_A_DAY) if r.submitted_at or r.started_at]
        hours, frees_at = gpu_usage([i for i in intervals if i[1] is None or i[1] > now - DAY], now, config.gpus_per_run(model), budget)
    return Snapshot(
        pending=tx.pending_stats(model),
        data=tx.data_stats(model),
        head=tx.model_head(model),
        in_flight=next(iter(tx.runs(model, IN_FLIGHT_STATES, limit=1)), None),
        force_request=weighed_request(
            next((r for r in requests if r.force and r.override_budget), None), next((r for r in requests if r.force), None)
        ),
        gpu_hours_24h=hours,
        budget_frees_at=frees_at,
    )


def gpu_held_since(run: RunRow) -> dt.datetime:
    """When a run began to hold its GPUs: when the backend said it was running, or (if that was never
    seen: a run whose end came first) when it was submitted."""
    if run.started_at is not None and (run.finished_at is None or run.started_at < run.finished_at):
        return run.started_at
    return run.submitted_at or run.started_at or run.created_at


def evaluate(ctx: Context, tx: Tx, model: str, message_id: str | None) -> tuple[Decision, RunRow | None]:
    """Run the policy for `model`, carry out and record its decision."""
    cfg = ctx.config.model(model)
    requests = tx.open_requests(model)
    snapshot = snapshot_of(tx, model, ctx.config, ctx.now, requests)
    head, force = snapshot.head, snapshot.force_request
    with telemetry.span("retrain.decide", model=model) as span:
        decision = decide(snapshot, ctx.now, cfg)
        span.set_attribute("retrain.outcome", decision.outcome)
    telemetry.gauge("retrain.pending.images", snapshot.pending.count, model=model)
    run = None
    if decision.outcome == "coalesce" and not head.followup_wanted:
        head.followup_wanted = True
        tx.save_model_head(head)
    elif decision.outcome == "drop" and force is not None:
        for request in [r for r in requests if r.force][:REJECTIONS_PER_COMMIT]:
            reject_request(ctx, tx, request, decision.reason)
    elif decision.outcome == "submit":
        # In queue mode each forced request makes its own run: consume up to the first one.
        consumed = requests[: requests.index(force) + 1] if cfg.in_flight == "queue" and force is not None else requests
        run = plan_run(ctx, tx, model, decision.reason, consumed, oldest_image_at=snapshot.pending.oldest_at)
    last = next(iter(tx.decisions(model, 1)), None)
    if run is not None or last is None or (last.outcome, last.reason) != (decision.outcome, clipped(decision.reason)):
        # An unchanged verdict is not recorded again: `retrain explain` shows changes, not ticks.
        tx.decided(model, ctx.now, decision.outcome, decision.reason, run.run_id if run else None, message_id)
    return decision, run


def reject_request(ctx: Context, tx: Tx, request: RequestRow, reason: str) -> None:
    tx.reject_request(request)  # the ledger marks it rejected
    data = {"request_id": request.request_id, "model": request.model, "reason": reason, "requested_by": request.requested_by}
    queue_event(tx, ev.REQUEST_REJECTED, f"requests/{request.request_id}", data, ctx.now)


def plan_run(
    ctx: Context, tx: Tx, model: str, reason: str, requests: list[RequestRow], oldest_image_at: dt.datetime | None = None
) -> RunRow:
    """Freeze the manifest and record the run as planned (step 1 of the submit protocol).

    The run covers every image that arrived so far (its watermark); images above the last
    successful run's watermark are new to it. The manifest is written as a content-addressed
    blob before the commit; the ledger records only its digest and the watermarks, so planning
    writes the same few records for 10 images or 10 million.
    """
    cfg = ctx.config.model(model)
    head = tx.model_head(model)
    watermark = tx.image_watermark(model)
    base = head.trained_watermark
    candidates = tx.manifest_candidates(model, base if cfg.training_data == "new" else 0, watermark)
    entries = [ManifestEntry(path=i.path, etag=i.etag, label=i.label, split=i.split, is_new=i.seq > base) for i in candidates]
    document = build_manifest(entries)
    if ctx.manifests is None:
        raise RuntimeError("no manifest store configured: a run cannot be planned")
    freeze(ctx.manifests, document)
    digest = document["sha256"]
    seq = head.next_seq
    overrides: dict[str, Any] = {}
    for request in requests:  # the newest request's overrides win
        overrides.update(request.overrides)
    run = RunRow(
        run_id=make_run_id(model, seq, digest),
        model=model,
        seq=seq,
        state="planned",
        manifest_sha256=digest,
        image_count=len(entries),
        new_image_count=sum(e.is_new for e in entries),
        classes=list(document["classes"]),
        created_at=ctx.now,
        watermark=watermark,
        base_watermark=base,
        reason=reason,
        request_ids=[r.request_id for r in requests][:REQUEST_IDS_KEPT],
        overrides=overrides,
        traceparent=telemetry.current_traceparent(),
        oldest_image_at=oldest_image_at,
    )
    tx.insert_run(run)
    if requests:
        head.request_watermark = max(head.request_watermark, max(r.seq for r in requests))
    head.next_seq, head.followup_wanted = seq + 1, False
    tx.save_model_head(head)
    return run


NOT_SUBMITTED_YET = "not submitted yet, retried at every tick: "  # a planned run's detail while its submission fails


def mark_submitted(ctx: Context, tx: Tx, run: RunRow, state: RunState) -> None:
    """The backend has the run (the submitter's mark, or a status event that overtook it).

    `retrain.run.submitted` is queued by whichever comes first: its id is derived from the run and
    attempt, so the second is a duplicate the outbox drops.
    """
    if run.state == "planned":
        run.submitted_at, run.next_attempt_at = run.submitted_at or ctx.now, None
        if run.detail.startswith(NOT_SUBMITTED_YET):
            run.detail = ""  # the failed attempts' reason no longer describes the run
        queue_submitted_event(ctx, tx, run)
    run.state = state
    if state == "running":
        run.started_at = run.started_at or ctx.now
    tx.update_run(run)


def queue_submitted_event(ctx: Context, tx: Tx, run: RunRow) -> None:
    data = {
        "run_id": run.run_id, "model": run.model, "attempt": run.attempt, "backend_run_id": run.backend_run_id,
        "manifest_sha256": run.manifest_sha256, "image_count": run.image_count, "new_image_count": run.new_image_count,
        "classes": run.classes, "reason": run.reason, "request_ids": run.request_ids, "overrides": run.overrides,
    }  # fmt: skip
    queue_event(tx, ev.RUN_SUBMITTED, f"runs/{run.run_id}", data, ctx.now, discriminator=str(run.attempt))


def run_succeeded(ctx: Context, tx: Tx, run: RunRow) -> None:
    """The run's images are trained (the trained watermark moves to its own); completion finalizes it."""
    run.state, run.outcome, run.finished_at = "succeeded", "succeeded", ctx.now
    run.started_at = run.started_at or ctx.now
    tx.update_run(run)
    head = tx.model_head(run.model)
    note_success(head, run.watermark, ctx.now)
    tx.save_model_head(head)


def run_failed(ctx: Context, tx: Tx, run: RunRow, status: str, detail: str, message_id: str | None) -> list[str]:
    cfg = ctx.config.model(run.model)
    detail = printable(detail)
    if status == "failed" and run.attempt < cfg.max_attempts:  # submit_failed and canceled are final
        backoff = cfg.retry_backoff * 2 ** (run.attempt - 1)
        run.attempt += 1
        run.state, run.submitted_at, run.started_at = "planned", None, None
        run.next_attempt_at = ctx.now + dt.timedelta(seconds=backoff)
        run.detail = clipped(detail)
        tx.update_run(run)
        reason = f"run {run.run_id} failed; attempt {run.attempt}/{cfg.max_attempts} at {run.next_attempt_at:%H:%M:%S} UTC"
        tx.decided(run.model, ctx.now, "retry", reason, run.run_id, message_id)
        return []
    head = tx.model_head(run.model)
    if run.state == "succeeded":  # completion failed for good: the run's images were not trained after all
        head.trained_watermark = run.base_watermark
    returned = run.new_image_count
    run.state, run.outcome, run.finished_at, run.detail = "finalized", status, ctx.now, clipped(detail)
    tx.update_run(run)
    note_failure(head, cfg, ctx.now, counted=status != "canceled")  # an operator's cancel is not the model failing
    backoff_note = ""
    if status != "canceled" and head.backoff_until is not None and head.failed_runs >= cfg.backoff_after_failed_runs:
        backoff_note = f"; {head.failed_runs} failed runs in a row: no new run before {head.backoff_until:%Y-%m-%d %H:%M:%S} UTC"
    tx.save_model_head(head)
    data = {
        "run_id": run.run_id,
        "model": run.model,
        "status": status,
        "attempts": run.attempt,
        "detail": clipped(detail),
        "images_returned_to_pending": returned,
        "consecutive_failed_runs": head.failed_runs,
        "backoff_until": head.backoff_until.isoformat() if head.backoff_until else None,
    }
    queue_event(tx, ev.RUN_FAILED, f"runs/{run.run_id}", data, ctx.now)
    telemetry.count("retrain.runs", model=run.model, outcome=status)
    reason = f"run {run.run_id} {status} after {run.attempt} attempt(s); {returned} images back to pending{backoff_note}"
    tx.decided(run.model, ctx.now, "failed", reason, run.run_id, message_id)
    return after_run(ctx, tx, run.model, message_id)


def after_run(ctx: Context, tx: Tx, model: str, message_id: str | None) -> list[str]:
    _, run = evaluate(ctx, tx, model, message_id)
    return [run.run_id] if run else []
