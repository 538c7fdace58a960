"""shared.files: a reader sees the old file or the whole new one; concurrent writers never share a temporary."""

from __future__ import annotations

import os

import pytest

from shared.files import atomic_write_bytes, atomic_write_text

pytestmark = pytest.mark.unit


def test_the_file_is_replaced_whole_and_no_temporary_is_left(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")
    with open(target, "rb") as reader:  # opened before the write: keeps reading the old file
        atomic_write_text(target, "new ✓")
        assert reader.read() == b"old"
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_two_writers_of_one_path_write_through_different_temporaries(tmp_path, monkeypatch):
    """The second write runs while the first has written its temporary but not renamed it."""
    target, renamed, real_replace = tmp_path / "model.onnx", [], os.replace

    def replace_after_the_other_writer(src, dst):
        renamed.append(src)
        if len(renamed) == 1:
            atomic_write_bytes(target, b"second")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_the_other_writer)
    atomic_write_bytes(target, b"first")
    assert renamed[0] != renamed[1]
    assert target.read_bytes() == b"first"


def test_two_puts_of_one_message_into_the_local_inbox_at_once_both_succeed(tmp_path, monkeypatch):
    """`retrain inject` run twice at the same moment (a retried backfill): the second put runs while
    the first has written its temporary file but not renamed it."""
    from worker.adapters.local.inbox import LocalInbox

    inbox, real_replace, nested = LocalInbox(tmp_path / "inbox"), os.replace, []

    def replace_after_the_other_put(src, dst):
        if not nested:
            nested.append(None)
            nested[0] = inbox.put("req-1", {"model": "birds"})
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_the_other_put)
    target = inbox.put("req-1", {"model": "birds"})
    assert nested == [target]
    assert [p.name for p in (tmp_path / "inbox").iterdir()] == ["req-1.json"]


def test_a_write_once_interrupted_before_it_completes_leaves_no_blob_under_the_name(tmp_path, monkeypatch):
    """A crash mid-write used to leave a torn blob under the final name, which write_once then
    refused to replace (the first writer wins): a torn manifest blocked its model."""
    import os

    from worker.adapters.local.directory_blobs import DirectoryBlobStore

    store = DirectoryBlobStore(tmp_path, images_only=False)

    def power_cut(_fd):
        raise OSError("the machine lost power")

    monkeypatch.setattr(os, "fsync", power_cut)
    with pytest.raises(OSError, match="lost power"):
        store.write_once("manifests/abc.json", b'{"a": 1}')
    assert not (tmp_path / "manifests" / "abc.json").exists()
    assert list((tmp_path / "manifests").iterdir()) == []  # no temporary file left either
    monkeypatch.undo()
    assert store.write_once("manifests/abc.json", b'{"a": 1}') is True
    assert store.write_once("manifests/abc.json", b'{"b": 2}') is False  # the first writer still wins
    assert store.read("manifests/abc.json") == b'{"a": 1}'
