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
