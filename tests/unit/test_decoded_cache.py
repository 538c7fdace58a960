"""The decoded cache and the CPU precision default."""

from __future__ import annotations

import pytest
import torch

from imagedata import DecodedCache, ImageListDataset, cache_side, eval_transform, train_transform
from manifests import scan_image_folder

pytestmark = pytest.mark.unit


def test_the_cache_keeps_at_most_its_memory_bound_and_spills_the_rest_to_disk_unchanged(split_birds, tmp_path):
    records = scan_image_folder(split_birds).images
    paths = [split_birds / r.path for r in records[:12]]
    side = cache_side(32)
    one = DecodedCache(side, 10**9, None).get(0, paths[0])
    limit = one.numel() * 3 + 10  # room for three images
    cache = DecodedCache(side, limit, tmp_path / "spill")
    first = [cache.get(i, p) for i, p in enumerate(paths)]
    assert cache.bytes <= limit
    assert len(cache.memory) == 3
    assert cache.spilled == len(paths) - 3
    assert sorted(f.name for f in (tmp_path / "spill").iterdir()) == sorted(f"{i}.npy" for i in range(3, len(paths)))
    for i, p in enumerate(paths):  # read back from memory or disk: the same pixels
        assert torch.equal(cache.get(i, p), first[i])
    assert min(first[0].shape[1:]) == side


def test_with_the_cache_training_crops_are_a_function_of_seed_epoch_and_sample_and_evaluation_is_unchanged(split_birds, tmp_path):
    manifest = scan_image_folder(split_birds)
    train = manifest.split("train")
    classes = {c: i for i, c in enumerate(manifest.classes)}
    cached = ImageListDataset(split_birds, train, classes, train_transform(32), 32, seed=5, cache=DecodedCache(cache_side(32), 10**8, None))
    again = ImageListDataset(split_birds, train, classes, train_transform(32), 32, seed=5, cache=DecodedCache(cache_side(32), 10**8, None))
    for key in [(0, 1), (3, 1), (3, 2)]:
        image, _ = cached[key]
        assert image.shape == (3, 32, 32)
        assert image.dtype == torch.uint8
        assert torch.equal(image, cached[key][0])  # decoded first time, from the cache the second: the same crop
        assert torch.equal(image, again[key][0])  # another process (rank) with the same seed: the same crop
    assert not torch.equal(cached[(3, 1)][0], cached[(3, 2)][0])  # another epoch: another crop
    val = manifest.split("val")
    plain = ImageListDataset(split_birds, val, classes, eval_transform(32), 32)
    fast = ImageListDataset(split_birds, val, classes, eval_transform(32), 32, cache=DecodedCache(cache_side(32), 10**8, None))
    for i in range(len(val)):
        assert torch.equal(plain[i][0], fast[i][0])


def test_amp_auto_uses_bf16_on_cpus_with_native_bf16_and_off_keeps_fp32(monkeypatch):
    import train

    cpu = torch.device("cpu")
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    assert train.amp_settings("auto", cpu) == (torch.bfloat16, False)
    assert train.amp_settings("off", cpu) == (None, False)
    assert train.amp_settings("none", cpu) == (None, False)
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    assert train.amp_settings("auto", cpu) == (None, False)
    assert train.amp_settings("bf16", cpu) == (torch.bfloat16, False)


def test_metrics_record_the_precision_that_ran(tiny_birds, tmp_path):
    from topology import Topology
    from train import parse_args, run

    common = [
        "--data_dir",
        str(tiny_birds),
        "--num_epochs",
        "1",
        "--image_size",
        "32",
        "--batch_size",
        "8",
        "--workers",
        "0",
        "--weights",
        "none",
    ]
    assert run(parse_args([*common, "--output_dir", str(tmp_path / "a"), "--amp", "off"]), Topology(kind="none"))["precision"] == "fp32"
    assert run(parse_args([*common, "--output_dir", str(tmp_path / "b"), "--amp", "bf16"]), Topology(kind="none"))["precision"] == "bf16"


def test_a_cached_images_crop_is_the_same_bytes_wherever_the_tensor_lies_in_memory():
    """The 1-process / N-process equivalence needs the cached crop to be a function of its input
    only (torch's uint8 antialiased kernel is vectorised: alignment must not change its result)."""
    import random

    transform = train_transform(32)
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        image = torch.randint(0, 256, (3, 40 + trial, 70 - trial // 2), dtype=torch.uint8, generator=generator)
        first = transform(image, random.Random(trial))
        for offset in (1, 3, 7):
            padded = torch.empty(image.numel() + offset, dtype=torch.uint8)  # the same bytes at another alignment
            moved = padded[offset:].view(image.shape)
            moved.copy_(image)
            assert torch.equal(transform(moved, random.Random(trial)), first)
