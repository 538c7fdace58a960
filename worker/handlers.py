"""Message handlers: each turns one message into state changes inside one transaction.

Handlers are plain functions `handler(ctx, tx, message) -> Effects`. They never call the
training backend: a run they plan is recorded as `planned` in the same transaction, and the bus
submits it after the commit (the submit protocol in `worker.submission`). A crash in between
leaves a planned run that the next Tick submits.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from shared import events as ev
from shared.manifest_hash import stable_split
from shared.messages import ImageUploaded, RetrainRequested, RunStatusChanged, Tick, check_blob_path, label_of
from shared.redact import printable, redact
from worker.config import RetrainConfig
from worker.manifests import build_manifest, freeze
from worker.policy import Decision, Snapshot, decide
from worker.ports import BlobStore
from worker.store import IN_FLIGHT_STATES, DecisionRow, ImageRow, ManifestEntry, OutboxRow, RequestRow, RunRow, Tx

DECISIONS_KEPT = 2000


REJECTIONS_PER_COMMIT = 20  # forced requests dropped per evaluation (more wait for the next one)
REQUEST_IDS_KEPT = 20  # on the run record; the request watermark covers them all


@dataclass
class Context:
    config: RetrainConfig
    now: dt.datetime
    blobs: dict[str, BlobStore] = field(default_factory=dict)  # per model, for backfills
    manifests: BlobStore | None = None  # where frozen manifests are written (manifests/<sha256>.json)
    backfill: Backfill | None = None  # a request's images, registered before its own transaction


@dataclass
class Effects:
    """What the bus must do after the commit, and what to tell the caller."""

    planned_runs: list[str] = field(default_factory=list)
    completed_runs: list[str] = field(default_factory=list)  # succeeded runs awaiting completion
    outcome: str = "ok"
    detail: str = ""


def split_backend_run_id(backend_run_id: str) -> tuple[str, int] | None:
    """`<run_id>-a<attempt>` -> (run_id, attempt); None for ids we did not make."""
    run_id, sep, attempt = backend_run_id.rpartition("-a")
    if not sep or not attempt.isdigit() or not run_id:
        return None
    return run_id, int(attempt)


def _redacted(value: Any) -> Any:
    """Events leave the system: mask anything secret-shaped in their strings (logs, error details)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def queue_event(tx: Tx, type_: str, subject: str, data: dict[str, Any], now: dt.datetime, discriminator: str = "") -> None:
    event = ev.new_event(type_, subject, _redacted(data), time=now, discriminator=discriminator)
    tx.enqueue_event(OutboxRow(event_id=event.id, type=event.type, subject=event.subject, payload=event.to_json_dict(), created_at=now))


# ----------------------------------------------------------------------------------------------
# policy evaluation and planning


def evaluate(ctx: Context, tx: Tx, model: str, message_id: str | None) -> tuple[Decision, RunRow | None]:
    """Run the policy for `model`, carry out and record its decision."""
    cfg = ctx.config.model(model)
    head = tx.model_head(model)
    in_flight = next(iter(tx.runs(model, IN_FLIGHT_STATES, limit=1)), None)
    requests = tx.open_requests(model)
    force = next((r for r in requests if r.force), None)
    snapshot = Snapshot(pending=tx.pending_stats(model), data=tx.data_stats(model), head=head, in_flight=in_flight, force_request=force)
    decision = decide(snapshot, ctx.now, cfg)
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
        run = plan_run(ctx, tx, model, decision.reason, consumed)
    last = next(iter(tx.decisions(model, 1)), None)
    if run is not None or last is None or (last.outcome, last.reason) != (decision.outcome, decision.reason):
        # An unchanged verdict is not recorded again: `retrain explain` shows changes, not ticks.
        tx.record_decision(
            DecisionRow(
                model=model,
                at=ctx.now,
                outcome=decision.outcome,
                reason=decision.reason,
                run_id=run.run_id if run else None,
                message_id=message_id,
            )
        )
    return decision, run


def reject_request(ctx: Context, tx: Tx, request: RequestRow, reason: str) -> None:
    request.state = "rejected"
    tx.reject_request(request)
    data = {"request_id": request.request_id, "model": request.model, "reason": reason, "requested_by": request.requested_by}
    queue_event(tx, ev.REQUEST_REJECTED, f"requests/{request.request_id}", data, ctx.now)


def plan_run(ctx: Context, tx: Tx, model: str, reason: str, requests: list[RequestRow]) -> RunRow:
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
    )
    tx.insert_run(run)
    if requests:
        head.request_watermark = max(head.request_watermark, max(r.seq for r in requests))
    head.next_seq, head.followup_wanted = seq + 1, False
    tx.save_model_head(head)
    return run


def make_run_id(model: str, seq: int, manifest_sha256: str) -> str:
    return f"{model}-{seq:04d}-{manifest_sha256[:8]}"


# ----------------------------------------------------------------------------------------------
# handlers


