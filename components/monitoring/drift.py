"""Drift: do new images (or texts) still look like the training data, as the frozen trunk sees them?

New inputs are embedded with the same frozen trunk, taps and preprocessing as the features stage:
images through `features.extract`, texts through `features.text_embedding` with the same
tokenization, each with the features stage's own config, so they share its cache key (training
inputs and inputs seen by an earlier check are read, not recomputed). The drift backbone's registry
entry says which modality a check reads. The embeddings are compared with the reference embeddings
by two two-sample tests, each giving a permutation p-value:

- MMD with an RBF kernel (Gretton et al., "A Kernel Two-Sample Test", JMLR 2012), bandwidth by
  the median heuristic on the pooled sample, p-value from a permutation test
  (`scipy.stats.permutation_test`). The bandwidth is computed once on the pooled sample, which
  every permutation shares, so the permutation null stays exact.
- A domain classifier (Lipton et al. 2018; Rabanser et al., "Failing Loudly", NeurIPS 2019):
  ridge regression telling new from reference rows on a whitened PCA projection of the pooled
  rows, scored by cross-validated ROC AUC, and refitted on permuted labels for its p-value
  (`domain_classifier_test` says why the null stays exact and why the refits are cheap).

An AUC alone has no fixed null: an in-distribution batch of 10 reaches a higher AUC than one of
60 (benchmarks/drift.py), so a fixed AUC threshold is a different false-alarm rate at each batch
size. P-values are uniform under no shift whatever the size, so a batch is flagged when either
p-value is below `p_value_threshold / 2`; by the union bound at most `p_value_threshold` of
in-distribution batches are flagged.

Each check appends one line to `history.jsonl` in `out_dir`; the caller logs
`tracking_record(result)` and draws `plot_history`. This module never talks to MLflow or Prefect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial.distance import cdist, pdist
from scipy.stats import permutation_test, rankdata
from sklearn.decomposition import PCA
from sklearn.model_selection import KFold

from components.core.progress import Progress, no_progress
from components.core.result import StageResult, atomic_path, sha256_file
from components.data.manifest import Dataset
from components.features import text_embedding
from components.features.cache import load_features, rows_by_sha256
from components.features.config import FeaturesConfig
from components.features.extract import entry_preprocessing, extract
from components.models.registry import get_entry
from components.monitoring.config import DriftConfig
from components.monitoring.new_images import DriftInputError, capped, checked_images
from components.monitoring.new_texts import NewTexts, capped_texts, checked_texts

log = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
PLOT_FILE = "drift_over_time.png"
# The domain classifier: dimensions it sees, folds, and ridge strength per training row (chosen on ELPV
# cells, benchmarks/drift.py).
CLASSIFIER_COMPONENTS = 32
CLASSIFIER_FOLDS = 5
CLASSIFIER_RIDGE = 1.0


@dataclass(frozen=True)
class Reference:
    """Embeddings the new inputs are compared with, and the sha256 of the image or text behind each row."""

    sha256: np.ndarray
    embeddings: np.ndarray

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or len(self.sha256) != len(self.embeddings):
            raise DriftInputError(f"reference embeddings have shape {self.embeddings.shape} for {len(self.sha256)} "
                                  f"sha256 values; expected (rows, features) with one sha256 per row.")


def features_reference(features_dir: Path, backbone: str, tap: str) -> Reference:
    """Every row of a features stage folder."""
    try:
        sha256, features = load_features(Path(features_dir), backbone, tap)
    except (FileNotFoundError, KeyError) as error:
        raise DriftInputError(error.args[0]) from None
    return Reference(sha256, features)


def split_reference(dataset: Dataset, features_dir: Path, backbone: str, tap: str, split: str = "train") -> Reference:
    """The features stage's rows of one split (what the model was trained on), with their sha256."""
    modality = get_entry(backbone).modality
    if modality != dataset.modality:
        raise DriftInputError(f"drift.backbone={backbone!r} embeds {modality}s, but the validated dataset holds "
                              f"{dataset.modality}s; set drift.backbone to auto (the select stage's choice) or to "
                              f"one of the {dataset.modality} entries `tlops backbones` lists.")
    every = features_reference(features_dir, backbone, tap)
    wanted = dataset.split(split)["sha256"]
    return Reference(wanted.to_numpy(dtype=str), rows_by_sha256(every.sha256, every.embeddings, wanted, backbone, split))


@dataclass(frozen=True)
class Scores:
    mmd2: float
    p_value: float  # MMD permutation p-value
    bandwidth: float
    auc: float  # the domain classifier's cross-validated ROC AUC
    auc_p_value: float
    flagged: bool


