"""Compress: prune, quantize, and ship the smallest model that keeps its validation accuracy.

Candidates are the exported FP32 model, the pruned export (when export.sparsity > 0) and a
post-training static INT8 model (of the pruned one if present). Each is scored on the val
split in ONNX Runtime; the most compressed candidate within `max_accuracy_drop` of FP32 ships
as `model.onnx`, otherwise FP32 ships and the reason is recorded.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn
from torch.nn.utils import prune

from components.config import StageConfig
from components.manifest import Dataset
from components.onnx_runtime import model_preprocessing, predict_frame, read_metadata, stamp_metadata
from components.preprocess import load_batch
from components.result import StageResult, write_json

log = logging.getLogger(__name__)

INT8_FILE = "model_int8.onnx"
SHIPPED_FILE = "model.onnx"
REPORT_FILE = "compress.json"
# Most compressed first: INT8 is built from the pruned model when there is one.
PREFERENCE = ("int8", "pruned", "fp32")
CALIBRATION_BATCH = 16


class CompressConfig(StageConfig):
    sparsity: float = 0.0  # global magnitude pruning of conv+linear weights; 0 = off (applied before export)
    quantize: bool = True  # post-training static INT8 (onnxruntime.quantization)
    max_accuracy_drop: float = 0.01  # absolute val accuracy the shipped model may lose vs FP32
    calibration_images: int = 128  # training images used to calibrate activations


def prune_model(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy of `model` with the smallest `sparsity` share of all conv and linear weights set to zero.

    Global (not per-layer) L1 magnitude pruning; the masks are folded into the weights, so the
    copy is a plain module that exports like the original.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"compress.sparsity must be in [0, 1), got {sparsity}; 0 turns pruning off.")
    pruned = copy.deepcopy(model)
    if sparsity == 0:
        return pruned
    targets = [(module, "weight") for module in pruned.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in targets:
        prune.remove(module, name)
    return pruned


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds preprocessed images to the calibrator a batch at a time, decoding lazily."""

    def __init__(self, input_name: str, paths: list[Path], preprocessing: dict, batch_size: int):
        self.input_name = input_name
        self.preprocessing = preprocessing
        self.batches = iter([paths[i : i + batch_size] for i in range(0, len(paths), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: load_batch(batch, self.preprocessing)}


def quantize_int8(source: Path, target: Path, dataset: Dataset, calibration_images: int) -> Path:
    """Static INT8 (QDQ, per-channel weights) of `source`, calibrated on training images."""
    train = dataset.split("train")
    if train.empty or calibration_images < 1:
        raise ValueError("INT8 calibration needs training images: the dataset's `train` split is empty "
                         "or compress.calibration_images < 1.")
    metadata = read_metadata(source)
    # The model says how its input is prepared; calibration must see exactly that.
    preprocessing = model_preprocessing(source, metadata)
    chosen = train.sort_values("sha256").head(calibration_images)
    paths = [dataset.image_path(p) for p in chosen["path"]]
    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # Shape inference and graph optimisation first, as onnxruntime's quantization guide advises.
        quant_pre_process(str(source), str(prepared))
        quantize_static(
            str(prepared),
            str(target),
            ImageCalibrationReader(input_name, paths, preprocessing, CALIBRATION_BATCH),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    stamp_metadata(target, metadata | {"quantization": f"static int8 QDQ per-channel, {len(paths)} calibration images"})
    onnx.checker.check_model(str(target), full_check=True)
    log.info("quantized %s -> %s with %d calibration images", source.name, target, len(paths))
    return target


def onnx_accuracy(model_path: Path, dataset: Dataset, split: str, batch_size: int = 32) -> float:
    frame = dataset.split(split)
    if frame.empty:
        raise ValueError(f"the dataset has no `{split}` rows to measure {model_path.name}'s accuracy on.")
    logits = predict_frame(model_path, dataset, frame, batch_size)
    return float(np.mean(logits.argmax(axis=1) == np.asarray(dataset.label_index(frame))))


def zipped_mb(path: Path) -> float:
    """Size after deflate: the only size in which unstructured sparsity shows (ONNX stores dense tensors)."""
    return len(zlib.compress(path.read_bytes(), 6)) / 1e6


def choose(accuracy: dict[str, float], max_drop: float) -> tuple[str, str, dict[str, bool]]:
    """(shipped candidate, reason, within-budget flags) under the FP32-relative accuracy budget."""
    baseline = accuracy["fp32"]
    floor = baseline - max_drop
    # The tolerance keeps k/n accuracies that meet the floor exactly from failing on rounding.
    within = {name: value >= floor - 1e-9 for name, value in accuracy.items()}
    budget = f"val accuracy >= {floor:.4f} (fp32 {baseline:.4f} - compress.max_accuracy_drop {max_drop:g})"
    ranked = [name for name in PREFERENCE if name in accuracy]
    passing = [name for name in ranked if within[name]]
    if not passing:
        failed = ", ".join(f"{name} {accuracy[name]:.4f}" for name in ranked)
        return "fp32", f"no candidate met {budget} ({failed}); shipping fp32 unchanged", within
    shipped = passing[0]
    rejected = [f"{name} {accuracy[name]:.4f}" for name in ranked[: ranked.index(shipped)]]
    reason = f"{shipped} is the most compressed candidate with {budget}: {accuracy[shipped]:.4f}"
    if rejected:
        reason += f"; more compressed but over budget: {', '.join(rejected)}"
    if len(ranked) == 1:
        reason += " (the only candidate: compress.quantize is off and export wrote no pruned model)"
    return shipped, reason, within


def run(cfg: CompressConfig, export_dir: Path, dataset: Dataset, out_dir: Path) -> StageResult:
    exported = StageResult.load(export_dir)
    if not exported.is_intact():
        raise RuntimeError(f"{export_dir}: the exported files changed since export wrote them; re-run export.")
    candidates = {name: path for name, path in exported.artifacts.items() if name in ("fp32", "pruned")}
    if "fp32" not in candidates:
        raise KeyError(f"{export_dir}: the export result lists no `fp32` model; re-run export.")
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.quantize:
        source = candidates.get("pruned", candidates["fp32"])
        candidates["int8"] = quantize_int8(source, out_dir / INT8_FILE, dataset, cfg.calibration_images)

    accuracy = {name: onnx_accuracy(path, dataset, "val") for name, path in candidates.items()}
    shipped, reason, within = choose(accuracy, cfg.max_accuracy_drop)
    log.info("shipping %s: %s", shipped, reason)

    model_path = out_dir / SHIPPED_FILE
    shutil.copyfile(candidates[shipped], model_path)
    stamp_metadata(
        model_path,
        {
            "compression": shipped,
            "val_accuracy": f"{accuracy[shipped]:.6f}",
            "val_accuracy_fp32": f"{accuracy['fp32']:.6f}",
            "max_accuracy_drop": f"{cfg.max_accuracy_drop:g}",
        },
    )

    sizes = {name: path.stat().st_size / 1e6 for name, path in candidates.items()}
    report = {
        "candidates": {
            name: {
                "file": path.name,
                "size_mb": sizes[name],
                "zipped_mb": zipped_mb(path),
                "val_accuracy": accuracy[name],
                "within_budget": within[name],
            }
            for name, path in candidates.items()
        },
        "val_images": len(dataset.split("val")),
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "shipped": shipped,
        "reason": reason,
    }
    report_path = write_json(out_dir / REPORT_FILE, report)

    metrics = {f"val_accuracy_{name}": value for name, value in accuracy.items()}
    metrics |= {f"size_mb_{name}": value for name, value in sizes.items()}
    metrics |= {f"zipped_mb_{name}": entry["zipped_mb"] for name, entry in report["candidates"].items()}
    if "int8" in sizes:
        metrics["size_ratio_int8"] = sizes["int8"] / sizes["fp32"]
    artifacts = {"model": model_path, "report": report_path}
    if "int8" in candidates:
        artifacts["int8"] = candidates["int8"]
    result = StageResult(
        stage="compress", out_dir=out_dir, metrics=metrics, artifacts=artifacts,
        info={"shipped": shipped, "reason": reason},
    )
    result.save()
    return result