def image_row(ctx: Context, model: str, path: str, etag: str, size: int, source: str, occurred_at: dt.datetime | None) -> ImageRow:
    cfg = ctx.config.model(model)
    return ImageRow(
        model=model, path=path, etag=etag, label=label_of(path), split=stable_split(path, cfg.val_fraction), size=size,
        occurred_at=occurred_at, first_seen_at=ctx.now, source=source,
    )  # fmt: skip


def handle_image_uploaded(ctx: Context, tx: Tx, msg: ImageUploaded) -> Effects:
    added = tx.add_image(image_row(ctx, msg.model, msg.path, msg.etag, msg.size, msg.source, msg.occurred_at))
    if added != "new":
        return Effects(
            outcome=added,
            detail=f"{msg.path} ({msg.etag}) is {'already known' if added == 'duplicate' else 'older than the known version'}",
        )
    _, run = evaluate(ctx, tx, msg.model, msg.message_id)
    return Effects(planned_runs=[run.run_id] if run else [], detail=f"registered {msg.path}")


@dataclass
class Backfill:
    """The images a request names, resolved against the blob store (outside any transaction)."""

    refs: list[tuple[str, str, int]] = field(default_factory=list)  # (path, etag, size)
    missing: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    registered: int = 0  # versions that were new, over all chunks


def resolve_backfill(ctx: Context, msg: RetrainRequested) -> Backfill:
    """List the prefix and look up etags the request left out: blob I/O, no ledger access."""
    backfill = Backfill()
    blobs = ctx.blobs.get(msg.model)
    refs: list[tuple[str, str | None]] = [(r.path, r.etag) for r in msg.images]
    if msg.prefix is not None:
        if blobs is None:
            raise RuntimeError(f"no blob store configured for model {msg.model}")
        for blob in blobs.list(msg.prefix):
            try:  # a listing holds whatever was uploaded: the same rules as an upload event
                refs.append((check_blob_path(blob.path), blob.etag))
            except ValueError:
                backfill.invalid.append(blob.path)
    for path, etag in refs:
        size = 0
        if etag is None:
            info = blobs.info(path) if blobs else None
            if info is None:
                backfill.missing.append(path)
                continue
            etag, size = info.etag, info.size
        backfill.refs.append((path, etag, size))
    return backfill


def handle_retrain_requested(ctx: Context, tx: Tx, msg: RetrainRequested) -> Effects:
    """Record the request (its images were registered chunk by chunk before) and evaluate."""
    backfill = ctx.backfill or Backfill()
    if msg.force or msg.overrides:
        # A forced request triggers a run; overrides alone wait for the next run and apply to it.
        overrides = msg.overrides.model_dump(exclude_none=True) if msg.overrides else {}
        tx.add_request(
            RequestRow(
                request_id=msg.message_id,
                model=msg.model,
                force=msg.force,
                created_at=ctx.now,
                overrides=overrides,
                requested_by=msg.requested_by,
                reason=msg.reason,
            )
        )
    if msg.force:
        # An operator asking for a run ends a failure backoff: they are watching.
        head = tx.model_head(msg.model)
        if head.failed_runs or head.backoff_until:
            head.failed_runs, head.backoff_until = 0, None
            tx.save_model_head(head)
    missing, invalid = backfill.missing, backfill.invalid
    detail = f"registered {backfill.registered} images" + (f"; {len(missing)} not found (e.g. {missing[0]})" if missing else "")
    if invalid:
        detail += f"; {len(invalid)} skipped: not <label>/<file> images (e.g. {printable(invalid[0])[:120]})"
    if missing:
        tx.record_decision(
            DecisionRow(
                model=msg.model,
                at=ctx.now,
                outcome="reject",
                reason=f"request {msg.message_id}: {len(missing)} listed images do not exist, e.g. {printable(missing[0])[:200]!r}",
                message_id=msg.message_id,
            )
        )
    _, run = evaluate(ctx, tx, msg.model, msg.message_id)
    return Effects(planned_runs=[run.run_id] if run else [], detail=detail)


def handle_run_status_changed(ctx: Context, tx: Tx, msg: RunStatusChanged) -> Effects:
    parsed = split_backend_run_id(msg.backend_run_id)
    run = tx.get_run(parsed[0]) if parsed else None
    if run is None or run.model != msg.model:
        return Effects(outcome="ignored", detail=f"unknown run {msg.backend_run_id}")
    if parsed[1] != run.attempt or run.state not in ("planned", "submitted", "running"):
        return Effects(
            outcome="ignored", detail=f"stale status {msg.status} for {msg.backend_run_id} (run is {run.state}, attempt {run.attempt})"
        )
    effects = Effects(detail=f"{run.run_id} {msg.status}")
    if msg.status == "queued":
        if run.state == "planned":
            mark_submitted(ctx, tx, run, "submitted")
    elif msg.status == "running":
        if run.state != "running":
            mark_submitted(ctx, tx, run, "running")
    elif msg.status == "succeeded":
        if run.state == "planned":  # the backend's events overtook the submitter: it was submitted
            queue_submitted_event(ctx, tx, run)
        run_succeeded(ctx, tx, run)
        effects.completed_runs.append(run.run_id)
    else:
        if run.state == "planned" and run.submitted_at is None and msg.status == "failed":
            queue_submitted_event(ctx, tx, run)
        effects.planned_runs += run_failed(ctx, tx, run, msg.status, msg.detail, msg.message_id)
    return effects


