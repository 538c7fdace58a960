"""Ingest, the bus's first half: staging an upload on a scale-out ledger (one write per image, the
policy at most every `evaluate_interval`), folding what was staged, and registering a request's
images chunk by chunk before the request's own transaction."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from shared.messages import ImageUploaded, RetrainRequested
from worker.backfill import Backfill, resolve_backfill
from worker.config import RetrainConfig
from worker.context import Context
from worker.effects import Effects
from worker.handlers import image_row
from worker.ports import BlobStore, Clock
from worker.runs import evaluate
from worker.store import ConcurrencyConflict, Store, Tx

T = TypeVar("T")
DRAIN_ROUNDS = 1000  # folds per model and tick (about 28 images each)
EVALUATION_ATTEMPTS = 1  # an image's evaluation on a staged-ingest ledger is best effort (the tick catches up)


class Ingest:
    """Mixed into the Worker (worker.bus), whose state and transactions it uses."""

    store: Store
    config: RetrainConfig
    clock: Clock
    blobs: dict[str, BlobStore]
    _evaluated_at: dict[str, float]
    _evaluating: threading.Lock

    if TYPE_CHECKING:

        def _transaction(self, step: Callable[[Context, Tx], T], attempts: int = 40) -> T: ...

        def _context(self) -> Context: ...

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


def _fold(ctx: Context, tx: Tx, model: str) -> int:
    return tx.fold(model)
