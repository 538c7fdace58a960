"""New images: a blob trigger on the images container, fed by Event Grid (BlobCreated).

The polling blob trigger can miss or delay blobs; the Event Grid source delivers each created
(committed, so complete) blob. The blob name is `<model>/<label>/<file>`; names that fail
validation, unknown models and empty blobs are logged (escaped) and not counted. A failure to
record the image raises, so the host retries the delivery; the ledger makes the retry harmless.
"""

from __future__ import annotations

import logging

import azure.functions as func

from functions import runtime

bp = func.Blueprint()
log = logging.getLogger("retrain.functions.blob")


def parse_blob_name(name: str) -> tuple[str, str]:
    """`images/birds/chicken/1.jpg` or `birds/chicken/1.jpg` -> ("birds", "chicken/1.jpg")."""
    container = runtime.setting(runtime.IMAGES_CONTAINER_SETTING, "images")
    if name.startswith(container + "/"):
        name = name[len(container) + 1 :]
    model, _, path = name.partition("/")
    return model, path


def blob_time(properties: dict):
    """The blob's LastModified (ISO 8601 or RFC 1123, as the host may give either), or None."""
    import datetime as dt
    from email.utils import parsedate_to_datetime

    raw = properties.get("LastModified") or properties.get("lastModified") or properties.get("Last-Modified")
    if isinstance(raw, dt.datetime):
        value = raw
    elif isinstance(raw, str) and raw.strip():
        try:
            value = dt.datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
        except ValueError:
            try:
                value = parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                return None
    else:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def image_message(blob: func.InputStream):
    """The ImageUploaded for a blob, or None (with a logged reason) when it must not count."""
    from pydantic import ValidationError

    from shared.errors import InvalidMessage
    from shared.messages import ImageUploaded, check_known_model
    from shared.redact import printable

    model, path = parse_blob_name(blob.name or "")
    properties = getattr(blob, "blob_properties", None) or {}  # newer hosts; older ones give only the name and length
    etag = str(properties.get("ETag") or properties.get("Etag") or properties.get("etag") or "").strip('"')
    size = blob.length if blob.length is not None else int(properties.get("ContentLength") or properties.get("Length") or 0)
    if not etag:
        log.warning("ignored blob %s: the trigger gave no ETag", printable(blob.name or "", limit=120))
        return None
    if size == 0:
        log.warning("ignored blob %s: it is empty (a placeholder, not an image)", printable(blob.name or "", limit=120))
        return None
    try:
        # The blob's own time orders versions: a late delivery of an older write is recognised as stale.
        message = ImageUploaded.of(model, path, etag, size, source="blob", occurred_at=blob_time(properties))
        check_known_model(message, runtime.worker().config.models)
    except InvalidMessage as exc:
        log.warning("rejected blob %s: %s", printable(blob.name or "", limit=120), exc.description)
        return None
    except ValidationError as exc:
        reasons = "; ".join(e["msg"] for e in exc.errors(include_url=False, include_input=False))
        log.warning("rejected blob %s: %s", printable(blob.name or "", limit=120), printable(reasons, limit=300))
        return None
    return message


@bp.function_name("image_uploaded")
@bp.blob_trigger(arg_name="blob", path="%RETRAIN_IMAGES_CONTAINER%/{name}", connection="RETRAIN_STORAGE", source=func.BlobSource.EVENT_GRID)
def image_uploaded(blob: func.InputStream) -> None:
    message = image_message(blob)
    if message is not None:
        effects = runtime.worker().handle(message)
        log.info("image %s/%s: %s %s", message.model, message.path, effects.outcome, effects.detail)
