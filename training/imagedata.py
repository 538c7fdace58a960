"""Image loading for training and evaluation: unreadable-image screening, datasets and DataLoaders.

Design choices that matter for correctness:
- Bad images (truncated, not an image, undecodable mode) are found by a screening pass before
  training, split over the ranks and gathered, so every rank drops the same files and the
  samplers stay identical. An image that breaks later anyway becomes an ignored sample
  (label -100) instead of a crash or an uneven batch that would desynchronise DDP.
- Augmentation randomness is a function of (seed, epoch, sample index), not of the worker or
  rank that happens to load the sample: 1 process and N processes see identical inputs, and a
  run is reproducible.
- Loaders hand out uint8 tensors; conversion to float and normalisation happen on the device
  (4x less host-to-device traffic, no float work in the loader processes).
- Loader worker processes come from a fork server, never from `fork()` of the training process:
  by the time a loader starts its workers, the training process has threads (the process group's,
  other loaders' queue feeders, pin-memory, Horovod's), and a fork while another thread holds a
  lock can leave the child waiting for that lock forever (docs/training.md, "Loader workers").
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms
from torchvision.transforms import functional as TF

from manifests import DataError, ImageRecord, Manifest, NotARegularFileError, open_regular_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_LABEL = -100
# How DataLoader workers are started. Both are safe in a process that already runs threads;
# forkserver starts each worker in milliseconds from a single-threaded server that has the
# loading code imported, spawn pays an interpreter start and the imports per worker.
WORKER_START_METHODS = ("forkserver", "spawn")
DEFAULT_WORKER_START_METHOD = "forkserver"
# Imported once by the fork server, so that the workers it forks start with them loaded (the
# expensive part of a worker's start). Installed packages only: Python 3.11's fork server does not
# apply the parent's sys.path before preloading, so this file's own modules are imported by each
# worker, in milliseconds once torch is there.
FORKSERVER_PRELOAD = ["numpy", "torch", "torchvision.transforms.functional", "PIL.Image"]


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully and return it as RGB; raises on anything unreadable."""
    with warnings.catch_warnings(), open_regular_file(path) as file:
        # A decompression-bomb-sized image is treated as bad data, not a warning.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(file) as img:
            img.load()  # forces the full decode: truncated files fail here, not in the loader
            if img.width < 1 or img.height < 1:
                raise ValueError("image has no pixels")
            return img.convert("RGB")


def unreadable_reason(path: Path) -> str | None:
    """None when `path` decodes to an RGB image, else a short reason."""
    try:
        open_rgb(path)
    except FileNotFoundError:
        return "missing"
    except NotARegularFileError:
        return "not a regular file"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"undecodable: {exc}"[:200]
    return None


