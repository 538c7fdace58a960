"""Events leave through the ledger's outbox: queued in the transaction that caused them (redacted,
with an id derived from what happened), published by the bus after the commit."""

from __future__ import annotations

import datetime as dt
from typing import Any

from shared import events as ev
from shared.redact import redact
from worker import telemetry
from worker.store import OutboxRow, Tx


def _redacted(value: Any) -> Any:
    """Events leave the system: mask anything secret-shaped in their strings (logs, error details)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def queue_event(tx: Tx, type_: str, subject: str, data: dict[str, Any], now: dt.datetime, discriminator: str = "") -> None:
    event = ev.new_event(
        type_, subject, _redacted(data), time=now, discriminator=discriminator, traceparent=telemetry.current_traceparent()
    )
    tx.enqueue_event(OutboxRow(event_id=event.id, type=event.type, subject=event.subject, payload=event.to_json_dict(), created_at=now))
