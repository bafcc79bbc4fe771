"""Features: frozen-trunk activations computed once with ONNX Runtime, cached by content.

A feature vector is stored per image at `<cache>/<backbone>/<key>/<sha[:2]>/<image sha256>.npz`.
The key is a hash of everything that determines the vector besides the image (`key_inputs`):
weights, architecture, preprocessing, taps, ONNX opset, the versions of the libraries that
compute it and a hash of the source code that does. A hit is therefore always a correct value
and any change misses; `cache_key.json` beside the entries lists what the key covers.

The trunk is exported to ONNX under the same key, checked (`onnx.checker`, ONNX Runtime vs
torch on real images) before it computes a single feature. Entries are written atomically as
they are computed, so an interrupted run resumes where it stopped; an unreadable or misshapen
entry is logged and recomputed, never read as valid.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import pandas as pd
import torch

from components.core.code_version import package_versions, source_sha256
from components.core.errors import UserError
from components.core.progress import Progress, no_progress
from components.core.result import StageResult, atomic_path, sha256_file, write_json
from components.data import preprocess
from components.data.manifest import Dataset
from components.data.preprocess import Preprocessing, load_batch
from components.data.tokenization import Tokenization
from components.features import cache, text_embedding
from components.features.cache import FEATURES_FILE, RECORD_FILE, FeatureStore, cache_key
from components.features.config import FeaturesConfig
from components.models import backbones
from components.models.backbones import Trunk, build_trunk
from components.models.onnx_io import open_session
from components.models.registry import BackboneEntry, Entry, get_entry

log = logging.getLogger(__name__)

# Libraries whose arithmetic or image decoding ends up in a cached vector.
KEYED_PACKAGES = ("numpy", "onnx", "onnxruntime", "pillow", "timm", "torch", "torchvision")

B = TypeVar("B")


class TrunkParityError(UserError):
    """An exported trunk that does not compute what the torch trunk computes (or fails onnx.checker)."""


def feature_code() -> tuple[Any, ...]:
    """The code between an image file and a cached vector; its source is part of every key.

    Whole modules: the preprocessing, the trunk builder (weights, key mapping, `Trunk`), this one and
    the cache it writes. Not the registry: registering another backbone leaves existing caches valid
    (an entry's own fields are in the key).
    """
    return (preprocess, backbones, sys.modules[__name__], cache)


def key_inputs(entry: BackboneEntry, preprocessing: Preprocessing, taps: Sequence[str], opset: int) -> dict[str, Any]:
    """Everything that changes a feature vector except the image itself."""
    return {
        "architecture": entry.architecture,
        "weights_sha256": entry.weights_sha256,
        "key_layout": entry.key_layout,
        "preprocessing": preprocessing.model_dump(mode="json"),
        "taps": {tap: entry.taps[tap] for tap in taps},
        "opset": opset,
        "versions": package_versions(KEYED_PACKAGES),
        "code_sha256": source_sha256(feature_code()),
    }


def entry_preprocessing(entry: Entry, cfg: FeaturesConfig) -> Preprocessing | Tokenization:
    """What turns one input into the encoder's: an image's size and normalisation, or a text's tokenization."""
    return entry.preprocessing(cfg.max_length) if entry.modality == "text" else entry.preprocessing(cfg.image_size)


def config_key_inputs(entry: Entry, cfg: FeaturesConfig) -> dict[str, Any]:
    if entry.modality == "text":
        return text_embedding.key_inputs(entry, entry_preprocessing(entry, cfg), cfg.taps, cfg.opset)
    return key_inputs(entry, entry.preprocessing(cfg.image_size), cfg.taps, cfg.opset)


def space_key(entry: BackboneEntry, cfg: FeaturesConfig) -> str:
    return cache_key(config_key_inputs(entry, cfg))


def export_trunk(trunk: Trunk, input_size: int, opset: int, path: Path) -> Path:
    """`trunk` as ONNX with one output per tap and a dynamic batch axis."""
    with torch.no_grad():
        torch.onnx.export(
            trunk,
            (torch.zeros(1, 3, input_size, input_size),),
            str(path),
            dynamo=False,  # the dynamo exporter needs onnxscript, which this environment does not carry
            input_names=["image"],
            output_names=list(trunk.tap_names),
            dynamic_axes={"image": {0: "batch"}, **{t: {0: "batch"} for t in trunk.tap_names}},
            opset_version=opset,
        )
    return path


def verify_trunk(entry: BackboneEntry, trunk: Trunk, path: Path, images: np.ndarray, cfg: FeaturesConfig,
                 fix: str) -> float:
    """Full onnx.checker, then max |ONNX Runtime - torch| over taps on `images`; raises beyond tolerance."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise TrunkParityError(f"backbone {entry.name!r}: trunk {path} fails onnx.checker ({first_line}); {fix}.") from None
    actual = open_session(path, cfg.num_threads).run(list(trunk.tap_names), {"image": images})
    with torch.no_grad():
        expected = [t.numpy() for t in trunk(torch.from_numpy(images))]
    diffs = {
        tap: float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
        for tap, got, want in zip(trunk.tap_names, actual, expected)
    }
    worst = max(diffs, key=lambda tap: diffs[tap] if np.isfinite(diffs[tap]) else float("inf"))
    diff = diffs[worst]
    if not diff <= cfg.parity_atol:  # also true for NaN
        raise TrunkParityError(
            f"backbone {entry.name!r}: trunk {path} differs from the torch trunk by max |diff| {diff:.3g} "
            f"(tap {worst!r}, {len(images)} images), above features.parity_atol={cfg.parity_atol:g}; {fix}."
        )
    return diff


def trunk_output_shapes(path: Path, taps: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per tap, the shape of one image's vector, as the exported graph declares it."""
    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {o.name: tuple(d.dim_value for d in o.type.tensor_type.shape.dim[1:]) for o in graph.output}
    return {tap: shapes[tap] for tap in taps}


def decode_ahead(batches: Sequence[B], decode: Callable[[B], np.ndarray]) -> Iterator[tuple[B, np.ndarray]]:
    """Each batch with its decoded images; the next batch decodes on a thread while the caller uses this one.

    Decoding (PIL, torchvision) and inference (ONNX Runtime, torch) both release the GIL.
    """
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1) as decoder:
        upcoming = decoder.submit(decode, batches[0])
        for index, batch in enumerate(batches):
            images = upcoming.result()
            if index + 1 < len(batches):
                upcoming = decoder.submit(decode, batches[index + 1])
            yield batch, images


