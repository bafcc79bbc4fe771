"""Promote: the champion/challenger gate that decides which registered version serves.

The candidate (the version `register` just wrote) and the current champion
(`models:/<name>@champion`) are both downloaded from the registry and re-scored on the same,
current test split with the same ONNX Runtime code that `evaluate` uses. Stored metric tags are
never compared: the champion was scored on an older dataset version, so its numbers describe
other images.

The candidate takes the alias only if
  * it passes its own gates: its labels are the dataset's, its logits are finite and a fresh
    batch-1 ONNX Runtime session reproduces the batched ones (parity), and its p95 latency at
    batch 1 on real test images is within `max_p95_latency_ms`;
  * and, when a comparable champion exists, its accuracy beats the champion's by at least
    `min_improvement`; its recall on no class falls more than `max_recall_drop` below the
    champion's (a better accuracy bought with missed defects is refused); and a paired test on the
    same images is significant at `significance`: the exact binomial test on the discordant pairs
    (McNemar's exact test), or with `test: bootstrap` and enough discordant pairs, a paired
    bootstrap.
The first version ever registered becomes champion if it passes its own gates. A champion whose
labels differ from the dataset's cannot be scored on it (its class indices mean something
else); the candidate then wins on its own gates and the reason says so.

New classes (`tlops add-class`). A candidate whose labels are the dataset's followed by new ones is
scored on the test split like any other (an image it assigns to a new class counts as wrong), but
the new classes have no test images, so nothing here can show it better, and it cannot be: the old
classes' prototypes are unchanged, so a new class can only take predictions away. Such a candidate
is therefore judged for non-inferiority, explicitly: it takes the alias when it passes its own gates
and loses at most `max_drop_new_classes` accuracy against the champion on the same images; its
`promote.untested_classes` tag names the classes no test image vouched for. The other way round, a
candidate without a class the champion serves is kept out: retraining would silently drop it.

The decision, both scores, the test, the latency and the reason go to the candidate's model
version tags (`promote.*`), to `promotion.json` and to a side-by-side chart `promotion.png`.
This is the one stage that talks to the registry itself, because moving the alias is its work.

When the registered version already holds the alias (a `dvc repro` with nothing new), nothing is
downloaded or scored: `already_champion` asks the registry and writes the record. ONNX Runtime,
scipy and matplotlib are imported only by the functions that score and draw, so that answer costs
no more than MLflow's import.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.core.result import StageResult, atomic_path, sha256_json, write_json
from components.registry.config import PromoteConfig
from components.registry.significance import MIN_DISCORDANT_FOR_BOOTSTRAP, paired_test

if TYPE_CHECKING:
    import pandas as pd

    from components.data.manifest import Dataset

log = logging.getLogger(__name__)

DECISION_FILE = "promotion.json"
CHART_FILE = "promotion.png"
TAG_PREFIX = "promote."
LATENCY_WARMUP_RUNS = 3  # the first runs of a session allocate buffers; they are not what serving sees

Decision = Literal["promoted", "kept", "first"]


@dataclass
class Scored:
    """One model version on the current test split."""

    version: str
    labels_match: bool
    labels: list[str]
    accuracy: float | None = None
    accuracy_ci: tuple[float, float] | None = None
    p95_latency_ms: float | None = None
    median_latency_ms: float | None = None
    parity_max_diff: float | None = None
    finite: bool | None = None
    recall: dict[str, float] | None = None  # per class: the share of its test images called that class
    untested_labels: list[str] = field(default_factory=list)  # labels after the dataset's: no test image has them
    correct: np.ndarray | None = field(default=None, repr=False)

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "correct"}


def download_onnx(client: MlflowClient, name: str, version: str, into: Path) -> Path:
    """The ONNX file of a registered version, fetched from the registry (not from local outputs)."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{version}", dst_path=str(into), tracking_uri=client.tracking_uri))
    found = sorted(local.rglob("*.onnx"))
    if not found:
        raise FileNotFoundError(f"models:/{name}/{version} holds no .onnx file; register an ONNX model.")
    return found[0]


def latency_frame_paths(dataset: Dataset, count: int) -> list[Path]:
    test = dataset.split("test")
    paths = [dataset.image_path(p) for p in test["path"]]
    return [paths[i % len(paths)] for i in range(count)]  # a small test split is cycled


