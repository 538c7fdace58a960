"""Fine-tune an image classifier (ResNet-18 by default) on an ImageFolder tree or a frozen manifest.

The training snapshot of `retrain`: this folder is uploaded as an Azure ML run's source
directory, or run locally by the worker. It is a drop-in for the Azure ML sample
`pytorch_train.py` (same arguments, same outputs/model.pt, same `best_val_acc` metric) and adds
manifests, warm starts, DDP and Horovod.

Single process:
    python train.py --data_dir ./birds --num_epochs 30 --output_dir ./outputs

DDP on one machine (CPU: gloo, GPUs: nccl):
    torchrun --standalone --nproc_per_node=2 train.py --data_dir ./birds

DDP, older Azure ML style (PyTorchConfiguration, per-process arguments):
    python train.py --dist-backend nccl --dist-url $AZ_BATCHAI_PYTORCH_INIT_METHOD \
        --rank $AZ_BATCHAI_TASK_INDEX --world-size 2 --data_dir ./birds

Horovod (MpiConfiguration on Azure ML, or locally over Gloo):
    horovodrun -np 2 -H localhost:2 --gloo python train.py --distributed horovod --data_dir ./birds

Exit status: 0 success, 2 unusable input (bad data, bad checkpoint, bad arguments; the message
says what to fix), 124 stalled (no progress for --stall_timeout seconds; the message names the
phase), 1 anything unexpected (a collective that timed out after --collective_timeout included).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from reporting import Progress, Tracking
from stall_watchdog import EXIT_STALLED, Watchdog
from torch import nn

from imagedata import (
    DEFAULT_WORKER_START_METHOD,
    IGNORE_LABEL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    WORKER_START_METHODS,
    DataBundle,
    build_data,
    find_unreadable,
    loader_workers,
    prestart_worker_server,
    to_model_input,
)
from manifests import DataError, Manifest, load_manifest, scan_image_folder
from modelio import (
    ARCHITECTURES,
    WEIGHT_CHOICES,
    CheckpointError,
    atomic_write_bytes,
    build_model,
    cpu_state_dict,
    file_sha256,
    load_checkpoint,
    load_imagenet_backbone,
    make_checkpoint,
    save_checkpoint,
    warm_start,
)
from topology import DISTRIBUTED_CHOICES, Topology, TopologyError, setup_topology

log = logging.getLogger("train")

EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT = 0, 1, 2
assert EXIT_STALLED not in (EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT)
# The arguments recorded as the tracked run's parameters (paths and switches without effect on the result are left out).
TRACKED_ARGS = ("arch", "num_epochs", "batch_size", "image_size", "learning_rate", "momentum", "weight_decay", "step_size", "gamma",
                "lr_scaling", "amp", "bn", "seed", "weights", "val_fraction", "max_steps_per_epoch")  # fmt: skip


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work before reading a clock (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument(
        "--data_dir", default="./data", help="root the image paths are relative to (ImageFolder tree, or the manifest's root)"
    )
    data.add_argument(
        "--manifest", default=None, help="JSON manifest listing exactly the images to use (path, label, split, etag) with its sha256"
    )
    data.add_argument(
        "--manifest_sha256",
        default=None,
        help="with --manifest: the digest the run was frozen with; a manifest that hashes to anything else is refused",
    )
    data.add_argument(
        "--val_fraction",
        type=float,
        default=0.2,
        help="without a manifest or train/ and val/ folders: share of images (by a stable hash of the path) used for validation",
    )
    data.add_argument("--image_size", type=int, default=224, help="input side length in pixels")
    data.add_argument("--batch_size", type=int, default=16, help="images per step per process (global batch = this x world size)")
    data.add_argument("--workers", type=int, default=-1, help="DataLoader worker processes per rank (-1: a fair share of the cores)")
    data.add_argument(
        "--worker_start_method", choices=WORKER_START_METHODS, default=DEFAULT_WORKER_START_METHOD,
        help="how DataLoader workers start; never fork: the training process has threads by then (docs/training.md)",
    )  # fmt: skip
    data.add_argument(
        "--decode_cache_mb", type=int, default=2048,
        help="keep each decoded, resized image in memory up to this many MB per loader process (beyond it: on local disk); 0: decode every epoch",
    )  # fmt: skip
    data.add_argument("--cache_dir", default=None, help="where the decoded cache spills (default: a temporary folder, removed at the end)")

    model = p.add_argument_group("model")
    model.add_argument(
        "--arch", choices=ARCHITECTURES, default=None, help="torchvision architecture (default: the init checkpoint's, else resnet18)"
    )
    model.add_argument(
        "--weights",
        choices=WEIGHT_CHOICES,
        default="auto",
        help="backbone init without --init_checkpoint: imagenet (torchvision, may download), auto (imagenet only if already in the local torchvision cache), none (random)",
    )
    model.add_argument(
        "--init_checkpoint",
        default=None,
        help="model.pt to warm start from (usually the champion); its accuracy on this run's validation set is recorded as baseline_val_acc",
    )
    model.add_argument(
        "--bn",
        choices=("train", "frozen", "sync"),
        default="train",
        help="BatchNorm: train normally, freeze statistics and affine params, or SyncBatchNorm (DDP on CUDA only)",
    )

    optim = p.add_argument_group("optimisation (defaults are the reference script's)")
    optim.add_argument("--num_epochs", type=int, default=25, help="number of epochs")
    optim.add_argument("--learning_rate", type=float, default=0.001, help="SGD learning rate per process (see --lr_scaling)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    optim.add_argument("--weight_decay", type=float, default=0.0, help="SGD weight decay")
    optim.add_argument("--step_size", type=int, default=7, help="StepLR: epochs between learning-rate decays")
    optim.add_argument("--gamma", type=float, default=0.1, help="StepLR: decay factor")
    optim.add_argument(
        "--lr_scaling",
        choices=("linear", "none"),
        default="linear",
        help="linear: multiply the learning rate by the world size (the global batch grows with it), as Horovod recommends",
    )
    optim.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and augmentation")
    optim.add_argument(
        "--max_steps_per_epoch",
        type=int,
        default=0,
        help="stop each epoch after this many steps (0: full epoch); for benchmarks and smoke tests",
    )

    perf = p.add_argument_group("performance")
    perf.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off", "none"),
        default="auto",
        help="mixed precision: auto = bf16 (or fp16) on CUDA, bf16 on CPUs with native bf16 (AVX512-BF16, AMX), fp32 elsewhere; "
        "off (or none) = fp32 everywhere, bit-reproducible across world sizes",
    )
    perf.add_argument(
        "--channels_last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC memory format (faster convolutions on CPU and tensor cores)",
    )

    out = p.add_argument_group("output")
    out.add_argument("--output_dir", default="./outputs", help="where rank 0 writes model.pt and metrics.json (Azure ML uploads ./outputs)")
    out.add_argument(
        "--export_onnx",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="rank 0 also writes model.onnx and onnx_report.json (parity on this run's validation images) before metrics.json",
    )
    out.add_argument(
        "--onnx_tolerance", type=float, default=1e-4, help="with --export_onnx: the largest |PyTorch - onnxruntime| that passes"
    )
    out.add_argument("--onnx_samples", type=int, default=32, help="with --export_onnx: validation images in the parity check")
    out.add_argument("--log_every", type=int, default=20, help="steps between progress updates with a loss value")

    d = p.add_argument_group("distributed")
    d.add_argument(
        "--distributed",
        choices=DISTRIBUTED_CHOICES,
        default="auto",
        help="auto: DDP when launched by torchrun/Azure ML (WORLD_SIZE>1) or with --dist-url, Horovod under horovodrun, else one process",
    )
    d.add_argument(
        "--dist-backend",
        "--dist_backend",
        dest="dist_backend",
        choices=("nccl", "gloo"),
        default=None,
        help="DDP backend (default: nccl on GPU, gloo on CPU)",
    )
    d.add_argument(
        "--dist-url",
        "--dist_url",
        dest="dist_url",
        default=None,
        help="DDP init method URL, e.g. $AZ_BATCHAI_PYTORCH_INIT_METHOD or tcp://host:port",
    )
    d.add_argument("--rank", type=int, default=None, help="global rank, with --dist-url")
    d.add_argument("--world-size", "--world_size", dest="world_size", type=int, default=None, help="number of processes, with --dist-url")
    d.add_argument(
        "--collective_timeout", type=float, default=600.0,
        help="seconds a collective (and joining the process group) may wait for the other ranks before this rank fails "
        "(DDP: the process group's timeout; Horovod: its stall shutdown)",
    )  # fmt: skip
    d.add_argument(
        "--stall_timeout", type=float, default=900.0,
        help="seconds without progress (a training step, an evaluation batch, a screened image) before the watchdog "
        "ends this process with exit status 124, naming the phase that stalled; 0 turns it off",
    )  # fmt: skip
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = []
    if args.num_epochs < 1:
        problems.append("--num_epochs must be at least 1")
    if args.batch_size < 1:
        problems.append("--batch_size must be at least 1")
    if args.image_size < 16:
        problems.append("--image_size must be at least 16")
    if not 0.0 < args.val_fraction < 1.0:
        problems.append("--val_fraction must be between 0 and 1")
    if args.learning_rate <= 0:
        problems.append("--learning_rate must be positive")
    if args.step_size < 1:
        problems.append("--step_size must be at least 1")
    if not (math.isfinite(args.collective_timeout) and args.collective_timeout > 0):
        problems.append("--collective_timeout must be a positive number of seconds")
    if not (math.isfinite(args.stall_timeout) and args.stall_timeout >= 0):
        problems.append("--stall_timeout must be a number of seconds (0: off)")
    if problems:
        parser.error("; ".join(problems))
    return args


# --------------------------------------------------------------------------------------------
# Training


def cpu_has_native_bf16() -> bool:
    """True on CPUs that compute bf16 in hardware (AVX512-BF16 or AMX): there bf16 autocast was
    1.9-2.7x faster than fp32 at the same accuracy; elsewhere it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: trust oneDNN's own check
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_settings(requested: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, needs a GradScaler)."""
    if requested in ("off", "none"):
        return None, False
    if requested == "auto" and device.type != "cuda":
        return (torch.bfloat16, False) if cpu_has_native_bf16() else (None, False)
    if requested == "auto":
        requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16":
        if device.type != "cuda":
            raise DataError("--amp fp16 needs CUDA; use --amp bf16 on CPU")
        return torch.float16, True
    return torch.bfloat16, False


def set_train_mode(model: nn.Module, bn: str) -> None:
    model.train()
    if bn == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def freeze_batchnorm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for param in module.parameters():
                param.requires_grad_(False)


def state_digest(model: nn.Module) -> str:
    """sha256 over all weights and buffers: equal on every rank iff the replicas are identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def average_buffers(model: nn.Module, topo: Topology) -> None:
    """Average BatchNorm running statistics over the ranks.

    Each rank updates them from its own batches, so without this the replicas would be
    evaluated (and saved) with different statistics. The average is also the better estimate.
    """
    if not topo.distributed:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.copy_(topo.all_reduce_sum(buffer.detach().clone()) / topo.world_size)


