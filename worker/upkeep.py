"""Upkeep, the bus's other half: what the worker does on its own schedule rather than on a message:
poll the backend for runs whose events were lost, tick (poll, prune, keep the champion's tag, run
the policy), forget old message ids and published events, and relay the outbox to the publisher."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import TYPE_CHECKING

from shared import events as ev
from shared.messages import Message, RunStatusChanged, Tick
from worker import telemetry
from worker.completion import Completer
from worker.config import RetrainConfig
from worker.effects import Effects, Remember
from worker.ports import Clock, Publisher, TrainingBackend
from worker.store import Store

log = logging.getLogger("retrain.worker")


class Upkeep:
    """Mixed into the Worker (worker.bus), whose state and `handle` it uses."""

    store: Store
    config: RetrainConfig
    clock: Clock
    backend: TrainingBackend
    completer: Completer | None
    publisher: Publisher | None

    if TYPE_CHECKING:

        def handle(self, message: Message, remember: Remember | None = None) -> Effects: ...

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
        return self.store.prune_outbox(before, keep=ev.CONTROL_EVENTS)

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
