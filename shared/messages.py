"""Inbound messages: what the triggers, the CLI and the local loop hand to the worker.

Every message has a `message_id` the worker de-duplicates on (each source delivers at least
once) and names a `model`. Validation is strict and every refusal says what is wrong, because a
message that fails here is rejected for good (dead-lettered, answered 400, or recorded).

Blob paths are relative to the model's image root and follow `<label>/<file>`: the first path
segment is the class label.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable, Collection
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from shared.errors import InvalidMessage

MAX_MESSAGE_BYTES = 256 * 1024  # a Service Bus standard-tier message
MAX_PATH_CHARS = 1024
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MODEL_NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
LABEL_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,62}[A-Za-z0-9_])?$"


def lone_surrogate(value: str) -> str | None:
    """The first code point of `value` that UTF-8 cannot encode (a lone surrogate, as from a JSON
    escape like \\ud800 or an undecodable file name), escaped for display; None for valid text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return ascii(value[exc.start])[1:-1]
    return None


def _check_relative_path(value: str, *, what: str) -> str:
    if (bad := lone_surrogate(value)) is not None:  # the ledger, blob names and files need UTF-8
        raise ValueError(f"{what} holds {bad}, a lone surrogate, which is not Unicode text")
    if len(value) > MAX_PATH_CHARS:
        raise ValueError(f"{what} is longer than {MAX_PATH_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{what} contains control characters")
    if "\\" in value:
        raise ValueError(f"{what} contains a backslash; use '/'")
    if value.startswith("/"):
        raise ValueError(f"{what} must be relative, not absolute")
    parts = value.split("/")
    if ".." in parts or "." in parts:
        raise ValueError(f"{what} must not contain '.' or '..' segments")
    return value


def check_blob_path(value: str) -> str:
    """A path the worker will read: relative, clean, `<label>/<file>`, an image extension."""
    _check_relative_path(value, what="path")
    parts = value.split("/")
    if len(parts) < 2 or any(p == "" for p in parts):
        raise ValueError("path must look like <label>/<file> with no empty segments")
    if not value.lower().endswith(IMAGE_EXTENSIONS):
        raise ValueError(f"unsupported image extension (allowed: {', '.join(IMAGE_EXTENSIONS)})")
    return value


def check_prefix(value: str) -> str:
    _check_relative_path(value, what="prefix")
    if "//" in value:
        raise ValueError("prefix must not contain empty segments")
    return value


BlobPath = Annotated[str, AfterValidator(check_blob_path)]
Prefix = Annotated[str, Field(max_length=MAX_PATH_CHARS), AfterValidator(check_prefix)]
ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
Label = Annotated[str, Field(pattern=LABEL_PATTERN)]
# Ids become inbox keys, Table RowKeys, event ids and (local inbox) file names: no separators,
# no dots at the start, nothing that needs escaping anywhere.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@=+-]{0,199}$"
MessageId = Annotated[str, Field(pattern=ID_PATTERN)]
BackendRunId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")]


def safe_message_id(value: str, prefix: str = "") -> str:
    """`prefix + value` if that is a valid id, else `prefix` + a digest of `value`: the same input
    always maps to the same id (ids from Service Bus, Event Grid or a hostile message)."""
    plain = f"{prefix}{value}"
    if isinstance(value, str) and re.fullmatch(ID_PATTERN, plain):
        return plain
    return (prefix or "sha256-") + hashlib.sha256(str(value).encode("utf-8", "replace")).hexdigest()[:40]


