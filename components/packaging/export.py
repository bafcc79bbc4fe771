"""Export: the trained classifier as ONNX, checked and verified against PyTorch before it leaves.

Each file written here passes `onnx.checker` (full check), loads in ONNX Runtime, matches
the PyTorch model's logits on held-out images within a tolerance, and carries in its
metadata_props everything a consumer needs: labels, preprocessing, backbone and weights hash,
the cache key of the features it was trained on, data version, training strategy, sparsity
and the tlops version. A model of several tasks has one output per task, named by it, and says
in `metadata_props["tasks"]` each task's name, head kind, labels and declared order; parity and
the train/serve check then hold for every output.

The FP32 file is also checked against what was trained and evaluated (`check_train_serve`):
read back the way a server reads it (its own metadata -> preprocessing -> raw image files ->
ONNX Runtime), it must give the logits of the trained head on the cached features of the
same images. A stale feature cache, a preprocessing mismatch or wrong metadata fails the
export with a message that says which.

With `export.tta_views` > 1 every file averages the logits of that many dihedral views of its
input inside the graph (`classifier.ViewAverage`), but never of more views than the checkpoint
says the model was trained on (`train_views`: 1 for the linear probe); the train/serve check then
runs on the plain graph, and parity on the averaged one.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from components.core.errors import UserError
from components.core.result import StageResult, sha256_file
from components.data.manifest import Dataset
from components.data.preprocess import Preprocessing, load_batch
from components.data.tokenization import preprocessing_for
from components.features.cache import FEATURES_FILE, RECORD_FILE, load_features, read_record, rows_by_sha256
from components.features.extract import stale_inputs
from components.models.classifier import (
    ViewAverage,
    WithEmbedding,
    build_model,
    checkpoint_head,
    load_checkpoint,
    output_names,
)
from components.models.onnx_export import export_onnx
from components.models.onnx_io import model_preprocessing, open_session, predict_tasks, read_metadata
from components.models.registry import get_entry
from components.packaging import text_export
from components.packaging.config import ExportConfig
from components.packaging.errors import ExportParityError, TrainServeSkewError
from components.packaging.pruning import prune_model

if TYPE_CHECKING:
    from components.packaging.config import ChannelPruning

log = logging.getLogger(__name__)

FP32_FILE = "model_fp32.onnx"
PRUNED_FILE = "model_pruned.onnx"


def tlops_version() -> str:
    try:
        return importlib.metadata.version("tlops")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"  # a source checkout that was never installed


def check_parity(model: nn.Module, onnx_path: Path, images: np.ndarray, atol: float, rtol: float = 0.0) -> float:
    """Max |logit difference| between PyTorch and ONNX Runtime on `images`, over every output (one per task);
    raises when any output differs beyond atol + rtol * its max |logit|, naming it."""
    with torch.no_grad():
        expected = model(torch.from_numpy(images))
    # Every output: one per task, or a prototype head's logits and embedding (what add-class builds on).
    expected = [e.numpy() for e in expected] if isinstance(expected, tuple) else [expected.numpy()]
    session = open_session(onnx_path)
    actual = session.run(None, {session.get_inputs()[0].name: images})
    names = [output.name for output in session.get_outputs()]
    if len(actual) != len(expected):
        raise ExportParityError(f"{onnx_path}: ONNX Runtime returns {len(actual)} output(s) {names}, PyTorch {len(expected)}.")
    worst = 0.0
    for name, got, want in zip(names, actual, expected):
        if got.shape != want.shape:
            raise ExportParityError(
                f"{onnx_path}: ONNX Runtime returns {name} of shape {got.shape}, PyTorch {want.shape}."
            )
        diff = float(np.max(np.abs(got - want)))
        allowed = atol + rtol * float(np.max(np.abs(want)))
        if not np.isfinite(diff) or diff > allowed:
            relative = f" + export.pruned_parity_rtol={rtol:g} x max |logit| {np.max(np.abs(want)):.3g}" if rtol else ""
            raise ExportParityError(
                f"{onnx_path}: max |{name} difference| vs PyTorch is {diff:.3g} on {len(images)} held-out images, "
                f"above export.parity_atol={atol:g}{relative}; the exported graph does not compute what the model does."
            )
        worst = max(worst, diff)
    return worst


def model_metadata(checkpoint: dict[str, Any], checkpoint_path: Path, sparsity: float,
                   features_cache_key: str, tta_views: int = 1) -> dict[str, str]:
    backbone = checkpoint["backbone"]
    return {
        **preprocessing_for(backbone, checkpoint["preprocessing"]).to_metadata(),
        "features_cache_key": features_cache_key,
        "labels": json.dumps(list(checkpoint["labels"])),
        "backbone": str(backbone["name"]),
        "backbone_weights_sha256": str(backbone["weights_sha256"]),
        "data": json.dumps(checkpoint["data"], sort_keys=True),
        "strategy": str(checkpoint["strategy"]),
        "taps": json.dumps(list(checkpoint["taps"])),
        "train_config": json.dumps(checkpoint["config"], sort_keys=True, default=str),
        "checkpoint_sha256": sha256_file(checkpoint_path),
        "sparsity": f"{sparsity:g}",
        "tta_views": str(tta_views),
        "head": str((checkpoint.get("head_spec") or {"kind": "linear"})["kind"]),
        "tlops_version": tlops_version(),
        # Several tasks (or an ordinal / regress head): the outputs, in task order, and what each one's columns are.
        **({"tasks": json.dumps(checkpoint["tasks"])} if checkpoint.get("tasks") else {}),
    }


def held_out(dataset: Dataset, count: int) -> pd.DataFrame:
    """`count` val rows, the same ones on every run."""
    val = dataset.split("val")
    if val.empty:
        raise ValueError(
            "the dataset has no `val` rows; export checks parity on held-out images, so ingest with "
            "ingest.val_fraction > 0."
        )
    # Ordering by content hash mixes labels; the manifest itself is sorted by label folder.
    return val.sort_values("sha256").head(count).reset_index(drop=True)


def parity_images(dataset: Dataset, count: int, preprocessing: Preprocessing) -> np.ndarray:
    return load_batch([dataset.image_path(p) for p in held_out(dataset, count)["path"]], preprocessing)


def _listed(differences: dict[str, tuple[object, object]], first: str, second: str) -> str:
    return "; ".join(f"{name}: {first} {a!r}, {second} {b!r}" for name, (a, b) in differences.items())


def check_train_serve(checkpoint: dict[str, Any], checkpoint_path: Path, served_path: Path, dataset: Dataset,
                      features_dir: Path, count: int, atol: float) -> float:
    """Max |served logit - trained logit| on `count` held-out images; raises `TrainServeSkewError` naming the cause.

    Served: `served_path` read back through its own metadata_props, on the raw image files, in
    ONNX Runtime. Trained: the checkpoint's head on the cached features the features stage wrote
    for the same images, i.e. what finetune trained and select ranked on.
    """
    backbone, taps = str(checkpoint["backbone"]["name"]), list(checkpoint["taps"])
    trained = Preprocessing.of(checkpoint["preprocessing"])
    served = model_preprocessing(served_path, read_metadata(served_path))
    if served != trained:
        raise TrainServeSkewError(
            f"{served_path}: preprocessing mismatch between the metadata_props and the checkpoint {checkpoint_path.name} "
            f"({_listed(served.differences(trained), 'metadata', 'checkpoint')}); re-export the model."
        )
    record_path = Path(features_dir) / backbone / RECORD_FILE
    record = read_record(features_dir, backbone)
    stale = f"stale feature cache: {record_path}"
    rerun = "rerun the features stage, then finetune"
    cached = Preprocessing.of(record["preprocessing"])
    if cached != trained:
        raise TrainServeSkewError(
            f"{stale} describes features preprocessed otherwise than the checkpoint was trained with "
            f"({_listed(cached.differences(trained), 'features', 'checkpoint')}); {rerun}."
        )
    if record["cache_key_inputs"]["weights_sha256"] != checkpoint["backbone"]["weights_sha256"] or not set(taps) <= set(record["taps"]):
        raise TrainServeSkewError(
            f"{stale} was computed with weights {record['cache_key_inputs']['weights_sha256'][:12]} and taps "
            f"{record['taps']}, the checkpoint uses {checkpoint['backbone']['weights_sha256'][:12]} and taps {taps}; {rerun}."
        )
    if checkpoint.get("features_cache_key", record["cache_key"]) != record["cache_key"]:
        raise TrainServeSkewError(
            f"{stale} has cache_key {record['cache_key']}, the checkpoint was trained on features with cache_key "
            f"{checkpoint['features_cache_key']}; {rerun}."
        )
    drift = stale_inputs(record, get_entry(backbone))
    if drift:
        raise TrainServeSkewError(
            f"{stale} was computed by other code or library versions than this export uses "
            f"({'; '.join(drift[:3])}{'; ...' if len(drift) > 3 else ''}); {rerun}."
        )
    frame = held_out(dataset, count)
    cached_features = []
    for tap in taps:
        sha256, tap_features = load_features(features_dir, backbone, tap)
        cached_features.append(rows_by_sha256(sha256, tap_features, frame["sha256"], backbone, "val"))
    head = checkpoint_head(checkpoint)
    with torch.no_grad():
        trained = head(torch.from_numpy(np.concatenate(cached_features, axis=1)))
    trained_logits = np.concatenate([t.numpy() for t in trained] if isinstance(trained, tuple) else [trained.numpy()], axis=1)
    served_logits = np.concatenate(list(predict_tasks(served_path, dataset, frame, batch_size=count).values()), axis=1)
    worst = int(np.abs(served_logits - trained_logits).max(axis=1).argmax())
    diff = float(np.abs(served_logits - trained_logits).max())
    if not diff <= atol:  # also true for NaN
        raise TrainServeSkewError(
            f"train/serve skew: {served_path.name} on the raw images differs by {diff:.3g} (max |logit|, "
            f"e.g. {frame['path'][worst]}) from the trained head on {record_path.parent / FEATURES_FILE}, above "
            f"export.train_serve_atol={atol:g}; preprocessing and provenance agree, so the cached features "
            f"themselves are stale or altered; {rerun}."
        )
    return diff


def zero_fraction(model: nn.Module) -> float:
    """Share of exactly-zero weights over conv and linear layers (what pruning acts on)."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


