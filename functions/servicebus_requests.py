"""Upstream requests: a Service Bus queue trigger carrying RetrainRequested messages.

Settlement: the host completes a message when the function returns and abandons it when the
function raises (then redelivers, and dead-letters after MaxDeliveryCount). So:
- valid -> handled; the message id (the body's, else the Service Bus MessageId) is claimed in
  the ledger, so a duplicate MessageId has one effect;
- permanently invalid (bad JSON, wrong schema, unknown model, oversize) -> recorded once as
  `retrain.request.rejected` with the reason and completed: never retried ten times;
- transient failures (the ledger or the backend unavailable) -> raise, and the host retries.

Dead-lettering with a reason would need the SDK-type binding extension
(azurefunctions-extensions-bindings-servicebus); see README "Functions" for why this app
completes with a rejected event instead.
"""

from __future__ import annotations

import logging
from typing import Any

import azure.functions as func

from functions import runtime

bp = func.Blueprint()
QUEUE_CONTROLS_SETTING = "RETRAIN_QUEUE_CONTROLS"  # "true": the requests queue also takes model controls
log = logging.getLogger("retrain.functions.servicebus")


def delivery_id(msg: func.ServiceBusMessage) -> str | None:
    """`sb-<message id>`; an id with characters a retrain id may not hold is used by its digest."""
    from shared.messages import safe_message_id

    return safe_message_id(msg.message_id, prefix="sb-") if msg.message_id else None


def request_from(msg: func.ServiceBusMessage):
    """(message, None) for a valid request, or (None, InvalidMessage) for a permanently bad one."""
    from shared.errors import InvalidMessage
    from shared.messages import ModelControl, RetrainRequested, load_document, parse_as
    from shared.redact import printable

    kinds: dict[str, Any] = {"retrain.requested": RetrainRequested, "model.control": ModelControl}
    try:
        document = load_document(msg.get_body() or b"")
        document.setdefault("message_id", delivery_id(msg))
        document.setdefault("kind", "retrain.requested")
        # Anyone with Data Sender on the queue can send: the queue is the door, the name is a claim.
        claimed = document.get("requested_by")
        queue = runtime.setting("RETRAIN_REQUESTS_QUEUE", "requests")
        who = printable(claimed, limit=80) if isinstance(claimed, str) and claimed.strip() else "unknown"
        document["requested_by"] = f"queue {printable(queue, limit=60)}: {who} (unverified)"[:200]
        if document["kind"] not in kinds:
            raise InvalidMessage("schema", f"kind must be 'retrain.requested' or 'model.control', got {str(document['kind'])[:50]!r}")
        if document["kind"] == "model.control" and runtime.setting(QUEUE_CONTROLS_SETTING, "false").strip().lower() != "true":
            # Anyone with Data Sender on the queue could promote or pause: controls need a verified
            # operator (HTTP with Retrain.Operator, or the command line) unless the deployment opts in.
            raise InvalidMessage(
                "forbidden",
                f"model controls are not accepted on the requests queue (its senders are not verified); use HTTP with the "
                f"Retrain.Operator role or the command line, or set {QUEUE_CONTROLS_SETTING}=true",
            )
        return parse_as(kinds[document["kind"]], document, known_models=runtime.worker().config.models), None
    except InvalidMessage as exc:
        return None, exc


@bp.function_name("retrain_requested")
@bp.service_bus_queue_trigger(arg_name="msg", queue_name="%RETRAIN_REQUESTS_QUEUE%", connection="RETRAIN_SERVICEBUS")
def retrain_requested(msg: func.ServiceBusMessage) -> None:
    from shared.messages import load_json

    request, error = request_from(msg)
    worker = runtime.worker()
    if error is not None:
        message_id = delivery_id(msg) or f"sb-seq-{msg.sequence_number}"
        try:  # only to record the rejection under a configured model; anything else goes under none
            model = load_json(msg.get_body()).get("model")
        except Exception:
            model = None
        worker.reject(message_id, model if isinstance(model, str) else None, error.reason, error.description, source="servicebus")
        log.warning(
            "rejected Service Bus message %s (delivery %s): %s: %s", msg.message_id, msg.delivery_count, error.reason, error.description
        )
        return
    effects = worker.handle(request)
    log.info("request %s for %s: %s %s", request.message_id, request.model, effects.outcome, effects.detail)
