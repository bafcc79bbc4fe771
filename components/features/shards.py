"""The features stage's work in independent pieces, for a runner that spreads them over machines.

Feature extraction is every image times every candidate backbone, and each vector is a cache entry
of its own (`components/features/cache.py`), so the work splits without coordination:

1. `prepare_trunk`, once per backbone: the trunk exported under its cache key (or the one already
   there) checked against torch on real images; its sha256 is handed to the backbone's chunks.
2. `compute_chunk`, per backbone and chunk of images (consecutive in sha256 order, a whole number of
   `features.batch_size` batches, so a chunk batches its images exactly as one process does): the
   chunk's missing entries computed with that trunk, written atomically to the shared cache.

Both return fingerprints, never arrays. The stage itself (`extract.run`) then finds every entry
cached and only assembles `features.npz`; run without the pieces, it computes the same entries itself
in one pass. Pieces may run twice (a worker lost mid-chunk): entries are content-addressed and
written atomically, so a repeat only recomputes equal values.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from components.core.result import atomic_path, sha256_file
from components.data.manifest import Dataset
from components.data.preprocess import load_batch
from components.features.cache import FeatureStore, cache_key
from components.features.config import FeaturesConfig
from components.features.extract import config_key_inputs, export_trunk, extract, verify_trunk
from components.models.backbones import build_trunk
from components.models.registry import get_entry

log = logging.getLogger(__name__)


def missing_images(backbone: str, cfg: FeaturesConfig, dataset: Dataset, cache_dir: Path) -> set[str]:
    """The dataset's images whose entries the backbone's cache lacks."""
    store = store_for(backbone, cfg, cache_dir)
    return {sha for sha in set(dataset.manifest["sha256"]) if not store.has(sha)}


def image_chunks(dataset: Dataset, batches_per_chunk: int, batch_size: int) -> list[list[str]]:
    """The distinct images' sha256 in the order one process extracts them, cut every `batches_per_chunk` batches."""
    ordered = sorted(set(dataset.manifest["sha256"]))
    size = batches_per_chunk * batch_size
    return [ordered[start:start + size] for start in range(0, len(ordered), size)]


def store_for(backbone: str, cfg: FeaturesConfig, cache_dir: Path) -> FeatureStore:
    entry = get_entry(backbone)
    inputs = config_key_inputs(entry, cfg)
    store = FeatureStore(cache_dir / entry.name, cache_key(inputs))
    store.describe(inputs)
    return store


def prepare_trunk(backbone: str, cfg: FeaturesConfig, dataset: Dataset, cache_dir: Path) -> str:
    """The sha256 of the backbone's trunk under today's key, exported if missing, checked against torch either way."""
    entry = get_entry(backbone)
    store = store_for(backbone, cfg, cache_dir)
    first = dataset.manifest.drop_duplicates("sha256").sort_values("sha256").head(cfg.parity_images)
    sample = load_batch([dataset.image_path(p) for p in first["path"]], entry.preprocessing(cfg.image_size))
    trunk = build_trunk(entry, cfg.taps)
    if store.trunk_path.exists():
        diff = verify_trunk(entry, trunk, store.trunk_path, sample, cfg, f"delete {store.trunk_path} to re-export it")
    else:
        with atomic_path(store.trunk_path) as partial:
            export_trunk(trunk, entry.preprocessing(cfg.image_size).input_size, cfg.opset, partial)
            diff = verify_trunk(entry, trunk, partial, sample, cfg, "try another features.opset")
    log.info("%s: trunk %s ready (parity max diff %.2g)", backbone, store.trunk_path, diff)
    return sha256_file(store.trunk_path)


def compute_chunk(backbone: str, cfg: FeaturesConfig, dataset: Dataset, cache_dir: Path, sha256s: Sequence[str],
                  trunk_sha256: str) -> str:
    """The chunk's missing cache entries computed; returns the store's key (what the entries are keyed by)."""
    rows = dataset.manifest[dataset.manifest["sha256"].isin(set(sha256s))]
    if rows["sha256"].nunique() != len(set(sha256s)):
        raise ValueError(f"{backbone}: {len(set(sha256s)) - rows['sha256'].nunique()} images of the chunk are not in "
                         f"the manifest this worker reads (is it the client's?)")
    chunk = Dataset(manifest=rows.reset_index(drop=True), root=dataset.root, labels=dataset.labels)
    _, stats = extract(get_entry(backbone), cfg, chunk, cache_dir, verified_trunk=trunk_sha256)
    log.info("%s: chunk of %d images, %d computed", backbone, len(set(sha256s)), int(stats["n_computed"]))
    return store_for(backbone, cfg, cache_dir).key