def served_views(cfg: ExportConfig, checkpoint: dict[str, Any]) -> int:
    """`export.tta_views`, capped at the dihedral views the model was trained on (the checkpoint's `train_views`).

    A model averaged over views it never saw gets worse, not better: the linear probe, trained on
    features of each image as it is, fell from 0.72 to 0.55 four-class ELPV test accuracy when its
    logits were averaged over four rotations. Checkpoints that do not say are taken as one view.
    """
    trained = int(checkpoint.get("train_views", 1))
    if cfg.tta_views > trained:
        log.info("export.tta_views=%d, but the %s model was trained on %d view(s) of each image: averaging over %d",
                 cfg.tta_views, checkpoint.get("strategy", "?"), trained, trained)
    return min(cfg.tta_views, trained)


def run(cfg: ExportConfig, sparsity: float, checkpoint_path: Path, dataset: Dataset, out_dir: Path, *,
        features_dir: Path, channel_pruning: ChannelPruning | None = None) -> StageResult:
    """Export FP32 (and pruned) ONNX; `features_dir` is the features stage's output the head was trained on.

    The pruned candidate is unstructured (`sparsity` > 0) or, with `channel_pruning`, channel-pruned
    and recovery fine-tuned: then it is no longer the registry architecture, so it is exported
    straight from the pruned module and its metadata_props say how it was pruned.
    """
    if sparsity > 0 and channel_pruning is not None:
        raise ValueError("export: unstructured sparsity and channel pruning both asked for; compress.prune picks one.")
    checkpoint = load_checkpoint(checkpoint_path)
    if channel_pruning is not None and checkpoint.get("tasks"):
        raise UserError(f"compress.prune=structured: {checkpoint_path} has tasks "
                        f"{[t['name'] for t in checkpoint['tasks']]}, and structured pruning's recovery training "
                        f"fine-tunes one classify head; set compress.prune to none or unstructured for this model.")
    features_cache_key = str(read_record(features_dir, checkpoint["backbone"]["name"])["cache_key"])
    if checkpoint["backbone"].get("modality") == "text":  # no views, no pruning: its own export and checks
        return text_export.run(cfg, checkpoint, checkpoint_path, dataset, out_dir, features_dir,
                               model_metadata(checkpoint, checkpoint_path, 0.0, features_cache_key),
                               held_out(dataset, cfg.parity_images))
    model = build_model(checkpoint)
    preprocessing = Preprocessing.of(checkpoint["preprocessing"])
    images = parity_images(dataset, cfg.parity_images, preprocessing)
    views = served_views(cfg, checkpoint)

    variants: dict[str, tuple[nn.Module, Path, float]] = {"fp32": (model, out_dir / FP32_FILE, 0.0)}
    extra_metadata: dict[str, dict[str, str]] = {"fp32": {}}
    pruning_info: dict[str, Any] | None = None
    metrics: dict[str, float] = {"n_params": float(sum(p.numel() for p in model.parameters()))}
    if sparsity > 0:
        variants["pruned"] = (prune_model(model, sparsity), out_dir / PRUNED_FILE, sparsity)
        extra_metadata["pruned"] = {"pruning": "unstructured"}
    elif channel_pruning is not None:
        from components.packaging.pruning import describe, prune_and_recover

        pruned, report = prune_and_recover(model, channel_pruning, dataset, preprocessing)
        variants["pruned"] = (pruned, out_dir / PRUNED_FILE, 0.0)
        extra_metadata["pruned"] = report.metadata()
        pruning_info = describe(report)
        metrics |= {"n_params_pruned": float(report.params_after), "macs": float(report.macs_before),
                    "macs_pruned": float(report.macs_after), "val_accuracy_torch": report.val_accuracy_before or 0.0,
                    "val_accuracy_pruned_before_recovery": report.val_accuracy_pruned or 0.0}
        if report.val_accuracy_recovered is not None:
            metrics["val_accuracy_pruned_recovered"] = report.val_accuracy_recovered

    artifacts: dict[str, Path] = {}
    for name, (variant, path, variant_sparsity) in variants.items():
        metadata = (model_metadata(checkpoint, checkpoint_path, variant_sparsity, features_cache_key, views)
                    | extra_metadata[name])
        if views > 1:
            variant = ViewAverage(variant, views).eval()
        elif hasattr(getattr(variant, "head", None), "embedding"):  # prototypes: the embedding is a second output, for add-class
            variant = WithEmbedding(variant).eval()
        export_onnx(variant, path, metadata, preprocessing.input_size, cfg.opset, output_names(variant, checkpoint))
        diff = check_parity(variant, path, images, cfg.parity_atol, cfg.pruned_parity_rtol if name == "pruned" else 0.0)
        metrics[f"parity_max_diff_{name}"] = diff
        metrics[f"size_mb_{name}"] = path.stat().st_size / 1e6
        metrics[f"zero_weight_fraction_{name}"] = zero_fraction(variant)
        artifacts[name] = path
        log.info("exported %s (%.1f MB%s), parity max diff %.2e on %d images", path, path.stat().st_size / 1e6,
                 f", mean of {views} views" if views > 1 else "", diff, len(images))
    if checkpoint.get("trunk") is None:  # the head was trained on cached features: the served file must agree
        with tempfile.TemporaryDirectory(prefix="tlops-export-") as scratch:
            # The cached features are of view 0, so a view-averaging file is checked through its plain twin.
            served = artifacts["fp32"] if views == 1 else export_onnx(
                model, Path(scratch) / FP32_FILE, model_metadata(checkpoint, checkpoint_path, 0.0, features_cache_key),
                preprocessing.input_size, cfg.opset, output_names(model, checkpoint))
            metrics["train_serve_max_diff"] = check_train_serve(checkpoint, checkpoint_path, served, dataset,
                                                                features_dir, cfg.parity_images, cfg.train_serve_atol)
    else:
        log.info("trunk weights were trained too: cached features do not describe this model, no train/serve check")

    result = StageResult(
        stage="export",
        out_dir=out_dir,
        metrics=metrics,
        artifacts=artifacts,
        info={
            "files": {name: path.name for name, path in artifacts.items()},
            "parity_atol": cfg.parity_atol,
            "train_serve_atol": cfg.train_serve_atol,
            "features_cache_key": features_cache_key,
            "parity_images": len(images),
            "opset": cfg.opset,
            "tta_views": views,
            "tta_views_requested": cfg.tta_views,
            "sparsity": sparsity,
            "pruning": pruning_info,
            "backbone": checkpoint["backbone"]["name"],
            "labels": list(checkpoint["labels"]),
            **({"tasks": [task["name"] for task in checkpoint["tasks"]]} if checkpoint.get("tasks") else {}),
        },
    )
    result.save()
    return result