def extract(
    entry: BackboneEntry,
    cfg: FeaturesConfig,
    dataset: Dataset,
    cache_dir: Path,
    progress: Progress = no_progress,
    verified_trunk: str | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Features of every manifest image for one backbone, computing only what the cache lacks.

    `verified_trunk`: the sha256 of a trunk this run has already checked against torch (a shard of the stage,
    `components/features/shards.py`); a trunk file with exactly that content is used without checking it again."""
    inputs = config_key_inputs(entry, cfg)
    store = FeatureStore(cache_dir / entry.name, cache_key(inputs))
    store.describe(inputs)
    preprocessing = entry.preprocessing(cfg.image_size)
    frame = dataset.manifest.drop_duplicates("sha256").sort_values("sha256")
    stats: dict[str, float] = {}

    def decode(batch: pd.DataFrame) -> np.ndarray:
        return load_batch([dataset.image_path(p) for p in batch["path"]], preprocessing)

    trunk: Trunk | None = None
    if not store.trunk_path.exists():
        trunk = build_trunk(entry, cfg.taps)
        sample = decode(frame.head(cfg.parity_images))
        with atomic_path(store.trunk_path) as partial:
            export_trunk(trunk, preprocessing.input_size, cfg.opset, partial)
            fix = "try another features.opset"
            stats["trunk_parity_max_diff"] = verify_trunk(entry, trunk, partial, sample, cfg, fix)
        log.info("exported %s trunk to %s (parity max diff %.2g)", entry.name, store.trunk_path,
                 stats["trunk_parity_max_diff"])
    shapes = trunk_output_shapes(store.trunk_path, cfg.taps)
    cached = {sha: store.get(sha, shapes) for sha in frame["sha256"]}
    missing = frame[[cached[sha] is None for sha in frame["sha256"]]]
    invalid = sum(store.has(sha) for sha in missing["sha256"])
    seconds = 0.0
    if len(missing):
        if trunk is None and not (verified_trunk and sha256_file(store.trunk_path) == verified_trunk):
            # a trunk exported earlier is checked again before it computes anything new
            trunk = build_trunk(entry, cfg.taps)
            fix = f"delete {store.trunk_path} to re-export it"
            stats["trunk_parity_max_diff"] = verify_trunk(
                entry, trunk, store.trunk_path, decode(missing.head(cfg.parity_images)), cfg, fix
            )
        runner = open_session(store.trunk_path, cfg.num_threads)
        started = time.perf_counter()  # throughput of decode + preprocess + inference, not export
        batches = [missing.iloc[i : i + cfg.batch_size] for i in range(0, len(missing), cfg.batch_size)]
        with progress(total=len(missing), desc=f"features {entry.name}", unit="img") as bar:
            for batch, images in decode_ahead(batches, decode):
                outputs = runner.run(list(cfg.taps), {"image": images})
                for row, sha in enumerate(batch["sha256"]):
                    arrays = {tap: out[row] for tap, out in zip(cfg.taps, outputs)}
                    store.put(sha, arrays)  # written as computed, so a killed run resumes here
                    cached[sha] = arrays
                bar.update(len(batch))
        seconds = time.perf_counter() - started
    rows = [cached[s] for s in dataset.manifest["sha256"]]
    features = {"sha256": dataset.manifest["sha256"].to_numpy(dtype=str)}
    for tap in cfg.taps:
        features[tap] = np.stack([r[tap] for r in rows]).astype(np.float32)
    stats |= {
        "n_computed": float(len(missing)),
        "n_cached": float(len(frame) - len(missing)),
        "n_invalid_recomputed": float(invalid),
        "images_per_s": len(missing) / seconds if len(missing) and seconds > 0 else 0.0,
    }
    log.info("%s: %d computed (%d replacing invalid entries), %d from cache %s", entry.name, len(missing),
             invalid, len(frame) - len(missing), store.dir)
    return features, stats


def stale_inputs(record: Mapping[str, Any], entry: Entry) -> list[str]:
    """What differs between the key inputs recorded with cached features and today's code, versions, entry.

    Empty when features computed now with the recorded settings would get the same key.
    """
    if entry.modality == "text":
        return text_embedding.stale_inputs(record, entry)
    recorded = record["cache_key_inputs"]
    current = key_inputs(entry, Preprocessing.of(record["preprocessing"]), record["taps"], recorded["opset"])
    return cache.key_differences(recorded, current)


class ModalityMismatchError(UserError):
    """An encoder asked to embed the other modality (a text encoder and images, or the reverse)."""


def check_modality(entry: Entry, dataset: Dataset) -> None:
    if entry.modality != dataset.modality:
        raise ModalityMismatchError(
            f"backbone {entry.name!r} is {'a text encoder' if entry.modality == 'text' else 'an image backbone'}, but "
            f"the dataset holds {dataset.modality}s; set select.candidates to "
            f"{'image backbones' if dataset.modality == 'image' else 'text encoders'} (`tlops backbones` lists them).")


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
        check_modality(entry, dataset)
        unknown = [t for t in cfg.taps if t not in entry.taps]
        if unknown:
            raise KeyError(f"features.taps: {entry.name} has no tap(s) {unknown}; available: {sorted(entry.taps)}.")
    metrics: dict[str, float] = {}
    artifacts: dict[str, Path] = {}
    for entry in entries:
        if entry.modality == "text":
            features, stats = text_embedding.extract(entry, entry_preprocessing(entry, cfg), cfg.taps, cfg.opset,
                                                     cfg.batch_size, cfg.num_threads, cfg.parity_images,
                                                     cfg.parity_atol, dataset, cache_dir, progress)
        else:
            features, stats = extract(entry, cfg, dataset, cache_dir, progress)
        target = out_dir / entry.name
        with atomic_path(target / FEATURES_FILE) as partial, open(partial, "wb") as f:
            np.savez(f, **features)
        inputs = config_key_inputs(entry, cfg)
        write_json(
            target / RECORD_FILE,
            {"entry": entry.describe(), "preprocessing": entry_preprocessing(entry, cfg),
             "taps": list(cfg.taps), "cache_key": cache_key(inputs), "cache_key_inputs": inputs},
        )
        artifacts[f"{entry.name}.features"] = target / FEATURES_FILE
        metrics.update({f"{entry.name}.{k}": v for k, v in stats.items()})
    result = StageResult(
        stage="features", out_dir=out_dir, metrics=metrics, artifacts=artifacts,
        info={"backbones": list(backbones), "taps": list(cfg.taps)},
    )
    result.save()
    return result
