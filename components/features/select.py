"""Select: rank candidate backbones by LogME on cached train-split features, pick one.

LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
ICML 2021) scores a frozen feature extractor by the marginal likelihood of a Bayesian linear
regression from its features to each one-hot label column, with the prior precision `alpha`
and noise precision `beta` set by evidence maximisation. No training, one SVD per backbone.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from components.core.code_version import package_versions, source_sha256
from components.core.result import StageResult, sha256_file, sha256_json, write_json
from components.data.manifest import Dataset
from components.features.cache import FEATURES_FILE, split_features
from components.features.config import SelectConfig
from components.models.registry import get_entry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evidence:
    """The maximised evidence of one one-hot target: log p(y | F, alpha, beta), not divided by n."""

    label: int
    alpha: float
    beta: float
    log_evidence: float
    iterations: int


def _evidence_terms(
    alpha: float, beta: float, sigma2: np.ndarray, z2: np.ndarray, outside: float
) -> tuple[float, float, float]:
    """(gamma, |m|^2, |Fm - y|^2) at (alpha, beta), in the SVD basis of F."""
    t = alpha / beta
    gamma = float(np.sum(sigma2 / (sigma2 + t)))
    m2 = float(np.sum(sigma2 * z2 / (sigma2 + t) ** 2))
    # y's component outside the column space of F is never fitted, whatever alpha and beta are.
    res2 = float(np.sum(z2 * (t / (sigma2 + t)) ** 2)) + outside
    return gamma, m2, res2


def maximize_evidence(
    u: np.ndarray, sigma2: np.ndarray, target: np.ndarray, feature_dim: int, label: int = 0,
    max_iter: int = 2000, rtol: float = 1e-7,
) -> Evidence:
    """Maximise log p(y | F, alpha, beta) given F's thin SVD (`u`, `sigma2` = singular values^2).

    MacKay's fixed point, as in the paper. The supremum can lie on the boundary, which the
    iteration only approaches: beta -> inf when F has full row rank (n <= D) and y can be
    interpolated exactly, alpha -> inf when the features explain nothing. Both limits have
    closed forms; the largest of the three evidences is returned.
    """
    n = target.shape[0]
    tiny = np.finfo(np.float64).tiny
    z2 = (u.T @ target) ** 2
    y2 = float(target @ target)
    outside = max(y2 - float(z2.sum()), 0.0)
    spectrum = sigma2[sigma2 > 1e-12 * sigma2.max()]
    alpha, beta, iterations = 1.0, 1.0, 0
    for iterations in range(1, max_iter + 1):
        gamma, m2, res2 = _evidence_terms(alpha, beta, sigma2, z2, outside)
        new_alpha, new_beta = gamma / max(m2, tiny), (n - gamma) / max(res2, tiny)
        done = abs(new_alpha - alpha) <= rtol * alpha and abs(new_beta - beta) <= rtol * beta
        alpha, beta = new_alpha, new_beta
        t = alpha / beta
        if done or t < 1e-10 * spectrum.min() or t > 1e10 * spectrum.max():
            break
    else:
        log.warning("LogME: class %d did not converge in %d iterations (alpha=%g, beta=%g)",
                    label, max_iter, alpha, beta)
    _, m2, res2 = _evidence_terms(alpha, beta, sigma2, z2, outside)
    # log|A| for A = alpha I_D + beta F^T F: F^T F has only k = min(n, D) nonzero eigenvalues;
    # the other D - k directions contribute log(alpha) each. Dropping them (as a sum over the
    # thin SVD alone would) overstates the evidence whenever n < D.
    log_det_a = float(np.sum(np.log(alpha + beta * sigma2))) + (feature_dim - sigma2.size) * np.log(alpha)
    interior = (
        feature_dim / 2 * np.log(alpha) + n / 2 * np.log(beta) - n / 2 * np.log(2 * np.pi)
        - beta / 2 * res2 - alpha / 2 * m2 - log_det_a / 2
    )
    candidates = [(float(interior), float(alpha), float(beta))]
    # alpha = inf: w = 0 and y ~ N(0, I / beta), best at beta = n / |y|^2.
    beta_0 = n / y2
    candidates.append((n / 2 * (np.log(beta_0) - np.log(2 * np.pi) - 1), np.inf, beta_0))
    if spectrum.size == n:
        # beta = inf: y ~ N(0, F F^T / alpha), nonsingular at full row rank; best at alpha = n / q.
        q = float(np.sum(z2 / sigma2))
        alpha_0 = n / q
        noise_free = n / 2 * (np.log(alpha_0) - np.log(2 * np.pi) - 1) - float(np.sum(np.log(sigma2))) / 2
        candidates.append((noise_free, alpha_0, np.inf))
    log_evidence, alpha, beta = max(candidates, key=lambda c: c[0])
    return Evidence(label, alpha, beta, float(log_evidence), iterations)


def logme_evidences(features: np.ndarray, labels: np.ndarray) -> list[Evidence]:
    """One maximised evidence per class present in `labels` (one-hot target per class)."""
    f = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if f.ndim != 2 or f.shape[0] != labels.shape[0] or f.shape[0] == 0:
        raise ValueError(f"LogME needs features (n, D) and n labels; got {f.shape} and {labels.shape}.")
    if not np.isfinite(f).all():
        raise ValueError("LogME: features contain NaN or inf.")
    u, s, _ = np.linalg.svd(f, full_matrices=False)  # thin: u is (n, k), k = min(n, D)
    if s.size == 0 or s[0] == 0:
        raise ValueError("LogME: features are all zero.")
    sigma2 = s**2
    return [
        maximize_evidence(u, sigma2, (labels == c).astype(np.float64), f.shape[1], label=int(c))
        for c in np.unique(labels)
    ]


def logme_score(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME: per-class log evidence divided by n, averaged over classes. Higher is better."""
    n = np.asarray(features).shape[0]
    return float(np.mean([e.log_evidence / n for e in logme_evidences(features, labels)]))