def embed_images(
    paths: Sequence[Path],
    backbone: str,
    tap: str,
    features_cfg: FeaturesConfig,
    cache_dir: Path,
    progress: Progress = no_progress,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(sha256, embeddings, how many were computed rather than read) of `paths`, through the features cache.

    `features_cfg` is used as it is, every tap included: narrowing it to `tap` would change the cache
    key and recompute what the features stage already stored.
    """
    check_tap_cached(tap, features_cfg)
    features, stats = extract(get_entry(backbone), features_cfg, images_dataset(paths), cache_dir, progress)
    return features["sha256"], features[tap], int(stats["n_computed"])


def images_dataset(paths: Sequence[Path]) -> Dataset:
    """Any list of image files as an unlabelled dataset (the features stage's input), each with its sha256."""
    absolute = [Path(p).resolve() for p in paths]
    manifest = pd.DataFrame({"path": [str(p) for p in absolute], "sha256": [sha256_file(p) for p in absolute]})
    # Absolute paths: `root / path` is the path itself, so any list of files forms a dataset.
    return Dataset(manifest=manifest, root=Path(absolute[0].anchor), labels=())


def new_inputs(cfg: DriftConfig, new_data: Path | Sequence[Path]) -> tuple[int, NewTexts | list[Path]]:
    """(how many inputs `new_data` holds, the ones a check embeds: all, or a seeded subsample of
    `drift.max_new_images` / `max_new_texts`), checked whole before anything is embedded."""
    if get_entry(cfg.backbone).modality == "text":
        texts = checked_texts(new_data, cfg)
        return len(texts), capped_texts(texts, cfg)
    images = checked_images(new_data, cfg)
    return len(images), capped(images, cfg)


def embed_texts(
    texts: NewTexts,
    backbone: str,
    tap: str,
    features_cfg: FeaturesConfig,
    cache_dir: Path,
    progress: Progress = no_progress,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(sha256, embeddings, how many were computed rather than read) of `texts`, through the features cache.

    The features stage's own call, with its config as it is: the same tokenization, taps and key.
    """
    check_tap_cached(tap, features_cfg)
    entry = get_entry(backbone)
    sha256 = texts.sha256
    # The encoder reads texts from a dataset's files, as ingest stores them: one UTF-8 file per text, named by its
    # sha256 here. Only the texts the cache lacks are read back.
    with tempfile.TemporaryDirectory(prefix="tlops-drift-") as folder:
        root = Path(folder)
        for sha, text in dict(zip(sha256, texts.texts)).items():
            (root / f"{sha}.txt").write_bytes(text.encode("utf-8"))
        manifest = pd.DataFrame({"path": [f"{sha}.txt" for sha in sha256], "sha256": sha256,
                                 "chars": [len(text) for text in texts.texts]})
        features, stats = text_embedding.extract(
            entry, entry_preprocessing(entry, features_cfg), features_cfg.taps, features_cfg.opset,
            features_cfg.batch_size, features_cfg.num_threads, features_cfg.parity_images, features_cfg.parity_atol,
            Dataset(manifest=manifest, root=root, labels=()), cache_dir, progress)
    return features["sha256"], features[tap], int(stats["n_computed"])


def check_tap_cached(tap: str, features_cfg: FeaturesConfig) -> None:
    if tap not in features_cfg.taps:
        raise DriftInputError(f"drift.tap={tap!r} is not in features.taps {list(features_cfg.taps)}: the features "
                              f"stage caches only those; pick one of them or add it there.")


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


def domain_classifier_test(reference: np.ndarray, new: np.ndarray, permutations: int, seed: int) -> tuple[float, float]:
    """(cross-validated ROC AUC of a linear classifier telling new from reference rows, its permutation p-value).

    The classifier is ridge regression of the label on a whitened PCA projection of the pooled rows,
    fitted on four folds and scored on the fifth. Three choices keep the permutation null exact:
    PCA and folds are drawn without looking at the labels (every permutation shares them), and
    the held-out scores carry no intercept, which would depend on the labels of the other folds.
    Its weights are linear in the labels, so refitting on all permuted label vectors at once is
    one matrix product per fold. scikit-learn's `permutation_test_score`, refitting an estimator
    object per fold and permutation, took 43 times as long at the caps (benchmarks/drift.py).
    """
    pooled = np.concatenate([reference, new]).astype(np.float64)
    is_new = np.concatenate([np.zeros(len(reference)), np.ones(len(new))])
    rng = np.random.default_rng(seed)
    # Column 0: the observed labels; then one column per permutation.
    labels = np.column_stack([is_new] + [rng.permutation(is_new) for _ in range(permutations)])
    components = min(CLASSIFIER_COMPONENTS, len(pooled) - 1, pooled.shape[1])
    projected = PCA(components, whiten=True, random_state=seed).fit_transform(pooled)
    scores = np.empty_like(labels)
    for train, test in KFold(n_splits=CLASSIFIER_FOLDS, shuffle=True, random_state=seed).split(projected):
        centre = projected[train].mean(axis=0)
        centred = projected[train] - centre  # centred rows make the labels' own mean drop out
        gram = centred.T @ centred + CLASSIFIER_RIDGE * len(train) * np.eye(components)
        scores[test] = (projected[test] - centre) @ np.linalg.solve(gram, centred.T @ labels[train])
    # ROC AUC of every column at once: the Mann-Whitney U of the new rows' score ranks over n_new * n_reference.
    n_new, n_reference = len(new), len(reference)
    ranks = rankdata(scores, axis=0)
    aucs = ((ranks * labels).sum(axis=0) - n_new * (n_new + 1) / 2) / (n_new * n_reference)
    return float(aucs[0]), float((1 + np.sum(aucs[1:] >= aucs[0])) / (permutations + 1))


def compare(cfg: DriftConfig, reference: np.ndarray, new: np.ndarray) -> Scores:
    """Both tests on two embedding arrays, and whether the batch is flagged (either p-value below threshold/2)."""
    mmd2, p_value, bandwidth = mmd_test(reference, new, cfg.permutations, cfg.seed)
    auc, auc_p_value = domain_classifier_test(reference, new, cfg.auc_permutations, cfg.seed)
    flagged = min(p_value, auc_p_value) < cfg.per_test_threshold()
    return Scores(mmd2=mmd2, p_value=p_value, bandwidth=bandwidth, auc=auc, auc_p_value=auc_p_value,
                  flagged=bool(flagged))


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
        raise DriftInputError(f"{path}: no drift history yet; run a drift check first (`tlops drift NEW_DATA`).")
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run(
    cfg: DriftConfig,
    reference: Reference | Path,
    new_data: Path | Sequence[Path],
    out_dir: Path,
    *,
    features_cfg: FeaturesConfig | None = None,
    cache_dir: Path | None = None,
    progress: Progress = no_progress,
) -> StageResult:
    """Compare `new_data` with `reference` (embeddings with their sha256, or a features stage folder).

    `new_data` is what `cfg.backbone` embeds: for an image backbone, a folder of images or a list of
    image paths; for a text encoder, a CSV with a `text` column or a folder of .txt files. It is
    checked whole before anything is embedded. `features_cfg` must be the features stage's config
    and `cache_dir` its feature cache (default: a `cache/` folder in `out_dir`), so both sides are
    embedded identically and nothing the stage stored is recomputed. `out_dir` keeps its earlier
    history: each call appends one line to `history.jsonl`.
    """
    if cfg.backbone == "auto":
        raise DriftInputError("drift.backbone is 'auto': pass the backbone the select stage chose (or name one).")
    features_cfg = features_cfg or FeaturesConfig()
    cache_dir = cache_dir or out_dir / "cache"
    modality = get_entry(cfg.backbone).modality
    noun = f"{modality}s"
    n_found, used = new_inputs(cfg, new_data)
    cap, least = getattr(cfg, f"max_new_{noun}"), getattr(cfg, f"min_new_{noun}")
    if len(used) < n_found:
        log.info("drift: %d %s found, checking a seeded subsample of %d (drift.max_new_%s)", n_found, noun,
                 len(used), noun)
    if not isinstance(reference, Reference):
        reference = features_reference(Path(reference), cfg.backbone, cfg.tap)
    if isinstance(used, NewTexts):
        new_sha, new, computed = embed_texts(used, cfg.backbone, cfg.tap, features_cfg, cache_dir, progress)
    else:
        new_sha, new, computed = embed_images(used, cfg.backbone, cfg.tap, features_cfg, cache_dir, progress)
    ref = reference.embeddings
    if ref.shape[1] != new.shape[1]:
        raise DriftInputError(
            f"reference embeddings have {ref.shape[1]} features, {cfg.backbone}/{cfg.tap} gives {new.shape[1]}: "
            f"the reference was made with another backbone or tap; set drift.backbone/drift.tap to match it."
        )
    # An input that is already in the reference says nothing about whether new data differs.
    ref = ref[~np.isin(reference.sha256, new_sha)]
    if len(ref) > cfg.max_reference:
        ref = ref[np.sort(np.random.default_rng(cfg.seed).choice(len(ref), cfg.max_reference, replace=False))]
    if len(ref) < least:
        raise DriftInputError(f"only {len(ref)} reference embeddings besides the new {noun}; rerun the features "
                              f"stage on the training data.")

    scores = compare(cfg, ref, new)
    log.info("drift %s/%s: MMD^2 %.4g p=%.4g, AUC %.3f p=%.4g on %d new vs %d reference -> %s", cfg.backbone, cfg.tap,
             scores.mmd2, scores.p_value, scores.auc, scores.auc_p_value, len(new), len(ref),
             "FLAGGED" if scores.flagged else "ok")

    out_dir.mkdir(parents=True, exist_ok=True)
    source = str(new_data) if isinstance(new_data, (str, Path)) else f"{n_found} paths"
    record = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "backbone": cfg.backbone, "tap": cfg.tap, "modality": modality, noun: source,
        "n_found": n_found, "n_new": len(new), "n_reference": len(ref), "n_computed": computed,
        **asdict(scores),
        "p_value_threshold": cfg.p_value_threshold, "per_test_threshold": cfg.per_test_threshold(),
        f"max_new_{noun}": cap, "seed": cfg.seed,
        "new_sha256": sha256_of_list(new_sha),
    }
    history = append_history(out_dir / HISTORY_FILE, record)
    batch = len(read_history(history)) - 1
    result = StageResult(
        stage="drift", out_dir=out_dir,
        metrics={"mmd2": scores.mmd2, "p_value": scores.p_value, "auc": scores.auc, "auc_p_value": scores.auc_p_value,
                 "flagged": float(scores.flagged), "n_found": float(n_found), "n_new": float(len(new)),
                 "n_reference": float(len(ref)), "n_computed": float(computed)},
        artifacts={"history": history},
        info={**record, "batch": batch},
    )
    result.save()
    return result


def sha256_of_list(values: np.ndarray) -> str:
    """One hash naming the set of new inputs (order-free), to tell batches apart in the history."""
    return hashlib.sha256("\n".join(sorted(map(str, values))).encode()).hexdigest()


def tracking_record(result: StageResult) -> dict[str, Any]:
    """What the caller logs to MLflow for one check: metrics at step = batch index, and tags.

    The settings are tags, not params: one monitoring run collects many checks, and MLflow
    refuses a param whose value changes within a run.
    """
    info = result.info
    noun = inputs_noun(info)
    return {
        "metrics": {f"drift_{k}": v for k, v in result.metrics.items()},
        "step": int(info["batch"]),
        "timestamp_ms": int(datetime.fromisoformat(info["time"]).timestamp() * 1000),
        "tags": {"tlops.stage": "drift", "tlops.drift.flagged": str(info["flagged"]).lower(),
                 f"tlops.drift.{noun}": info[noun], "tlops.drift.backbone": info["backbone"],
                 "tlops.drift.tap": info["tap"], "tlops.drift.p_value_threshold": str(info["p_value_threshold"]),
                 f"tlops.drift.max_new_{noun}": str(info[f"max_new_{noun}"])},
    }


def inputs_noun(record: dict[str, Any]) -> str:
    """`images` or `texts`: the key a check's record names its new inputs under (lines before text: images)."""
    return f"{record.get('modality', 'image')}s"


def plot_history(history: Path, out_path: Path | None = None) -> Path:
    """`drift_over_time.png` beside the history: both p-values (log scale) and the classifier AUC per check.

    Lines written before the classifier had a p-value lack `auc_p_value`; they are drawn without it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_history(history)
    out_path = out_path or Path(history).with_name(PLOT_FILE)
    times = np.array([datetime.fromisoformat(r["time"]) for r in records])
    flagged = np.array([r["flagged"] for r in records])
    figure = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    for key, colour, label in [("p_value", "tab:blue", "MMD"), ("auc_p_value", "tab:green", "domain classifier")]:
        p_values = np.array([np.nan if r.get(key) is None else max(r[key], 1e-6) for r in records])
        top.plot(times, p_values, "-o", color=colour, label=f"{label} permutation p-value")
        top.scatter(times[flagged], p_values[flagged], s=90, facecolors="none", edgecolors="tab:red", linewidths=2,
                    zorder=3)
    last = records[-1]
    top.axhline(last.get("per_test_threshold", last["p_value_threshold"]), color="tab:red", ls="--",
                label="flags below (each test)")
    top.set_yscale("log")
    top.set_ylabel("p-value (low = drift)")
    top.legend(loc="lower left", fontsize=8)
    top.set_title(f"Embedding drift, {last['backbone']}/{last['tap']} (red rings: flagged)")
    aucs = np.array([r["auc"] for r in records], dtype=float)
    bottom.plot(times, aucs, "-o", color="tab:green", label="domain-classifier AUC (effect size)")
    bottom.scatter(times[flagged], aucs[flagged], s=90, facecolors="none", edgecolors="tab:red", linewidths=2,
                   zorder=3)
    bottom.axhline(0.5, color="grey", lw=0.8)
    bottom.set_ylim(0.0, 1.02)
    bottom.set_ylabel("AUC (0.5 = alike)")
    bottom.legend(loc="lower left", fontsize=8)
    figure.autofmt_xdate()
    with atomic_path(out_path) as partial:
        figure.savefig(partial, format="png", dpi=110)
    return out_path