def mark_submitted(ctx: Context, tx: Tx, run: RunRow, state: str) -> None:
    """The backend has the run (the submitter's mark, or a status event that overtook it).

    `retrain.run.submitted` is queued by whichever comes first: its id is derived from the run and
    attempt, so the second is a duplicate the outbox drops.
    """
    if run.state == "planned":
        run.submitted_at, run.next_attempt_at = run.submitted_at or ctx.now, None
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
    head.trained_watermark = max(head.trained_watermark, run.watermark)
    head.last_run_finished_at = ctx.now
    head.failed_runs, head.backoff_until = 0, None
    tx.save_model_head(head)


def run_failed(ctx: Context, tx: Tx, run: RunRow, status: str, detail: str, message_id: str | None) -> list[str]:
    cfg = ctx.config.model(run.model)
    detail = printable(detail)
    if status == "failed" and run.attempt < cfg.max_attempts:  # submit_failed and canceled are final
        backoff = cfg.retry_backoff * 2 ** (run.attempt - 1)
        run.attempt += 1
        run.state, run.submitted_at, run.started_at = "planned", None, None
        run.next_attempt_at = ctx.now + dt.timedelta(seconds=backoff)
        run.detail = detail[:2000]
        tx.update_run(run)
        tx.record_decision(
            DecisionRow(
                model=run.model,
                at=ctx.now,
                outcome="retry",
                reason=f"run {run.run_id} failed; attempt {run.attempt}/{cfg.max_attempts} at {run.next_attempt_at:%H:%M:%S} UTC",
                run_id=run.run_id,
                message_id=message_id,
            )
        )
        return []
    head = tx.model_head(run.model)
    if run.state == "succeeded":  # completion failed for good: the run's images were not trained after all
        head.trained_watermark = run.base_watermark
    returned = run.new_image_count
    run.state, run.outcome, run.finished_at, run.detail = "finalized", status, ctx.now, detail[:2000]
    tx.update_run(run)
    head.last_run_finished_at = ctx.now
    backoff_note = ""
    if status != "canceled":  # an operator's cancel is not the model failing
        head.failed_runs += 1
        if head.failed_runs >= cfg.backoff_after_failed_runs:
            exponent = head.failed_runs - cfg.backoff_after_failed_runs
            delay = min(cfg.failure_backoff * 2**exponent, cfg.failure_backoff_max)
            head.backoff_until = ctx.now + dt.timedelta(seconds=delay)
            backoff_note = f"; {head.failed_runs} failed runs in a row: no new run before {head.backoff_until:%Y-%m-%d %H:%M:%S} UTC"
    tx.save_model_head(head)
    data = {
        "run_id": run.run_id,
        "model": run.model,
        "status": status,
        "attempts": run.attempt,
        "detail": detail[:2000],
        "images_returned_to_pending": returned,
        "consecutive_failed_runs": head.failed_runs,
        "backoff_until": head.backoff_until.isoformat() if head.backoff_until else None,
    }
    queue_event(tx, ev.RUN_FAILED, f"runs/{run.run_id}", data, ctx.now)
    tx.record_decision(
        DecisionRow(
            model=run.model,
            at=ctx.now,
            outcome="failed",
            reason=f"run {run.run_id} {status} after {run.attempt} attempt(s); {returned} images back to pending{backoff_note}",
            run_id=run.run_id,
            message_id=message_id,
        )
    )
    return after_run(ctx, tx, run.model, message_id)


def after_run(ctx: Context, tx: Tx, model: str, message_id: str | None) -> list[str]:
    _, run = evaluate(ctx, tx, model, message_id)
    return [run.run_id] if run else []


def handle_tick(ctx: Context, tx: Tx, msg: Tick) -> Effects:
    """Re-evaluate one model (the bus splits a tick for all models into one transaction per model);
    planned runs that are due are handed back for (re)submission."""
    if msg.model is None:
        raise ValueError("a tick is handled per model; Worker.handle splits a tick for every model")
    model, effects = msg.model, Effects()
    _decision, run = evaluate(ctx, tx, model, msg.message_id)
    if run:
        effects.planned_runs.append(run.run_id)
    for planned in tx.runs(model, frozenset({"planned"})):
        if planned.run_id not in effects.planned_runs and (planned.next_attempt_at is None or planned.next_attempt_at <= ctx.now):
            effects.planned_runs.append(planned.run_id)
    # A completion interrupted by a crash (or a transient error) is finished by the next tick.
    effects.completed_runs += [r.run_id for r in tx.runs(model, frozenset({"succeeded"}))]
    tx.prune_decisions(model, DECISIONS_KEPT)
    return effects


HANDLERS = {
    ImageUploaded: handle_image_uploaded,
    RetrainRequested: handle_retrain_requested,
    RunStatusChanged: handle_run_status_changed,
    Tick: handle_tick,
}