def label_of(path: str) -> str:
    return path.split("/", 1)[0]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageUploaded(_Strict):
    """One new or overwritten image (a new etag is a new version)."""

    kind: Literal["image.uploaded"] = "image.uploaded"
    message_id: MessageId
    model: ModelName
    path: BlobPath
    label: Label
    etag: Annotated[str, Field(min_length=1, max_length=256)]
    size: Annotated[int, Field(ge=0, le=2**40)] = 0
    source: Literal["folder", "blob", "eventgrid", "backfill", "inject"] = "folder"
    occurred_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _label_matches_path(self) -> ImageUploaded:
        if label_of(self.path) != self.label:
            raise ValueError(f"label {self.label!r} does not match the path's first segment {label_of(self.path)!r}")
        return self

    @classmethod
    def of(
        cls, model: str, path: str, etag: str, size: int = 0, source: str = "folder", occurred_at: dt.datetime | None = None
    ) -> ImageUploaded:
        """Build the message for a blob; the id is derived, so the same version always has the same id."""
        # surrogatepass: a path that is not Unicode text is refused by validation, not by the digest
        digest = hashlib.sha256(f"{model}\x00{path}\x00{etag}".encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return cls(
            message_id=f"img-{digest}",
            model=model,
            path=path,
            label=label_of(path),
            etag=etag,
            size=size,
            source=source,
            occurred_at=occurred_at,
        )


class ImageRef(_Strict):
    path: BlobPath
    etag: Annotated[str, Field(min_length=1, max_length=256)] | None = None


class TrainingOverrides(_Strict):
    # Strict: `true` is not an epoch count and "8" is not a number here.
    epochs: Annotated[StrictInt, Field(ge=1, le=1000)] | None = None
    learning_rate: Annotated[float, Field(gt=0, le=10, strict=True, allow_inf_nan=False)] | None = None
    batch_size: Annotated[StrictInt, Field(ge=1, le=4096)] | None = None
    image_size: Annotated[StrictInt, Field(ge=16, le=1024)] | None = None


class RetrainRequested(_Strict):
    """An upstream or manual request: force a run, and/or register images (backfill)."""

    kind: Literal["retrain.requested"] = "retrain.requested"
    message_id: MessageId
    model: ModelName
    force: StrictBool = False
    images: Annotated[list[ImageRef], Field(max_length=20_000)] = []
    prefix: Prefix | None = None
    overrides: TrainingOverrides | None = None
    requested_by: Annotated[str, Field(max_length=200)] = "unknown"
    reason: Annotated[str, Field(max_length=2000)] = ""
    override_budget: StrictBool = False  # with force: run even past max_gpu_hours_per_day

    @model_validator(mode="after")
    def _asks_for_something(self) -> RetrainRequested:
        if not (self.force or self.images or self.prefix is not None):
            raise ValueError("the request asks for nothing: set force, images or prefix")
        return self


class ModelControl(_Strict):
    """An operator steering a model: promote a registered version to champion, roll back to the
    previous champion, pause (no new runs; optionally cancel the one in flight) or resume."""

    kind: Literal["model.control"] = "model.control"
    message_id: MessageId
    model: ModelName
    action: Literal["promote", "rollback", "pause", "resume"]
    version: Annotated[StrictInt, Field(ge=1)] | None = None
    cancel: StrictBool = False
    requested_by: Annotated[str, Field(max_length=200)] = "unknown"
    reason: Annotated[str, Field(max_length=2000)] = ""

    @model_validator(mode="after")
    def _fits_the_action(self) -> ModelControl:
        if (self.action == "promote") != (self.version is not None):
            raise ValueError("promote needs a version; the other actions take none")
        if self.cancel and self.action != "pause":
            raise ValueError("cancel goes with pause only")
        return self


# Status names as Azure ML and our backends report them, mapped onto the run states we track.
_STATUS_MAP = {
    "notstarted": "queued",
    "starting": "queued",
    "provisioning": "queued",
    "preparing": "queued",
    "queued": "queued",
    "running": "running",
    "finalizing": "running",
    "notresponding": "running",  # not terminal: Azure ML may recover the run
    "cancelrequested": "running",
    "paused": "queued",  # a paused (e.g. preempted low-priority) job waits to resume
    "completed": "succeeded",
    "succeeded": "succeeded",
    "failed": "failed",
    "canceled": "canceled",
    "cancelled": "canceled",
}


def normalize_status(value: str) -> str:
    key = value.replace("_", "").replace(" ", "").lower()
    if key not in _STATUS_MAP:
        raise ValueError(f"unknown run status {value!r}")
    return _STATUS_MAP[key]


class RunStatusChanged(_Strict):
    """A run (one backend attempt) reached a status."""

    kind: Literal["run.status_changed"] = "run.status_changed"
    message_id: MessageId
    model: ModelName
    backend_run_id: BackendRunId
    status: Annotated[str, AfterValidator(normalize_status)]
    occurred_at: AwareDatetime | None = None
    detail: Annotated[str, Field(max_length=4000)] = ""


class Tick(_Strict):
    """Time passes: quiet periods end, max waits expire, runs are polled, planned runs repaired."""

    kind: Literal["tick"] = "tick"
    message_id: MessageId
    model: ModelName | None = None  # None: every model
    occurred_at: AwareDatetime | None = None


Message = Annotated[ImageUploaded | RetrainRequested | ModelControl | RunStatusChanged | Tick, Field(discriminator="kind")]
_MESSAGE = TypeAdapter(Message)


def _describe(exc: ValidationError) -> tuple[str, list[dict[str, Any]]]:
    errors = [
        {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors(include_url=False, include_input=False)
    ]
    return "; ".join(f"{e['field'] or 'message'}: {e['message']}" for e in errors[:10]), errors


MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 30


def _check_shape(value: Any, depth: int = 0) -> None:
    """Refuse what no message needs and what breaks parsers and validators downstream."""
    if depth > MAX_JSON_DEPTH:
        raise InvalidMessage("too_deep", f"the message nests deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_shape(key, depth + 1)
            _check_shape(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_shape(item, depth + 1)
    elif isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        raise InvalidMessage("schema", "the message holds NaN or Infinity, which JSON does not allow")
    elif isinstance(value, str) and (bad := lone_surrogate(value)) is not None:
        # JSON may escape one (\ud800); no ledger, blob name or log line can store it.
        raise InvalidMessage("schema", f"the message holds {bad}, a lone surrogate, which is not Unicode text")


def _int_within_limits(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise InvalidMessage("schema", f"the message holds an integer of more than {MAX_INT_DIGITS} digits")
    return int(text)


def _no_constant(name: str) -> Any:
    raise InvalidMessage("schema", f"the message holds {name}, which JSON does not allow")


def load_json(raw: bytes | str) -> Any:
    """Decode a message body, refusing malformed, too deep or oversized-number JSON with a reason.

    Every entry point decodes through here, so RecursionError or a huge integer never escapes as
    an unexpected error (which would make the platform redeliver the message forever).
    """
    try:
        value = json.loads(raw, parse_int=_int_within_limits, parse_constant=_no_constant)
    except InvalidMessage:
        raise
    except RecursionError:
        raise InvalidMessage("too_deep", f"the message nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidMessage(
            "malformed_json", f"the body is not valid JSON ({exc.__class__.__name__} at position {getattr(exc, 'pos', '?')})"
        ) from None
    return value  # its shape is checked by parse_message / parse_as


def load_document(raw: bytes | str) -> dict[str, Any]:
    """The one check every inbound body passes first (queue, HTTP, inbox file): not empty, at most
    MAX_MESSAGE_BYTES, JSON within the depth and number limits, an object. Its fields are checked
    by parse_message / parse_as."""
    size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
    if size == 0:
        raise InvalidMessage("empty", "the message body is empty")
    if size > MAX_MESSAGE_BYTES:
        raise InvalidMessage("too_large", f"the message is {size} bytes; the limit is {MAX_MESSAGE_BYTES}")
    document = load_json(raw)
    if not isinstance(document, dict):
        raise InvalidMessage("schema", "the message must be a JSON object")
    return document


def load_checked_document(raw: bytes | str) -> dict[str, Any]:
    """`load_document` and the shape checks every message passes (depth, NaN/Infinity, lone
    surrogates): for JSON from outside that is not a message (a simulation history line)."""
    document = load_document(raw)
    _check_shape(document)
    return document


def parse_message(raw: bytes | str | dict[str, Any], known_models: Collection[str] | None = None) -> Message:
    """Validate raw input into a message, or raise InvalidMessage with a specific reason."""
    if isinstance(raw, bytes | str):
        raw = load_document(raw)
    if not isinstance(raw, dict):
        raise InvalidMessage("schema", "the message must be a JSON object")
    _check_shape(raw)
    message: Message = _validated(_MESSAGE.validate_python, raw, known_models)
    return message


def parse_as(cls: type[_Strict], raw: dict[str, Any], known_models: Collection[str] | None = None) -> Any:
    """Validate input that is known to be of one message type (e.g. an HTTP body)."""
    _check_shape(raw)
    return _validated(cls.model_validate, raw, known_models)


def _validated(validate: Callable[[Any], Any], raw: dict[str, Any], known_models: Collection[str] | None) -> Any:
    try:
        message = validate(raw)
    except ValidationError as exc:
        description, errors = _describe(exc)
        raise InvalidMessage("schema", description, errors) from None
    check_known_model(message, known_models)
    return message


def check_known_model(message: Any, known_models: Collection[str] | None) -> None:
    model = getattr(message, "model", None)
    if known_models is not None and model is not None and model not in known_models:
        raise InvalidMessage("unknown_model", f"model {model!r} is not configured (known: {', '.join(sorted(known_models)) or 'none'})")