def measure_batch1(model_path: Path, paths: list[Path], threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image latency (ms, session.run only: what a server pays per request) and batch-1 logits."""
    from components.models.onnx_io import model_feeds, open_session, read_metadata

    metadata = read_metadata(model_path)
    session = open_session(model_path, num_threads=threads)
    inputs = [model_feeds(model_path, metadata, [p]) for p in paths]  # images or texts, as the model says
    for _ in range(LATENCY_WARMUP_RUNS):
        session.run(None, inputs[0])
    latencies, logits = [], []
    for batch in inputs:
        start = time.perf_counter()
        out = session.run(None, batch)[0]
        latencies.append((time.perf_counter() - start) * 1e3)
        logits.append(out[0])
    return np.asarray(latencies), np.asarray(logits, dtype=np.float32)


def score(cfg: PromoteConfig, version: str, model_path: Path, dataset: Dataset) -> Scored:
    """Accuracy (with a Wilson 95% interval), recall per class, finiteness, batch-1 parity and latency of one model."""
    from scipy.stats import binomtest

    from components.models.onnx_io import model_labels, predict_frame, read_metadata

    labels = list(model_labels(model_path, read_metadata(model_path)))
    extends = len(labels) > len(dataset.labels) and tuple(labels[: len(dataset.labels)]) == dataset.labels
    scored = Scored(version=version, labels_match=tuple(labels) == dataset.labels, labels=labels,
                    untested_labels=labels[len(dataset.labels):] if extends else [])
    if not scored.labels_match and not extends:
        return scored
    test = dataset.split("test")
    logits = predict_frame(model_path, dataset, test, cfg.batch_size, superset=extends)
    actual = np.asarray(dataset.label_index(test))
    scored.correct = logits.argmax(axis=1) == actual
    scored.finite = bool(np.isfinite(logits).all())
    hits = int(scored.correct.sum())
    scored.accuracy = hits / len(test)
    interval = binomtest(hits, len(test)).proportion_ci(0.95, method="wilson")
    scored.accuracy_ci = (float(interval.low), float(interval.high))
    scored.recall = {label: float(scored.correct[actual == i].mean())
                     for i, label in enumerate(dataset.labels) if (actual == i).any()}

    latencies, single = measure_batch1(model_path, latency_frame_paths(dataset, cfg.latency_images), cfg.latency_threads)
    scored.p95_latency_ms = float(np.percentile(latencies, 95))
    scored.median_latency_ms = float(np.median(latencies))
    reference = logits[np.arange(len(single)) % len(test)]  # the same images, scored in batches
    scored.parity_max_diff = float(np.max(np.abs(single - reference)))
    scored.finite = scored.finite and bool(np.isfinite(single).all())
    return scored


def recall_drop(candidate: Scored, champion: Scored) -> tuple[str, float] | None:
    """The class whose recall falls furthest below the champion's, and by how much (None: no class falls)."""
    assert candidate.recall is not None and champion.recall is not None
    drops = {label: champion.recall[label] - candidate.recall[label] for label in candidate.recall}
    label = max(drops, key=drops.__getitem__)
    return (label, drops[label]) if drops[label] > 0 else None


def own_gates(cfg: PromoteConfig, candidate: Scored, dataset: Dataset) -> str | None:
    """Why the candidate cannot serve whatever the champion does, or None when it can."""
    if not candidate.labels_match and not candidate.untested_labels:
        return f"candidate labels {candidate.labels} differ from the dataset's {list(dataset.labels)}"
    if not candidate.finite:
        return "candidate outputs non-finite logits"
    if candidate.parity_max_diff is None or candidate.parity_max_diff > cfg.parity_atol:
        return (f"candidate batch-1 logits differ from batched ones by {candidate.parity_max_diff:.3g} "
                f"(> promote.parity_atol={cfg.parity_atol:g})")
    if candidate.p95_latency_ms is None or candidate.p95_latency_ms > cfg.max_p95_latency_ms:
        return (f"candidate p95 latency {candidate.p95_latency_ms:.2f} ms exceeds "
                f"promote.max_p95_latency_ms={cfg.max_p95_latency_ms:g}")
    return None


def decide(cfg: PromoteConfig, candidate: Scored, champion: Scored | None, test: dict[str, float | str] | None,
           dataset: Dataset) -> tuple[Decision, str]:
    refused = own_gates(cfg, candidate, dataset)
    if champion is None:
        return ("kept", f"no champion yet, but {refused}; no alias set") if refused else \
            ("first", "no champion yet; the candidate passes parity and latency")
    if refused:
        return "kept", refused
    dropped = [label for label in champion.labels if label not in candidate.labels]
    if champion.labels_match or champion.untested_labels:
        if dropped:
            return "kept", (f"the candidate lacks class(es) {dropped} that champion v{champion.version} serves; "
                            f"add them (tlops add-class) or move @{cfg.alias} by hand to drop them")
    else:
        return "promoted", (f"champion v{champion.version} labels {champion.labels} differ from the dataset's "
                            f"{list(dataset.labels)}, so it cannot be scored on this data; the candidate passes "
                            f"its own gates")
    assert test is not None and candidate.accuracy is not None and champion.accuracy is not None
    gain = candidate.accuracy - champion.accuracy
    if len(candidate.labels) > len(champion.labels):  # new classes: non-inferiority, not superiority
        added = candidate.labels[len(champion.labels):]
        if -gain > cfg.max_drop_new_classes:
            return "kept", (f"the candidate adds {added} but loses {-gain:.4f} accuracy on the test split's classes, "
                            f"more than promote.max_drop_new_classes={cfg.max_drop_new_classes:g}")
        return "promoted", (f"the candidate adds {added} (no test images: untested here) and changes accuracy on the "
                            f"test split's classes by {gain:+.4f}, within promote.max_drop_new_classes="
                            f"{cfg.max_drop_new_classes:g}; parity and latency pass")
    if gain <= 0 or gain < cfg.min_improvement:
        return "kept", (f"accuracy gain {gain:+.4f} does not beat the champion by "
                        f"promote.min_improvement={cfg.min_improvement:g}")
    dropped = recall_drop(candidate, champion)
    if dropped and dropped[1] > cfg.max_recall_drop + 1e-9:  # k/n recalls that meet the bound exactly pass
        label, drop = dropped
        return "kept", (f"recall on {label!r} falls {drop:.4f} below the champion's ({champion.recall[label]:.4f} -> "
                        f"{candidate.recall[label]:.4f}; promote.max_recall_drop={cfg.max_recall_drop:g}), "
                        f"although accuracy gains {gain:+.4f}")
    test_name = str(test["method"]) + ("" if test["method"] == cfg.test else
                                       f" (fewer than {MIN_DISCORDANT_FOR_BOOTSTRAP} discordant pairs for a bootstrap)")
    if test["p_value"] >= cfg.significance:
        return "kept", (f"accuracy gain {gain:+.4f} is not significant ({test_name} p={test['p_value']:.3g} "
                        f">= promote.significance={cfg.significance:g})")
    return "promoted", (f"accuracy gain {gain:+.4f} >= {cfg.min_improvement:g}, {test_name} p={test['p_value']:.3g} "
                        f"< {cfg.significance:g}, no class's recall falls more than {cfg.max_recall_drop:g}, "
                        f"parity and latency pass")


def plot(record: dict[str, Any], path: Path) -> Path:
    """Accuracy with 95% intervals, the discordant pairs, and batch-1 p95 latency against the budget."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.8))
    acc_ax, pairs_ax, latency_ax = figure.subplots(1, 3)
    models = [("champion", record["champion"]), ("candidate", record["candidate"])]
    shown = [(f"{role}\nv{m['version']}", m) for role, m in models if m and m.get("accuracy") is not None]
    colors = ["tab:gray", "tab:blue"][-len(shown):] if shown else []
    for i, (name, m) in enumerate(shown):
        low, high = m["accuracy_ci"]
        acc_ax.bar(i, m["accuracy"], color=colors[i])
        acc_ax.errorbar(i, m["accuracy"], yerr=[[m["accuracy"] - low], [high - m["accuracy"]]], color="black", capsize=6)
        acc_ax.text(i, 0.02, f"{m['accuracy']:.3f}", ha="center", color="white")
    acc_ax.set_xticks(range(len(shown)), [n for n, _ in shown])
    acc_ax.set_ylim(0, 1)
    acc_ax.set_title(f"test accuracy (95% Wilson), n={record['n_test']}")

    test = record.get("test")
    if test:
        counts = [test["champion_only"], test["candidate_only"]]
        pairs_ax.bar([0, 1], counts, color=["tab:gray", "tab:blue"])
        for i, count in enumerate(counts):
            pairs_ax.text(i, count, f"{int(count)}", ha="center", va="bottom")
        pairs_ax.set_ylim(0, max(counts + [1]) * 1.2)  # counts: no negative axis when both are zero
        pairs_ax.set_xticks([0, 1], ["only champion\nright", "only candidate\nright"])
        pairs_ax.set_title(f"discordant pairs, {test['method']} p={test['p_value']:.3g}")
    else:
        pairs_ax.text(0.5, 0.5, "no comparable champion", ha="center", va="center", transform=pairs_ax.transAxes)
        pairs_ax.set_axis_off()

    timed = [(n, m) for n, m in shown if m.get("p95_latency_ms") is not None]
    for i, (name, m) in enumerate(timed):
        latency_ax.bar(i, m["p95_latency_ms"], color=colors[-len(timed):][i])
    budget = record["config"]["max_p95_latency_ms"]
    latency_ax.axhline(budget, color="tab:red", linestyle="--", label=f"budget {budget:g} ms")
    latency_ax.set_xticks(range(len(timed)), [n for n, _ in timed])
    latency_ax.set_ylabel("ms")
    latency_ax.set_title("p95 latency, batch 1, ONNX Runtime")
    latency_ax.legend(loc="upper right")
    figure.suptitle(f"{record['decision']}: {record['reason']}"[:140], fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=110, format="png")
    return path


def current_champion(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def version_tags(record: dict[str, Any]) -> dict[str, str]:
    candidate, champion, test = record["candidate"], record["champion"], record.get("test") or {}
    tags = {
        "decision": record["decision"],
        "reason": record["reason"][:4900],  # MLflow caps tag values at 5,000 characters
        "alias": record["alias"],
        "champion_version": champion["version"] if champion else "none",
        "candidate_accuracy": candidate.get("accuracy"),
        "champion_accuracy": champion.get("accuracy") if champion else None,
        "test": record["config"]["test"],
        "test_used": test.get("method"),
        "p_value": test.get("p_value"),
        "statistic": test.get("statistic"),
        "discordant_candidate_only": test.get("candidate_only"),
        "discordant_champion_only": test.get("champion_only"),
        "p95_latency_ms": candidate.get("p95_latency_ms"),
        "max_p95_latency_ms": record["config"]["max_p95_latency_ms"],
        "parity_max_diff": candidate.get("parity_max_diff"),
        "untested_classes": json.dumps(candidate.get("untested_labels")) if candidate.get("untested_labels") else None,
        "n_test": record["n_test"],
        "test_split_sha256": record["test_split_sha256"],
        "decided_at": record["decided_at"],
    }
    return {TAG_PREFIX + k: (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in tags.items() if v is not None}


def summary_line(record: dict[str, Any]) -> str:
    name, candidate, champion = record["model_name"], record["candidate"], record["champion"]
    against = f" vs v{champion['version']} {champion['accuracy']:.4f}" if champion and champion.get("accuracy") is not None else ""
    test = record.get("test")
    p = f", {test['method']} p={test['p_value']:.3g}" if test else ""
    latency = candidate.get("p95_latency_ms")
    timing = f", p95 {latency:.1f} ms (budget {record['config']['max_p95_latency_ms']:g})" if latency is not None else ""
    verdict = {"promoted": f"promoted to @{record['alias']}", "first": f"first @{record['alias']}",
               "kept": f"not promoted; @{record['alias']} stays {('v' + champion['version']) if champion else 'unset'}"}
    if candidate.get("accuracy") is None:  # refused before scoring, or already the champion
        return f"{name} v{candidate['version']} {verdict[record['decision']]}: {record['reason']}"
    accuracy = f"accuracy {candidate['accuracy']:.4f}"
    return f"{name} v{candidate['version']} {verdict[record['decision']]}: {accuracy}{against}{p}{timing}"


def decision_base(cfg: PromoteConfig, model_name: str) -> dict[str, Any]:
    return {"model_name": model_name, "alias": cfg.alias, "config": cfg.model_dump(mode="json"),
            "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def already_champion(cfg: PromoteConfig, model_name: str, candidate_version: str, out_dir: Path,
                     tracking: MlflowClient | None = None) -> StageResult | None:
    """The record of a rerun with nothing new when `candidate_version` already holds the alias, else None.

    Nothing is downloaded or scored, and the version's `promote.*` tags stay as they were first set.
    """
    client = tracking or MlflowClient()
    candidate_version = str(candidate_version)
    client.get_model_version(model_name, candidate_version)  # fails early, naming the missing version
    if current_champion(client, model_name, cfg.alias) != candidate_version:
        return None
    log.info("%s v%s already holds @%s: nothing to decide", model_name, candidate_version, cfg.alias)
    record = {**decision_base(cfg, model_name), "decision": "kept",
              "reason": f"v{candidate_version} already holds @{cfg.alias}", "candidate": {"version": candidate_version},
              "champion": {"version": candidate_version}, "test": None}
    return finish(record, out_dir, tags=None, client=client)


def run(cfg: PromoteConfig, model_name: str, candidate_version: str, dataset: Dataset, out_dir: Path,
        tracking: MlflowClient | None = None) -> StageResult:
    client = tracking or MlflowClient()
    candidate_version = str(candidate_version)
    unchanged = already_champion(cfg, model_name, candidate_version, out_dir, client)
    if unchanged is not None:
        return unchanged
    test_split = dataset.split("test")
    if test_split.empty:
        raise ValueError("the dataset has no `test` rows; promotion compares models on the test split.")
    champion_version = current_champion(client, model_name, cfg.alias)
    base = {**decision_base(cfg, model_name), "n_test": len(test_split),
            "test_split_sha256": scored_images_sha256(test_split)}

    with tempfile.TemporaryDirectory(prefix="tlops-promote-") as tmp:
        candidate = score(cfg, candidate_version, download_onnx(client, model_name, candidate_version, Path(tmp) / "candidate"),
                          dataset)
        champion = None
        if champion_version is not None:
            champion = score(cfg, champion_version,
                             download_onnx(client, model_name, champion_version, Path(tmp) / "champion"), dataset)
    test = None
    if champion is not None and champion.correct is not None and candidate.correct is not None:
        test = paired_test(cfg, candidate.correct, champion.correct)
    decision, reason = decide(cfg, candidate, champion, test, dataset)

    if decision in ("promoted", "first"):
        client.set_registered_model_alias(model_name, cfg.alias, candidate_version)
        if champion is not None:
            client.set_model_version_tag(model_name, champion.version, TAG_PREFIX + "superseded_by", candidate_version)
    log.info("%s v%s: %s (%s)", model_name, candidate_version, decision, reason)
    record = {**base, "decision": decision, "reason": reason, "candidate": candidate.record(),
              "champion": champion.record() if champion else None, "test": test}
    return finish(record, out_dir, tags=version_tags(record), client=client)


def scored_images_sha256(test: pd.DataFrame) -> str:
    """Identity of exactly the images both models were scored on (paths, contents, labels)."""
    return sha256_json(test[["path", "sha256", "label"]].to_dict("records"))


def finish(record: dict[str, Any], out_dir: Path, tags: dict[str, str] | None, client: MlflowClient) -> StageResult:
    """Tags on the candidate, promotion.json, the chart, and the StageResult the callers log."""
    if tags:
        for key, value in tags.items():
            client.set_model_version_tag(record["model_name"], record["candidate"]["version"], key, value)
    record["summary"] = summary_line(record)
    artifacts = {"promotion": write_json(out_dir / DECISION_FILE, record)}
    if tags:  # a real comparison happened: draw it
        artifacts["chart"] = plot(record, out_dir / CHART_FILE)
    candidate, champion, test = record["candidate"], record["champion"] or {}, record["test"] or {}
    metrics = {"promoted": float(record["decision"] in ("promoted", "first"))}
    metrics |= {f"candidate_recall.{label}": value for label, value in (candidate.get("recall") or {}).items()}
    for key, value in {"candidate_accuracy": candidate.get("accuracy"), "champion_accuracy": champion.get("accuracy"),
                       "p_value": test.get("p_value"), "candidate_p95_latency_ms": candidate.get("p95_latency_ms"),
                       "champion_p95_latency_ms": champion.get("p95_latency_ms")}.items():
        if value is not None:
            metrics[key] = float(value)
    result = StageResult(
        stage="promote", out_dir=out_dir, metrics=metrics, artifacts=artifacts,
        info={"decision": record["decision"], "summary": record["summary"], "reason": record["reason"],
              "model_name": record["model_name"], "candidate_version": candidate["version"],
              "champion_version": champion.get("version"), "alias": record["alias"]},
    )
    result.save()
    return result
