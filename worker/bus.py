"""The message bus: one transaction per message, duplicates dropped, then the post-commit work.

`Worker.handle(message)` is what every entry point calls (the CLI loop, the Functions triggers):
claim the message id in the inbox, run its handler, commit, then submit any run the handler
planned. Lock contention between processes sharing the ledger is retried with jittered backoff
(the whole transaction, so nothing half-applied is retried). Handler errors propagate, so the
platform redelivers; the inbox makes the redelivery safe.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from shared import events as ev
from shared.messages import ImageUploaded, Message, RetrainRequested, RunStatusChanged, Tick, safe_message_id
from shared.redact import printable, redact
from worker import telemetry
from worker.backfill import Backfill, resolve_backfill
from worker.completion import Completer
from worker.config import RetrainConfig
from worker.context import Context
from worker.crashpoints import crashpoint
from worker.handlers import HANDLERS, Effects, image_row
from worker.outbox import queue_event
from worker.ports import BlobStore, Clock, Publisher, TrainingBackend
from worker.runs import NOT_SUBMITTED_YET, evaluate, run_failed
from worker.store import ConcurrencyConflict, Store, Tx, clipped, retry_lost_races
from worker.submission import Submitter

log = logging.getLogger("retrain.worker")
AUDITED_EVENTS = frozenset({ev.MODEL_PROMOTED, ev.MODEL_PAUSED, ev.MODEL_RESUMED})
T = TypeVar("T")
COMPLETION_ATTEMPTS = 5  # completions of one run that raised before the run is failed for good
DRAIN_ROUNDS = 1000  # folds per model and tick (about 28 images each)
EVALUATION_ATTEMPTS = 1  # an image's evaluation on a staged-ingest ledger is best effort (the tick catches up)


@dataclass(frozen=True)
class Remember:
    """An idempotency key with the request's fingerprint and the response to replay."""

    key: str
    fingerprint: str
    response: dict[str, Any]


