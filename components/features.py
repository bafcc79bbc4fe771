"""Features: frozen-trunk activations computed once with ONNX Runtime, cached by content.

Each backbone's trunk is exported to ONNX once. Pooled activations are stored per image under
a key made of (weights sha256, architecture, preprocessing, taps, code version) and the image's
sha256, so a rerun computes only images it has never seen with exactly this configuration, and
an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from components.backbones import BackboneEntry, build_trunk, get_entry
from components.config import StageConfig
from components.errors import UserError
from components.manifest import Dataset
from components.onnx_runtime import open_session
from components.preprocess import load_batch
from components.progress import Progress, no_progress
from components.result import StageResult, sha256_json, write_json

log = logging.getLogger(__name__)

# Bump when the extraction changes in a way the key below does not capture.
FEATURE_CODE_VERSION = 1

FEATURES_FILE = "features.npz"
RERUN_FEATURES = "rerun the features stage (`tlops stage features` or `dvc repro`)"


class FeatureCacheError(UserError):
    """Cached features that do not cover the manifest; the message names the backbone and the fix."""


class FeaturesConfig(StageConfig):
    image_size: int | None = None  # None = each backbone's native input size
    taps: tuple[str, ...] = ("pooled",)
    batch_size: int = 32
    num_threads: int = 0  # ONNX Runtime intra-op threads; 0 = its default (all cores)
    opset: int = 17


def space_key(entry: BackboneEntry, cfg: FeaturesConfig) -> str:
    """Everything that changes a feature vector except the image itself."""
    return sha256_json(
        {
            "architecture": entry.architecture,
            "weights_sha256": entry.weights_sha256,
            "preprocessing": entry.preprocessing(cfg.image_size),
            "taps": [entry.taps[t] for t in cfg.taps],
            "code": FEATURE_CODE_VERSION,
        }
    )[:20]


class FeatureStore:
    """One `.npz` per image under `root/<space key>/<sha[:2]>/<sha>.npz`, written atomically."""

    def __init__(self, root: Path, key: str):
        self.dir = root / key

    def path(self, sha256: str) -> Path:
        return self.dir / sha256[:2] / f"{sha256}.npz"

    def has(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def put(self, sha256: str, arrays: dict[str, np.ndarray]) -> None:
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(partial, "wb") as f:
            np.savez(f, **arrays)
        partial.replace(target)

    def get(self, sha256: str) -> dict[str, np.ndarray]:
        with np.load(self.path(sha256)) as data:
            return {k: data[k] for k in data.files}


def export_trunk(entry: BackboneEntry, cfg: FeaturesConfig, path: Path) -> Path:
    """The frozen trunk as ONNX with one output per tap; reused when already exported."""
    if path.exists():
        return path
    trunk = build_trunk(entry, cfg.taps)
    size = entry.preprocessing(cfg.image_size)["input_size"]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.onnx.export(
        trunk,
        torch.zeros(1, 3, size, size),
        partial,
        dynamo=False,
        input_names=["image"],
        output_names=list(cfg.taps),
        dynamic_axes={"image": {0: "batch"}, **{t: {0: "batch"} for t in cfg.taps}},
        opset_version=cfg.opset,
    )
    partial.replace(path)
    log.info("exported %s trunk to %s", entry.name, path)
    return path


def extract(
    entry: BackboneEntry,
    cfg: FeaturesConfig,
    dataset: Dataset,
    cache_dir: Path,
    progress: Progress = no_progress,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Features of every manifest image for one backbone, computing only cache misses."""
    key = space_key(entry, cfg)
    store = FeatureStore(cache_dir / entry.name, key)
    frame = dataset.manifest.drop_duplicates("sha256")
    missing = frame[[not store.has(s) for s in frame["sha256"]]]
    preprocessing = entry.preprocessing(cfg.image_size)
    seconds = 0.0
    if len(missing):
        runner = open_session(export_trunk(entry, cfg, store.dir / "trunk.onnx"), cfg.num_threads)
        started = time.perf_counter()  # throughput of decode + preprocess + inference, not export
        batches = [missing.iloc[i : i + cfg.batch_size] for i in range(0, len(missing), cfg.batch_size)]

        def decode(batch: pd.DataFrame) -> np.ndarray:
            return load_batch([dataset.image_path(p) for p in batch["path"]], preprocessing)

        # Decode the next batch on a thread while ONNX Runtime runs this one (both release the GIL).
        with progress(total=len(missing), desc=f"features {entry.name}", unit="img") as bar, \
                ThreadPoolExecutor(max_workers=1) as decoder:
            upcoming = decoder.submit(decode, batches[0])
            for index, batch in enumerate(batches):
                images = upcoming.result()
                if index + 1 < len(batches):
                    upcoming = decoder.submit(decode, batches[index + 1])
                outputs = runner.run(list(cfg.taps), {"image": images})
                for row, sha in enumerate(batch["sha256"]):
                    store.put(sha, {tap: out[row] for tap, out in zip(cfg.taps, outputs)})
                bar.update(len(batch))
        seconds = time.perf_counter() - started
    cached = [store.get(s) for s in dataset.manifest["sha256"]]
    features = {"sha256": dataset.manifest["sha256"].to_numpy(dtype=str)}
    for tap in cfg.taps:
        features[tap] = np.stack([c[tap] for c in cached]).astype(np.float32)
    stats = {
        "n_computed": float(len(missing)),
        "n_cached": float(len(frame) - len(missing)),
        "images_per_s": len(missing) / seconds if len(missing) and seconds > 0 else 0.0,
    }
    log.info("%s: %d computed, %d from cache (%s)", entry.name, len(missing), len(frame) - len(missing), key)
    return features, stats