class Inputs:
    """Turns a loader's uint8 batch into the model's input on the device: normalised, in the training
    memory format; `amp_dtype` is the autocast that training and evaluation both run under."""

    def __init__(self, device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool):
        self.device, self.amp_dtype, self.channels_last = device, amp_dtype, channels_last
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_model_input(images, self.device, self.mean, self.std, self.channels_last)
        return x, labels.to(self.device, non_blocking=True)


@dataclass
class Evaluation:
    """One pass over the validation set: rows of `confusion` are true classes, columns predicted."""

    loss: float
    accuracy: float
    images: int
    confusion: list[list[int]]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    topo: Topology,
    inputs: Inputs,
    watchdog: Watchdog | None = None,
    num_classes: int = 0,
) -> Evaluation:
    """Loss, accuracy and (with `num_classes`) the confusion matrix over the whole validation set,
    identical on every rank.

    Runs on the bare model, not the DDP wrapper: ranks hold different numbers of validation
    batches and DDP's forward may issue collectives.
    """
    watchdog = watchdog or Watchdog(0)
    model.eval()
    # loss sum, correct, count, then confusion[true][predicted] flattened: one all-reduce for all
    sums = torch.zeros(3 + num_classes * num_classes, dtype=torch.float64, device=topo.device)
    watchdog.beat("waiting for batch 1")
    for batch, (images, labels) in enumerate(loader, start=1):
        watchdog.beat(f"batch {batch}")
        x, y = inputs(images, labels)
        with torch.autocast(topo.device.type, dtype=inputs.amp_dtype, enabled=inputs.amp_dtype is not None):
            logits = model(x)
        valid = y != IGNORE_LABEL
        predicted = logits.argmax(dim=1)
        sums[0] += F.cross_entropy(logits.float(), y, ignore_index=IGNORE_LABEL, reduction="sum")
        sums[1] += ((predicted == y) & valid).sum()
        sums[2] += valid.sum()
        if num_classes:
            cells = y[valid] * num_classes + predicted[valid]
            sums[3:] += torch.bincount(cells, minlength=num_classes * num_classes).to(sums.dtype)
        watchdog.beat(f"waiting for batch {batch + 1}")
    watchdog.beat("summing over the ranks")
    sums = topo.all_reduce_sum(sums)
    count = int(sums[2].item())
    confusion = sums[3:].round().to(torch.int64).view(num_classes, num_classes).tolist() if num_classes else []
    if count == 0:
        return Evaluation(float("nan"), 0.0, 0, confusion)
    return Evaluation(float(sums[0] / count), float(sums[1] / count), count, confusion)


