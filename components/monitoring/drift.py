"""Drift: do new images still look like the training data, as the frozen trunk sees them?

New images are embedded with the same frozen trunk, tap and preprocessing as the features
stage (through `features.extract`, so they share its content-addressed cache), then compared
with the reference embeddings by two two-sample tests:

- MMD with an RBF kernel (Gretton et al., "A Kernel Two-Sample Test", JMLR 2012), bandwidth by
  the median heuristic on the pooled sample, p-value from a permutation test
  (`scipy.stats.permutation_test`). The bandwidth is computed once on the pooled sample, which
  every permutation shares, so the permutation null stays exact.
- A domain classifier (logistic regression, cross-validated): its ROC AUC at telling reference
  from new is 0.5 when the two are alike (Lipton et al., "Detecting and Correcting for Label
  Shift", 2018; Rabanser et al., "Failing Loudly", NeurIPS 2019).

A batch is flagged when the MMD p-value is below `p_value_threshold` or the AUC above
`auc_threshold`. Each check appends one line to `history.jsonl` in `out_dir`; the caller logs
`tracking_record(result)` and draws `plot_history`. This module never talks to MLflow or Prefect.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial.distance import cdist, pdist
from scipy.stats import permutation_test
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from components.core.errors import UserError
from components.core.progress import Progress, no_progress
from components.core.result import StageResult, atomic_path, sha256_file
from components.data.manifest import Dataset
from components.features.cache import load_features
from components.features.config import FeaturesConfig
from components.features.extract import extract
from components.models.registry import get_entry
from components.monitoring.config import DriftConfig

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
PLOT_FILE = "drift_over_time.png"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DriftInputError(UserError):
    """New images or reference embeddings that cannot be compared; the message says what to fix."""


def image_paths(new_images: Path | Sequence[Path]) -> list[Path]:
    """The images to check: every image file under a folder (recursively, sorted), or the given list."""
    if isinstance(new_images, (str, Path)):
        folder = Path(new_images)
        if not folder.is_dir():
            raise DriftInputError(f"{folder}: not a folder of images; pass a folder or a list of image paths.")
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise DriftInputError(f"{folder}: holds no image ({', '.join(IMAGE_SUFFIXES)}); point --images at new images.")
        return paths
    paths = [Path(p) for p in new_images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DriftInputError(f"{missing[0]}: image not found ({len(missing)} of {len(paths)} missing).")
    return paths


def embed_images(
    paths: Sequence[Path],
    backbone: str,
    tap: str,
    features_cfg: FeaturesConfig,
    cache_dir: Path,
    progress: Progress = no_progress,
) -> tuple[np.ndarray, np.ndarray]:
    """(sha256, embeddings) of `paths` from the frozen trunk, through the features stage's cache."""
    absolute = [Path(p).resolve() for p in paths]
    manifest = pd.DataFrame({"path": [str(p) for p in absolute], "sha256": [sha256_file(p) for p in absolute]})
    # Absolute paths: `root / path` is the path itself, so any list of files forms a dataset.
    dataset = Dataset(manifest=manifest, root=Path(absolute[0].anchor), labels=())
    cfg = features_cfg.model_copy(update={"taps": (tap,)})
    features, _ = extract(get_entry(backbone), cfg, dataset, cache_dir, progress)
    return features["sha256"], features[tap]


def reference_embeddings(reference: Path | np.ndarray, backbone: str, tap: str) -> tuple[np.ndarray, np.ndarray]:
    """(sha256 or empty, embeddings) from a features stage folder or an array."""
    if isinstance(reference, np.ndarray):
        if reference.ndim != 2:
            raise DriftInputError(f"reference embeddings have shape {reference.shape}; expected (rows, features).")
        return np.array([], dtype=str), reference.astype(np.float32, copy=False)
    try:
        return load_features(Path(reference), backbone, tap)
    except (FileNotFoundError, KeyError) as error:
        raise DriftInputError(error.args[0]) from None


def median_bandwidth(pooled: np.ndarray) -> float:
    """The median pairwise Euclidean distance (Gretton et al.'s heuristic), never zero."""
    distances = pdist(pooled)
    positive = distances[distances > 0]
    return float(np.median(positive)) if positive.size else 1.0