def find_unreadable(
    root: Path,
    records: Sequence[ImageRecord],
    rank: int = 0,
    world_size: int = 1,
    on_checked: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Screen this rank's share of `records`; returns {path: reason} for the bad ones.

    The caller gathers the per-rank results so that all ranks drop the same images.
    `on_checked(progress)` is called after each image (train.py's watchdog counts it as progress).
    """
    mine = list(records)[rank::world_size]
    threads = max(1, min(8, (os.cpu_count() or 1)))

    def screen(numbered: tuple[int, ImageRecord]) -> str | None:
        reason = unreadable_reason(root / numbered[1].path)
        if on_checked is not None:
            on_checked(f"image {numbered[0]} of {len(mine)}")
        return reason

    with ThreadPoolExecutor(max_workers=threads) as pool:  # PIL releases the GIL while decoding
        reasons = list(pool.map(screen, enumerate(mine, start=1)))
    return {r.path: reason for r, reason in zip(mine, reasons, strict=True) if reason is not None}


def cache_side(image_size: int) -> int:
    """The short side images are kept at: what the evaluation crop resizes to (ImageNet's 256/224)."""
    return round(image_size * 256 / 224)


class DecodedCache:
    """Each image decoded once per run, its short side resized to `side`, kept as uint8 CHW: in
    memory up to `max_bytes` (per process), beyond that in .npy files under `spill_dir` on local
    disk, read back memory-mapped. Later epochs crop and flip the kept tensor instead of decoding the
    JPEG again; a run over 1,000,000 images holds at most `max_bytes` of them in RAM."""

    def __init__(self, side: int, max_bytes: int, spill_dir: Path | None):
        self.side, self.max_bytes, self.spill_dir = side, max_bytes, spill_dir
        self.memory: dict[int, torch.Tensor] = {}
        self.bytes = 0
        self.spilled = 0

    def _file(self, index: int) -> Path | None:
        return self.spill_dir / f"{index}.npy" if self.spill_dir is not None else None

    def get(self, index: int, path: Path) -> torch.Tensor:
        found = self.memory.get(index)
        if found is not None:
            return found
        spill = self._file(index)
        if spill is not None and spill.exists():
            import numpy as np

            return torch.from_numpy(np.array(np.load(spill, mmap_mode="r")))
        image = open_rgb(path)
        tensor = TF.pil_to_tensor(TF.resize(image, self.side, antialias=True)).contiguous()  # one layout, one resize kernel
        size = tensor.numel()
        if self.bytes + size <= self.max_bytes:
            self.memory[index] = tensor
            self.bytes += size
        elif spill is not None:
            import numpy as np

            spill.parent.mkdir(parents=True, exist_ok=True)
            tmp = spill.with_name(f".{spill.name}.{os.getpid()}.tmp.npy")
            np.save(tmp, tensor.numpy())
            os.replace(tmp, spill)  # another worker may write the same file: either copy is whole
            self.spilled += 1
        return tensor


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return zlib.crc32(f"{seed}:{epoch}:{index}".encode()) & 0x7FFFFFFF


class SeededTrainTransform:
    """RandomResizedCrop + horizontal flip + to uint8 tensor, drawing from the `random.Random` it is given.

    The same algorithm as torchvision's RandomResizedCrop, but with an explicit generator: seeding
    one per sample costs a microsecond, where swapping torch's global RNG state cost ~75 us.
    """

    def __init__(self, image_size: int, scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = image_size, scale, ratio

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        # Fallback: the largest centred crop within the aspect-ratio range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Image.Image | torch.Tensor, rng: random.Random) -> torch.Tensor:
        """A PIL image, or a uint8 CHW tensor (the decoded cache's): the same draws either way.

        A cached tensor is cropped and resized by torch's uint8 antialiased kernel, which is
        deterministic (the same bytes for the same input, wherever it lies in memory: checked on
        300 random crops) and faster than a round trip through PIL."""
        width, height = (image.width, image.height) if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])
        top, left, h, w = self.crop_box(width, height, rng)
        out = TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
        if rng.random() < 0.5:
            out = TF.hflip(out)
        return TF.pil_to_tensor(out) if isinstance(out, Image.Image) else out.contiguous()


def train_transform(image_size: int) -> SeededTrainTransform:
    return SeededTrainTransform(image_size)


def eval_transform(image_size: int) -> transforms.Compose:
    # The usual ImageNet evaluation crop: resize the short side to size*256/224, centre crop.
    return transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224), antialias=True),
            transforms.CenterCrop(image_size),
            transforms.PILToTensor(),
        ]
    )


class ImageListDataset(Dataset):
    """(uint8 CHW tensor, class index) for each record; keys are (index, epoch) tuples or ints."""

    def __init__(
        self,
        root: Path,
        records: Sequence[ImageRecord],
        class_to_idx: dict[str, int],
        transform,
        image_size: int,
        seed: int = 0,
        cache: DecodedCache | None = None,
    ):
        self.cache = cache
        self.root = Path(root)
        self.records = list(records)
        self.class_to_idx = class_to_idx
        self.transform = transform
        self.image_size = image_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        record = self.records[index]
        try:
            if self.cache is not None:
                image: Any = self.cache.get(index, self.root / record.path)
            else:
                image = open_rgb(self.root / record.path)
            if isinstance(self.transform, SeededTrainTransform):
                tensor = self.transform(image, random.Random(sample_seed(self.seed, epoch, index)))
            elif self.cache is not None:  # already at the evaluation size: the centre crop is all that is left
                tensor = TF.center_crop(image, [self.image_size, self.image_size]).contiguous()
            else:
                tensor = self.transform(image)  # evaluation: deterministic
            return tensor, self.class_to_idx[record.label]
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            # Screened out before training, so this means the file changed under us. Keep the
            # batch shape (every rank must take the same number of steps) and ignore the sample.
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), IGNORE_LABEL


