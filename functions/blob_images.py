"""New images: an Event Grid trigger on the storage account's `Microsoft.Storage.BlobCreated` events.

The function never reads the image: the event carries what the ledger needs (the blob's path in
its subject, its eTag, contentLength and the time it was written), so a 10 MB photo costs the
Function App one small event, not a download (the blob trigger, even with its Event Grid source,
hands the function the blob's content). Only blobs a writer committed count: the event's `api`
is PutBlob, PutBlockList, CopyBlob or FlushWithClose (Data Lake), and the subscription filters on
the same (see docs/azure.md). The path is `<model>/<label>/<file>` inside the images container;
names that fail validation, unknown models and empty blobs are logged (escaped) and not counted.
A failure to record the image raises, so Event Grid retries the delivery; the ledger counts an
image version (path, eTag) once however often it is delivered.
"""

from __future__ import annotations

import logging

import azure.functions as func

from functions import runtime

bp = func.Blueprint()
log = logging.getLogger("retrain.functions.blob")


COMMITTED_APIS = frozenset({"PutBlob", "PutBlockList", "CopyBlob", "FlushWithClose"})
SUBJECT_PREFIX = "/blobServices/default/containers/"


def parse_subject(subject: str) -> tuple[str, str, str] | None:
    """`/blobServices/default/containers/images/blobs/birds/chicken/1.jpg` -> ("images", "birds", "chicken/1.jpg")."""
    if not subject.startswith(SUBJECT_PREFIX):
        return None
    container, sep, name = subject[len(SUBJECT_PREFIX) :].partition("/blobs/")
    if not sep:
        return None
    model, _, path = name.partition("/")
    return container, model, path


def image_message(event: func.EventGridEvent):
    """The ImageUploaded for a BlobCreated event, or None (with a logged reason) when it must not count."""
    from pydantic import ValidationError

    from shared.errors import InvalidMessage
    from shared.messages import ImageUploaded, check_known_model
    from shared.redact import printable

    subject = event.subject or ""
    shown = printable(subject, limit=160)
    if (event.event_type or "") != "Microsoft.Storage.BlobCreated":
        log.info("ignored event %s: %s is not a BlobCreated", shown, printable(event.event_type or "", limit=80))
        return None
    parsed = parse_subject(subject)
    container = runtime.setting(runtime.IMAGES_CONTAINER_SETTING, "images")
    if parsed is None or parsed[0] != container:
        log.info("ignored blob %s: not in the images container %r", shown, container)
        return None
    _, model, path = parsed
    data = event.get_json() if isinstance(event.get_json(), dict) else {}
    api = str(data.get("api") or "")
    if api not in COMMITTED_APIS:
        log.info("ignored blob %s: %s does not commit a whole blob", shown, printable(api, limit=40) or "no api")
        return None
    etag = str(data.get("eTag") or data.get("etag") or "").strip('"')
    try:
        size = int(data.get("contentLength") or 0)
    except (TypeError, ValueError):
        size = -1
    if not etag:
        log.warning("ignored blob %s: the event carries no eTag", shown)
        return None
    if size <= 0:
        log.warning("ignored blob %s: it is empty or its size is unreadable (a placeholder, not an image)", shown)
        return None
    try:
        # The event's time orders versions: a late delivery of an older write is recognised as stale.
        message = ImageUploaded.of(model, path, etag, size, source="blob", occurred_at=event_time(event))
        check_known_model(message, runtime.worker().config.models)
    except InvalidMessage as exc:
        log.warning("rejected blob %s: %s", shown, exc.description)
        return None
    except ValidationError as exc:
        reasons = "; ".join(e["msg"] for e in exc.errors(include_url=False, include_input=False))
        log.warning("rejected blob %s: %s", shown, printable(reasons, limit=300))
        return None
    return message


def event_time(event: func.EventGridEvent):
    import datetime as dt

    value = event.event_time
    if not isinstance(value, dt.datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@bp.function_name("image_uploaded")
@bp.event_grid_trigger(arg_name="event")
def image_uploaded(event: func.EventGridEvent) -> None:
    message = image_message(event)
    if message is not None:
        effects = runtime.worker().handle(message)
        log.info("image %s/%s: %s %s", message.model, message.path, effects.outcome, effects.detail)
