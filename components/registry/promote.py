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
    `min_improvement` and a paired test on the same images (exact McNemar on the discordant
    pairs, or a paired bootstrap) is significant at `significance`.
The first version ever registered becomes champion if it passes its own gates. A champion whose
labels differ from the dataset's cannot be scored on it (its class indices mean something
else); the candidate then wins on its own gates and the reason says so.

The decision, both scores, the test, the latency and the reason go to the candidate's model
version tags (`promote.*`), to `promotion.json` and to a side-by-side chart `promotion.png`.
This is the one stage that talks to the registry itself, because moving the alias is its work.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from scipy.stats import binomtest

from components.core.result import StageResult, sha256_json
from components.data.manifest import Dataset
from components.models.onnx_io import model_feeds, model_labels, open_session, predict_frame, read_metadata
from components.registry.config import PromoteConfig

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
    """Accuracy (with a Wilson 95% interval), finiteness, batch-1 parity and latency of one model."""
    labels = list(model_labels(model_path, read_metadata(model_path)))
    scored = Scored(version=version, labels_match=tuple(labels) == dataset.labels, labels=labels)
    if not scored.labels_match:
        return scored
    test = dataset.split("test")
    logits = predict_frame(model_path, dataset, test, cfg.batch_size)
    actual = np.asarray(dataset.label_index(test))
    scored.correct = logits.argmax(axis=1) == actual
    scored.finite = bool(np.isfinite(logits).all())
    hits = int(scored.correct.sum())
    scored.accuracy = hits / len(test)
    interval = binomtest(hits, len(test)).proportion_ci(0.95, method="wilson")
    scored.accuracy_ci = (float(interval.low), float(interval.high))

    latencies, single = measure_batch1(model_path, latency_frame_paths(dataset, cfg.latency_images), cfg.latency_threads)
    scored.p95_latency_ms = float(np.percentile(latencies, 95))
    scored.median_latency_ms = float(np.median(latencies))
    reference = logits[np.arange(len(single)) % len(test)]  # the same images, scored in batches
    scored.parity_max_diff = float(np.max(np.abs(single - reference)))
    scored.finite = scored.finite and bool(np.isfinite(single).all())
    return scored


def paired_test(cfg: PromoteConfig, candidate: np.ndarray, champion: np.ndarray) -> dict[str, float]:
    """One-sided: is the candidate right more often than the champion on the same images?

    `candidate_only` / `champion_only` count the discordant pairs (one right, the other wrong).
    """
    candidate_only = int((candidate & ~champion).sum())
    champion_only = int((champion & ~candidate).sum())
    discordant = candidate_only + champion_only
    if cfg.test == "mcnemar":
        # Exact McNemar: under no difference each discordant pair favours either model with p = 1/2.
        p_value = binomtest(candidate_only, discordant, 0.5, alternative="greater").pvalue if discordant else 1.0
        statistic = float(candidate_only)
    else:
        rng = np.random.default_rng(cfg.seed)
        index = rng.integers(0, len(candidate), size=(cfg.bootstrap_samples, len(candidate)))
        differences = candidate[index].mean(axis=1) - champion[index].mean(axis=1)
        p_value = (1 + int((differences <= 0).sum())) / (cfg.bootstrap_samples + 1)
        statistic = float(candidate.mean() - champion.mean())
    return {"p_value": float(p_value), "statistic": statistic, "candidate_only": float(candidate_only),
            "champion_only": float(champion_only)}


def own_gates(cfg: PromoteConfig, candidate: Scored, dataset: Dataset) -> str | None:
    """Why the candidate cannot serve whatever the champion does, or None when it can."""
    if not candidate.labels_match:
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


def decide(cfg: PromoteConfig, candidate: Scored, champion: Scored | None, test: dict[str, float] | None,
           dataset: Dataset) -> tuple[Decision, str]:
    refused = own_gates(cfg, candidate, dataset)
    if champion is None:
        return ("kept", f"no champion yet, but {refused}; no alias set") if refused else \
            ("first", "no champion yet; the candidate passes parity and latency")
    if refused:
        return "kept", refused
    if not champion.labels_match:
        return "promoted", (f"champion v{champion.version} labels {champion.labels} differ from the dataset's "
                            f"{list(dataset.labels)}, so it cannot be scored on this data; the candidate passes "
                            f"its own gates")
    assert test is not None and candidate.accuracy is not None and champion.accuracy is not None
    gain = candidate.accuracy - champion.accuracy
    if gain <= 0 or gain < cfg.min_improvement:
        return "kept", (f"accuracy gain {gain:+.4f} does not beat the champion by "
                        f"promote.min_improvement={cfg.min_improvement:g}")
    if test["p_value"] >= cfg.significance:
        return "kept", (f"accuracy gain {gain:+.4f} is not significant ({cfg.test} p={test['p_value']:.3g} "
                        f">= promote.significance={cfg.significance:g})")
    return "promoted", (f"accuracy gain {gain:+.4f} >= {cfg.min_improvement:g}, {cfg.test} p={test['p_value']:.3g} "
                        f"< {cfg.significance:g}, parity and latency pass")