class EpochSampler(DistributedSampler):
    """DistributedSampler that tags each index with the epoch, so augmentation can be seeded by it
    even inside persistent DataLoader workers that never see `set_epoch`."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in super().__iter__():
            yield (index, epoch)


@dataclass
class DataBundle:
    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: EpochSampler
    class_names: list[str]
    num_train: int
    num_val: int  # across all ranks
    skipped: dict[str, str]  # path -> reason, across all ranks


def _check_usable(manifest: Manifest, train: list[ImageRecord], val: list[ImageRecord], skipped: dict[str, str]) -> None:
    note = f" ({len(skipped)} unreadable images were skipped)" if skipped else ""
    if not train and not val:
        raise DataError(f"the data set is empty: no readable images{note}")
    empty = [c for c in manifest.classes if not any(r.label == c for r in train)]
    if empty:
        raise DataError(f"class(es) {empty} have no readable training images{note}; every class needs at least one")
    if not val:
        raise DataError(f"the validation split is empty{note}; add val images (or a val/ folder)")


def loader_workers(requested: int, local_world_size: int, device: torch.device) -> int:
    """-1 means automatic: worker processes only where they do not steal the compute's cores.

    On CPU every loader process competes with the training threads, and with two or fewer cores
    per rank loading inline was measured faster (benchmarks/train_throughput.py: 112 px,
    215 vs 231 ms/step). On GPU the cores are otherwise idle, so use several.
    """
    if requested >= 0:
        return requested
    cores_per_rank = max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    if device.type == "cuda":
        return max(1, min(8, cores_per_rank - 1))
    return 0 if cores_per_rank <= 2 else min(4, cores_per_rank // 4)


def worker_context(start_method: str) -> multiprocessing.context.BaseContext:
    """The multiprocessing context loader workers start from: one of `WORKER_START_METHODS` (train.py
    offers only those; "fork" is accepted here for benchmarks/loader_start.py's comparison)."""
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # Has effect only until this process's fork server starts; the server inherits os.environ
        # and sys.path from that moment (train.py keeps BLAS single-threaded there: see main()).
        context.set_forkserver_preload(FORKSERVER_PRELOAD)
    return context


def prestart_worker_server(start_method: str) -> None:
    """Start the fork server now (its imports take seconds) so it is ready when the first loader
    needs workers; a no-op for other start methods or once it runs."""
    worker_context(start_method)
    if start_method == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def build_data(
    root: Path,
    manifest: Manifest,
    skipped: dict[str, str],
    *,
    image_size: int,
    batch_size: int,
    workers: int,
    rank: int,
    world_size: int,
    seed: int,
    pin_memory: bool,
    cache_bytes: int = 0,
    cache_dir: Path | None = None,
    start_method: str = DEFAULT_WORKER_START_METHOD,
) -> DataBundle:
    """`cache_bytes` > 0 turns on the decoded cache (per process, per split), spilling to `cache_dir`;
    with `workers` > 0 each loader's workers start by `start_method` (see `worker_context`)."""
    train = [r for r in manifest.split("train") if r.path not in skipped]
    val = [r for r in manifest.split("val") if r.path not in skipped]
    _check_usable(manifest, train, val, skipped)
    class_to_idx = {name: i for i, name in enumerate(manifest.classes)}
    caches: list[DecodedCache | None] = [None, None]
    if cache_bytes > 0:
        side = cache_side(image_size)
        caches = [
            DecodedCache(side, cache_bytes * 3 // 4, cache_dir / "train" if cache_dir else None),
            DecodedCache(side, cache_bytes // 4, cache_dir / f"val-{rank}" if cache_dir else None),
        ]
    train_set = ImageListDataset(root, train, class_to_idx, train_transform(image_size), image_size, seed=seed, cache=caches[0])
    # Validation is sharded without padding (DistributedSampler would repeat samples and skew
    # accuracy); the per-rank (correct, count) sums are reduced afterwards.
    val_set = ImageListDataset(
        root, val[rank::world_size], class_to_idx, eval_transform(image_size), image_size, seed=seed, cache=caches[1]
    )
    sampler = EpochSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    common: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": pin_memory,
        "persistent_workers": workers > 0,
    }
    if workers > 0:
        common["prefetch_factor"] = 4
        common["multiprocessing_context"] = worker_context(start_method)
    # Full batches only: a trailing batch of one breaks BatchNorm and skews the step; the dropped
    # remainder differs every epoch because the order is reshuffled. A data set smaller than one
    # batch per rank still trains, on one partial batch.
    drop_last = sampler.num_samples >= batch_size
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **common)
    val_loader = DataLoader(val_set, batch_size=batch_size * 2, shuffle=False, **common)
    return DataBundle(
        train_loader=train_loader,
        val_loader=val_loader,
        train_sampler=sampler,
        class_names=list(manifest.classes),
        num_train=len(train),
        num_val=len(val),
        skipped=dict(skipped),
    )


def to_model_input(batch: torch.Tensor, device: torch.device, mean: torch.Tensor, std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 NCHW batch -> normalised float on `device` (in the requested memory format)."""
    x = batch.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.float().div_(255.0).sub_(mean).div_(std)
