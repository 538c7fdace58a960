"""Time passes: every minute a Tick (quiet periods, max waits, polling, repairs) and the outbox relay."""

from __future__ import annotations

import logging

import azure.functions as func

from functions import runtime

bp = func.Blueprint()
log = logging.getLogger("retrain.functions.timer")


@bp.function_name("tick")
@bp.timer_trigger(arg_name="timer", schedule="0 */1 * * * *", run_on_startup=False, use_monitor=True)
def tick(timer: func.TimerRequest) -> None:
    worker = runtime.worker()
    effects = worker.tick()
    published = worker.relay()
    log.info(
        "tick%s: planned %s, published %d events", " (past due)" if timer.past_due else "", effects.planned_runs or "nothing", published
    )
