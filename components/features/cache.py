"""The features stage's outputs and content-addressed cache, as the stages after it read them.

`<features>/<backbone>/features.npz` holds one row per manifest image (its sha256 and one array
per tap) and `backbone.json` the entry, preprocessing, taps and cache key they were computed
with. `FeatureStore` is the per-image cache under `<cache>/<backbone>/<key>/`, written atomically
entry by entry; an entry that cannot be read or has the wrong taps, shape or dtype is reported
and recomputed, never read as valid. How vectors are computed and what the key covers is
`components/features/extract.py`.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.core.errors import UserError
from components.core.result import atomic_path, sha256_json, write_json
from components.data.manifest import Dataset

log = logging.getLogger(__name__)

FEATURES_FILE = "features.npz"
RECORD_FILE = "backbone.json"
KEY_FILE = "cache_key.json"
TRUNK_FILE = "trunk.onnx"
RERUN_FEATURES = "rerun the features stage (`tlops stage features` or `dvc repro`)"


class FeatureCacheError(UserError):
    """Cached features that do not cover the manifest; the message names the backbone and the fix."""


def cache_key(inputs: Mapping[str, Any]) -> str:
    return sha256_json(inputs)[:20]


def key_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`name: was -> now` for every key input that differs (one level into dicts); empty when the keys agree."""
    differences = []
    for name in sorted(set(recorded) | set(current)):
        was, now = recorded.get(name), current.get(name)
        if isinstance(was, dict) and isinstance(now, dict):
            differences += [f"{name}.{k}: {was.get(k)} -> {now.get(k)}" for k in sorted(set(was) | set(now))
                            if was.get(k) != now.get(k)]
        elif was != now:
            differences.append(f"{name}: {was} -> {now}")
    return differences


class FeatureStore:
    """One `.npz` per image under `root/<key>/<sha[:2]>/<sha>.npz`, written atomically."""

    def __init__(self, root: Path, key: str):
        self.key = key
        self.dir = root / key
        self.trunk_path = self.dir / TRUNK_FILE

    def describe(self, inputs: Mapping[str, Any]) -> None:
        """Write `cache_key.json` (what the key covers) unless it is already there."""
        if cache_key(inputs) != self.key:
            raise ValueError(f"inputs hash to {cache_key(inputs)}, not this store's key {self.key}")
        if not (self.dir / KEY_FILE).exists():
            write_json(self.dir / KEY_FILE, {"key": self.key, "inputs": inputs})

    def path(self, sha256: str) -> Path:
        return self.dir / sha256[:2] / f"{sha256}.npz"

    def has(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def put(self, sha256: str, arrays: Mapping[str, np.ndarray]) -> None:
        with atomic_path(self.path(sha256)) as partial, open(partial, "wb") as f:
            np.savez(f, **arrays)

    def get(self, sha256: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
        """The entry's arrays, or None when it is absent or not a valid entry of this key."""
        path = self.path(sha256)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            log.warning("%s: unreadable cached features (%s); recomputing it", path, error)
            return None
        problem = entry_problem(arrays, shapes)
        if problem:
            log.warning("%s: %s; recomputing it", path, problem)
            return None
        return arrays


def entry_problem(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why `arrays` is not a valid cache entry for taps of `shapes`, or None."""
    if set(arrays) != set(shapes):
        return f"holds taps {sorted(arrays)}, expected {sorted(shapes)}"
    for tap, shape in shapes.items():
        array = arrays[tap]
        if array.dtype != np.float32 or array.shape != shape:
            return f"tap {tap!r} is {array.dtype}{list(array.shape)}, expected float32{list(shape)}"
        if not np.isfinite(array).all():
            return f"tap {tap!r} holds non-finite values"
    return None


def load_features(features_dir: Path, backbone: str, tap: str = "pooled") -> tuple[np.ndarray, np.ndarray]:
    """(sha256 per row as str, features float32) from `features_dir/<backbone>/features.npz`."""
    path = Path(features_dir) / backbone / FEATURES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no cached features for backbone {backbone!r}; {RERUN_FEATURES}.")
    try:
        with np.load(path, allow_pickle=False) as cache:
            if "sha256" not in cache.files:
                raise FeatureCacheError(f"{path}: no 'sha256' array (backbone {backbone!r}); {RERUN_FEATURES}.")
            if tap not in cache.files:
                taps = sorted(k for k in cache.files if k != "sha256")
                raise KeyError(f"{path}: backbone {backbone!r} has no cached tap {tap!r}; cached: {taps}.")
            sha256, features = cache["sha256"].astype(str), cache[tap]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise FeatureCacheError(f"{path}: unreadable ({error}); {RERUN_FEATURES}.") from None
    if features.ndim != 2 or features.shape[0] != sha256.shape[0]:
        raise FeatureCacheError(
            f"{path}: tap {tap!r} has shape {features.shape} for {sha256.shape[0]} sha256 rows; {RERUN_FEATURES}."
        )
    return sha256, features.astype(np.float32, copy=False)


def rows_by_sha256(sha256: np.ndarray, features: np.ndarray, wanted: pd.Series, backbone: str, what: str) -> np.ndarray:
    """Rows of `features` for the `wanted` sha256 values, in their order."""
    index = pd.Index(sha256)
    keep = ~index.duplicated()  # identical images have identical features
    positions = index[keep].get_indexer(wanted.astype(str))
    missing = int((positions < 0).sum())
    if missing:
        example = wanted.iloc[int(np.argmax(positions < 0))]
        raise FeatureCacheError(
            f"cached features for backbone {backbone!r} lack {missing} of {positions.size} {what} images "
            f"(e.g. sha256 {example}): the cache predates the manifest; {RERUN_FEATURES}."
        )
    return features[keep][positions]


def split_features(dataset: Dataset, features_dir: Path, backbone: str, tap: str, split: str = "train") -> np.ndarray:
    """The cached features of `split`'s rows, in manifest order, matched by sha256."""
    sha256, features = load_features(features_dir, backbone, tap)
    return rows_by_sha256(sha256, features, dataset.split(split)["sha256"], backbone, split)


def read_record(features_dir: Path, backbone: str) -> dict[str, Any]:
    """`features_dir/<backbone>/backbone.json`: the entry, preprocessing, taps and cache key of the features."""
    path = Path(features_dir) / backbone / RECORD_FILE
    if not path.exists():
        raise FeatureCacheError(f"{path}: not found (backbone {backbone!r}); {RERUN_FEATURES}.")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FeatureCacheError(f"{path}: not valid JSON ({error}); {RERUN_FEATURES}.") from None
    missing = [k for k in ("preprocessing", "taps", "cache_key", "cache_key_inputs") if k not in record]
    if missing:
        raise FeatureCacheError(f"{path}: lacks {missing}, written by an older tlops; {RERUN_FEATURES}.")
    return record


