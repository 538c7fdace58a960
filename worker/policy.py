"""The retrain policy: a pure function of (ledger snapshot, now, model config) -> decision.

It never touches storage or the clock; the handlers build the snapshot, call `decide`, and carry
out (and record) what it says. Reasons are written for the person running `retrain explain`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal, TypeVar

from worker.config import ModelConfig
from worker.store import DataStats, ModelHead, PendingStats, RequestRow, RunRow

R = TypeVar("R")

Outcome = Literal["submit", "wait", "coalesce", "drop", "idle"]


@dataclass(frozen=True)
class Snapshot:
    pending: PendingStats
    data: DataStats
    head: ModelHead
    in_flight: RunRow | None = None
    force_request: RequestRow | None = None  # the oldest open forced request, if any
    gpu_hours_24h: float = 0.0  # what the model's runs used in the last 24 h (a run in flight: so far)
    budget_frees_at: dt.datetime | None = None  # when that drops below max_gpu_hours_per_day, if no run starts


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str
    wake_at: dt.datetime | None = None  # when waiting may end without a new event
    forced: bool = False


def _hms(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%H:%M:%S UTC")


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


DAY = dt.timedelta(hours=24)


def gpu_usage(
    intervals: list[tuple[dt.datetime, dt.datetime | None]], now: dt.datetime, gpus: int, budget: float | None
) -> tuple[float, dt.datetime | None]:
    """(GPU-hours used in the 24 h before `now`, when that falls below `budget` if no run starts).

    `intervals` are runs' (start, end); end None for a run still going (it counts up to `now`, and
    while it goes the budget has no known time to free up)."""

    def used(at: dt.datetime) -> float:
        window = at - DAY
        seconds = sum(max(0.0, (min(end or at, at) - max(start, window)).total_seconds()) for start, end in intervals)
        return seconds * gpus / 3600

    hours = used(now)
    if budget is None or hours < budget or any(end is None for _, end in intervals):
        return hours, None
    lo, hi = now, now + DAY  # used() only falls as the window slides past finished runs
    for _ in range(40):
        mid = lo + (hi - lo) / 2
        lo, hi = (mid, hi) if used(mid) >= budget else (lo, mid)
    return hours, hi


def weighed_request(first_overriding: R | None, first_forced: R | None) -> R | None:
    """The forced request the policy weighs: an explicit budget override among the open forced
    requests comes first, else the oldest forced one."""
    return first_overriding or first_forced


def note_success(head: ModelHead, watermark: int, at: dt.datetime) -> None:
    """A run succeeded: its images are trained, and failures in a row start again from zero."""
    head.trained_watermark = max(head.trained_watermark, watermark)
    head.last_run_finished_at = at
    head.failed_runs, head.backoff_until = 0, None


def note_failure(head: ModelHead, cfg: ModelConfig, at: dt.datetime, counted: bool = True) -> None:
    """A run ended without training anything. A counted failure (not an operator's cancel) may start
    the model's back-off: `failure_backoff`, doubling with each further one, at most `failure_backoff_max`."""
    head.last_run_finished_at = at
    if not counted:
        return
    head.failed_runs += 1
    if head.failed_runs >= cfg.backoff_after_failed_runs:
        exponent = head.failed_runs - cfg.backoff_after_failed_runs
        head.backoff_until = at + dt.timedelta(seconds=min(cfg.failure_backoff * 2**exponent, cfg.failure_backoff_max))


def data_shortfall(snapshot: Snapshot, cfg: ModelConfig) -> str | None:
    """Why the data cannot make a useful run yet (train.py would refuse it), or None."""
    per_class = dict(snapshot.data.train_per_class)
    if cfg.training_data == "new":
        per_class = dict(snapshot.pending.per_class)
    if len(per_class) < cfg.min_classes:
        have = ", ".join(sorted(per_class)) or "none"
        return f"waiting for data: {len(per_class)}/{cfg.min_classes} classes have images ({have})"
    short = sorted((n, c) for c, n in per_class.items() if n < cfg.min_per_class)
    if short:
        n, c = short[0]
        more = f" (and {len(short) - 1} more classes)" if len(short) > 1 else ""
        return f"waiting for data: class {c!r} has {n}/{cfg.min_per_class} training images{more}"
    if snapshot.data.val_count < 1 and cfg.training_data == "all":
        return "waiting for data: no image falls in the validation split yet"
    return None


def held_back(snapshot: Snapshot, now: dt.datetime, cfg: ModelConfig, forced: bool, count_met: bool) -> Decision | None:
    """What keeps a run from starting though nothing is in flight: too little data, the GPU budget,
    the failure back-off, the cooldown (the last three only while there is something to train)."""
    pending, head = snapshot.pending, snapshot.head
    shortfall = data_shortfall(snapshot, cfg)
    if shortfall:
        count = "" if forced or count_met else f"waiting: {pending.count}/{cfg.min_new_images} new images; "
        return Decision("wait", count + shortfall + (" (a forced request is waiting too)" if forced else ""))

    budget = cfg.max_gpu_hours_per_day
    if budget is not None and snapshot.gpu_hours_24h >= budget and (pending.count > 0 or head.followup_wanted or forced):
        override = forced and snapshot.force_request is not None and snapshot.force_request.override_budget
        if not override:
            frees = f"; it frees up at {_hms(snapshot.budget_frees_at)}" if snapshot.budget_frees_at else ""
            waiting = " (a forced request is waiting too; override_budget runs it now)" if forced else ""
            return Decision(
                "wait",
                f"GPU budget: {snapshot.gpu_hours_24h:.1f} of {budget:g} GPU-hours used in the last 24 h{frees}{waiting}",
                wake_at=snapshot.budget_frees_at,
            )

    if not forced and head.backoff_until is not None and now < head.backoff_until and (pending.count > 0 or head.followup_wanted):
        return Decision(
            "wait",
            f"backing off: {head.failed_runs} runs failed in a row; no new run before {_hms(head.backoff_until)} "
            "(a success or a forced request ends it)",
            wake_at=head.backoff_until,
        )

    if not forced and head.last_run_finished_at is not None:
        cooldown_ends = head.last_run_finished_at + dt.timedelta(seconds=cfg.cooldown)
        if now < cooldown_ends and (pending.count > 0 or head.followup_wanted):
            return Decision("wait", f"cooldown after the last run until {_hms(cooldown_ends)}", wake_at=cooldown_ends)
    return None


def decide(snapshot: Snapshot, now: dt.datetime, cfg: ModelConfig) -> Decision:
    pending, head = snapshot.pending, snapshot.head
    forced = snapshot.force_request is not None
    oldest_age = (now - pending.oldest_at).total_seconds() if pending.oldest_at else 0.0
    count_met = pending.count >= cfg.min_new_images
    max_wait_met = cfg.max_wait is not None and pending.count > 0 and oldest_age >= cfg.max_wait

    if head.paused is not None:  # an operator's stop outranks every trigger; a run in flight goes on
        who = f"paused by {head.paused.get('by') or 'unknown'} at {head.paused.get('at', '?')[:19].replace('T', ' ')} UTC"
        why = f": {head.paused['reason']}" if head.paused.get("reason") else ""
        if forced:
            return Decision("drop", f"{who}{why}; forced requests are refused while paused (resume first)", forced=True)
        return Decision("wait", f"{who}{why}; {pending.count} new images are counted, no run starts until resumed")

    if snapshot.in_flight is not None:
        run = snapshot.in_flight
        triggered = forced or count_met or max_wait_met or head.followup_wanted
        if not triggered:
            return Decision("wait", f"run {run.run_id} in flight ({run.state}); {pending.count} new images will wait for it")
        if cfg.in_flight == "drop":
            return Decision("drop", f"run {run.run_id} in flight: the trigger is dropped (in_flight = drop)", forced=forced)
        what = "a forced request" if forced else f"{pending.count} new images"
        mode = "queued behind it" if cfg.in_flight == "queue" else "coalescing into one follow-up run"
        return Decision("coalesce", f"run {run.run_id} in flight ({run.state}): {what}, {mode}", forced=forced)

    held = held_back(snapshot, now, cfg, forced, count_met)
    if held is not None:
        return held

    if forced:
        request = snapshot.force_request
        assert request is not None
        return Decision(
            "submit",
            f"forced by request {request.request_id} ({request.requested_by or 'unknown'}): {pending.count} new images",
            forced=True,
        )
    if pending.count == 0:
        return Decision("idle", "no new images")
    if head.followup_wanted:
        return Decision("submit", f"coalesced follow-up: {pending.count} new images arrived during the last run")
    if max_wait_met:
        return Decision(
            "submit", f"the oldest of {pending.count} new images has waited {_span(oldest_age)} (max_wait {_span(cfg.max_wait or 0)})"
        )
    wake_at = pending.oldest_at + dt.timedelta(seconds=cfg.max_wait) if (cfg.max_wait is not None and pending.oldest_at) else None
    if not count_met:
        suffix = f"; max_wait runs it at {_hms(wake_at)}" if wake_at else ""
        return Decision("wait", f"waiting: {pending.count}/{cfg.min_new_images} new images{suffix}", wake_at=wake_at)
    quiet_for = (now - pending.newest_at).total_seconds() if pending.newest_at else cfg.quiet_period
    if quiet_for < cfg.quiet_period:
        quiet_ends = now + dt.timedelta(seconds=cfg.quiet_period - quiet_for)
        return Decision(
            "wait",
            f"quiet period: {pending.count} new images, the last {_span(quiet_for)} ago; waiting until {_hms(quiet_ends)}",
            wake_at=min(quiet_ends, wake_at) if wake_at else quiet_ends,
        )
    return Decision("submit", f"{pending.count}/{cfg.min_new_images} new images and quiet for {_span(quiet_for)}")
