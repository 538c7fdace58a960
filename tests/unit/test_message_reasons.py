"""Each kind of unreadable body is refused with its reason code (the `reason` of
`retrain.request.rejected` and of HTTP 400s, a contract) and a description that says what is
wrong, word for word."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from shared.errors import InvalidMessage
from shared.messages import ImageUploaded, RetrainRequested, load_json, parse_as, parse_message, safe_message_id

pytestmark = pytest.mark.unit

IMAGE = {"kind": "image.uploaded", "message_id": "m-1", "model": "birds", "path": "chicken/1.jpg", "label": "chicken", "etag": "e"}


def _refused(raw: Any, models=frozenset({"birds"})) -> tuple[str, str]:
    with pytest.raises(InvalidMessage) as exc:
        parse_message(raw, models)
    return exc.value.reason, exc.value.description


@pytest.mark.parametrize(
    ("raw", "reason", "description"),
    [
        (b"", "empty", "the message body is empty"),
        ("", "empty", "the message body is empty"),
        (b"[1]", "schema", "the message must be a JSON object"),
        (b'"text"', "schema", "the message must be a JSON object"),
        ([1], "schema", "the message must be a JSON object"),
        (b"{", "malformed_json", "the body is not valid JSON (JSONDecodeError at position 1)"),
        (b'{"a": 1,}', "malformed_json", "the body is not valid JSON (JSONDecodeError at position 8)"),
        (b"\xff{}", "malformed_json", "the body is not valid JSON (UnicodeDecodeError at position ?)"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "too_deep", "the message nests deeper than 32 levels"),
        (b"[" * 100_000 + b"]" * 100_000, "too_deep", "the message nests deeper than 32 levels"),
        ({**IMAGE, "x": float("nan")}, "schema", "the message holds NaN or Infinity, which JSON does not allow"),
        ({**IMAGE, "x": [float("inf")]}, "schema", "the message holds NaN or Infinity, which JSON does not allow"),
        ({**IMAGE, "x": float("-inf")}, "schema", "the message holds NaN or Infinity, which JSON does not allow"),
        (b'{"x": NaN}', "schema", "the message holds NaN, which JSON does not allow"),
        ({}, "schema", "message: Unable to extract tag using discriminator 'kind'"),
    ],
    ids=[
        "empty-bytes",
        "empty-text",
        "list",
        "string",
        "decoded-list",
        "truncated",
        "trailing-comma",
        "not-utf8",
        "deep-objects",
        "deep-beyond-recursion",
        "nan",
        "inf-in-list",
        "minus-inf",
        "nan-literal",
        "no-kind",
    ],
)
def test_each_kind_of_unreadable_body_has_its_reason_and_description(raw, reason, description):
    assert _refused(raw) == (reason, description)


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({**IMAGE, "path": "chicken/\\ud800.jpg"}).replace("\\\\", "\\").encode(),  # a JSON escape
        json.dumps({**IMAGE, "etag": "e\\udfff"}).replace("\\\\", "\\").encode(),
        json.dumps({**IMAGE, "k\\udc80": 1}).replace("\\\\", "\\").encode(),  # in a key
        {**IMAGE, "path": "chicken/\udc80.jpg"},  # an already decoded document (a file name's bytes)
    ],
    ids=["path", "etag", "key", "decoded"],
)
def test_a_lone_surrogate_anywhere_is_refused_as_not_unicode_text(body):
    reason, description = _refused(body)
    assert reason == "schema"
    assert description.startswith("the message holds \\ud")
    assert description.endswith(", a lone surrogate, which is not Unicode text")
    with pytest.raises(InvalidMessage):
        parse_as(ImageUploaded, body if isinstance(body, dict) else load_json(body))


def test_a_text_body_with_a_raw_lone_surrogate_is_refused_not_a_crash():
    assert _refused("\ud800") == ("malformed_json", "the body is not valid JSON (JSONDecodeError at position 0)")
    assert _refused('{"kind": "\ud800"}') == ("schema", "the message holds \\ud800, a lone surrogate, which is not Unicode text")


def test_image_paths_built_in_the_worker_refuse_lone_surrogates_too():
    """The blob trigger and the folder scan build messages with ImageUploaded.of, not parse_message."""
    with pytest.raises(ValueError, match="path holds \\\\udcff, a lone surrogate"):
        ImageUploaded.of("birds", "chicken/\udcff.jpg", "e", 1)
    with pytest.raises(ValueError, match="prefix"):  # (refused by its length constraint first)
        RetrainRequested(message_id="r", model="birds", prefix="chicken/\udcff")


def test_a_schema_error_at_the_top_level_is_named_message():
    reason, description = _refused({"kind": "nope"})
    assert reason == "schema"
    assert description.startswith("message: Input tag 'nope' found using 'kind' does not match")


def test_an_unknown_model_lists_every_configured_one():
    assert _refused({**IMAGE, "model": "cats"}, {"birds", "ants"}) == (
        "unknown_model",
        "model 'cats' is not configured (known: ants, birds)",
    )


def test_an_id_that_is_not_unicode_text_still_has_a_stable_digest():
    assert safe_message_id("\ud800") == "sha256-" + hashlib.sha256("\ud800".encode("utf-8", "replace")).hexdigest()[:40]
    assert safe_message_id("\ud800", prefix="sb-") == safe_message_id("\ud800", prefix="sb-")


@pytest.mark.parametrize(
    ("prefix", "words"),
    [
        ("chicken//x", "prefix must not contain empty segments"),
        ("/chicken", "prefix must be relative, not absolute"),
        ("chicken/../x", "prefix must not contain '.' or '..' segments"),
    ],
)
def test_a_bad_backfill_prefix_is_named_in_the_description(prefix, words):
    reason, description = _refused({"kind": "retrain.requested", "message_id": "r", "model": "birds", "prefix": prefix})
    assert (reason, description) == ("schema", f"retrain.requested.prefix: Value error, {words}")


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("1.jpg", "path must look like <label>/<file> with no empty segments"),
        ("chicken//1.jpg", "path must look like <label>/<file> with no empty segments"),
        ("chicken/notes.txt", "unsupported image extension (allowed: .jpg, .jpeg, .png, .bmp, .gif, .webp, .tif, .tiff)"),
    ],
)
def test_an_unusable_image_path_is_named_in_the_description(path, words):
    reason, description = _refused({**IMAGE, "path": path, "label": "chicken"})
    assert (reason, description) == ("schema", f"image.uploaded.path: Value error, {words}")
