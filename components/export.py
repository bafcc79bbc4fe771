"""Export: the trained classifier as ONNX, checked and verified against PyTorch before it leaves.

Each file written here passes `onnx.checker` (full check), loads in ONNX Runtime, matches
the PyTorch model's logits on held-out images within a tolerance, and carries in its
metadata_props everything a consumer needs: labels, preprocessing, backbone and weights hash,
data version, training strategy, sparsity and the tlops version.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from components.classifier import build_model, load_checkpoint
from components.compress import prune_model
from components.config import StageConfig
from components.errors import UserError
from components.manifest import Dataset
from components.onnx_runtime import open_session, stamp_metadata
from components.preprocess import load_batch, onnx_metadata
from components.result import StageResult, sha256_file

log = logging.getLogger(__name__)

FP32_FILE = "model_fp32.onnx"
PRUNED_FILE = "model_pruned.onnx"


class ExportConfig(StageConfig):
    opset: int = 17
    parity_images: int = 16  # held-out (val split) images for the parity check
    parity_atol: float = 1e-4  # max |logit_torch - logit_onnx|


class ExportParityError(UserError):
    """An exported model whose outputs differ from the PyTorch model's beyond the tolerance."""


def tlops_version() -> str:
    try:
        return importlib.metadata.version("tlops")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"  # a source checkout that was never installed


def export_onnx(model: nn.Module, path: Path, metadata: dict[str, str], input_size: int, opset: int) -> Path:
    """Write `model` (image NCHW -> logits) to `path` with a dynamic batch axis, stamp and check it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, input_size, input_size)
    with torch.no_grad():
        # The dynamo exporter needs onnxscript, which this environment does not carry.
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
        )
    stamp_metadata(path, metadata)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def check_parity(model: nn.Module, onnx_path: Path, images: np.ndarray, atol: float) -> float:
    """Max |logit difference| between PyTorch and ONNX Runtime on `images`; raises beyond `atol`."""
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    session = open_session(onnx_path)
    actual = session.run(None, {session.get_inputs()[0].name: images})[0]
    if actual.shape != expected.shape:
        raise ExportParityError(
            f"{onnx_path}: ONNX Runtime returns logits of shape {actual.shape}, PyTorch {expected.shape}."
        )
    diff = float(np.max(np.abs(actual - expected)))
    if not np.isfinite(diff) or diff > atol:
        raise ExportParityError(
            f"{onnx_path}: max |logit difference| vs PyTorch is {diff:.3g} on {len(images)} held-out images, "
            f"above export.parity_atol={atol:g}; the exported graph does not compute what the model does."
        )
    return diff


def model_metadata(checkpoint: dict[str, Any], checkpoint_path: Path, sparsity: float) -> dict[str, str]:
    backbone = checkpoint["backbone"]
    return {
        **onnx_metadata(checkpoint["preprocessing"]),
        "labels": json.dumps(list(checkpoint["labels"])),
        "backbone": str(backbone["name"]),
        "backbone_weights_sha256": str(backbone["weights_sha256"]),
        "data": json.dumps(checkpoint["data"], sort_keys=True),
        "strategy": str(checkpoint["strategy"]),
        "tap": str(checkpoint["tap"]),
        "train_config": json.dumps(checkpoint["config"], sort_keys=True, default=str),
        "checkpoint_sha256": sha256_file(checkpoint_path),
        "sparsity": f"{sparsity:g}",
        "tlops_version": tlops_version(),
    }


def parity_images(dataset: Dataset, count: int, preprocessing: dict) -> np.ndarray:
    val = dataset.split("val")
    if val.empty:
        raise ValueError(
            "the dataset has no `val` rows; export checks parity on held-out images, so ingest with "
            "ingest.val_fraction > 0."
        )
    # Ordering by content hash mixes labels; the manifest itself is sorted by label folder.
    chosen = val.sort_values("sha256").head(count)
    return load_batch([dataset.image_path(p) for p in chosen["path"]], preprocessing)


def zero_fraction(model: nn.Module) -> float:
    """Share of exactly-zero weights over conv and linear layers (what pruning acts on)."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


def run(cfg: ExportConfig, sparsity: float, checkpoint_path: Path, dataset: Dataset, out_dir: Path) -> StageResult:
    if cfg.parity_images < 1 or cfg.parity_atol < 0:
        raise ValueError("export.parity_images must be >= 1 and export.parity_atol >= 0.")
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint)
    preprocessing = checkpoint["preprocessing"]
    input_size = int(preprocessing["input_size"])
    images = parity_images(dataset, cfg.parity_images, preprocessing)

    variants: dict[str, tuple[nn.Module, Path, float]] = {"fp32": (model, out_dir / FP32_FILE, 0.0)}
    if sparsity > 0:
        variants["pruned"] = (prune_model(model, sparsity), out_dir / PRUNED_FILE, sparsity)

    metrics: dict[str, float] = {"n_params": float(sum(p.numel() for p in model.parameters()))}
    artifacts: dict[str, Path] = {}
    for name, (variant, path, variant_sparsity) in variants.items():
        metadata = model_metadata(checkpoint, checkpoint_path, variant_sparsity)
        export_onnx(variant, path, metadata, input_size, cfg.opset)
        diff = check_parity(variant, path, images, cfg.parity_atol)
        metrics[f"parity_max_diff_{name}"] = diff
        metrics[f"size_mb_{name}"] = path.stat().st_size / 1e6
        metrics[f"zero_weight_fraction_{name}"] = zero_fraction(variant)
        artifacts[name] = path
        log.info("exported %s (%.1f MB), parity max diff %.2e on %d images", path, path.stat().st_size / 1e6,
                 diff, len(images))

    result = StageResult(
        stage="export",
        out_dir=out_dir,
        metrics=metrics,
        artifacts=artifacts,
        info={
            "files": {name: path.name for name, path in artifacts.items()},
            "parity_atol": cfg.parity_atol,
            "parity_images": len(images),
            "opset": cfg.opset,
            "sparsity": sparsity,
            "backbone": checkpoint["backbone"]["name"],
            "labels": list(checkpoint["labels"]),
        },
    )
    result.save()
    return result