def load_features(features_dir: Path, backbone: str, tap: str = "pooled") -> tuple[np.ndarray, np.ndarray]:
    """(sha256 per row as str, features float32) from `features_dir/<backbone>/features.npz`."""
    path = Path(features_dir) / backbone / FEATURES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no cached features for backbone {backbone!r}; {RERUN_FEATURES}.")
    with np.load(path, allow_pickle=False) as cache:
        if "sha256" not in cache.files:
            raise FeatureCacheError(f"{path}: no 'sha256' array (backbone {backbone!r}); {RERUN_FEATURES}.")
        if tap not in cache.files:
            taps = sorted(k for k in cache.files if k != "sha256")
            raise KeyError(f"{path}: backbone {backbone!r} has no cached tap {tap!r}; cached: {taps}.")
        sha256, features = cache["sha256"].astype(str), cache[tap]
    if features.ndim != 2 or features.shape[0] != sha256.shape[0]:
        raise FeatureCacheError(
            f"{path}: tap {tap!r} has shape {features.shape} for {sha256.shape[0]} sha256 rows; {RERUN_FEATURES}."
        )
    return sha256, features.astype(np.float32, copy=False)


def split_features(dataset: Dataset, features_dir: Path, backbone: str, tap: str, split: str = "train") -> np.ndarray:
    """The cached features of `split`'s rows, in manifest order, matched by sha256."""
    sha256, features = load_features(features_dir, backbone, tap)
    index = pd.Index(sha256)
    keep = ~index.duplicated()  # identical images have identical features
    wanted = dataset.split(split)["sha256"].astype(str)
    positions = index[keep].get_indexer(wanted)
    missing = int((positions < 0).sum())
    if missing:
        example = wanted.iloc[int(np.argmax(positions < 0))]
        raise FeatureCacheError(
            f"cached features for backbone {backbone!r} lack {missing} of {positions.size} {split} images "
            f"(e.g. sha256 {example}): the cache predates the manifest; {RERUN_FEATURES}."
        )
    return features[keep][positions]


def run(
    cfg: FeaturesConfig,
    backbones: tuple[str, ...],
    dataset: Dataset,
    cache_dir: Path,
    out_dir: Path,
    progress: Progress = no_progress,
) -> StageResult:
    entries = [get_entry(name) for name in backbones]  # unknown names fail before any work
    for entry in entries:
        unknown = [t for t in cfg.taps if t not in entry.taps]
        if unknown:
            raise KeyError(f"features.taps: {entry.name} has no tap(s) {unknown}; available: {sorted(entry.taps)}.")
    metrics: dict[str, float] = {}
    artifacts: dict[str, Path] = {}
    for entry in entries:
        features, stats = extract(entry, cfg, dataset, cache_dir, progress)
        target = out_dir / entry.name
        target.mkdir(parents=True, exist_ok=True)
        np.savez(target / FEATURES_FILE, **features)
        write_json(
            target / "backbone.json",
            {"entry": entry.describe(), "preprocessing": entry.preprocessing(cfg.image_size),
             "taps": list(cfg.taps), "cache_key": space_key(entry, cfg)},
        )
        artifacts[f"{entry.name}.features"] = target / FEATURES_FILE
        metrics.update({f"{entry.name}.{k}": v for k, v in stats.items()})
    result = StageResult(
        stage="features", out_dir=out_dir, metrics=metrics, artifacts=artifacts,
        info={"backbones": list(backbones), "taps": list(cfg.taps)},
    )
    result.save()
    return result
