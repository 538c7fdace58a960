"""Image screening, per-sample seeded augmentation and the loaders' guarantees."""

import shutil

import pytest
import torch
from PIL import Image

from imagedata import IGNORE_LABEL, EpochSampler, ImageListDataset, build_data, find_unreadable, train_transform, unreadable_reason
from manifests import DataError, ImageRecord, Manifest, manifest_sha256, scan_image_folder
from synthetic_birds import draw_bird, write_corrupt

pytestmark = pytest.mark.unit


@pytest.fixture
def odd_images(tmp_path):
    import random

    rng = random.Random(0)
    base = draw_bird("chicken", rng)
    files = {
        "rgb.jpg": lambda p: base.save(p),
        "gray.png": lambda p: base.convert("L").save(p),
        "cmyk.jpg": lambda p: base.convert("CMYK").save(p),
        "rgba.png": lambda p: base.convert("RGBA").save(p),
        "palette.png": lambda p: base.convert("P").save(p),
        "truncated.jpg": lambda p: write_corrupt(p, rng, 0),
        "text.jpg": lambda p: write_corrupt(p, rng, 1),
        "empty.jpg": lambda p: p.write_bytes(b""),
    }
    for name, make in files.items():
        make(tmp_path / name)
    return tmp_path


def test_truncated_text_and_empty_files_are_flagged_with_a_reason(odd_images):
    assert unreadable_reason(odd_images / "truncated.jpg").startswith("undecodable")
    assert unreadable_reason(odd_images / "text.jpg") == "not an image"
    assert unreadable_reason(odd_images / "empty.jpg") == "not an image"
    assert unreadable_reason(odd_images / "absent.jpg") == "missing"


@pytest.mark.parametrize("name", ["rgb.jpg", "gray.png", "cmyk.jpg", "rgba.png", "palette.png"])
def test_other_colour_modes_are_converted_not_skipped(odd_images, name):
    assert unreadable_reason(odd_images / name) is None


def test_screening_splits_the_work_over_ranks_and_the_union_is_complete(odd_images):
    records = [ImageRecord(path=p.name, label="chicken", split="train") for p in sorted(odd_images.iterdir())]
    alone = find_unreadable(odd_images, records)
    shards = [find_unreadable(odd_images, records, rank=r, world_size=3) for r in range(3)]
    merged = {k: v for shard in shards for k, v in shard.items()}
    assert merged == alone
    assert set(alone) == {"truncated.jpg", "text.jpg", "empty.jpg"}


def _manifest(root, records):
    classes = sorted({r.label for r in records})
    return Manifest(classes=tuple(classes), images=tuple(records), sha256=manifest_sha256(classes, records))


def test_a_class_with_only_unreadable_images_is_a_clear_error(tmp_path):
    import random

    rng = random.Random(0)
    for i in range(3):
        draw_bird("chicken", rng).save(tmp_path / f"c{i}.jpg")
    write_corrupt(tmp_path / "t0.jpg", rng, 1)
    records = [ImageRecord(f"c{i}.jpg", "chicken", "train" if i else "val") for i in range(3)] + [ImageRecord("t0.jpg", "turkey", "train")]
    manifest = _manifest(tmp_path, records)
    skipped = find_unreadable(tmp_path, records)
    with pytest.raises(DataError, match=r"\['turkey'\] have no readable training images \(1 unreadable"):
        build_data(tmp_path, manifest, skipped, image_size=32, batch_size=2, workers=0, rank=0, world_size=1, seed=0, pin_memory=False)


def test_an_empty_validation_split_is_a_clear_error(split_birds, tmp_path):
    shutil.copytree(split_birds / "train", tmp_path / "flat")
    manifest = scan_image_folder(tmp_path / "flat")
    train_only = Manifest(manifest.classes, tuple(ImageRecord(r.path, r.label, "train") for r in manifest.images), "x")
    with pytest.raises(DataError, match="validation split is empty"):
        build_data(
            tmp_path / "flat", train_only, {}, image_size=32, batch_size=2, workers=0, rank=0, world_size=1, seed=0, pin_memory=False
        )


def test_augmentation_depends_on_seed_epoch_and_sample_not_on_who_loads_it(tiny_birds):
    manifest = scan_image_folder(tiny_birds)
    records = [r for r in manifest.split("train") if "corrupt" not in r.path][:4]
    ds = ImageListDataset(tiny_birds, records, {"chicken": 0, "turkey": 1}, train_transform(32), 32, seed=5)
    first = ds[(2, 3)][0]
    torch.manual_seed(123)  # unrelated global RNG state must not matter
    assert torch.equal(ds[(2, 3)][0], first)
    assert not torch.equal(ds[(2, 4)][0], first)  # another epoch, another crop


