"""`retrain inject` handled here and now: the worker takes the request, and the answer says what it
will do (a run planned, queued behind the one in flight, waiting and why, or refused and why);
`--wait` follows the request's run to its end by ticking the worker."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared.messages import RetrainRequested
from worker.bus import Worker
from worker.effects import Effects
from worker.store import RunRow

TERMINAL = ("finalized", "failed", "canceled")


@dataclass
class Answer:
    """What to print, what to return as JSON, and the exit status."""

    lines: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0


def answer(message: RetrainRequested, effects: Effects) -> Answer:
    """The worker's response to a request, as a person reads it: registered images, then the verdict.
    Exit 1 when the request changes nothing: a forced run refused, or a backfill that found no image."""
    rid = message.message_id
    out = Answer(data={"request_id": rid, "model": message.model, "outcome": effects.outcome, "detail": effects.detail,
                       "planned_runs": effects.planned_runs})  # fmt: skip
    if effects.outcome in ("duplicate", "replayed"):
        out.lines.append(f"request {rid} was already handled: nothing done again")
        return out
    backfill = effects.backfill
    asked_images = message.prefix is not None or bool(message.images)
    if asked_images:
        out.lines.append(f"request {rid} for {message.model}: {effects.detail}")
    decision = effects.decision
    if decision is not None:
        out.data["decision"] = {
            "outcome": decision.outcome,
            "reason": decision.reason,
            "wake_at": decision.wake_at.isoformat() if decision.wake_at else None,
        }
        verdict = {
            "submit": "a run starts now",
            "coalesce": "queued: it runs after the run in flight",
            "wait": "the worker waits",
            "idle": "nothing to train",
            "drop": "refused",
        }.get(decision.outcome, decision.outcome)
        run = f" ({', '.join(effects.planned_runs)})" if effects.planned_runs else ""
        out.lines.append(f"{verdict}{run}: {decision.reason}")
    if message.force and decision is not None and decision.outcome == "drop":
        out.exit_code = 1
    elif asked_images and not message.force and backfill is not None and not backfill.refs:
        out.lines.append("nothing to backfill: no image was found")
        out.exit_code = 1
    return out


def request_run(worker: Worker, model: str, request_id: str) -> RunRow | None:
    """The run that carried out a forced request, once it has one."""
    with worker.store.read() as tx:
        for run in tx.runs(model, limit=50):
            if request_id in run.request_ids:
                return run
        refused = next((r for r in tx.all_requests(model) if r.request_id == request_id and r.state == "rejected"), None)
    if refused is not None:
        raise LookupError(f"request {request_id} was refused")
    return None


def wait_for_run(worker: Worker, model: str, request_id: str, timeout_s: float, echo: Callable[[str], None],
                 sleep: Callable[[float], None] = time.sleep) -> Answer:  # fmt: skip
    """Tick the worker (as `serve` does; another worker ticking the same ledger is fine) until the
    request's run ends; exit 0 when it was registered, 1 otherwise (with why), 124 on the timeout."""
    deadline = time.monotonic() + timeout_s
    shown: tuple[str, str] | None = None
    while True:
        try:
            run = request_run(worker, model, request_id)
        except LookupError as exc:
            return Answer([f"{exc}"], {"request_id": request_id, "state": "refused"}, 1)
        if run is not None and (run.run_id, run.state) != shown:
            shown = (run.run_id, run.state)
            echo(f"{dt.datetime.now(dt.UTC):%H:%M:%S} {run.run_id}: {run.state}" + (f" (attempt {run.attempt})" if run.attempt > 1 else ""))
        if run is not None and run.state in TERMINAL:
            ended = run.outcome or run.state
            data = {"request_id": request_id, "run_id": run.run_id, "state": run.state, "outcome": ended, "detail": run.detail}
            return Answer([f"{run.run_id} {ended}: {run.detail}"], data, 0 if ended == "registered" else 1)
        if time.monotonic() >= deadline:
            where = f"{run.run_id} is {run.state}" if run else "no run has started for it yet"
            return Answer([f"still waiting after {timeout_s:g} s: {where} (`retrain runs` follows it)"], {"request_id": request_id}, 124)
        worker.tick()
        worker.relay()  # the events of its end go out as `serve` would send them
        sleep(worker.config.worker.tick_seconds)
