"""Message handlers: each turns one message into state changes inside one transaction.

Handlers are plain functions `handler(ctx, tx, message) -> Effects`. They never call the
training backend: a run they plan is recorded as `planned` in the same transaction, and the bus
submits it after the commit (the submit protocol in `worker.submission`). A crash in between
leaves a planned run that the next Tick submits.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from shared import events as ev
from shared.manifest_hash import manifest_sha256, stable_split
from shared.messages import ImageUploaded, RetrainRequested, RunStatusChanged, Tick, check_blob_path, label_of
from shared.redact import redact
from worker.config import RetrainConfig
from worker.policy import Decision, Snapshot, decide
from worker.ports import BlobStore
from worker.store import IN_FLIGHT_STATES, DecisionRow, ImageRow, ManifestEntry, OutboxRow, RequestRow, RunRow, Tx

DECISIONS_KEPT = 2000


@dataclass
class Context:
    config: RetrainConfig
    now: dt.datetime
    blobs: dict[str, BlobStore] = field(default_factory=dict)  # per model, for backfills


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
        for request in [r for r in requests if r.force]:
            reject_request(ctx, tx, request, decision.reason)
    elif decision.outcome == "submit":
        consumed = requests if cfg.in_flight != "queue" or force is None else [force]
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
    tx.update_request(request)
    data = {"request_id": request.request_id, "model": request.model, "reason": reason, "requested_by": request.requested_by}
    queue_event(tx, ev.REQUEST_REJECTED, f"requests/{request.request_id}", data, ctx.now)


def plan_run(ctx: Context, tx: Tx, model: str, reason: str, requests: list[RequestRow]) -> RunRow:
    """Freeze the manifest and record the run as planned (step 1 of the submit protocol)."""
    cfg = ctx.config.model(model)
    candidates = tx.manifest_candidates(model, only_pending=cfg.training_data == "new")
    entries = [ManifestEntry(path=i.path, etag=i.etag, label=i.label, split=i.split, is_new=i.state == "pending") for i in candidates]
    classes = sorted({e.label for e in entries})
    digest = manifest_sha256(classes, [dataclasses.asdict(e) for e in entries])
    head = tx.model_head(model)
    seq = head.next_seq
    overrides: dict[str, Any] = {}
    for request in requests:  # the newest request's overrides win
        overrides.update(request.overrides)
    run = RunRow(
        run_id=f"{model}-{seq:04d}-{digest[:8]}",
        model=model,
        seq=seq,
        state="planned",
        manifest_sha256=digest,
        image_count=len(entries),
        new_image_count=sum(e.is_new for e in entries),
        classes=classes,
        created_at=ctx.now,
        reason=reason,
        request_ids=[r.request_id for r in requests],
        overrides=overrides,
    )
    tx.insert_run(run, entries)
    tx.set_image_state(model, [(e.path, e.etag) for e in entries if e.is_new], "in_run", run.run_id)
    for request in requests:
        request.state, request.run_id = "consumed", run.run_id
        tx.update_request(request)
    head.next_seq, head.followup_wanted = seq + 1, False
    tx.save_model_head(head)
    return run


def manifest_document(run: RunRow, entries: list[ManifestEntry]) -> dict[str, Any]:
    """The manifest train.py reads (training/manifests.py format), with its digest."""
    images = [{"path": e.path, "label": e.label, "split": e.split, "etag": e.etag} for e in sorted(entries, key=lambda e: e.path)]
    return {
        "format": "retrain.manifest/v1",
        "classes": list(run.classes),
        "images": images,
        "sha256": run.manifest_sha256,
        "run_id": run.run_id,
    }


# ----------------------------------------------------------------------------------------------
# handlers


def _image_row(ctx: Context, model: str, path: str, etag: str, size: int, source: str, occurred_at: dt.datetime | None) -> ImageRow:
    cfg = ctx.config.model(model)
    return ImageRow(
        model=model, path=path, etag=etag, label=label_of(path), split=stable_split(path, cfg.val_fraction), size=size,
        occurred_at=occurred_at, first_seen_at=ctx.now, source=source,
    )  # fmt: skip


def handle_image_uploaded(ctx: Context, tx: Tx, msg: ImageUploaded) -> Effects:
    added = tx.add_image(_image_row(ctx, msg.model, msg.path, msg.etag, msg.size, msg.source, msg.occurred_at))
    if added != "new":
        return Effects(
            outcome=added,
            detail=f"{msg.path} ({msg.etag}) is {'already known' if added == 'duplicate' else 'older than the known version'}",
        )
    _, run = evaluate(ctx, tx, msg.model, msg.message_id)
    return Effects(planned_runs=[run.run_id] if run else [], detail=f"registered {msg.path}")


def handle_retrain_requested(ctx: Context, tx: Tx, msg: RetrainRequested) -> Effects:
    registered, missing, invalid = 0, [], []
    blobs = ctx.blobs.get(msg.model)
    refs: list[tuple[str, str | None]] = [(r.path, r.etag) for r in msg.images]
    if msg.prefix is not None:
        if blobs is None:
            raise RuntimeError(f"no blob store configured for model {msg.model}")
        for blob in blobs.list(msg.prefix):
            try:  # a listing holds whatever was uploaded: the same rules as an upload event
                refs.append((check_blob_path(blob.path), blob.etag))
            except ValueError:
                invalid.append(blob.path)
    for path, etag in refs:
        size = 0
        if etag is None:
            info = blobs.info(path) if blobs else None
            if info is None:
                missing.append(path)
                continue
            etag, size = info.etag, info.size
        if tx.add_image(_image_row(ctx, msg.model, path, etag, size, "backfill", None)) == "new":
            registered += 1
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
    detail = f"registered {registered} images" + (f"; {len(missing)} not found (e.g. {missing[0]})" if missing else "")
    if invalid:
        detail += f"; {len(invalid)} skipped: not <label>/<file> images (e.g. {invalid[0].encode('unicode_escape').decode()[:120]})"
    if missing:
        tx.record_decision(
            DecisionRow(
                model=msg.model,
                at=ctx.now,
                outcome="reject",
                reason=f"request {msg.message_id}: {len(missing)} listed images do not exist, e.g. {missing[0]!r}",
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
            run.state, run.submitted_at = "submitted", run.submitted_at or ctx.now
            tx.update_run(run)
    elif msg.status == "running":
        if run.state != "running":
            run.state, run.started_at = "running", run.started_at or ctx.now
            tx.update_run(run)
    elif msg.status == "succeeded":
        run_succeeded(ctx, tx, run)
        effects.completed_runs.append(run.run_id)
    else:
        effects.planned_runs += run_failed(ctx, tx, run, msg.status, msg.detail, msg.message_id)
    return effects


def run_succeeded(ctx: Context, tx: Tx, run: RunRow) -> None:
    """The run's images are trained; completion (gate, registry) finalizes it."""
    tx.set_image_state(run.model, [(i.path, i.etag) for i in tx.images_in_run(run.run_id)], "trained", None)
    run.state, run.outcome, run.finished_at = "succeeded", "succeeded", ctx.now
    run.started_at = run.started_at or ctx.now
    tx.update_run(run)
    head = tx.model_head(run.model)
    head.last_run_finished_at = ctx.now
    tx.save_model_head(head)


