"""Run completion from Azure ML: an Event Grid trigger for RunCompleted and RunStatusChanged.

Payload keys arrive camelCase or PascalCase and statuses in any case. Events from other
workspaces (topic) and runs this worker did not start are acknowledged and ignored; duplicate and
out-of-order events have one effect (the ledger checks the attempt and the run's state).
"""

from __future__ import annotations

import logging

import azure.functions as func

from functions import runtime

bp = func.Blueprint()
log = logging.getLogger("retrain.functions.eventgrid")
RUN_EVENTS = {"microsoft.machinelearningservices.runcompleted": "Completed", "microsoft.machinelearningservices.runstatuschanged": None}


def _get(data: dict, *names: str):
    lowered = {k.lower(): v for k, v in data.items()} if isinstance(data, dict) else {}
    for name in names:
        if name.lower() in lowered:
            return lowered[name.lower()]
    return None


def event_message_id(event_id: str) -> str:
    """`eg-<event id>`, or its digest when the id holds characters a retrain id may not."""
    from shared.messages import safe_message_id

    return safe_message_id(event_id, prefix="eg-")


def status_message(event: func.EventGridEvent):
    """The RunStatusChanged for an event, or None with a reason to ignore it."""
    from shared.errors import InvalidMessage
    from shared.messages import RunStatusChanged, parse_as
    from shared.run_ids import parse_backend_run_id

    kind = (event.event_type or "").lower()
    if kind not in RUN_EVENTS:
        return None, f"event type {event.event_type!r} is not a run event"
    expected_topic = runtime.setting(runtime.AML_TOPIC_SETTING)
    if expected_topic and (event.topic or "").lower() != expected_topic.lower():
        return None, "event from another workspace"
    data = event.get_json() or {}
    run_id = _get(data, "runId", "run_id")
    status = RUN_EVENTS[kind] or _get(data, "runStatus", "status")
    ours = parse_backend_run_id(str(run_id or ""))
    if ours is None:
        return None, f"run {str(run_id)[:80]!r} was not started by retrain"
    if not status:
        return None, "the event carries no run status"
    try:
        message = parse_as(
            RunStatusChanged,
            {
                "message_id": event_message_id(event.id),
                "model": ours.model,
                "backend_run_id": run_id,
                "status": status,
                "occurred_at": event.event_time,
            },
            known_models=runtime.worker().config.models,
        )
    except InvalidMessage as exc:
        return None, f"{exc.reason}: {exc.description}"
    return message, None


@bp.function_name("run_status_changed")
@bp.event_grid_trigger(arg_name="event")
def run_status_changed(event: func.EventGridEvent) -> None:
    message, why = status_message(event)
    if message is None:
        log.info("ignored Event Grid event %s: %s", event.id, why)
        return
    effects = runtime.worker().handle(message)
    log.info("run %s %s: %s %s", message.backend_run_id, message.status, effects.outcome, effects.detail)
