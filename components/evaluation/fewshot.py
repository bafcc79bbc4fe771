"""Episodic few-shot evaluation on cached features: accuracy against the number of labelled images per class.

Each episode draws K support images of every class from the train split (N-way over all the dataset's
classes) and scores the whole test split: SimpleShot's nearest centroid (`prototypes`: centred by the
mean of every train image's features, no label needed, then L2-normalised) and a logistic-regression
probe fitted on the same K shots of the same features. Per K: the mean accuracy over episodes and its
95% interval (1.96 standard deviations of the episode accuracies / sqrt(episodes)). Every draw comes
from one seeded generator per (seed, K), so the same seed, data and features give the same numbers.
Nothing here runs a network: the features stage already did.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from components.core.errors import UserError
from components.core.result import StageResult, write_json
from components.data.manifest import Dataset
from components.evaluation.config import FewshotConfig
from components.features.cache import split_features
from components.training.strategies.prototypes import class_prototypes, normalised

log = logging.getLogger(__name__)

REPORT_FILE = "fewshot.json"
PLOT_FILE = "fewshot.png"
METHODS = ("prototypes", "linear")


def draw_support(labels: np.ndarray, n_classes: int, shots: int, rng: np.random.Generator) -> np.ndarray:
    """K distinct train rows of every class."""
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), size=shots, replace=False) for c in range(n_classes)])


def episode_accuracies(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                       n_classes: int, shots: int, episodes: int, seed: int, linear_c: float) -> dict[str, np.ndarray]:
    """Per method, one test accuracy per episode."""
    rng = np.random.default_rng([seed, shots])
    mean = train.mean(0)
    train_unit, test_unit = normalised(train, mean), normalised(test, mean)
    found = {method: np.empty(episodes) for method in METHODS}
    for episode in range(episodes):
        rows = draw_support(train_labels, n_classes, shots, rng)
        prototypes = class_prototypes(train_unit[rows], train_labels[rows], n_classes)
        found["prototypes"][episode] = float(((test_unit @ prototypes).argmax(1) == test_labels).mean())
        probe = LogisticRegression(C=linear_c, max_iter=1000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(train_unit[rows], train_labels[rows])
        found["linear"][episode] = float((probe.predict(test_unit) == test_labels).mean())
    return found


def check_shots(cfg: FewshotConfig, dataset: Dataset) -> None:
    counts = dataset.split("train")["label"].value_counts()
    short = {label: int(counts.get(label, 0)) for label in dataset.labels if counts.get(label, 0) < max(cfg.shots)}
    if short:
        raise UserError(f"fewshot.shots {list(cfg.shots)}: the train split has fewer than {max(cfg.shots)} images of "
                        f"{short}; lower the largest K (--shots) or add images.")
    if dataset.split("test").empty:
        raise UserError("tlops fewshot scores the test split, and the dataset has none; ingest with ingest.test_fraction > 0.")


def plot(report: dict[str, dict[str, dict[str, float]]], title: str, path: Path) -> Path:
    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    shots = [int(k) for k in report]
    for method, colour in zip(METHODS, ("tab:blue", "tab:orange")):
        means = np.array([report[str(k)][method]["mean"] for k in shots])
        half = np.array([report[str(k)][method]["ci95"] for k in shots])
        ax.plot(shots, means, marker="o", color=colour, label=method)
        ax.fill_between(shots, means - half, means + half, color=colour, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set(xlabel="labelled images per class (K)", ylabel="test accuracy", title=title)
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def run(cfg: FewshotConfig, backbone: str, dataset: Dataset, features_dir: Path, out_dir: Path) -> StageResult:
    check_shots(cfg, dataset)
    x = {s: split_features(dataset, features_dir, backbone, cfg.tap, s) for s in ("train", "test")}
    y = {s: np.asarray(dataset.label_index(dataset.split(s))) for s in ("train", "test")}
    n_classes = len(dataset.labels)
    report: dict[str, dict[str, dict[str, float]]] = {}
    for shots in cfg.shots:
        found = episode_accuracies(x["train"], y["train"], x["test"], y["test"], n_classes, shots, cfg.episodes,
                                   cfg.seed, cfg.linear_c)
        report[str(shots)] = {method: {"mean": float(a.mean()), "ci95": float(1.96 * a.std(ddof=1) / np.sqrt(len(a)))}
                              for method, a in found.items()}
        log.info("fewshot %d-way %d-shot over %d episodes: prototypes %.4f ± %.4f, linear %.4f ± %.4f", n_classes,
                 shots, cfg.episodes, *(report[str(shots)][m][k] for m in METHODS for k in ("mean", "ci95")))
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{n_classes}-way few-shot, {backbone} {cfg.tap}, {cfg.episodes} episodes, {len(x['test'])} test images"
    artifacts = {"report": write_json(out_dir / REPORT_FILE, report), "plot": plot(report, title, out_dir / PLOT_FILE)}
    metrics = {f"fewshot.{k}.{m}.{stat}": v for k, per in report.items() for m, s in per.items() for stat, v in s.items()}
    result = StageResult(stage="fewshot", out_dir=out_dir, metrics=metrics, artifacts=artifacts,
                         info={"backbone": backbone, "tap": cfg.tap, "labels": list(dataset.labels), "n_way": n_classes,
                               "episodes": cfg.episodes, "seed": cfg.seed, "n_test": int(len(x["test"]))})
    result.save()
    return result
