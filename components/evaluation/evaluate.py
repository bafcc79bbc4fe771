"""Evaluate: the shipped ONNX model on the test split, in ONNX Runtime, as it will be served.

Labels and preprocessing are read from the model's metadata_props, so the numbers describe
the file that ships, not the PyTorch model it came from. Returns flat metrics (the caller
writes them as DVC's `metrics.json`, nested by `metrics_document`) and writes `predictions.csv`
(for DVC's confusion plot), a labelled confusion matrix and a reliability diagram.

When the manifest has domains (`components/data/domains.py`), every metric is also reported per
domain, as `by_domain.<domain>.<metric>` (a `by_domain` block in `metrics.json`), with a chart of
accuracy and macro-F1 per domain: after domain adaptation the target domain's figure is the one
that matters.

A model of several tasks is scored on each: the primary task's figures keep their names (they are
the run's headline, and the only ones broken down `by_domain`), and every task gets `task.<name>.*`
metrics and, in `tasks/`, its own predictions, confusion matrix, reliability diagram and chart per
domain, read against its own manifest column.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from components.core.result import StageResult
from components.data.domains import domain_of
from components.data.manifest import Dataset
from components.evaluation.config import TASKS_FOLDER, EvaluateConfig
from components.models.onnx_io import ModelTask, predict_tasks, read_metadata, softmax

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.csv"
CONFUSION_FILE = "confusion_matrix.png"
RELIABILITY_FILE = "reliability.png"
BY_DOMAIN_FILE = "by_domain.png"
BY_DOMAIN = "by_domain"
SAFE_NAME = re.compile(r"[A-Za-z0-9_-]+")


def calibration_table(confidence: np.ndarray, correct: np.ndarray, bins: int) -> pd.DataFrame:
    """Per equal-width confidence bin: count, mean confidence, accuracy (empty bins kept, as NaN)."""
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    frame = pd.DataFrame({"bin": index, "confidence": confidence, "correct": correct.astype(float)})
    grouped = frame.groupby("bin").agg(count=("correct", "size"), confidence=("confidence", "mean"),
                                       accuracy=("correct", "mean"))
    table = grouped.reindex(range(bins))
    table["count"] = table["count"].fillna(0).astype(int)
    table["lower"] = np.arange(bins) / bins
    return table


def expected_calibration_error(table: pd.DataFrame) -> float:
    """Sum over bins of (share of images) * |accuracy - mean confidence|."""
    used = table[table["count"] > 0]
    return float((used["count"] * (used["accuracy"] - used["confidence"]).abs()).sum() / used["count"].sum())


def classification_metrics(actual: np.ndarray, predicted: np.ndarray, labels: tuple[str, ...]) -> dict[str, float]:
    classes = list(range(len(labels)))
    precision, recall, _, _ = precision_recall_fscore_support(
        actual, predicted, labels=classes, zero_division=0
    )
    metrics = {
        "accuracy": float(accuracy_score(actual, predicted)),
        "macro_f1": float(f1_score(actual, predicted, labels=classes, average="macro", zero_division=0)),
    }
    metrics |= {f"precision_{label}": float(p) for label, p in zip(labels, precision)}
    metrics |= {f"recall_{label}": float(r) for label, r in zip(labels, recall)}
    return metrics


def plot_confusion(matrix: np.ndarray, labels: tuple[str, ...], path: Path, title: str = "") -> Path:
    # A bare Figure renders through Agg without touching pyplot's global backend state.
    figure = Figure(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2))
    ax = figure.subplots()
    ax.imshow(matrix, cmap="Blues")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"{title}test split, {int(matrix.sum())} images")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def plot_reliability(table: pd.DataFrame, ece: float, path: Path, title: str = "") -> Path:
    bins = len(table)
    centres = table["lower"] + 0.5 / bins
    figure = Figure(figsize=(5, 5))
    ax = figure.subplots()
    accuracy, confidence = table["accuracy"].fillna(0), table["confidence"].fillna(0)
    ax.bar(centres, accuracy, width=1 / bins, edgecolor="black", label="accuracy")
    ax.bar(centres, (confidence - accuracy).abs(), bottom=np.minimum(accuracy, confidence), width=1 / bins,
           color="tab:red", alpha=0.35, hatch="//", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    for x, count in zip(centres, table["count"]):
        if count:
            ax.text(x, 0.02, str(count), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}reliability, ECE = {ece:.3f}")
    ax.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def domain_metrics(actual: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, domain: pd.Series,
                   labels: tuple[str, ...], bins: int) -> dict[str, float]:
    """Every overall metric again per domain, flat: `by_domain.<domain>.<metric>`."""
    metrics: dict[str, float] = {}
    for name in sorted(domain.unique()):
        rows = np.asarray(domain == name)
        correct = predicted[rows] == actual[rows]
        values = {"n_test": float(rows.sum()), **classification_metrics(actual[rows], predicted[rows], labels),
                  "ece": expected_calibration_error(calibration_table(confidence[rows], correct, bins))}
        metrics |= {f"{BY_DOMAIN}.{name}.{key}": value for key, value in values.items()}
    return metrics


def metrics_document(metrics: dict[str, float]) -> dict[str, object]:
    """Flat metrics as DVC's `metrics.json`: the `by_domain.<domain>.<metric>` keys nested in a `by_domain` block."""
    document: dict[str, object] = {k: v for k, v in metrics.items() if not k.startswith(f"{BY_DOMAIN}.")}
    nested: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith(f"{BY_DOMAIN}."):
            domain, _, metric = key.removeprefix(f"{BY_DOMAIN}.").rpartition(".")
            nested.setdefault(domain, {})[metric] = value
    if nested:
        document[BY_DOMAIN] = nested
    return document


