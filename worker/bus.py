"""The message bus: one transaction per message, duplicates dropped, then the post-commit work.

`Worker.handle(message)` is what every entry point calls (the CLI loop, the Functions triggers):
claim the message id in the inbox, run its handler, commit, then submit any run the handler
planned. Lock contention between processes sharing the ledger is retried with jittered backoff
(the whole transaction, so nothing half-applied is retried). Handler errors propagate, so the
platform redelivers; the inbox makes the redelivery safe.
"""

from __future__ import annotations

import logging
import uuid

from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_random_exponential

from shared.messages import Message, RunStatusChanged, Tick
from worker.completion import Completer
from worker.config import RetrainConfig
from worker.crashpoints import crashpoint
from worker.handlers import HANDLERS, Context, Effects
from worker.ports import BlobStore, Clock, Publisher, TrainingBackend
from worker.sqlite_store import is_busy_error
from worker.store import ConcurrencyConflict, Store
from worker.submission import Submitter

log = logging.getLogger("retrain.worker")


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
    ):
        self.store, self.backend, self.config, self.clock = store, backend, config, clock
        self.submitter = submitter
        self.completer = completer
        self.blobs = blobs or {}
        self.publisher = publisher

    def handle(self, message: Message) -> Effects:
        effects = self._apply(message)
        for run_id in effects.completed_runs:
            effects.planned_runs += self.complete(run_id)
        if effects.planned_runs:
            crashpoint("after_plan")
        for run_id in dict.fromkeys(effects.planned_runs):
            self.submit(run_id)
        return effects

    def complete(self, run_id: str) -> list[str]:
        """Gate, export, register a succeeded run. A failure leaves it succeeded; the next tick retries."""
        if self.completer is None:
            return []
        try:
            return self.completer.complete(run_id)
        except Exception:
            log.exception("completing %s failed; it stays succeeded and the next tick retries", run_id)
            return []

    def _apply(self, message: Message) -> Effects:
        for attempt in Retrying(
            retry=retry_if_exception(lambda exc: is_busy_error(exc) or isinstance(exc, ConcurrencyConflict)),
            wait=wait_random_exponential(multiplier=0.005, max=0.25),
            stop=stop_after_attempt(40) | stop_after_delay(60),
            reraise=True,
        ):
            with attempt, self.store.transaction() as tx:
                now = self.clock.now()
                # Ticks are idempotent by nature and frequent; they are not worth an inbox row.
                if not isinstance(message, Tick) and not tx.claim_message(message.message_id, message.kind, message.model, now):
                    return Effects(outcome="duplicate", detail=f"{message.message_id} was already processed")
                effects = HANDLERS[type(message)](Context(self.config, now, self.blobs), tx, message)
                tx.commit()
                return effects
        raise AssertionError("unreachable")  # pragma: no cover

    def reject(self, message_id: str, model: str | None, reason: str, description: str, source: str) -> bool:
        """Record a message that can never be processed: a decision and `retrain.request.rejected`.

        Claimed in the inbox like any message, so a redelivered bad message is rejected once.
        """
        from shared import events as ev
        from worker.handlers import queue_event
        from worker.store import DecisionRow

        with self.store.transaction() as tx:
            now = self.clock.now()
            if not tx.claim_message(message_id, "rejected", model, now):
                return False
            data = {"request_id": message_id, "model": model, "reason": reason, "description": description[:2000], "source": source}
            queue_event(tx, ev.REQUEST_REJECTED, f"requests/{message_id}", data, now)
            if model in self.config.models:
                tx.record_decision(
                    DecisionRow(
                        model=model,
                        at=now,
                        outcome="reject",
                        reason=f"{source} message {message_id} rejected: {reason}: {description[:300]}",
                        message_id=message_id,
                    )
                )
            tx.commit()
        return True

    def remember_response(self, key: str, fingerprint: str, response: dict) -> tuple[str, dict] | None:
        """First use of an idempotency key stores the response; later uses get (fingerprint, response) back."""
        with self.store.transaction() as tx:
            previous = tx.remember_response(key, fingerprint, response, self.clock.now())
            tx.commit()
        return previous

    def submit(self, run_id: str) -> None:
        """Steps 2-4 of the protocol. A failure leaves the run planned; the next Tick retries it."""
        try:
            self.submitter.submit(run_id)
        except Exception:
            log.exception("submitting %s failed; it stays planned and the next tick retries", run_id)

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
        for run in active:
            status = self.backend.status(run.backend_run_id)
            state = status.state
            if state == "unknown":
                state, detail = "failed", "the backend has no record of this run"
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
        if self.completer is not None:
            for name in [model] if model else sorted(self.config.models):
                self.completer.sync_champion_alias(name)
        now = self.clock.now()
        return self.handle(Tick(message_id=f"tick-{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}", model=model, occurred_at=now))

    def relay(self, batch: int = 100) -> int:
        """Publish queued events (oldest first); returns how many were published."""
        if self.publisher is None:
            return 0
        published = 0
        while events := self.store.unpublished_events(batch):
            self.publisher.publish([e.payload for e in events])
            self.store.mark_published([e.event_id for e in events], self.clock.now())
            published += len(events)
            if len(events) < batch:
                break
        return published