def test_the_two_rank_batches_together_are_the_single_process_batch():
    data = list(range(32))
    single = list(EpochSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3))
    ranks = [list(EpochSampler(data, num_replicas=2, rank=r, shuffle=True, seed=3)) for r in range(2)]
    per_rank_batch = 4
    for step in range(len(data) // (2 * per_rank_batch)):
        together = (
            ranks[0][step * per_rank_batch : (step + 1) * per_rank_batch] + ranks[1][step * per_rank_batch : (step + 1) * per_rank_batch]
        )
        assert sorted(together) == sorted(single[step * 2 * per_rank_batch : (step + 1) * 2 * per_rank_batch])


def test_an_image_that_breaks_after_screening_becomes_an_ignored_sample(tmp_path):
    import random

    draw_bird("turkey", random.Random(0)).save(tmp_path / "t.jpg")
    ds = ImageListDataset(tmp_path, [ImageRecord("t.jpg", "turkey", "train")], {"chicken": 0, "turkey": 1}, train_transform(32), 32)
    assert ds[0][1] == 1
    (tmp_path / "t.jpg").write_bytes(b"garbage")
    image, label = ds[0]
    assert label == IGNORE_LABEL
    assert image.shape == (3, 32, 32)
    assert image.dtype == torch.uint8


def test_loaders_hand_out_uint8_batches_of_the_requested_size(split_birds):
    manifest = scan_image_folder(split_birds)
    data = build_data(split_birds, manifest, {}, image_size=40, batch_size=5, workers=0, rank=0, world_size=1, seed=0, pin_memory=False)
    images, labels = next(iter(data.train_loader))
    assert images.dtype == torch.uint8
    assert images.shape == (5, 3, 40, 40)
    assert set(labels.tolist()) <= {0, 1}
    assert (data.num_train, data.num_val) == (24, 8)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_loader_workers_of_both_loaders_start_by_the_chosen_method_never_by_fork(split_birds, method):
    manifest = scan_image_folder(split_birds)
    data = build_data(split_birds, manifest, {}, image_size=32, batch_size=4, workers=1, rank=0, world_size=1, seed=0, pin_memory=False,
                      start_method=method)  # fmt: skip
    for loader in (data.train_loader, data.val_loader):
        assert loader.multiprocessing_context.get_start_method() == method
        assert loader.persistent_workers


def test_the_default_start_method_is_the_fork_server_and_inline_loading_starts_no_workers(split_birds):
    manifest = scan_image_folder(split_birds)
    common = {"image_size": 32, "batch_size": 4, "rank": 0, "world_size": 1, "seed": 0, "pin_memory": False}
    threaded = build_data(split_birds, manifest, {}, workers=2, **common)
    assert threaded.train_loader.multiprocessing_context.get_start_method() == "forkserver"
    assert threaded.val_loader.multiprocessing_context.get_start_method() == "forkserver"
    inline = build_data(split_birds, manifest, {}, workers=0, **common)
    assert inline.train_loader.multiprocessing_context is None


def test_batches_from_fork_server_workers_equal_inline_batches(split_birds):
    """The (seed, epoch, sample) contract holds whoever loads the sample, wherever its process came from."""
    manifest = scan_image_folder(split_birds)
    common = {"image_size": 32, "batch_size": 4, "rank": 0, "world_size": 1, "seed": 5, "pin_memory": False}
    inline = build_data(split_birds, manifest, {}, workers=0, **common)
    workers = build_data(split_birds, manifest, {}, workers=2, **common)
    for data in (inline, workers):
        data.train_sampler.set_epoch(1)
    for (a, la), (b, lb) in zip(inline.train_loader, workers.train_loader, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(la, lb)
    for (a, _), (b, _) in zip(inline.val_loader, workers.val_loader, strict=True):
        assert torch.equal(a, b)


def test_a_fifo_or_a_folder_named_like_an_image_is_refused_without_blocking(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.jpg")  # opening it for reading would wait for a writer forever
    (tmp_path / "folder.jpg").mkdir()
    assert unreadable_reason(tmp_path / "pipe.jpg") == "not a regular file"
    assert unreadable_reason(tmp_path / "folder.jpg") == "not a regular file"


def test_screening_reports_progress_once_per_image(odd_images):
    records = [ImageRecord(path=p.name, label="chicken", split="train") for p in sorted(odd_images.iterdir())]
    seen: list[str] = []
    find_unreadable(odd_images, records, rank=1, world_size=2, on_checked=seen.append)
    mine = len(records[1::2])
    assert sorted(seen) == sorted(f"image {i} of {mine}" for i in range(1, mine + 1))


def test_images_of_any_size_come_out_square(tmp_path):
    Image.new("RGB", (300, 20), "red").save(tmp_path / "wide.png")
    ds = ImageListDataset(tmp_path, [ImageRecord("wide.png", "a", "train")], {"a": 0}, train_transform(24), 24)
    assert ds[0][0].shape == (3, 24, 24)


def test_auto_loader_workers_stay_inline_on_small_cpus_and_scale_on_gpus(monkeypatch):
    from imagedata import loader_workers

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert loader_workers(-1, 1, torch.device("cpu")) == 0
    assert loader_workers(-1, 2, torch.device("cpu")) == 0
    assert loader_workers(3, 2, torch.device("cpu")) == 3  # an explicit choice wins
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert loader_workers(-1, 1, torch.device("cuda", 0)) == 8
    assert loader_workers(-1, 1, torch.device("cpu")) == 4


def test_ranks_sharing_a_cache_folder_spill_validation_images_apart(split_birds, tmp_path):
    """Each rank holds another shard of the validation set, indexed from 0: in one spill folder,
    rank 1 would read rank 0's image number i as its own."""
    manifest = scan_image_folder(split_birds)
    common = {"image_size": 32, "batch_size": 2, "workers": 0, "world_size": 2, "seed": 0, "pin_memory": False}
    spilled = {r: build_data(split_birds, manifest, {}, rank=r, cache_bytes=1, cache_dir=tmp_path / "cache", **common) for r in (0, 1)}
    inline = {r: build_data(split_birds, manifest, {}, rank=r, **common) for r in (0, 1)}
    for _ in range(2):  # the first pass spills, the second reads back
        for rank in (0, 1):
            got = [images for images, _ in spilled[rank].val_loader]
            want = [images for images, _ in inline[rank].val_loader]
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), f"rank {rank}"
