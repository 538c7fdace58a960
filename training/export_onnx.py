"""Export model.pt to ONNX and prove the ONNX model computes what the PyTorch model computes.

    python export_onnx.py --model outputs/model.pt --output outputs/model.onnx \
        --data_dir ./birds [--manifest manifest.json] --report outputs/onnx_report.json

Steps: load model.pt (weights only), export with a dynamic batch axis, `onnx.checker`, then run
the same real validation images through PyTorch (fp32, eval) and onnxruntime and compare the
logits. The report (JSON) has the opset, file sizes and sha256, the parity figures and timings.
Exit status 0 when parity holds, 3 when the difference is above --tolerance (the report is
still written, with "passed": false), 2 for unusable input.

Exporter: the TorchScript-based exporter (`dynamo=False`). It needs only the `onnx` package and
writes one self-contained file, which is what the registry stores and what a scoring container
loads; the dynamo exporter needs onnxscript and writes the weights to a `.onnx.data` sidecar.
Both matched PyTorch to ~3e-6 on ResNet-18 here (../shared/DESIGN.md), so the simpler artifact wins.
Opset 17 is read by every onnxruntime from 1.14 on, including the ones in Azure ML's
inference images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from imagedata import IMAGENET_MEAN, IMAGENET_STD, eval_transform, find_unreadable, open_rgb
from manifests import DataError, load_manifest, scan_image_folder
from modelio import CheckpointError, atomic_write_bytes, file_sha256, load_checkpoint, model_from_checkpoint

EXIT_OK, EXIT_BAD_INPUT, EXIT_PARITY = 0, 2, 3
DEFAULT_TOLERANCE = 1e-4
DEFAULT_OPSET = 17


class Normalized(torch.nn.Module):
    """The classifier with its input normalisation baked in: ONNX input is RGB in [0, 1], NCHW."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: torch.nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def validation_batch(checkpoint: dict[str, Any], data_dir: str | None, manifest_path: str | None, samples: int) -> tuple[torch.Tensor, str]:
    """Up to `samples` real validation images as a float batch in [0, 1]; random inputs without data."""
    size = int(checkpoint.get("image_size", 224))
    if data_dir:
        root = Path(data_dir)
        manifest = load_manifest(manifest_path) if manifest_path else scan_image_folder(root)
        records = manifest.split("val") or list(manifest.images)
        bad = find_unreadable(root, records)
        records = [r for r in records if r.path not in bad][:samples]
        if records:
            transform = eval_transform(size)
            tensors = [transform(open_rgb(root / r.path)) for r in records]
            return torch.stack(tensors).float().div_(255.0), "validation images"
    generator = torch.Generator().manual_seed(0)
    return torch.rand(samples, 3, size, size, generator=generator), "random inputs (no --data_dir given)"