def per_class_accuracy(confusion: list[list[int]], class_names: list[str]) -> dict[str, float | None]:
    """Each class's recall on the validation set (None for a class with no validation image)."""
    return {name: (row[i] / sum(row) if sum(row) else None) for i, (name, row) in enumerate(zip(class_names, confusion, strict=True))}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


@dataclass
class Model:
    """The network on this rank, and where its starting weights came from."""

    net: nn.Module  # the bare model: evaluated and saved (never the DDP wrapper)
    arch: str
    weights_source: str  # "imagenet" | "random" | "checkpoint" | "checkpoint-backbone"
    baseline_comparable: bool  # warm-started with the same classes: the champion can be measured
    channels_last: bool


@dataclass
class Epoch:
    """One pass over the training data, summed over every rank."""

    loss_sum: float
    correct: float
    seen: int
    steps: int
    seconds: float  # training only, device synchronised at both ends
    data_wait: float  # of which waiting for the loader


_SCRATCH: list[Path] = []


def _scratch() -> Path:
    """A temporary folder for the decoded cache's spill, removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="retrain-decoded-"))
    _SCRATCH.append(path)
    atexit.register(shutil.rmtree, path, True)
    return path


def load_data(args: argparse.Namespace, topo: Topology, watchdog: Watchdog) -> tuple[Manifest, dict[str, str], DataBundle, int]:
    """The manifest (frozen, or scanned from the folder), the images no rank could read, the loaders."""
    root = Path(args.data_dir)
    watchdog.phase("reading the manifest" if args.manifest else "scanning the image folder")
    manifest = load_manifest(args.manifest, args.manifest_sha256) if args.manifest else scan_image_folder(root, args.val_fraction)
    workers = loader_workers(args.workers, topo.local_world_size, topo.device)
    if workers > 0:
        prestart_worker_server(args.worker_start_method)  # its imports overlap the screening
    watchdog.phase("screening images")
    unreadable = find_unreadable(root, manifest.images, topo.rank, topo.world_size, on_checked=watchdog.beat)
    watchdog.phase("gathering the screening results from every rank")
    skipped: dict[str, str] = {}
    for part in topo.all_gather_object(unreadable):
        skipped.update(part)
    if skipped and topo.is_writer:
        log.warning("skipping %d unreadable images, e.g. %s", len(skipped), ", ".join(f"{p} ({r})" for p, r in list(skipped.items())[:3]))
    watchdog.phase("building the data loaders")
    data = build_data(
        root,
        manifest,
        skipped,
        image_size=args.image_size,
        batch_size=args.batch_size,
        workers=workers,
        rank=topo.rank,
        world_size=topo.world_size,
        seed=args.seed,
        pin_memory=topo.device.type == "cuda",
        cache_bytes=max(0, args.decode_cache_mb) * 2**20,
        cache_dir=Path(args.cache_dir) if args.cache_dir else _scratch(),
        start_method=args.worker_start_method,
    )
    return manifest, skipped, data, workers


def load_model(args: argparse.Namespace, topo: Topology, class_names: list[str]) -> Model:
    """The architecture with its starting weights (the champion's for a warm start, else ImageNet's),
    BatchNorm handled as asked, on the device in the memory format that will train."""
    init = load_checkpoint(args.init_checkpoint) if args.init_checkpoint else None
    arch = args.arch or (init["arch"] if init else "resnet18")
    model = build_model(arch, len(class_names))
    same_head = False
    if init is not None:
        if init["arch"] != arch:
            raise CheckpointError(f"--init_checkpoint is a {init['arch']} but --arch is {arch}")
        same_head = warm_start(model, init, class_names)
        weights_source = "checkpoint" if same_head else "checkpoint-backbone"
    else:
        weights_source = load_imagenet_backbone(model, arch, args.weights)
    if args.bn == "frozen":
        freeze_batchnorm(model)
    if args.bn == "sync":
        if not (topo.kind == "ddp" and topo.device.type == "cuda"):
            raise DataError("--bn sync needs DDP on CUDA (SyncBatchNorm does not run on CPU)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = args.channels_last and topo.supports_channels_last
    if args.channels_last and not channels_last and topo.is_writer:
        log.warning("channels_last is not supported with %s; using NCHW", topo.kind)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=topo.device).to(memory_format=memory_format)
    return Model(model, arch, weights_source, init is not None and same_head, channels_last)


def train_one_epoch(
    args: argparse.Namespace,
    topo: Topology,
    epoch: int,
    model: nn.Module,
    optimizer,
    scaler,
    data: DataBundle,
    inputs: Inputs,
    progress: Progress,
    watchdog: Watchdog,
) -> Epoch:
    """One epoch of steps on this rank's shard; the sums come back reduced over every rank."""
    watchdog.phase(f"training, epoch {epoch}")
    device = topo.device
    steps_per_epoch = min(len(data.train_loader), args.max_steps_per_epoch or len(data.train_loader))
    data.train_sampler.set_epoch(epoch)
    set_train_mode(model, args.bn)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    synchronize(device)  # GPU work is asynchronous: the clock is read only when the device is idle
    epoch_start = fetch_start = time.perf_counter()
    data_wait, step_count = 0.0, 0
    watchdog.beat(f"waiting for batch 1 of {steps_per_epoch}")
    for step, (images, labels) in enumerate(data.train_loader, start=1):
        watchdog.beat(f"step {step}/{steps_per_epoch}")  # a hang from here on is in the forward/backward or DDP's all-reduce
        data_wait += time.perf_counter() - fetch_start
        step_count = step
        x, y = inputs(images, labels)
        with torch.autocast(device.type, dtype=inputs.amp_dtype, enabled=inputs.amp_dtype is not None):
            logits = model(x)
        valid = y != IGNORE_LABEL
        count = valid.sum()
        # Sum over valid samples / their count: an ignored (unreadable) sample changes
        # nothing, and a batch of only ignored samples gives a zero loss, not NaN.
        loss_sum = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_LABEL, reduction="sum")
        loss = loss_sum / count.clamp(min=1)
        optimizer.zero_grad()  # set_to_none is the default (and Horovod takes no arguments)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        # Accumulate on the device; reading values back every step would stall a GPU.
        sums[0] += loss_sum.detach()
        sums[1] += ((logits.detach().argmax(dim=1) == y) & valid).sum()
        sums[2] += count
        if progress.bar:
            shown_loss = float(loss.detach()) if step % args.log_every == 0 or step == steps_per_epoch else None
            elapsed = time.perf_counter() - epoch_start
            progress.step(epoch, step, steps_per_epoch, step * args.batch_size * topo.world_size / max(elapsed, 1e-9), shown_loss)
        if step >= steps_per_epoch:
            break
        watchdog.beat(f"waiting for batch {step + 1} of {steps_per_epoch}")
        fetch_start = time.perf_counter()
    watchdog.beat("summing the epoch over the ranks")
    sums = topo.all_reduce_sum(sums)
    synchronize(device)
    seconds = time.perf_counter() - epoch_start
    return Epoch(float(sums[0]), float(sums[1]), int(sums[2].item()), step_count, seconds, data_wait)