def run_failed(ctx: Context, tx: Tx, run: RunRow, status: str, detail: str, message_id: str | None) -> list[str]:
    cfg = ctx.config.model(run.model)
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
    returned = tx.images_in_run(run.run_id)
    tx.set_image_state(run.model, [(i.path, i.etag) for i in returned], "pending", None)
    run.state, run.outcome, run.finished_at, run.detail = "finalized", status, ctx.now, detail[:2000]
    tx.update_run(run)
    head = tx.model_head(run.model)
    head.last_run_finished_at = ctx.now
    tx.save_model_head(head)
    data = {
        "run_id": run.run_id,
        "model": run.model,
        "status": status,
        "attempts": run.attempt,
        "detail": detail[:2000],
        "images_returned_to_pending": len(returned),
    }
    queue_event(tx, ev.RUN_FAILED, f"runs/{run.run_id}", data, ctx.now)
    tx.record_decision(
        DecisionRow(
            model=run.model,
            at=ctx.now,
            outcome="failed",
            reason=f"run {run.run_id} {status} after {run.attempt} attempt(s); {len(returned)} images back to pending",
            run_id=run.run_id,
            message_id=message_id,
        )
    )
    return after_run(ctx, tx, run.model, message_id)


def after_run(ctx: Context, tx: Tx, model: str, message_id: str | None) -> list[str]:
    _, run = evaluate(ctx, tx, model, message_id)
    return [run.run_id] if run else []


def handle_tick(ctx: Context, tx: Tx, msg: Tick) -> Effects:
    """Re-evaluate every model; planned runs that are due are handed back for (re)submission."""
    effects = Effects()
    models = [msg.model] if msg.model else sorted(ctx.config.models)
    for model in models:
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