def score_key_inputs(dataset: Dataset, features_dir: Path, backbone: str, tap: str) -> dict[str, object]:
    """Everything a LogME score depends on: the features' content, the train rows and labels, the code, numpy."""
    train = dataset.split("train")
    return {"features_sha256": sha256_file(Path(features_dir) / backbone / FEATURES_FILE), "tap": tap,
            "train": list(train["sha256"]), "labels": dataset.label_index(train), "classes": list(dataset.labels),
            "code": source_sha256([logme_score, logme_evidences, maximize_evidence, _evidence_terms]),
            "versions": package_versions(["numpy"])}


def score_path(dataset: Dataset, features_dir: Path, backbone: str, tap: str, cache_dir: Path) -> Path:
    """Where the LogME score of these features, rows and labels is kept (whether or not it is there yet)."""
    key = sha256_json(score_key_inputs(dataset, features_dir, backbone, tap))[:20]
    return Path(cache_dir) / backbone / "logme" / f"{key}.json"


def candidate_score(dataset: Dataset, features_dir: Path, backbone: str, tap: str,
                    cache_dir: Path | None = None) -> dict[str, float]:
    """LogME of one candidate's train features, with the rows and dimension it was computed on.

    With `cache_dir`, scores are kept by content (`<cache_dir>/<backbone>/logme/<key>.json`, the key covering
    `score_key_inputs`), so a score computed elsewhere (a shard of the stage on another worker) or earlier is reused."""
    path = score_path(dataset, features_dir, backbone, tap, cache_dir) if cache_dir is not None else None
    if path is not None and path.exists():
        return json.loads(path.read_text())["score"]
    features = split_features(dataset, features_dir, backbone, tap)
    labels = np.asarray(dataset.label_index(dataset.split("train")))
    score = {"logme": logme_score(features, labels), "n_samples": int(features.shape[0]),
             "feature_dim": int(features.shape[1])}
    if path is not None:
        write_json(path, {"score": score, "inputs": score_key_inputs(dataset, features_dir, backbone, tap)})
    return score


def plot_ranking(ranking: list[dict[str, object]], selected: str, path: Path) -> Path:
    names = [str(row["backbone"]) for row in ranking]
    scores = np.array([float(row["logme"]) for row in ranking])
    # LogME is usually negative; bars start just left of the worst score so longer means better.
    span = max(float(np.ptp(scores)), 1e-3)
    base = float(scores.min()) - 0.25 * span
    fig = Figure(figsize=(7, 0.6 * len(names) + 1.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = ["tab:orange" if name == selected else "tab:gray" for name in names]
    bars = ax.barh(range(len(names)), scores - base, left=base, color=colors)
    ax.set_yticks(range(len(names)), [f"{n}  (selected)" if n == selected else n for n in names])
    ax.invert_yaxis()  # best on top
    ax.bar_label(bars, labels=[f"{s:.4f}" for s in scores], padding=3)
    ax.set_xlim(base, float(scores.max()) + 0.35 * span)
    ax.set_xlabel("LogME on train features (higher is better)")
    ax.set_title("Backbone ranking")
    fig.savefig(path, dpi=120)
    return path


def run(cfg: SelectConfig, dataset: Dataset, features_dir: Path, out_dir: Path, cache_dir: Path | None = None) -> StageResult:
    """Rank `cfg.scored()` by LogME; `cache_dir` keeps scores by content (see `candidate_score`)."""
    train = dataset.split("train")
    if train.empty:
        raise ValueError("select: the manifest has no train rows to score backbones on.")
    labels = np.asarray(dataset.label_index(train))
    if np.unique(labels).size < 2:
        log.warning("select: the train split holds a single class; LogME cannot tell backbones apart.")
    ranking = []
    for name in cfg.scored():
        score = candidate_score(dataset, features_dir, name, cfg.tap, cache_dir)
        log.info("LogME %s (%s, %d x %d): %.5f", name, cfg.tap, score["n_samples"], score["feature_dim"], score["logme"])
        ranking.append({"backbone": name, **score, "imagenet_top1": get_entry(name).imagenet_top1})
    ranking.sort(key=lambda row: -row["logme"])  # stable: ties keep the configured order
    selected = ranking[0]["backbone"] if cfg.backbone == "auto" else cfg.backbone
    if selected != ranking[0]["backbone"]:
        log.info("select: using pinned backbone %s; LogME prefers %s", selected, ranking[0]["backbone"])
    log.info("select: %s", selected)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    features_sha256 = {name: sha256_file(Path(features_dir) / name / FEATURES_FILE) for name in cfg.scored()}
    write_json(out_dir / "ranking.json", {
        "selected": selected, "ranking": ranking, "config": cfg.model_dump(mode="json"), "labels": list(dataset.labels),
        "features_sha256": features_sha256,
    })
    with open(out_dir / "ranking.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["backbone", "logme"])
        writer.writerows([row["backbone"], f"{row['logme']:.6f}"] for row in ranking)
    plot_ranking(ranking, selected, out_dir / "ranking.png")

    result = StageResult(
        stage="select",
        out_dir=out_dir,
        metrics={f"logme.{row['backbone']}": row["logme"] for row in ranking},
        artifacts={name: out_dir / name for name in ("ranking.json", "ranking.csv", "ranking.png")},
        info={"selected": selected, "ranking": ranking},
    )
    result.save()
    return result