def epoch_row(epoch: int, trained: Epoch, val_loss: float, val_acc: float, lr: float, seconds: float) -> dict[str, Any]:
    """One line of metrics.json's history."""
    return {
        "epoch": epoch,
        "train_loss": trained.loss_sum / max(trained.seen, 1),
        "train_acc": trained.correct / max(trained.seen, 1),
        "val_loss": val_loss,
        "val_acc": val_acc,
        "lr": lr,
        "seconds": round(seconds, 3),
        "train_seconds": round(trained.seconds, 3),
        "steps": trained.steps,
        "images_per_s": round(trained.seen / max(trained.seconds, 1e-9), 2),
        "data_wait_s": round(trained.data_wait, 3),
        "data_wait_fraction": round(trained.data_wait / max(trained.seconds, 1e-9), 4),
    }


@dataclass
class Fit:
    """The epochs' results: one history row each, and the best epoch's weights (rank 0 keeps them)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_acc: float = -1.0
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_confusion: list[list[int]] = field(default_factory=list)  # the best epoch's, on the validation set
    train_images: int = 0
    train_seconds: float = 0.0


def measure_baseline(model: Model, data: DataBundle, topo: Topology, inputs: Inputs, watchdog: Watchdog) -> float | None:
    """The champion judged on this run's own validation set, so the gate compares like with like."""
    if not model.baseline_comparable:
        return None
    watchdog.phase("evaluating the init checkpoint (baseline)")
    baseline_val_acc = evaluate(model.net, data.val_loader, topo, inputs, watchdog).accuracy
    if topo.is_writer:
        log.info("baseline (init checkpoint) val_acc=%.4f on %d images", baseline_val_acc, data.num_val)
    return baseline_val_acc


