"""Message handlers: each turns one message into state changes inside one transaction.

Handlers are plain functions `handler(ctx, tx, message) -> Effects`. They never call the
training backend: a run they plan is recorded as `planned` in the same transaction, and the bus
submits it after the commit (the submit protocol in `worker.submission`). A crash in between
leaves a planned run that the next Tick submits. What happens to a run lives in `worker.runs`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from shared import events as ev
from shared.manifest_hash import stable_split
from shared.messages import ImageUploaded, ModelControl, RetrainRequested, RunStatusChanged, Tick, label_of
from shared.redact import printable
from shared.run_ids import parse_backend_run_id
from worker.backfill import Backfill
from worker.champion import crown, roll_back
from worker.context import Context
from worker.effects import Effects
from worker.outbox import queue_event
from worker.runs import evaluate, mark_submitted, queue_submitted_event, run_failed, run_succeeded
from worker.store import IN_FLIGHT_STATES, ImageRow, ModelHead, RequestRow, Tx

DECISIONS_KEPT = 2000


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
                override_budget=msg.override_budget,
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
    if msg.prefix is not None and not (backfill.refs or missing or invalid):
        detail += f"; the prefix {printable(msg.prefix)[:200]!r} matches no image"
    elif backfill.refs and not backfill.registered:
        detail += f" (all {len(backfill.refs)} were already registered)"
    if missing:
        reason = f"request {msg.message_id}: {len(missing)} listed images do not exist, e.g. {printable(missing[0])[:200]!r}"
        tx.decided(msg.model, ctx.now, "reject", reason, message_id=msg.message_id)
    decision, run = evaluate(ctx, tx, msg.model, msg.message_id)
    return Effects(planned_runs=[run.run_id] if run else [], detail=detail, decision=decision, backfill=ctx.backfill)


def handle_run_status_changed(ctx: Context, tx: Tx, msg: RunStatusChanged) -> Effects:
    parsed = parse_backend_run_id(msg.backend_run_id)
    run = tx.get_run(parsed.run_id) if parsed else None
    if parsed is None or run is None or run.model != msg.model:
        return Effects(outcome="ignored", detail=f"unknown run {msg.backend_run_id}")
    if parsed.attempt != run.attempt or run.state not in ("planned", "submitted", "running"):
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


def handle_model_control(ctx: Context, tx: Tx, msg: ModelControl) -> Effects:
    """Promote, roll back, pause or resume: recorded with who asked and why, announced, and (for the
    champion) the same head the completion's compare-and-swap reads, so a completion that started
    against the old champion gates again against the new one."""
    head = tx.model_head(msg.model)
    who = f"{msg.requested_by}" + (f" ({msg.reason})" if msg.reason else "")
    base = {"model": msg.model, "requested_by": msg.requested_by, "reason": msg.reason, "request_id": msg.message_id}
    if msg.action in ("promote", "rollback"):
        return _move_champion(ctx, tx, msg, head, who, base)
    if msg.action == "pause":
        if head.paused is not None:
            return Effects(outcome="unchanged", detail=f"{msg.model} is already paused")
        head.paused = {"by": msg.requested_by, "reason": msg.reason, "at": ctx.now.isoformat()}
        tx.save_model_head(head)
        in_flight = next(iter(tx.runs(msg.model, IN_FLIGHT_STATES, limit=1)), None)
        cancel = [in_flight.run_id] if msg.cancel and in_flight is not None else []
        queue_event(tx, ev.MODEL_PAUSED, f"models/{msg.model}", {**base, "canceled_runs": cancel}, ctx.now, discriminator=msg.message_id)
        _record(ctx, tx, msg, "paused", f"paused by {who}" + (f"; canceling {cancel[0]}" if cancel else ""))
        return Effects(outcome="paused", detail=f"{msg.model} paused", cancel_runs=cancel)
    if head.paused is None:
        return Effects(outcome="unchanged", detail=f"{msg.model} is not paused")
    head.paused = None
    tx.save_model_head(head)
    queue_event(tx, ev.MODEL_RESUMED, f"models/{msg.model}", base, ctx.now, discriminator=msg.message_id)
    _record(ctx, tx, msg, "resumed", f"resumed by {who}")
    _, run = evaluate(ctx, tx, msg.model, msg.message_id)
    return Effects(outcome="resumed", detail=f"{msg.model} resumed", planned_runs=[run.run_id] if run else [])


def _move_champion(ctx: Context, tx: Tx, msg: ModelControl, head: ModelHead, who: str, base: dict[str, Any]) -> Effects:
    versions = {v.version: v for v in tx.model_versions(msg.model)}
    if msg.action == "promote":
        target = msg.version
        refused = None if target in versions else f"v{target} is not a registered version of {msg.model}"
    else:
        earlier = [v for v in head.previous_champions if v in versions and v != head.champion_version]
        target = earlier[-1] if earlier else None
        refused = None if target is not None else f"{msg.model} has no earlier champion to roll back to"
    if refused is None and target is not None and not (versions[target].card.get("onnx") or {}).get("passed", True):
        refused = f"v{target} failed its ONNX parity check"
    if refused is not None or target is None:
        _record(ctx, tx, msg, "reject", f"{msg.action} by {who} refused: {refused}")
        return Effects(outcome="rejected", detail=refused or "")
    if target == head.champion_version:
        return Effects(outcome="unchanged", detail=f"v{target} is already the champion of {msg.model}")
    previous = head.champion_version
    model_sha256 = (versions[target].card.get("artifacts") or {}).get("model.pt", {}).get("sha256")
    (crown if msg.action == "promote" else roll_back)(head, target, model_sha256)
    tx.save_model_head(head)
    data = {**base, "action": msg.action, "version": target, "previous_version": previous}
    queue_event(tx, ev.MODEL_PROMOTED, f"models/{msg.model}/versions/{target}", data, ctx.now, discriminator=msg.message_id)
    verb = "promoted" if msg.action == "promote" else "rolled back"
    _record(ctx, tx, msg, msg.action, f"v{target} is champion ({verb} from v{previous} by {who})")
    return Effects(outcome=msg.action, detail=f"v{target} is the champion of {msg.model}", champion_moved=[msg.model])


def _record(ctx: Context, tx: Tx, msg: ModelControl, outcome: str, reason: str) -> None:
    tx.decided(msg.model, ctx.now, outcome, reason, message_id=msg.message_id)


HANDLERS: dict[type, Callable[[Context, Tx, Any], Effects]] = {
    ImageUploaded: handle_image_uploaded,
    ModelControl: handle_model_control,
    RetrainRequested: handle_retrain_requested,
    RunStatusChanged: handle_run_status_changed,
    Tick: handle_tick,
}