def export(model: torch.nn.Module, example: torch.Tensor, output: Path, opset: int, metadata: dict[str, str]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name of its own: two exports of the same run at once (two completions racing)
    # must not write, load or delete each other's half-written graph.
    fd, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        atomic_write_bytes(output, _checked_graph(model, example, tmp, opset, metadata))
    finally:
        tmp.unlink(missing_ok=True)


def _checked_graph(model: torch.nn.Module, example: torch.Tensor, tmp: Path, opset: int, metadata: dict[str, str]) -> bytes:
    """The model exported through `tmp`, with `metadata`, checked: the ONNX file's bytes."""
    import onnx

    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (see module docstring); its notice that
        # the dynamo exporter exists is not actionable here.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(tmp))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def _time_per_image(fn, batch: torch.Tensor, repeats: int = 1) -> float:
    fn(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn(batch)
    return (time.perf_counter() - start) / (repeats * batch.shape[0]) * 1000.0


def check_parity(model: torch.nn.Module, onnx_path: Path, batch: torch.Tensor) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def run_torch(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(x).numpy()

    def run_ort(x: torch.Tensor) -> np.ndarray:
        return session.run(["logits"], {"image": x.numpy()})[0]

    expected = run_torch(batch)
    got = run_ort(batch)
    single = run_ort(batch[:1])  # the batch axis is dynamic: one image must work too
    diff = np.abs(expected - got)
    return {
        "max_abs_diff": float(max(diff.max(), np.abs(expected[:1] - single).max())),
        "mean_abs_diff": float(diff.mean()),
        "argmax_agreement": float((expected.argmax(1) == got.argmax(1)).mean()),
        "batch_sizes_checked": [int(batch.shape[0]), 1],
        "torch_ms_per_image": round(_time_per_image(run_torch, batch), 3),
        "onnxruntime_ms_per_image": round(_time_per_image(run_ort, batch), 3),
        "onnxruntime_version": ort.__version__,
    }


def export_and_verify(
    model_path: str | Path,
    output: str | Path,
    *,
    data_dir: str | None = None,
    manifest: str | None = None,
    samples: int = 16,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = DEFAULT_OPSET,
    report_path: str | Path | None = None,
) -> dict[str, Any]:
    started = time.perf_counter()
    checkpoint = load_checkpoint(model_path)
    norm = checkpoint.get("normalization") or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    model = Normalized(model_from_checkpoint(checkpoint), norm["mean"], norm["std"]).eval()
    batch, source = validation_batch(checkpoint, data_dir, manifest, samples)
    output = Path(output)
    metadata = {
        "class_names": json.dumps(checkpoint["class_names"]),
        "image_size": str(checkpoint.get("image_size", 224)),
        "input": "RGB float32 in [0, 1], NCHW; normalisation is inside the graph",
        "normalization": json.dumps(norm),
        "manifest_sha256": str(checkpoint.get("manifest_sha256", "")),
        "source_model_sha256": file_sha256(model_path),
    }
    export_start = time.perf_counter()
    export(model, batch[:1], output, opset, metadata)
    export_seconds = time.perf_counter() - export_start
    parity = check_parity(model, output, batch)
    report = {
        "model": str(model_path),
        "onnx": str(output),
        "exporter": "torchscript (dynamo=False)",
        "opset": opset,
        "onnx_bytes": output.stat().st_size,
        "onnx_sha256": file_sha256(output),
        "model_sha256": metadata["source_model_sha256"],
        "model_pt_bytes": Path(model_path).stat().st_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "class_names": checkpoint["class_names"],
        "image_size": checkpoint.get("image_size", 224),
        "parity_inputs": source,
        "samples": int(batch.shape[0]),
        "tolerance": tolerance,
        **parity,
        "passed": parity["max_abs_diff"] <= tolerance,
        "export_seconds": round(export_seconds, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
    }
    if report_path:
        atomic_write_bytes(Path(report_path), (json.dumps(report, indent=2) + "\n").encode())
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="outputs/model.pt", help="model.pt written by train.py")
    p.add_argument("--output", default=None, help="where to write the ONNX file (default: beside --model as model.onnx)")
    p.add_argument("--data_dir", default=None, help="images for the parity check (the run's data)")
    p.add_argument("--manifest", default=None, help="manifest whose val split supplies the parity images")
    p.add_argument("--samples", type=int, default=16, help="number of images in the parity check")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest allowed absolute logit difference")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    p.add_argument("--report", default=None, help="where to write the JSON report (default: beside the ONNX file as onnx_report.json)")
    args = p.parse_args(argv)
    output = Path(args.output) if args.output else Path(args.model).with_name("model.onnx")
    report_path = Path(args.report) if args.report else output.with_name("onnx_report.json")
    try:
        report = export_and_verify(
            args.model,
            output,
            data_dir=args.data_dir,
            manifest=args.manifest,
            samples=args.samples,
            tolerance=args.tolerance,
            opset=args.opset,
            report_path=report_path,
        )
    except (DataError, CheckpointError) as exc:
        print(f"export_onnx.py: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    verdict = "ok" if report["passed"] else f"FAILED (tolerance {args.tolerance:g})"
    print(
        f"exported {output} (opset {report['opset']}, {report['onnx_bytes'] / 1e6:.1f} MB); parity on {report['samples']} "
        f"{report['parity_inputs']}: max |diff| {report['max_abs_diff']:.2e}, argmax agreement "
        f"{report['argmax_agreement']:.0%}, torch {report['torch_ms_per_image']} ms/img vs onnxruntime "
        f"{report['onnxruntime_ms_per_image']} ms/img: {verdict}; report {report_path}"
    )
    return EXIT_OK if report["passed"] else EXIT_PARITY


if __name__ == "__main__":
    sys.exit(main())
