"""The message bus: one transaction per message, duplicates dropped, then the post-commit work.

`Worker.handle(message)` is what every entry point calls (the CLI loop, the Functions triggers):
claim the message id in the inbox, run its handler, commit, then submit any run the handler
planned. Lock contention between processes sharing the ledger is retried with jittered backoff
(the whole transaction, so nothing half-applied is retried). Handler errors propagate, so the
platform redelivers; the inbox makes the redelivery safe.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from shared import events as ev
from shared.messages import ImageUploaded, Message, RetrainRequested, RunStatusChanged, Tick, safe_message_id
from shared.redact import printable, redact
from worker import telemetry
from worker.backfill import Backfill
from worker.completion import Completer
from worker.config import RetrainConfig
from worker.context import Context
from worker.crashpoints import crashpoint
from worker.effects import Effects, Remember
from worker.handlers import HANDLERS
from worker.ingest import Ingest
from worker.outbox import queue_event
from worker.ports import BlobStore, Clock, Publisher, TrainingBackend
from worker.runs import NOT_SUBMITTED_YET, run_failed
from worker.store import Store, Tx, clipped, retry_lost_races
from worker.submission import Submitter
from worker.upkeep import Upkeep

log = logging.getLogger("retrain.worker")
T = TypeVar("T")
COMPLETION_ATTEMPTS = 5  # completions of one run that raised before the run is failed for good


class Worker(Ingest, Upkeep):
    """The bus: `handle` routes each message by type to one transaction and the work after its
    commit; ingest (worker.ingest) and upkeep (worker.upkeep) are its other two halves."""

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
        """Route the message by its type; what every route ends with is one transaction (`_apply`)
        and the work after its commit."""
        if isinstance(message, Tick):
            return self._on_tick(message)
        if isinstance(message, ImageUploaded) and self.store.staged_ingest:
            return self._after_commit(self._stage(message))  # (nothing to do after a duplicate or a plain staging)
        if isinstance(message, RetrainRequested) and (message.images or message.prefix is not None):
            return self._on_backfill(message, remember)
        return self._after_commit(self._apply(message, None, remember))  # (a duplicate or a replay has nothing to do)

    def _on_tick(self, tick: Tick) -> Effects:
        if tick.model is None:
            # One transaction per model: a commit never spans two models' partitions.
            combined = Effects()
            for model in sorted(self.config.models):
                part = self.handle(tick.model_copy(update={"model": model, "message_id": f"{tick.message_id}.{model}"}))
                combined.planned_runs += part.planned_runs
                combined.completed_runs += part.completed_runs
            return combined
        if self.store.staged_ingest:
            self._drain(tick.model)
        return self._after_commit(self._apply(tick))

    def _on_backfill(self, message: RetrainRequested, remember: Remember | None) -> Effects:
        if remember is not None:  # a replayed (or conflicting) key is answered before any backfill work
            with self.store.transaction() as tx:  # not committed: a look, not a write
                previous = tx.remember_response(message.model, remember.key, remember.fingerprint, remember.response, self.clock.now())
            if previous is not None:
                return Effects.replayed(previous)
        backfill = self._register_backfill(message)
        if backfill is None:
            return Effects(outcome="duplicate", detail=f"{message.message_id} was already processed")
        return self._after_commit(self._apply(message, backfill, remember))

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

    def _apply(self, message: Message, backfill: Backfill | None = None, remember: Remember | None = None) -> Effects:
        def step(ctx: Context, tx: Tx) -> Effects:
            ctx.backfill = backfill
            if remember is not None:
                assert message.model is not None, "idempotency keys come with requests, which name their model"
                previous = tx.remember_response(message.model, remember.key, remember.fingerprint, remember.response, ctx.now)
                if previous is not None:
                    return Effects.replayed(previous)
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