class Worker:
    def __init__(
        self,
        store: Store,
        backend: TrainingBackend,
        config: RetrainConfig,
        clock: Clock,
        submitter: Submitter,
        blobs: dict[str, BlobStore] | None = None,
        publisher: Publisher | None = None,
        completer: Completer | None = None,
        manifests: BlobStore | None = None,
    ):
        self.store, self.backend, self.config, self.clock = store, backend, config, clock
        self.submitter = submitter
        self.completer = completer
        self.blobs = blobs or {}
        self.publisher = publisher
        self.manifests = manifests
        self._evaluated_at: dict[str, float] = {}  # model -> monotonic time of this instance's last evaluation
        # Held while a delivery of this instance evaluates: one evaluation at a time per instance, so
        # the evaluation load grows with instances, not with instances x models.
        self._evaluating = threading.Lock()

    def handle(self, message: Message, remember: Remember | None = None) -> Effects:
        """Apply one message. `remember` (an HTTP Idempotency-Key) is stored in the same transaction
        as the message's effect, so a request that failed is not "replayed" on retry."""
        with telemetry.span(f"retrain.receive {message.kind}", model=message.model or "", message_id=message.message_id) as span:
            effects = self._handle(message, remember)
            span.set_attribute("retrain.outcome", effects.outcome)
            return effects

    def _handle(self, message: Message, remember: Remember | None) -> Effects:
        if isinstance(message, Tick) and message.model is None:
            # One transaction per model: a commit never spans two models' partitions.
            combined = Effects()
            for model in sorted(self.config.models):
                part = self.handle(message.model_copy(update={"model": model, "message_id": f"{message.message_id}.{model}"}))
                combined.planned_runs += part.planned_runs
                combined.completed_runs += part.completed_runs
            return combined
        if isinstance(message, ImageUploaded) and self.store.staged_ingest:
            return self._after_commit(self._stage(message))  # (nothing to do after a duplicate or a plain staging)
        if isinstance(message, Tick) and message.model is not None and self.store.staged_ingest:  # (named: see above)
            self._drain(message.model)
        backfill = None
        if isinstance(message, RetrainRequested) and (message.images or message.prefix is not None):
            if remember is not None:  # a replayed (or conflicting) key is answered before any backfill work
                with self.store.transaction() as tx:  # not committed: a look, not a write
                    previous = tx.remember_response(message.model, remember.key, remember.fingerprint, remember.response, self.clock.now())
                if previous is not None:
                    return Effects(outcome="replayed", detail=json.dumps({"fingerprint": previous[0], "response": previous[1]}))
            backfill = self._register_backfill(message)
            if backfill is None:
                return Effects(outcome="duplicate", detail=f"{message.message_id} was already processed")
        return self._after_commit(self._apply(message, backfill, remember))  # (a duplicate or a replay has nothing to do)

    def _after_commit(self, effects: Effects) -> Effects:
        for model in effects.champion_moved:  # the registry's alias follows the ledger (as after a completion)
            if self.completer is not None:
                self.completer.sync_champion_alias(model)
        for run_id in effects.cancel_runs:
            log.info("%s", self.cancel(run_id))
        for run_id in effects.completed_runs:
            effects.planned_runs += self.complete(run_id)
        if effects.planned_runs:
            crashpoint("after_plan")
        for run_id in dict.fromkeys(effects.planned_runs):
            self.submit(run_id)
        return effects

    def complete(self, run_id: str) -> list[str]:
        """Gate, export, register a succeeded run. A failure leaves it succeeded and the next tick
        retries, up to COMPLETION_ATTEMPTS; then the run fails with the reason and its images are
        pending again (a run whose outputs can never be completed must not block its model)."""
        if self.completer is None:
            return []
        try:
            return self.completer.complete(run_id)
        except Exception as exc:
            log.exception("completing %s failed; it stays succeeded and the next tick retries", run_id)
            return self._completion_failed(run_id, f"completion failed: {exc.__class__.__name__}: {redact(exc)}")

    def _completion_failed(self, run_id: str, reason: str) -> list[str]:
        def step(ctx: Context, tx: Tx) -> list[str]:
            run = tx.get_run(run_id)
            if run is None or run.state != "succeeded":
                return []
            run.completion_failures += 1
            if run.completion_failures < COMPLETION_ATTEMPTS:
                run.detail = clipped(reason)
                tx.update_run(run)
                return []
            return run_failed(ctx, tx, run, "completion_failed", f"{reason} ({run.completion_failures} attempts)", None)

        return self._transaction(step)

    def _transaction(self, step: Callable[[Context, Tx], T], attempts: int = 40) -> T:
        """Run `step` in a transaction, retried on lock contention or a lost optimistic race."""
        for attempt in retry_lost_races(attempts):
            with attempt, self.store.transaction() as tx:
                result = step(self._context(), tx)
                tx.commit()
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _context(self) -> Context:
        return Context(self.config, self.clock.now(), self.blobs, manifests=self.manifests)

    def _stage(self, message: ImageUploaded) -> Effects:
        """Scale-out ingest: one idempotent write per image, then the policy at most every
        `worker.evaluate_interval` per model in this instance (the tick evaluates too). The
        evaluation is best effort: if other instances keep winning the head, the image is safely
        staged and the next evaluation (theirs or the tick's) folds it in."""
        ctx = self._context()
        row = image_row(ctx, message.model, message.path, message.etag, message.size, message.source, message.occurred_at)
        if self.store.stage_image(row) == "duplicate":
            return Effects(outcome="duplicate", detail=f"{message.path} ({message.etag}) is already known")
        staged = Effects(outcome="staged", detail=f"staged {message.path}")
        lock = self._evaluating
        if not lock.acquire(blocking=False):  # another delivery in this instance is evaluating now
            return staged
        try:
            now = time.monotonic()
            if now - self._evaluated_at.get(message.model, float("-inf")) < self.config.worker.evaluate_interval:
                return staged
            self._evaluated_at[message.model] = now

            def step(ctx: Context, tx: Tx) -> Effects:
                _, run = evaluate(ctx, tx, message.model, message.message_id)
                return Effects(planned_runs=[run.run_id] if run else [], detail=f"staged {message.path} and evaluated")

            try:
                return self._transaction(step, attempts=EVALUATION_ATTEMPTS)
            except ConcurrencyConflict:
                # Another instance committed an evaluation meanwhile; ours is not needed for safety,
                # and the next one (or the tick's) folds this image in.
                return staged
        finally:
            lock.release()

    def _drain(self, model: str) -> None:
        """Fold the model's staged arrivals (a tick's first step on a staged-ingest ledger), a batch
        per commit. (A tick for every model reaches here once per model: see `_handle`.)"""
        for _ in range(DRAIN_ROUNDS):  # bounded: arrivals that keep coming wait for the next tick
            if not self._transaction(partial(_fold, model=model)):
                break

    def _register_backfill(self, message: RetrainRequested) -> Backfill | None:
        """Register a request's images chunk by chunk, each chunk its own (idempotent) transaction.

        None when the request was already processed. A crash part-way leaves some chunks
        registered; the redelivery registers them again as duplicates and finishes the rest.
        """
        with self.store.transaction() as tx:
            if tx.claim_message(message.message_id, message.kind, message.model, self.clock.now()) is False:
                return None  # (read-only here: the claim is not committed)
        ctx = self._context()
        backfill = resolve_backfill(self.blobs.get(message.model), message)
        rows = [image_row(ctx, message.model, path, etag, size, "backfill", None) for path, etag, size in backfill.refs]
        backfill.registered = self.store.stage_images(rows)  # in bounded, idempotent chunks
        if self.store.staged_ingest:
            self._drain(message.model)  # fold them now, so the request's evaluation sees them
        return backfill

    def _apply(self, message: Message, backfill: Backfill | None = None, remember: Remember | None = None) -> Effects:
        def step(ctx: Context, tx: Tx) -> Effects:
            ctx.backfill = backfill
            if remember is not None:
                assert message.model is not None, "idempotency keys come with requests, which name their model"
                previous = tx.remember_response(message.model, remember.key, remember.fingerprint, remember.response, ctx.now)
                if previous is not None:
                    return Effects(outcome="replayed", detail=json.dumps({"fingerprint": previous[0], "response": previous[1]}))
            # Ticks are idempotent by nature and frequent; an image version is its own key (model, path,
            # etag), so a redelivered image is a duplicate without an inbox row. Neither needs one.
            if not isinstance(message, Tick | ImageUploaded) and not tx.claim_message(
                message.message_id, message.kind, message.model, ctx.now
            ):
                return Effects(outcome="duplicate", detail=f"{message.message_id} was already processed")
            return HANDLERS[type(message)](ctx, tx, message)

        return self._transaction(step)

    def reject(self, message_id: str, model: str | None, reason: str, description: str, source: str) -> bool:
        """Record a message that can never be processed: a decision and `retrain.request.rejected`.

        Claimed in the inbox like any message, so a redelivered bad message is rejected once. The
        ids come from outside: a model that is not configured is recorded under no model (it never
        names a partition or a file), and an id that does not fit the id pattern is replaced by its
        digest.
        """
        known = model if model in self.config.models else None
        message_id = safe_message_id(message_id)
        description = clipped(redact(description))

        def step(ctx: Context, tx: Tx) -> bool:
            if not tx.claim_message(message_id, "rejected", known, ctx.now):
                return False
            data = {"request_id": message_id, "model": known, "reason": reason, "description": description, "source": source}
            if model is not None and known is None:
                data["given_model"] = printable(model)[:100]
            queue_event(tx, ev.REQUEST_REJECTED, f"requests/{message_id}", data, ctx.now)
            if known is not None:
                reason_text = f"{source} message {message_id} rejected: {reason}: {description[:300]}"
                tx.decided(known, ctx.now, "reject", reason_text, message_id=message_id)
            return True

        return self._transaction(step)

    def submit(self, run_id: str) -> None:
        """Steps 2-4 of the protocol. A failure leaves the run planned; the next Tick retries it."""
        try:
            self.submitter.submit(run_id)
        except Exception as exc:
            log.exception("submitting %s failed; it stays planned and the next tick retries", run_id)
            self._note_submit_failure(run_id, f"{exc.__class__.__name__}: {exc}")

    def _note_submit_failure(self, run_id: str, error: str) -> None:
        """Say on the run why it is still planned (`retrain runs`, the status view), best effort."""
        text = clipped(f"{NOT_SUBMITTED_YET}{redact(error)}")
        try:
            with self.store.transaction() as tx:
                run = tx.get_run(run_id)
                if run is None or run.state != "planned" or run.detail == text:
                    return
                run.detail = text
                tx.update_run(run)
                tx.commit()
        except Exception:  # the ledger may be what failed; the log has the error
            log.warning("could not record why %s is not submitted", run_id)

    def cancel(self, run_id: str) -> str:
        """Ask the backend to stop the run's current attempt; the next poll records the outcome.

        A planned run that never reached the backend is finalized here directly.
        """
        with self.store.transaction() as tx:
            run = tx.get_run(run_id)
            if run is None:
                raise KeyError(f"no run {run_id!r}")
            if not run.in_flight:
                return f"{run_id} is not in flight ({run.state})"
        status = self.backend.cancel(run.backend_run_id)
        if status.state == "unknown" and run.state == "planned":
            message = RunStatusChanged(
                message_id=f"cancel-{run.backend_run_id}",
                model=run.model,
                backend_run_id=run.backend_run_id,
                status="canceled",
                detail="canceled before submission",
            )
            self.handle(message)
        else:
            self.poll()
        return f"{run_id}: cancel requested (backend says {status.state})"

    def poll(self) -> list[Effects]:
        """Ask the backend about every submitted or running run; apply what changed (lost events)."""
        with self.store.transaction() as tx:
            active = tx.runs(states=frozenset({"submitted", "running"}))
        results = []
        now = self.clock.now()
        for run in active:
            try:
                status = self.backend.status(run.backend_run_id)
            except Exception as exc:  # the backend unreachable: this run waits, the rest of the tick goes on
                log.warning(
                    "could not read the status of %s (%s: %s); the next tick asks again", run.backend_run_id, type(exc).__name__, exc
                )
                continue
            state = status.state
            timeout = self.config.model(run.model).run_timeout
            since = run.submitted_at or run.created_at
            if state == "unknown":
                state, detail = "failed", "the backend has no record of this run"
            elif not status.terminal and (now - since).total_seconds() > timeout:
                # A run that never ends would hold its model forever: cancel it and count it failed.
                self.backend.cancel(run.backend_run_id)
                state, detail = "failed", f"timed out: still {status.state} {timeout:.0f}s after submission (run_timeout); canceled"
            else:
                detail = status.detail
            if (state, run.state) in {("queued", "submitted"), ("running", "running")}:
                continue
            message = RunStatusChanged(
                message_id=f"poll-{run.backend_run_id}-{state}",
                model=run.model,
                backend_run_id=run.backend_run_id,
                status=state,
                detail=detail[:4000],
            )
            results.append(self.handle(message))
        return results

    def tick(self, model: str | None = None) -> Effects:
        self.poll()
        self.prune_inbox()
        self.prune_outbox()
        if self.completer is not None:
            for name in [model] if model else sorted(self.config.models):
                try:
                    self.completer.sync_champion_alias(name)
                except Exception as exc:  # a registry out of reach must not stop the tick: the ledger is the truth
                    log.warning(
                        "could not check %s's champion tag in the registry (%s: %s); the next tick does", name, type(exc).__name__, exc
                    )
        now = self.clock.now()
        return self.handle(Tick(message_id=f"tick-{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}", model=model, occurred_at=now))

    def prune_inbox(self) -> int:
        """Forget processed message ids older than `worker.inbox_retention` (longer than any redelivery)."""
        before = self.clock.now() - dt.timedelta(seconds=self.config.worker.inbox_retention)
        return sum(self.store.prune_inbox(model, before) for model in [None, *sorted(self.config.models)])

    def prune_outbox(self) -> int:
        """Forget events published longer ago than `worker.inbox_retention` (the outbox would
        otherwise grow for ever); the operators' controls are kept: they are the audit trail."""
        before = self.clock.now() - dt.timedelta(seconds=self.config.worker.inbox_retention)
        return self.store.prune_outbox(before, keep=AUDITED_EVENTS)

    def relay(self, batch: int = 100) -> int:
        """Publish queued events (oldest first); returns how many were published."""
        if self.publisher is None:
            return 0
        published = 0
        while events := self.store.unpublished_events(batch):
            with telemetry.span("retrain.publish.batch", events=len(events)):
                self.publisher.publish([e.payload for e in events])
            self.store.mark_published([e.event_id for e in events], self.clock.now())
            for event in events:  # where each event's own trace ends
                telemetry.mark("retrain.publish", event.payload.get("traceparent"), event_type=event.type, event_id=event.event_id)
            published += len(events)
            if len(events) < batch:
                break
        return published


def _fold(ctx: Context, tx: Tx, model: str) -> int:
    return tx.fold(model)
