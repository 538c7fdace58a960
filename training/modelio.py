"""Building the classifier and reading/writing `model.pt`.

`model.pt` is a plain dict of tensors, strings, numbers and lists, so it loads with
`torch.load(path, weights_only=True)` and never unpickles code:

    format          "retrain.model/v1"
    arch            torchvision architecture name, e.g. "resnet18"
    state_dict      weights without the DDP "module." prefix
    class_names     index -> class name
    image_size      input side length in pixels
    normalization   {"mean": [r, g, b], "std": [r, g, b]} applied to [0, 1] RGB
    metrics         the run's summary metrics (best_val_acc, baseline_val_acc, ...)
    manifest_sha256 digest of the data the weights were trained on
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models

from imagedata import IMAGENET_MEAN, IMAGENET_STD

MODEL_FORMAT = "retrain.model/v1"
ARCHITECTURES = ("resnet18", "resnet34", "resnet50")
WEIGHT_CHOICES = ("auto", "imagenet", "none")


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run; the message says why."""


def build_model(arch: str, num_classes: int) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unsupported architecture {arch!r}; choose one of {ARCHITECTURES}")
    model = getattr(models, arch)(weights=None)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _imagenet_weights(arch: str):
    return models.get_model_weights(arch).IMAGENET1K_V1


def cached_imagenet_path(arch: str) -> Path:
    """Where torchvision keeps the ImageNet weights once downloaded (TORCH_HOME aware)."""
    url = _imagenet_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_imagenet_backbone(model: nn.Module, arch: str, mode: str) -> str:
    """Initialise the backbone from ImageNet weights; returns what was used ("imagenet"/"random").

    mode "imagenet" loads through torchvision (downloading when allowed, as on a cluster);
    "auto" uses the weights only if they are already in the local torchvision cache (no network
    here); "none" keeps the random initialisation.
    """
    if mode not in WEIGHT_CHOICES:
        raise CheckpointError(f"--weights must be one of {WEIGHT_CHOICES}")
    if mode == "none":
        return "random"
    if mode == "auto":
        path = cached_imagenet_path(arch)
        if not path.is_file():
            return "random"
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state = _imagenet_weights(arch).get_state_dict(progress=False)
    # The ImageNet head has 1000 outputs; ours is new, so keep only the backbone.
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise CheckpointError(f"ImageNet weights do not fit {arch}: missing={missing} unexpected={unexpected}")
    return "imagenet"


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights as the bare model names them (DDP and torch.compile wrap with prefixes)."""
    clean = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        clean[key] = value
    return clean


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in strip_module_prefix(model.state_dict()).items()}


def make_checkpoint(
    *,
    arch: str,
    state_dict: Mapping[str, torch.Tensor],
    class_names: list[str],
    image_size: int,
    metrics: Mapping[str, Any],
    manifest_sha256: str,
) -> dict[str, Any]:
    return {
        "format": MODEL_FORMAT,
        "arch": arch,
        "state_dict": strip_module_prefix(state_dict),
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "image_size": int(image_size),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "metrics": dict(metrics),
        "manifest_sha256": manifest_sha256,
        "torch_version": str(torch.__version__),
    }


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(checkpoint: Mapping[str, Any], path: Path) -> str:
    """Atomically write model.pt; returns its sha256."""
    import io

    buffer = io.BytesIO()
    torch.save(dict(checkpoint), buffer)
    data = buffer.getvalue()
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and sanity-check a model.pt written by this script (weights only, no code)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path} does not exist") from exc
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"checkpoint {path} cannot be loaded with weights_only=True: {exc}") from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} is not a {MODEL_FORMAT} file (no state_dict)")
    fmt = checkpoint.get("format")
    if fmt not in (None, MODEL_FORMAT):
        raise CheckpointError(f"checkpoint {path} has format {fmt!r}; expected {MODEL_FORMAT}")
    checkpoint.setdefault("arch", "resnet18")
    checkpoint["state_dict"] = strip_module_prefix(checkpoint["state_dict"])
    if "class_names" not in checkpoint:
        fc = checkpoint["state_dict"].get("fc.weight")
        n = int(fc.shape[0]) if fc is not None else 0
        checkpoint["class_names"] = [str(i) for i in range(n)]
    return checkpoint


def model_from_checkpoint(checkpoint: Mapping[str, Any]) -> nn.Module:
    model = build_model(checkpoint["arch"], len(checkpoint["class_names"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model


def warm_start(model: nn.Module, checkpoint: Mapping[str, Any], class_names: list[str]) -> bool:
    """Load a champion's weights into `model`.

    Returns True when the head was loaded too (same classes, same order), which is what makes
    the champion's accuracy on this run's validation set a like-for-like baseline. With a
    different class list only the backbone carries over.
    """
    state = dict(checkpoint["state_dict"])
    same_head = list(checkpoint["class_names"]) == list(class_names)
    if not same_head:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = set() if same_head else {"fc.weight", "fc.bias"}
    if unexpected or set(missing) - allowed_missing:
        raise CheckpointError(
            f"--init_checkpoint does not fit {checkpoint['arch']}: missing={sorted(missing)} unexpected={sorted(unexpected)}"
        )
    return same_head


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
