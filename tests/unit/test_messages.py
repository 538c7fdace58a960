"""Inbound message validation: every kind of bad input is refused with a specific reason."""

import json

import pytest

from shared.errors import InvalidMessage
from shared.messages import MAX_MESSAGE_BYTES, ImageUploaded, RetrainRequested, RunStatusChanged, Tick, normalize_status, parse_message

pytestmark = pytest.mark.unit

MODELS = {"birds"}


def image(**over):
    body = {
        "kind": "image.uploaded",
        "message_id": "m-1",
        "model": "birds",
        "path": "chicken/1.jpg",
        "label": "chicken",
        "etag": "0x1",
        "size": 10,
    }
    body.update(over)
    return body


def test_a_valid_image_message_parses_from_bytes():
    msg = parse_message(json.dumps(image()).encode(), MODELS)
    assert isinstance(msg, ImageUploaded)
    assert (msg.path, msg.label, msg.etag) == ("chicken/1.jpg", "chicken", "0x1")


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/chicken/1.jpg", "relative"),
        ("chicken/../../etc/passwd.jpg", "'..'"),
        ("chicken\\1.jpg", "backslash"),
        ("chicken/1\x00.jpg", "control characters"),
        ("chicken/\n1.jpg", "control characters"),
        ("chicken/" + "a" * 1100 + ".jpg", "longer than 1024"),
        ("chicken/1.exe", "unsupported image extension"),
        ("1.jpg", "<label>/<file>"),
        ("chicken//1.jpg", "empty segments"),
        ("chicken/./1.jpg", "'.'"),
    ],
)
def test_hostile_or_unusable_paths_are_rejected_with_the_reason(path, words):
    with pytest.raises(InvalidMessage) as exc:
        parse_message(image(path=path, label=path.split("/")[0] or "chicken"), MODELS)
    assert exc.value.reason == "schema"
    assert words in exc.value.description


def test_the_label_must_be_the_first_path_segment():
    with pytest.raises(InvalidMessage, match="does not match"):
        parse_message(image(label="turkey"), MODELS)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty"),
        (b"{not json", "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (b"[1, 2]", "schema"),
        (json.dumps({"kind": "nope", "message_id": "x", "model": "birds"}).encode(), "schema"),
        (json.dumps(image(model="Birds!")).encode(), "schema"),
        (json.dumps(image(model="cats")).encode(), "unknown_model"),
        (json.dumps(image(extra_field=1)).encode(), "schema"),
        (json.dumps(image(size=-1)).encode(), "schema"),
        (b"{" + b" " * MAX_MESSAGE_BYTES + b"}", "too_large"),
    ],
)
def test_malformed_messages_are_permanent_errors_with_a_reason(raw, reason):
    with pytest.raises(InvalidMessage) as exc:
        parse_message(raw, MODELS)
    assert exc.value.reason == reason


def test_a_request_that_asks_for_nothing_is_rejected():
    with pytest.raises(InvalidMessage, match="asks for nothing"):
        parse_message({"kind": "retrain.requested", "message_id": "r", "model": "birds"}, MODELS)


def test_request_overrides_are_bounded():
    body = {"kind": "retrain.requested", "message_id": "r", "model": "birds", "force": True, "overrides": {"epochs": 0}}
    with pytest.raises(InvalidMessage, match=r"overrides\.epochs"):
        parse_message(body, MODELS)
    body["overrides"] = {"epochs": 3, "learning_rate": 0.1}
    assert isinstance(parse_message(body, MODELS), RetrainRequested)


def test_force_must_be_a_real_boolean():
    with pytest.raises(InvalidMessage):
        parse_message({"kind": "retrain.requested", "message_id": "r", "model": "birds", "force": "yes"}, MODELS)


@pytest.mark.parametrize(
    ("raw", "ours"),
    [("Completed", "succeeded"), ("COMPLETED", "succeeded"), ("failed", "failed"), ("Canceled", "canceled"), ("cancelled", "canceled"),
     ("NotResponding", "running"), ("CancelRequested", "running"), ("Finalizing", "running"), ("Queued", "queued"), ("NotStarted", "queued"), ("Running", "running")],
)  # fmt: skip
def test_run_statuses_are_normalised_case_insensitively(raw, ours):
    assert normalize_status(raw) == ours


def test_an_unknown_status_is_rejected():
    with pytest.raises(InvalidMessage, match="unknown run status"):
        parse_message(
            {"kind": "run.status_changed", "message_id": "s", "model": "birds", "backend_run_id": "r-a1", "status": "Exploded"}, MODELS
        )
    msg = parse_message(
        {"kind": "run.status_changed", "message_id": "s", "model": "birds", "backend_run_id": "r-a1", "status": "Completed"}, MODELS
    )
    assert isinstance(msg, RunStatusChanged)
    assert msg.status == "succeeded"


def test_the_same_image_version_always_gets_the_same_message_id():
    a = ImageUploaded.of("birds", "chicken/1.jpg", "e1")
    assert a.message_id == ImageUploaded.of("birds", "chicken/1.jpg", "e1").message_id
    assert a.message_id != ImageUploaded.of("birds", "chicken/1.jpg", "e2").message_id


def test_a_tick_may_name_no_model():
    assert parse_message({"kind": "tick", "message_id": "t"}, MODELS) == Tick(message_id="t")
