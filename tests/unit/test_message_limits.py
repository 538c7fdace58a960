"""Every documented limit of an inbound message, at the limit (accepted) and one past it (refused
with its reason): sizes, depth, digits, lengths, ranges, ids, statuses."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from shared.errors import InvalidMessage
from shared.messages import (
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    MAX_MESSAGE_BYTES,
    MAX_PATH_CHARS,
    ImageUploaded,
    ModelControl,
    RetrainRequested,
    normalize_status,
    parse_message,
    safe_message_id,
)

pytestmark = pytest.mark.unit

MODELS = {"birds"}


def _image(**over: Any) -> dict[str, Any]:
    body = {"kind": "image.uploaded", "message_id": "m-1", "model": "birds", "path": "chicken/1.jpg", "label": "chicken", "etag": "e"}
    body.update(over)
    return body


def _request(**over: Any) -> dict[str, Any]:
    body = {"kind": "retrain.requested", "message_id": "r-1", "model": "birds", "force": True}
    body.update(over)
    return body


def _refused(raw: Any, models=MODELS) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as exc:
        parse_message(raw, models)
    return exc.value


def test_a_path_of_exactly_max_path_chars_is_accepted_and_one_more_is_refused():
    stem = "chicken/"
    at_limit = stem + "a" * (MAX_PATH_CHARS - len(stem) - 4) + ".jpg"
    assert len(at_limit) == MAX_PATH_CHARS
    assert parse_message(_image(path=at_limit), MODELS).path == at_limit
    over = stem + "a" * (MAX_PATH_CHARS - len(stem) - 3) + ".jpg"
    assert "longer than 1024 characters" in _refused(_image(path=over)).description


@pytest.mark.parametrize(("char", "accepted"), [("\x1f", False), (" ", True), ("~", True), ("\x7f", False), ("é", True)])
def test_control_characters_are_refused_in_paths_and_nothing_else_is(char, accepted):
    body = _image(path=f"chicken/a{char}b.jpg")
    if accepted:
        assert parse_message(body, MODELS).path == f"chicken/a{char}b.jpg"
    else:
        assert "control characters" in _refused(body).description


@pytest.mark.parametrize("prefix", ["chicken//", "/chicken", "chicken/../x", "c\\d"])
def test_a_backfill_prefix_is_checked_like_a_path(prefix):
    assert _refused(_request(prefix=prefix)).reason == "schema"


def test_a_backfill_prefix_may_be_empty_or_a_folder():
    assert parse_message(_request(prefix=""), MODELS).prefix == ""
    assert parse_message(_request(prefix="chicken/"), MODELS).prefix == "chicken/"


def test_a_body_of_exactly_max_message_bytes_is_read_and_one_more_byte_is_too_large():
    body = json.dumps(_image()).encode()
    padded = body[:-1] + b" " * (MAX_MESSAGE_BYTES - len(body)) + b"}"
    assert len(padded) == MAX_MESSAGE_BYTES
    assert isinstance(parse_message(padded, MODELS), ImageUploaded)
    error = _refused(padded[:-1] + b" }")
    assert (error.reason, error.description) == (
        "too_large",
        f"the message is {MAX_MESSAGE_BYTES + 1} bytes; the limit is {MAX_MESSAGE_BYTES}",
    )


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def test_nesting_to_max_json_depth_is_read_and_one_level_deeper_is_refused():
    # The top object is depth 0 and its field's value depth 1: the leaf sits at depth `levels + 1`.
    assert _refused({**_image(), "x": _nested(MAX_JSON_DEPTH - 1)}).reason == "schema"  # read, then the extra field refused
    deeper = _refused({**_image(), "x": _nested(MAX_JSON_DEPTH)})
    assert (deeper.reason, deeper.description) == ("too_deep", f"the message nests deeper than {MAX_JSON_DEPTH} levels")
    assert _refused(json.dumps({**_image(), "x": _nested(MAX_JSON_DEPTH)}).encode()).reason == "too_deep"


def test_a_json_body_nested_beyond_the_interpreters_limit_is_too_deep_not_a_crash():
    assert _refused(b"[" * 100_000 + b"]" * 100_000).reason == "too_deep"


def test_integers_of_max_int_digits_are_read_and_longer_ones_refused():
    at_limit = "9" * MAX_INT_DIGITS
    read = _refused(json.dumps(_image()).encode()[:-1] + f', "size": -{at_limit}}}'.encode())
    assert "size" in read.description  # read (the minus sign is not a digit), then refused as out of range
    assert "digits" not in read.description
    longer = _refused(json.dumps(_image()).encode()[:-1] + f', "size": {at_limit}9}}'.encode())
    assert (longer.reason, longer.description) == ("schema", f"the message holds an integer of more than {MAX_INT_DIGITS} digits")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_from_text_and_from_objects(constant):
    text = json.dumps(_request()).encode()[:-1] + f', "overrides": {{"learning_rate": {constant}}}}}'.encode()
    assert _refused(text).description == f"the message holds {constant}, which JSON does not allow"
    value = float(constant.replace("Infinity", "inf"))
    assert (
        _refused(_request(overrides={"learning_rate": value})).description == "the message holds NaN or Infinity, which JSON does not allow"
    )


@pytest.mark.parametrize(
    ("field", "ok", "refused"),
    [
        ("epochs", [1, 1000], [0, 1001, True, "8", 2.0]),
        ("batch_size", [1, 4096], [0, 4097]),
        ("image_size", [16, 1024], [15, 1025]),
        ("learning_rate", [1e-9, 10.0], [0.0, 10.0001, -1.0, "0.1"]),
    ],
)
def test_training_overrides_are_accepted_at_their_bounds_and_refused_past_them(field, ok, refused):
    for value in ok:
        assert getattr(parse_message(_request(overrides={field: value}), MODELS).overrides, field) == value
    for value in refused:
        assert f"overrides.{field}" in _refused(_request(overrides={field: value})).description


@pytest.mark.parametrize(
    ("field", "at_limit", "over"),
    [
        ("message_id", "m" * 200, "m" * 201),
        ("requested_by", "u" * 200, "u" * 201),
        ("reason", "r" * 2000, "r" * 2001),
    ],
)
def test_request_text_fields_are_bounded(field, at_limit, over):
    assert getattr(parse_message(_request(**{field: at_limit}), MODELS), field) == at_limit
    assert _refused(_request(**{field: over})).reason == "schema"


def test_a_backfill_lists_at_most_20000_images():
    images = [{"path": f"chicken/{i}.jpg"} for i in range(20_000)]
    assert len(parse_message(_request(force=False, images=images), MODELS).images) == 20_000
    assert _refused(_request(force=False, images=[*images, {"path": "chicken/x.jpg"}])).reason == "schema"


@pytest.mark.parametrize(
    ("model", "ok"),
    [("a", True), ("a" * 63, True), ("a" * 64, False), ("a-b", True), ("-ab", False), ("ab-", False), ("aB", False)],
)
def test_model_names_follow_the_documented_pattern(model, ok):
    body = _image(model=model)
    if ok:
        assert parse_message(body, None).model == model
    else:
        assert _refused(body, None).reason == "schema"


@pytest.mark.parametrize(("label", "ok"), [("C" * 64, True), ("C" * 65, False), ("a_", True), ("a.", False), ("_a", False)])
def test_labels_follow_the_documented_pattern(label, ok):
    body = _image(path=f"{label}/1.jpg", label=label)
    if ok:
        assert parse_message(body, MODELS).label == label
    else:
        assert _refused(body).reason == "schema"


def test_an_unknown_model_is_named_with_the_configured_ones():
    assert _refused(_image(model="cats")).description == "model 'cats' is not configured (known: birds)"
    assert _refused(_image(model="cats"), set()).description == "model 'cats' is not configured (known: none)"
    assert parse_message(_image(model="cats"), None).model == "cats"  # no list: any valid name


def test_a_schema_error_names_each_field_and_its_problem_and_at_most_ten():
    error = _refused(_image(size=-1, etag=""))
    assert error.reason == "schema"
    assert [e["field"] for e in error.errors] == ["image.uploaded.etag", "image.uploaded.size"]
    assert error.description == "; ".join(f"{e['field']}: {e['message']}" for e in error.errors)
    many = _refused({"kind": "retrain.requested", "message_id": "r", "model": "birds", **{f"x{i}": 1 for i in range(15)}})
    assert len(many.errors) == 15
    assert many.description.count(";") == 9


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"action": "promote"}, "promote needs a version"),
        ({"action": "rollback", "version": 2}, "promote needs a version"),
        ({"action": "resume", "cancel": True}, "cancel goes with pause only"),
        ({"action": "rollback", "cancel": True}, "cancel goes with pause only"),
        ({"action": "promote", "version": 2, "cancel": True}, "cancel goes with pause only"),
        ({"action": "promote", "version": 0}, "version"),
    ],
)
def test_model_controls_must_fit_their_action(body, words):
    raw = {"kind": "model.control", "message_id": "c-1", "model": "birds", **body}
    assert words in _refused(raw).description


def test_model_controls_that_fit_their_action_parse():
    for body in ({"action": "promote", "version": 1}, {"action": "rollback"}, {"action": "pause", "cancel": True}, {"action": "resume"}):
        assert isinstance(parse_message({"kind": "model.control", "message_id": "c-1", "model": "birds", **body}, MODELS), ModelControl)


@pytest.mark.parametrize(
    ("raw", "ours"),
    [("NotStarted", "queued"), ("Not Started", "queued"), ("not_started", "queued"), ("Starting", "queued"), ("Provisioning", "queued"),
     ("Preparing", "queued"), ("Queued", "queued"), ("Paused", "queued"), ("Running", "running"), ("Finalizing", "running"),
     ("NotResponding", "running"), ("CancelRequested", "running"), ("Completed", "succeeded"), ("Succeeded", "succeeded"),
     ("Failed", "failed"), ("Canceled", "canceled"), ("Cancelled", "canceled")],
)  # fmt: skip
def test_every_azure_ml_status_maps_onto_a_run_state(raw, ours):
    assert normalize_status(raw) == ours


def test_an_unknown_status_is_named_in_the_error():
    with pytest.raises(ValueError, match="unknown run status 'Exploded'"):
        normalize_status("Exploded")


def test_an_image_versions_message_id_is_the_digest_of_model_path_and_etag():
    message = ImageUploaded.of("birds", "chicken/1.jpg", "e1", size=7, source="blob")
    assert message.message_id == "img-" + hashlib.sha256(b"birds\x00chicken/1.jpg\x00e1").hexdigest()[:32]
    assert (message.label, message.size, message.source) == ("chicken", 7, "blob")


def test_ids_that_fit_the_pattern_are_kept_and_others_become_a_stable_digest():
    assert safe_message_id("abc-1") == "abc-1"
    assert safe_message_id("abc-1", prefix="sb-") == "sb-abc-1"
    hostile = "../../etc/passwd"
    digest = hashlib.sha256(hostile.encode()).hexdigest()[:40]
    assert safe_message_id(hostile) == "sha256-" + digest
    assert safe_message_id(hostile, prefix="sb-") == "sb-" + digest
    assert safe_message_id("m" * 200) == "m" * 200
    assert safe_message_id("m" * 201) == "sha256-" + hashlib.sha256(b"m" * 201).hexdigest()[:40]


def test_a_request_asking_for_nothing_is_refused_and_any_one_ask_is_enough():
    assert "asks for nothing" in _refused(_request(force=False)).description
    assert isinstance(parse_message(_request(force=False, prefix="chicken/"), MODELS), RetrainRequested)
    assert isinstance(parse_message(_request(force=False, images=[{"path": "chicken/1.jpg"}]), MODELS), RetrainRequested)