def plot(record: dict[str, Any], path: Path) -> Path:
    """Accuracy with 95% intervals, the discordant pairs, and batch-1 p95 latency against the budget."""
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
        pairs_ax.set_title(f"discordant pairs, {record['config']['test']} p={test['p_value']:.3g}")
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
    return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))


def atomic_write(path: Path, write) -> Path:  # noqa: ANN001 - a callable taking the temporary path
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
        "p_value": test.get("p_value"),
        "statistic": test.get("statistic"),
        "discordant_candidate_only": test.get("candidate_only"),
        "discordant_champion_only": test.get("champion_only"),
        "p95_latency_ms": candidate.get("p95_latency_ms"),
        "max_p95_latency_ms": record["config"]["max_p95_latency_ms"],
        "parity_max_diff": candidate.get("parity_max_diff"),
        "n_test": record["n_test"],
        "test_split_sha256": record["test_split_sha256"],
        "decided_at": record["decided_at"],
    }
    return {TAG_PREFIX + k: (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in tags.items() if v is not None}


def summary_line(record: dict[str, Any]) -> str:
    name, candidate, champion = record["model_name"], record["candidate"], record["champion"]
    against = f" vs v{champion['version']} {champion['accuracy']:.4f}" if champion and champion.get("accuracy") is not None else ""
    test = record.get("test")
    p = f", {record['config']['test']} p={test['p_value']:.3g}" if test else ""
    latency = candidate.get("p95_latency_ms")
    timing = f", p95 {latency:.1f} ms (budget {record['config']['max_p95_latency_ms']:g})" if latency is not None else ""
    verdict = {"promoted": f"promoted to @{record['alias']}", "first": f"first @{record['alias']}",
               "kept": f"not promoted; @{record['alias']} stays {('v' + champion['version']) if champion else 'unset'}"}
    if candidate.get("accuracy") is None:  # refused before scoring, or already the champion
        return f"{name} v{candidate['version']} {verdict[record['decision']]}: {record['reason']}"
    accuracy = f"accuracy {candidate['accuracy']:.4f}"
    return f"{name} v{candidate['version']} {verdict[record['decision']]}: {accuracy}{against}{p}{timing}"


def run(cfg: PromoteConfig, model_name: str, candidate_version: str, dataset: Dataset, out_dir: Path,
        tracking: MlflowClient | None = None) -> StageResult:
    client = tracking or MlflowClient()
    candidate_version = str(candidate_version)
    test_split = dataset.split("test")
    if test_split.empty:
        raise ValueError("the dataset has no `test` rows; promotion compares models on the test split.")
    client.get_model_version(model_name, candidate_version)  # fails early, naming the missing version
    champion_version = current_champion(client, model_name, cfg.alias)
    base = {"model_name": model_name, "alias": cfg.alias, "config": cfg.model_dump(mode="json"),
            "n_test": len(test_split), "test_split_sha256": scored_images_sha256(test_split),
            "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    if champion_version == candidate_version:
        # A rerun with nothing new (register replayed from cache): nothing to decide, tags stay as first set.
        record = {**base, "decision": "kept", "reason": f"v{candidate_version} already holds @{cfg.alias}",
                  "candidate": {"version": candidate_version}, "champion": {"version": champion_version}, "test": None}
        return finish(record, out_dir, tags=None, client=client)

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
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
    artifacts = {"promotion": atomic_write(out_dir / DECISION_FILE, lambda tmp: Path(tmp).write_text(text))}
    if tags:  # a real comparison happened: draw it
        artifacts["chart"] = plot(record, out_dir / CHART_FILE)
    candidate, champion, test = record["candidate"], record["champion"] or {}, record["test"] or {}
    metrics = {"promoted": float(record["decision"] in ("promoted", "first"))}
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