def plot_by_domain(metrics: dict[str, float], path: Path) -> Path:
    """Accuracy and macro-F1 per domain beside the overall figures, each bar with its number of test images."""
    document = metrics_document(metrics)
    rows = [("all", metrics)] + sorted(document.get(BY_DOMAIN, {}).items())  # type: ignore[union-attr]
    figure = Figure(figsize=(1.6 * len(rows) + 3, 4))
    ax = figure.subplots()
    x = np.arange(len(rows))
    for offset, (key, colour) in zip((-0.2, 0.2), (("accuracy", "tab:blue"), ("macro_f1", "tab:orange"))):
        values = [row[key] for _, row in rows]
        ax.bar(x + offset, values, width=0.4, color=colour, label=key)
        for xi, value in zip(x + offset, values):
            ax.text(xi, value + 0.01, f"{value:.3f}", ha="center", fontsize=8)
    ax.set_xticks(x, [f"{name}\n(n={int(row['n_test'])})" for name, row in rows])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test split")
    ax.set_title("test metrics per domain" if len(rows) > 1 else "test metrics (the dataset has no domains)")
    ax.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def decide(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class indices and their softmax confidence.

    The class is the logits' argmax, as compress, promote and the server decide it: a float32 softmax
    rounds logits a few ulps apart into an exact tie (INT8 logits averaged over views are, on 3 of 679
    ELPV test cells), and the probabilities' argmax then reported another class than the server answers.
    """
    return logits.argmax(axis=1), softmax(logits).max(axis=1)


def file_stem(task: str) -> str:
    """A file name for a task's files; a column name is data, never a path."""
    if SAFE_NAME.fullmatch(task) and len(task) <= 64:
        return task
    return "_".join(SAFE_NAME.findall(task))[:48] + "-" + hashlib.sha256(task.encode("utf-8")).hexdigest()[:8]


def score_task(cfg: EvaluateConfig, task: ModelTask, logits: np.ndarray, dataset: Dataset, test: pd.DataFrame,
               out_dir: Path, stem: str, title: str = "") -> tuple[dict[str, float], dict[str, Path], np.ndarray]:
    """One task's test metrics, its predictions CSV, confusion matrix and reliability diagram (`<stem>...` in
    `out_dir`), and the confusion matrix itself; `dataset` and `test` are seen through the task's column."""
    predicted, confidence = decide(logits)
    actual = np.asarray(dataset.label_index(test))
    correct = predicted == actual
    metrics = {"n_test": float(len(test)), **classification_metrics(actual, predicted, dataset.labels)}
    table = calibration_table(confidence, correct, cfg.calibration_bins)
    metrics["ece"] = expected_calibration_error(table)
    domain = domain_of(test)
    if domain is not None:
        metrics |= domain_metrics(actual, predicted, confidence, domain, dataset.labels, cfg.calibration_bins)
    labels = np.asarray(dataset.labels)
    predictions = pd.DataFrame(
        {"path": test["path"], "actual": labels[actual], "predicted": labels[predicted], "confidence": confidence}
        | ({"domain": domain} if domain is not None else {})
    )
    matrix = confusion_matrix(actual, predicted, labels=list(range(len(labels))))
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts = {
        "predictions": out_dir / f"{stem}{PREDICTIONS_FILE}",
        "confusion_matrix": plot_confusion(matrix, dataset.labels, out_dir / f"{stem}{CONFUSION_FILE}", title),
        "reliability": plot_reliability(table, metrics["ece"], out_dir / f"{stem}{RELIABILITY_FILE}", title),
    }
    # One bar, "all", without domains: DVC declares the primary's, so it is always there.
    artifacts["by_domain"] = plot_by_domain(metrics, out_dir / f"{stem}{BY_DOMAIN_FILE}")
    # Labels are free text (commas, quotes, line breaks): quote every text field so the CSV always parses.
    predictions.to_csv(artifacts["predictions"], index=False, float_format="%.6f", quoting=csv.QUOTE_NONNUMERIC)
    return metrics, artifacts, matrix


def run(cfg: EvaluateConfig, model_path: Path, dataset: Dataset, out_dir: Path) -> StageResult:
    test = dataset.split("test")
    if test.empty:
        raise ValueError("the dataset has no `test` rows; ingest with ingest.test_fraction > 0.")
    outputs = predict_tasks(model_path, dataset, test, cfg.batch_size)
    tasks = list(outputs)
    metadata = read_metadata(model_path)
    primary = dataset.for_task(tasks[0].name)
    scored, artifacts, matrix = score_task(cfg, tasks[0], outputs[tasks[0]], primary, primary.split("test"), out_dir, "")
    metrics = {"n_test": float(len(test)), **scored}
    for task in tasks:  # every task, the primary too, in tasks/ (a model of one task: that one)
        view = dataset.for_task(task.name)
        task_metrics, task_files, _ = score_task(cfg, task, outputs[task], view, view.split("test"), out_dir / TASKS_FOLDER,
                                                 f"{file_stem(task.name)}.", f"{task.name}: ")
        if "tasks" in metadata:  # per domain: the primary's figures (`by_domain.*`); each task's in tasks/<name>.by_domain.png
            metrics |= {f"task.{task.name}.{key}": value for key, value in task_metrics.items()
                        if key != "n_test" and not key.startswith(f"{BY_DOMAIN}.")}
        artifacts |= {f"{task.name}.{kind}": path for kind, path in task_files.items()}
        log.info("task %s: test accuracy %.4f, macro F1 %.4f, ECE %.4f", task.name, task_metrics["accuracy"],
                 task_metrics["macro_f1"], task_metrics["ece"])
    log.info("test accuracy %.4f, macro F1 %.4f, ECE %.4f on %d %s with %s", metrics["accuracy"], metrics["macro_f1"],
             metrics["ece"], len(test), "texts" if metadata.get("modality") == "text" else "images", model_path.name)

    described = {k: metadata[k] for k in ("compression", "sparsity", "backbone", "checkpoint_sha256") if k in metadata}
    result = StageResult(
        stage="evaluate",
        out_dir=out_dir,
        metrics=metrics,
        artifacts=artifacts,
        info={
            "model": model_path.name,
            "model_metadata": described,
            "labels": list(primary.labels),
            "confusion_matrix": matrix.tolist(),
            "tasks": [task.describe() for task in tasks],
        },
    )
    result.save()
    return result
