"""Outbound events: CloudEvents 1.0 envelopes (structured JSON) for what the worker did.

Event ids are derived from what happened (type + subject + a discriminator), so recording the
same fact twice, after a crash and a redelivery, yields the same id: the outbox keeps one, and
the broker (message id = event id) and consumers can drop a re-send.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

RUN_SUBMITTED = "retrain.run.submitted"
RUN_FAILED = "retrain.run.failed"
MODEL_REGISTERED = "retrain.model.registered"
MODEL_REJECTED = "retrain.model.rejected"
REQUEST_REJECTED = "retrain.request.rejected"
MODEL_PROMOTED = "retrain.model.promoted"  # an operator put a registered version in place (promote or rollback)
MODEL_PAUSED = "retrain.model.paused"
MODEL_RESUMED = "retrain.model.resumed"
# The operators' controls: the audit trail (`retrain audit`), kept when published events are pruned.
CONTROL_EVENTS = frozenset({MODEL_PROMOTED, MODEL_PAUSED, MODEL_RESUMED})
EVENT_TYPES = (RUN_SUBMITTED, RUN_FAILED, MODEL_REGISTERED, MODEL_REJECTED, REQUEST_REJECTED, MODEL_PROMOTED, MODEL_PAUSED, MODEL_RESUMED)
DEFAULT_SOURCE = "/retrain/worker"


class CloudEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(min_length=1, max_length=256)
    source: str = DEFAULT_SOURCE
    type: str
    time: AwareDatetime
    subject: str
    datacontenttype: Literal["application/json"] = "application/json"
    data: dict[str, Any]
    # The CloudEvents distributed-tracing extension: the W3C trace context of what caused the event.
    traceparent: str | None = Field(None, pattern=r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")

    def to_json_dict(self) -> dict[str, Any]:
        document = self.model_dump(mode="json")
        if document.get("traceparent") is None:
            document.pop("traceparent", None)
        return document


def event_id(type_: str, subject: str, discriminator: str = "") -> str:
    digest = hashlib.sha256(f"{type_}\x00{subject}\x00{discriminator}".encode()).hexdigest()[:32]
    return f"evt-{digest}"


def new_event(
    type_: str,
    subject: str,
    data: dict[str, Any],
    *,
    time: dt.datetime,
    discriminator: str = "",
    source: str = DEFAULT_SOURCE,
    traceparent: str | None = None,
) -> CloudEvent:
    if type_ not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    event_id_ = event_id(type_, subject, discriminator)
    return CloudEvent(id=event_id_, source=source, type=type_, time=time, subject=subject, data=data, traceparent=traceparent)