def mmd_test(
    reference: np.ndarray, new: np.ndarray, permutations: int, seed: int
) -> tuple[float, float, float]:
    """(unbiased MMD^2, permutation p-value, bandwidth) of an RBF-kernel two-sample test."""
    pooled = np.concatenate([reference, new]).astype(np.float64)
    bandwidth = median_bandwidth(pooled)
    kernel = np.exp(-cdist(pooled, pooled, "sqeuclidean") / (2.0 * bandwidth**2))
    np.fill_diagonal(kernel, 0.0)  # the unbiased estimate leaves out k(x, x)
    m, n = len(reference), len(new)

    def statistic(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        # x: row indices of the first sample, batched along leading axes; y holds every other row.
        x = np.moveaxis(x, axis, -1)
        rows = x.reshape(-1, m)
        in_x = np.zeros((len(rows), len(pooled)))
        in_x[np.arange(len(rows))[:, None], rows] = 1.0
        in_y = 1.0 - in_x
        kernel_x = in_x @ kernel  # one matrix product per batch of permutations, not a gather per pair
        within_x = np.einsum("bi,bi->b", kernel_x, in_x) / (m * (m - 1))
        across = np.einsum("bi,bi->b", kernel_x, in_y) / (m * n)
        within_y = np.einsum("bi,bi->b", in_y @ kernel, in_y) / (n * (n - 1))
        return (within_x + within_y - 2.0 * across).reshape(x.shape[:-1])

    indices = np.arange(len(pooled))
    result = permutation_test(
        (indices[: len(reference)], indices[len(reference) :]),
        statistic,
        permutation_type="independent",
        vectorized=True,
        n_resamples=permutations,
        batch=256,
        alternative="greater",
        rng=np.random.default_rng(seed),
    )
    return float(result.statistic), float(result.pvalue), bandwidth


def domain_classifier_auc(reference: np.ndarray, new: np.ndarray, seed: int) -> float:
    """Cross-validated ROC AUC of a linear classifier telling new (1) from reference (0) rows."""
    rows = np.concatenate([reference, new])
    is_new = np.concatenate([np.zeros(len(reference), int), np.ones(len(new), int)])
    folds = StratifiedKFold(n_splits=min(5, len(new)), shuffle=True, random_state=seed)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    scores = cross_val_predict(classifier, rows, is_new, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(is_new, scores))


def append_history(path: Path, record: dict[str, Any]) -> Path:
    """Append one JSON line: the whole file is rewritten under a temporary name, then renamed."""
    previous = path.read_text() if path.exists() else ""
    if previous and not previous.endswith("\n"):
        previous += "\n"
    with atomic_path(path) as partial:
        partial.write_text(previous + json.dumps(record, sort_keys=True) + "\n")
    return path


def read_history(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        raise DriftInputError(f"{path}: no drift history yet; run a drift check first (`tlops drift --images FOLDER`).")
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run(
    cfg: DriftConfig,
    reference: Path | np.ndarray,
    new_images: Path | Sequence[Path],
    out_dir: Path,
    *,
    features_cfg: FeaturesConfig | None = None,
    cache_dir: Path | None = None,
    progress: Progress = no_progress,
) -> StageResult:
    """Compare `new_images` with `reference` (a features stage folder or an embeddings array).

    `features_cfg` must be the features stage's config (same image size), so both sides are
    embedded identically; `cache_dir` is its feature cache (default: a `cache/` folder in `out_dir`).
    `out_dir` keeps its earlier history: each call appends one line to `history.jsonl`.
    """
    if cfg.backbone == "auto":
        raise DriftInputError("drift.backbone is 'auto': pass the backbone the select stage chose (or name one).")
    features_cfg = features_cfg or FeaturesConfig()
    paths = image_paths(new_images)
    if len(paths) < cfg.min_new_images:
        raise DriftInputError(
            f"{len(paths)} new image(s); drift.min_new_images is {cfg.min_new_images}: check a larger batch."
        )
    ref_sha, ref = reference_embeddings(reference, cfg.backbone, cfg.tap)
    new_sha, new = embed_images(paths, cfg.backbone, cfg.tap, features_cfg, cache_dir or out_dir / "cache", progress)
    if ref.shape[1] != new.shape[1]:
        raise DriftInputError(
            f"reference embeddings have {ref.shape[1]} features, {cfg.backbone}/{cfg.tap} gives {new.shape[1]}: "
            f"the reference was made with another backbone or tap; set drift.backbone/drift.tap to match it."
        )
    # An image that is already in the reference says nothing about whether new data differs.
    if ref_sha.size:
        keep = ~np.isin(ref_sha, new_sha)
        ref = ref[keep]
    rng = np.random.default_rng(cfg.seed)
    if len(ref) > cfg.max_reference:
        ref = ref[np.sort(rng.choice(len(ref), cfg.max_reference, replace=False))]
    if len(ref) < cfg.min_new_images:
        raise DriftInputError(f"only {len(ref)} reference embeddings; rerun the features stage on the training data.")

    mmd2, p_value, bandwidth = mmd_test(ref, new, cfg.permutations, cfg.seed)
    auc = domain_classifier_auc(ref, new, cfg.seed)
    flagged = p_value < cfg.p_value_threshold or (cfg.auc_threshold is not None and auc > cfg.auc_threshold)
    log.info("drift %s/%s: MMD^2 %.4g p=%.4g AUC %.3f on %d new vs %d reference -> %s",
             cfg.backbone, cfg.tap, mmd2, p_value, auc, len(new), len(ref), "FLAGGED" if flagged else "ok")

    out_dir.mkdir(parents=True, exist_ok=True)
    source = str(new_images) if isinstance(new_images, (str, Path)) else f"{len(paths)} paths"
    record = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "backbone": cfg.backbone, "tap": cfg.tap, "images": source,
        "n_new": len(new), "n_reference": len(ref),
        "mmd2": mmd2, "p_value": p_value, "bandwidth": bandwidth, "auc": auc, "flagged": bool(flagged),
        "p_value_threshold": cfg.p_value_threshold, "auc_threshold": cfg.auc_threshold,
        "new_sha256": sha256_of_list(new_sha),
    }
    history = append_history(out_dir / HISTORY_FILE, record)
    batch = len(read_history(history)) - 1
    result = StageResult(
        stage="drift", out_dir=out_dir,
        metrics={"mmd2": mmd2, "p_value": p_value, "auc": auc, "flagged": float(flagged),
                 "n_new": float(len(new)), "n_reference": float(len(ref))},
        artifacts={"history": history},
        info={**record, "batch": batch},
    )
    result.save()
    return result


def sha256_of_list(values: np.ndarray) -> str:
    """One hash naming the set of new images (order-free), to tell batches apart in the history."""
    return hashlib.sha256("\n".join(sorted(map(str, values))).encode()).hexdigest()


def tracking_record(result: StageResult) -> dict[str, Any]:
    """What the caller logs to MLflow for one check: metrics at step = batch index, and tags.

    The settings are tags, not params: one monitoring run collects many checks, and MLflow
    refuses a param whose value changes within a run.
    """
    info = result.info
    return {
        "metrics": {f"drift_{k}": v for k, v in result.metrics.items()},
        "step": int(info["batch"]),
        "timestamp_ms": int(datetime.fromisoformat(info["time"]).timestamp() * 1000),
        "tags": {"tlops.stage": "drift", "tlops.drift.flagged": str(info["flagged"]).lower(),
                 "tlops.drift.images": info["images"], "tlops.drift.backbone": info["backbone"],
                 "tlops.drift.tap": info["tap"], "tlops.drift.p_value_threshold": str(info["p_value_threshold"]),
                 "tlops.drift.auc_threshold": str(info["auc_threshold"])},
    }


def plot_history(history: Path, out_path: Path | None = None) -> Path:
    """`drift_over_time.png` beside the history: MMD p-value (log scale) and classifier AUC per check."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_history(history)
    out_path = out_path or Path(history).with_name(PLOT_FILE)
    times = [datetime.fromisoformat(r["time"]) for r in records]
    flagged = np.array([r["flagged"] for r in records])
    figure = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    p_values = np.array([max(r["p_value"], 1e-6) for r in records])
    top.plot(times, p_values, "-o", color="tab:blue", label="MMD permutation p-value")
    top.scatter(np.array(times)[flagged], p_values[flagged], s=90, facecolors="none", edgecolors="tab:red",
                linewidths=2, label="flagged", zorder=3)
    top.axhline(records[-1]["p_value_threshold"], color="tab:red", ls="--", label="p-value threshold")
    top.set_yscale("log")
    top.set_ylabel("p-value (low = drift)")
    top.legend(loc="lower left", fontsize=8)
    top.set_title(f"Embedding drift, {records[-1]['backbone']}/{records[-1]['tap']}")
    aucs = np.array([r["auc"] for r in records])
    bottom.plot(times, aucs, "-o", color="tab:green", label="domain-classifier AUC")
    bottom.scatter(np.array(times)[flagged], aucs[flagged], s=90, facecolors="none", edgecolors="tab:red",
                   linewidths=2, zorder=3)
    if records[-1]["auc_threshold"] is not None:
        bottom.axhline(records[-1]["auc_threshold"], color="tab:red", ls="--", label="AUC threshold")
    bottom.axhline(0.5, color="grey", lw=0.8)
    bottom.set_ylim(0.0, 1.02)
    bottom.set_ylabel("AUC (0.5 = alike)")
    bottom.legend(loc="lower left", fontsize=8)
    figure.autofmt_xdate()
    with atomic_path(out_path) as partial:
        figure.savefig(partial, format="png", dpi=110)
    return out_path
