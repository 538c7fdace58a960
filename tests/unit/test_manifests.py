"""Manifests: validation, canonical hashing, and ImageFolder scanning."""

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manifests import DataError, ImageRecord, dump_manifest, load_manifest, manifest_sha256, parse_manifest, scan_image_folder, stable_split

pytestmark = pytest.mark.unit


def _records(n=6):
    return [
        ImageRecord(
            path=f"{'chicken' if i % 2 else 'turkey'}/{i}.jpg",
            label="chicken" if i % 2 else "turkey",
            split="val" if i < 2 else "train",
            etag=f"e{i}",
        )
        for i in range(n)
    ]


def test_a_dumped_manifest_loads_back_with_the_same_digest(tmp_path):
    records = _records()
    doc = dump_manifest(["chicken", "turkey"], records)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(doc))
    manifest = load_manifest(path)
    assert manifest.sha256 == doc["sha256"]
    assert sorted(manifest.images, key=lambda r: r.path) == sorted(records, key=lambda r: r.path)
    assert {r.path for r in manifest.split("val")} == {r.path for r in records if r.split == "val"}


@given(st.randoms())
def test_digest_does_not_depend_on_the_order_of_images(rnd: random.Random):
    records = _records(8)
    shuffled = records[:]
    rnd.shuffle(shuffled)
    assert manifest_sha256(["chicken", "turkey"], shuffled) == manifest_sha256(["chicken", "turkey"], records)


def test_digest_changes_when_an_image_is_overwritten():
    records = _records()
    changed = [*records[:-1], ImageRecord(records[-1].path, records[-1].label, records[-1].split, etag="new-etag")]
    assert manifest_sha256(["chicken", "turkey"], changed) != manifest_sha256(["chicken", "turkey"], records)


def test_a_manifest_edited_after_freezing_is_refused():
    doc = dump_manifest(["chicken", "turkey"], _records())
    doc["images"][0]["label"] = "turkey" if doc["images"][0]["label"] == "chicken" else "chicken"
    with pytest.raises(DataError, match="sha256 mismatch"):
        parse_manifest(doc)


@pytest.mark.parametrize("path", ["/etc/passwd", "../secrets.jpg", "a/../../b.jpg", "a\\b.jpg", "a\x00b.jpg", ""])
def test_paths_that_could_escape_the_data_dir_are_refused(path):
    with pytest.raises(DataError):
        parse_manifest({"images": [{"path": path, "label": "chicken", "split": "train"}]})


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"images": []}, "no images"),
        ({"nope": 1}, "'images' list"),
        ({"images": [{"path": "a.jpg", "label": "x"}]}, "lacks split"),
        ({"images": [{"path": "a.jpg", "label": "x", "split": "test"}]}, "split 'test'"),
        ({"images": [{"path": "a.jpg", "label": "x", "split": "train"}, {"path": "a.jpg", "label": "x", "split": "val"}]}, "twice"),
        ({"classes": ["a"], "images": [{"path": "a.jpg", "label": "b", "split": "train"}]}, "not in its classes"),
        ({"format": "other/v9", "images": [{"path": "a.jpg", "label": "b", "split": "train"}]}, "unsupported manifest format"),
    ],
)
def test_malformed_manifests_are_refused_with_a_specific_reason(doc, message):
    with pytest.raises(DataError, match=message):
        parse_manifest(doc)


def test_unreadable_or_invalid_json_manifest_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        load_manifest(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest(bad)


def test_scan_uses_train_and_val_folders_when_present(split_birds):
    manifest = scan_image_folder(split_birds)
    assert manifest.classes == ("chicken", "turkey")
    assert all(r.path.startswith(f"{r.split}/{r.label}/") for r in manifest.images)
    assert len(manifest.split("val")) == 8


def test_scan_of_a_flat_tree_splits_by_a_stable_hash_of_the_path(tiny_birds):
    manifest = scan_image_folder(tiny_birds, val_fraction=0.25)
    for record in manifest.images:
        assert record.split == stable_split(record.path, 0.25)
    assert 0 < len(manifest.split("val")) < len(manifest.images)


def test_an_image_keeps_its_split_as_the_data_set_grows():
    paths = [f"chicken/{i}.jpg" for i in range(2000)]
    before = {p: stable_split(p, 0.2) for p in paths[:1000]}
    assert all(stable_split(p, 0.2) == s for p, s in before.items())
    share = sum(stable_split(p, 0.2) == "val" for p in paths) / len(paths)
    assert 0.15 < share < 0.25


def test_scanning_an_empty_or_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        scan_image_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no class folders"):
        scan_image_folder(tmp_path)
    (tmp_path / "chicken").mkdir()
    with pytest.raises(DataError, match="no images"):
        scan_image_folder(tmp_path)


def test_a_manifest_that_is_not_the_one_the_run_was_frozen_with_is_refused(tmp_path):
    """A manifest rewritten with a recomputed digest is self-consistent; only the digest the run was
    frozen with, passed by the backend as --manifest_sha256, tells it apart."""
    images = [ImageRecord(path=f"{c}/{i}.jpg", label=c, split="train" if i else "val") for c in ("a", "b") for i in range(3)]
    frozen = dump_manifest(["a", "b"], images)
    tampered = dump_manifest(["a", "b"], images[1:])
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(tampered))
    assert load_manifest(path).sha256 == tampered["sha256"]  # consistent on its own
    with pytest.raises(DataError, match="not the manifest the run was planned with"):
        load_manifest(path, expected_sha256=frozen["sha256"])
    path.write_text(json.dumps(frozen))
    assert load_manifest(path, expected_sha256=frozen["sha256"]).sha256 == frozen["sha256"]


def test_a_manifest_path_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    import os

    os.mkfifo(tmp_path / "manifest.json")
    with pytest.raises(DataError, match="not a regular file"):
        load_manifest(tmp_path / "manifest.json")


def test_the_digest_covers_the_class_list_so_a_class_added_or_reordered_after_freezing_is_refused(tmp_path):
    """The class list fixes each label's output index: a manifest whose classes were edited (one
    added, or two swapped) but whose images were not must not keep the frozen digest."""
    from shared.manifest_hash import manifest_sha256 as worker_sha256

    images = [ImageRecord(path=f"{c}/{i}.jpg", label=c, split="train" if i else "val") for c in ("a", "b") for i in range(3)]
    entries = [{"path": r.path, "label": r.label, "split": r.split, "etag": r.etag} for r in images]
    frozen = manifest_sha256(["a", "b"], images)
    assert worker_sha256(["a", "b"], entries) == frozen  # the worker and train.py agree
    for classes in (["a", "b", "c"], ["b", "a"]):
        assert manifest_sha256(classes, images) != frozen
        assert worker_sha256(classes, entries) != frozen
        edited = {"format": "retrain.manifest/v1", "classes": classes, "images": entries, "sha256": frozen}
        path = tmp_path / "m.json"
        path.write_text(json.dumps(edited))
        with pytest.raises(DataError, match=r"sha256 mismatch|not the manifest"):
            load_manifest(path)
