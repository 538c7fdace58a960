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


@pytest.mark.parametrize("keep_recorded_digest", [True, False], ids=["digest-field-kept", "digest-field-changed"])
def test_a_frozen_manifest_changed_afterwards_is_refused_on_load_naming_it(keep_recorded_digest):
    from tests.fakes.adapters import FakeBlobStore
    from worker.manifests import build_manifest, encode, freeze, load
    from worker.store import ManifestEntry

    store = FakeBlobStore()
    document = build_manifest([ManifestEntry(path="chicken/a.jpg", etag="e1", label="chicken", split="train", is_new=True)])
    path = freeze(store, document)
    assert load(store, document["sha256"]) == document
    tampered = {**document, "images": [{**document["images"][0], "etag": "swapped"}]}
    if not keep_recorded_digest:
        tampered["sha256"] = "0" * 64
    store.blobs[path] = encode(tampered)  # someone rewrites the blob in place
    with pytest.raises(ValueError, match="does not hash to its name") as refused:
        load(store, document["sha256"])
    assert str(refused.value) == f"manifest {path} does not hash to its name: it was changed after it was frozen"
