"""The worker's manifest digest and split are exactly training/'s (the two cannot share code)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.manifest_hash import manifest_sha256, stable_split

from manifests import ImageRecord
from manifests import manifest_sha256 as training_sha256
from manifests import stable_split as training_split

pytestmark = pytest.mark.unit

names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF, exclude_characters="/\\"), min_size=1, max_size=12)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(st.sampled_from(["chicken", "turkey", "duck"]), names, st.sampled_from(["train", "val"]), names),
        max_size=20,
        unique_by=lambda t: (t[0], t[1]),
    ),
)
def test_worker_and_training_compute_the_same_manifest_digest(rows):
    images = [{"path": f"{label}/{name}.jpg", "label": label, "split": split, "etag": etag} for label, name, split, etag in rows]
    classes = sorted({i["label"] for i in images})
    records = [ImageRecord(**i) for i in images]
    assert manifest_sha256(classes, images) == training_sha256(classes, records)


@given(names, st.floats(min_value=0.01, max_value=0.99))
def test_worker_and_training_split_images_the_same_way(name, fraction):
    assert stable_split(f"chicken/{name}.jpg", fraction) == training_split(f"chicken/{name}.jpg", fraction)


def test_the_worker_writes_a_manifest_document_in_its_exact_format_and_bytes():
    from worker.manifests import FORMAT, build_manifest, encode
    from worker.store import ManifestEntry

    document = build_manifest([
        ManifestEntry(path="turkey/é.jpg", etag="e2", label="turkey", split="val", is_new=True),
        ManifestEntry(path="chicken/a.jpg", etag="e1", label="chicken", split="train", is_new=False),
    ])  # fmt: skip
    images = [
        {"path": "chicken/a.jpg", "label": "chicken", "split": "train", "etag": "e1"},
        {"path": "turkey/é.jpg", "label": "turkey", "split": "val", "etag": "e2"},
    ]
    assert document == {"format": FORMAT, "classes": ["chicken", "turkey"], "images": images, "sha256": document["sha256"]}
    assert FORMAT == "retrain.manifest/v1"
    # Compact, sorted keys, UTF-8 (not \u escapes): the same manifest is always the same bytes.
    assert encode({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()