def make_optimizer(args: argparse.Namespace, topo: Topology, model: Model) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    """SGD at the (optionally world-size scaled) learning rate, wrapped for the topology."""
    effective_lr = args.learning_rate * (topo.world_size if args.lr_scaling == "linear" else 1)
    params = [p for p in model.net.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=effective_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    trained_model, optimizer = topo.wrap(model.net, sgd)
    return trained_model, optimizer, effective_lr


def fit(
    args: argparse.Namespace,
    topo: Topology,
    model: Model,
    data: DataBundle,
    inputs: Inputs,
    use_scaler: bool,
    tracking: Tracking,
    watchdog: Watchdog,
) -> tuple[Fit, float]:
    """Train for the requested epochs, evaluating after each; returns the results and the learning rate."""
    watchdog.phase("wrapping the model for the topology")
    trained_model, optimizer, effective_lr = make_optimizer(args, topo, model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.step_size, gamma=args.gamma)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    progress = Progress(topo.is_writer, args.num_epochs)
    result = Fit()
    for epoch in range(1, args.num_epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        epoch_start = time.perf_counter()
        trained = train_one_epoch(args, topo, epoch, trained_model, optimizer, scaler, data, inputs, progress, watchdog)
        result.train_images += trained.seen
        result.train_seconds += trained.seconds
        scheduler.step()
        watchdog.phase(f"averaging BatchNorm statistics, epoch {epoch}")
        average_buffers(model.net, topo)
        watchdog.phase(f"evaluation, epoch {epoch}")
        judged = evaluate(model.net, data.val_loader, topo, inputs, watchdog, num_classes=len(data.class_names))
        val_acc = judged.accuracy
        row = epoch_row(epoch, trained, judged.loss, val_acc, lr, time.perf_counter() - epoch_start)
        result.history.append(row)
        progress.epoch_done(row)
        tracking.epoch(row)
        if val_acc > result.best_val_acc:  # strictly better, as the reference keeps the first best
            result.best_val_acc, result.best_epoch, result.best_confusion = val_acc, epoch, judged.confusion
            if topo.is_writer:
                result.best_state = cpu_state_dict(model.net)
    return result, effective_lr


def run(args: argparse.Namespace, topo: Topology, watchdog: Watchdog | None = None) -> dict[str, Any]:
    """Data, model, baseline, epochs, then (rank 0) model.pt, the optional ONNX export and metrics.json."""
    watchdog = watchdog or Watchdog(0)
    started = time.time()
    torch.manual_seed(args.seed)  # same initial weights on every rank
    device = topo.device
    manifest, skipped, data, workers = load_data(args, topo, watchdog)
    watchdog.phase("loading the model")
    model = load_model(args, topo, data.class_names)
    amp_dtype, use_scaler = amp_settings(args.amp, device)
    inputs = Inputs(device, amp_dtype, model.channels_last)
    baseline_val_acc = measure_baseline(model, data, topo, inputs, watchdog)
    if topo.is_writer:
        log.info(
            "training %s on %s: %d train / %d val images, %d classes %s, world_size=%d (%s%s), device=%s, batch=%dx%d, lr=%g, amp=%s, channels_last=%s, workers=%d, weights=%s",
            model.arch, manifest.sha256[:12], data.num_train, data.num_val, len(data.class_names), data.class_names, topo.world_size,
            topo.kind, f"/{topo.backend}" if topo.backend else "", device, args.batch_size, topo.world_size,
            args.learning_rate * (topo.world_size if args.lr_scaling == "linear" else 1), amp_dtype, model.channels_last, workers,
            model.weights_source,
        )  # fmt: skip
    watchdog.phase("starting the tracked run")
    tracking = Tracking(topo.is_writer)
    tracking.start(
        {**{k: v for k, v in vars(args).items() if k in TRACKED_ARGS}, "world_size": topo.world_size, "distributed": topo.kind},
        {"manifest_sha256": manifest.sha256, "arch": model.arch, "weights_source": model.weights_source},
    )
    result, effective_lr = fit(args, topo, model, data, inputs, use_scaler, tracking, watchdog)

    watchdog.phase("comparing the replicas' weights")
    digests = topo.all_gather_object(state_digest(model.net))
    if len(set(digests)) != 1:
        raise RuntimeError(f"replicas diverged: per-rank weight digests differ {digests}")
    history = result.history
    metrics: dict[str, Any] = {
        "baseline_val_acc": baseline_val_acc,
        "best_val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "final_val_acc": history[-1]["val_acc"],
        # The best epoch (the weights saved) on this run's validation set: rows true, columns predicted.
        "confusion_matrix": result.best_confusion,
        "per_class_val_acc": per_class_accuracy(result.best_confusion, data.class_names),
        "history": history,
        "images_per_s": round(result.train_images / max(result.train_seconds, 1e-9), 2),
        "data_wait_fraction": round(sum(r["data_wait_s"] for r in history) / max(result.train_seconds, 1e-9), 4),
        "world_size": topo.world_size,
        "distributed": topo.kind,
        "backend": topo.backend,
        "device": str(device),
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
        "precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32") if amp_dtype else "fp32",
        "channels_last": model.channels_last,
        "num_train": data.num_train,
        "num_val": data.num_val,
        "skipped_images": len(skipped),
        "skipped_examples": dict(list(sorted(skipped.items()))[:20]),
        "class_names": data.class_names,
        "manifest_sha256": manifest.sha256,
        "init_checkpoint_sha256": file_sha256(args.init_checkpoint) if args.init_checkpoint else None,
        "weights_source": model.weights_source,
        "arch": model.arch,
        "image_size": args.image_size,
        "batch_size_per_rank": args.batch_size,
        "effective_learning_rate": effective_lr,
        "seed": args.seed,
        "replica_digest": digests[0],
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "duration_s": round(time.time() - started, 3),
        "torch_version": str(torch.__version__),
    }
    if topo.is_writer:
        watchdog.phase("writing the outputs" + (" and exporting ONNX" if args.export_onnx else ""))
        save_outputs(args, model, result, data.class_names, metrics, manifest.sha256, tracking)
    return metrics


def save_outputs(
    args: argparse.Namespace,
    model: Model,
    result: Fit,
    class_names: list[str],
    metrics: dict[str, Any],
    manifest_sha256: str,
    tracking: Tracking,
) -> None:
    """Rank 0: the best epoch's weights as model.pt (and ONNX when asked), metrics.json, the run's final metrics."""
    assert result.best_state is not None, "rank 0 keeps the best epoch's weights (num_epochs >= 1)"
    onnx = None
    if args.export_onnx:
        onnx = {"data_dir": args.data_dir, "manifest": args.manifest, "tolerance": args.onnx_tolerance, "samples": args.onnx_samples}
    write_outputs(Path(args.output_dir), model.arch, result.best_state, class_names, args.image_size, metrics, manifest_sha256, onnx)
    output_dir = Path(args.output_dir)
    tracking.finish(metrics, [output_dir / "metrics.json", output_dir / "onnx_report.json"])
    baseline = metrics["baseline_val_acc"]
    log.info(
        "best_val_acc=%.4f (epoch %d)%s; wrote %s",
        result.best_val_acc,
        result.best_epoch,
        f", baseline_val_acc={baseline:.4f}" if baseline is not None else "",
        args.output_dir,
    )


def write_outputs(
    output_dir: Path,
    arch: str,
    state: dict,
    class_names: list[str],
    image_size: int,
    metrics: dict[str, Any],
    manifest_sha256: str,
    onnx: dict[str, Any] | None = None,
) -> None:
    """model.pt first, then (optionally) the ONNX export, metrics.json last: its presence means complete.

    `onnx` holds export_onnx.export_and_verify's keyword arguments when the run exports ONNX
    itself (on a cluster the worker then needs neither torch nor the data to complete the run).
    """
    summary = {
        k: v for k, v in metrics.items() if isinstance(v, (int, float, str, type(None))) and not (isinstance(v, float) and math.isnan(v))
    }
    checkpoint = make_checkpoint(
        arch=arch, state_dict=state, class_names=class_names, image_size=image_size, metrics=summary, manifest_sha256=manifest_sha256
    )
    metrics["model_sha256"] = save_checkpoint(checkpoint, output_dir / "model.pt")
    if onnx is not None:
        from export_onnx import export_and_verify

        report = export_and_verify(output_dir / "model.pt", output_dir / "model.onnx", report_path=output_dir / "onnx_report.json", **onnx)
        metrics["onnx"] = {k: report[k] for k in ("passed", "max_abs_diff", "tolerance", "onnx_sha256", "opset")}
        log.info(
            "ONNX parity max |diff| %.2e (tolerance %g): %s",
            report["max_abs_diff"],
            report["tolerance"],
            "ok" if report["passed"] else "FAILED",
        )
    atomic_write_bytes(output_dir / "metrics.json", (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank_hint = os.environ.get("RANK") or os.environ.get("HOROVOD_RANK") or (str(args.rank) if args.rank is not None else "0")
    logging.basicConfig(
        level=logging.INFO if rank_hint == "0" else logging.WARNING,
        format="%(asctime)s [train] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    # Loader workers are forked by a fork server that starts with this environment: with numpy's
    # BLAS pool off there, the server has one thread when it forks (and the workers do no BLAS).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    watchdog = Watchdog(args.stall_timeout).start()
    watchdog.phase("joining the process group")
    try:
        topo = setup_topology(
            args.distributed,
            dist_backend=args.dist_backend,
            dist_url=args.dist_url,
            rank=args.rank,
            world_size=args.world_size,
            timeout_s=args.collective_timeout,
        )
    except TopologyError as exc:
        watchdog.stop()
        print(f"train.py: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        run(args, topo, watchdog)
        return EXIT_OK
    except (DataError, CheckpointError) as exc:
        if topo.is_writer:
            print(f"train.py: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        if not topo.is_collective_failure(exc):
            raise
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        print(
            f"train.py: error: rank {topo.rank}: a collective failed in phase '{watchdog.describe()}' "
            f"(another rank stalled or died; --collective_timeout {args.collective_timeout:g} s): {first_line}",
            file=sys.stderr,
        )
        return EXIT_UNEXPECTED
    finally:
        watchdog.phase("shutting down the process group")  # destroying a group with a dead peer can hang too
        topo.close()
        watchdog.stop()


if __name__ == "__main__":
    sys.exit(main())
