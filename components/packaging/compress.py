"""Compress: prune, quantize, and ship the smallest model that keeps its validation accuracy.

Candidates are the exported FP32 model, the pruned export (when compress.prune is
`unstructured` or `structured`: see components/packaging/pruning.py) and the INT8 models of
int8_search.py (of the pruned one if present): full INT8 and, when it is over the budget, the steps of a
mixed-precision search. Every candidate is scored on the val split and timed at batch 1 and 32 in ONNX
Runtime in the same run, with the same threads, each alternating round by round with FP32.

The budget (budget.py) counts every task of a model of several tasks (one output each): each must keep
its val accuracy within `max_accuracy_drop` of FP32's. It also bounds how many answers a candidate
changes: each task's val answers must agree with FP32's on at least `min_agreement` of the images.
Accuracy alone cannot see flips that cancel out: on ELPV four-class, INT8 changed 8% of the answers,
gained on val (0.738 vs 0.723) and lost 2.2 points on test; the binary model's INT8 changes 2% (8 of 386
val cells).

What ships depends on `objective`. `size` (the default): the most compressed candidate within the
accuracy budget, decided by val accuracy alone, so the same inputs ship the same model on every
machine; latencies are recorded, not deciding. `latency`: it must also be no slower than FP32 (at most
`max_latency_ratio` times its latency at each batch size) on this machine, which is then recorded as
the serving CPU (and must be `serving_cpu` when that is set). That rule exists because speed is the
CPU's: keeping many nodes in FP32 adds a Quantize/Dequantize pair at every border (Lite2 with 32 FP32
nodes: 1.14x FP32's latency at batch 32), and full INT8 of the ELPV model ran 0.41x FP32's latency on
an AVX-512 VNNI EPYC but 1.08x on an AVX2-only one. Otherwise FP32 ships, and the reason is recorded.

A text model (`modality: text` in its metadata) gets dynamic INT8 instead (int8_search.dynamic_int8), the
norm for transformers: int8 weights, activations quantized at run time per batch, so no calibration texts
are needed. It is a candidate like any other: within the same budget, under the same objective, timed the
same way.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import statistics
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from components.core.cpu import describe_cpu
from components.core.errors import UserError
from components.core.result import StageResult, write_json
from components.data.manifest import Dataset
from components.data.tokenization import is_text_metadata
from components.models.onnx_io import model_feeds, open_session, read_metadata, stamp_metadata
from components.packaging.budget import Budget, accuracies, agreement, task_answers
from components.packaging.config import SHIPPED_FILE, CompressConfig
from components.packaging.int8_search import (
    MIXED_PREFIX,
    SENSITIVITY_FILE,
    SENSITIVITY_PLOT,
    dynamic_int8,
    search_int8,
)

log = logging.getLogger(__name__)

REPORT_FILE = "compress.json"
LATENCY_BATCHES = (1, 32)

class ExportChangedError(UserError):
    """The export folder's files no longer match what export recorded."""


def latencies_ms(models: dict[str, Path], inputs: dict[str, np.ndarray], threads: int, runs: int,
                 baseline: str = "fp32") -> dict[str, dict[int, float]]:
    """Median wall time (ms) of one session.run of each model at each batch size in LATENCY_BATCHES.

    Like for like: each model is timed against `baseline` with the same inputs and threads, both sessions warmed
    up and alternating round by round, so a burst of load on a shared machine falls on both rather than on one.
    Only that pair is open at a time: a session holds its largest run's memory (2.1 GB for a four-view Lite0 at
    batch 32), and seven candidates' sessions open together were killed for memory on a 24 GB machine. The
    baseline's figure is the median of its samples over every pair.
    """
    samples: dict[str, dict[int, list[float]]] = {name: {batch: [] for batch in LATENCY_BATCHES} for name in models}
    others = [name for name in models if name != baseline] or [baseline]
    for other in others:
        pair = {name: open_session(models[name], threads) for name in dict.fromkeys([baseline, other])}
        for batch_size in LATENCY_BATCHES:
            batch = {key: np.ascontiguousarray(np.resize(value, (batch_size, *value.shape[1:]))) for key, value in inputs.items()}
            for session in pair.values():
                session.run(None, batch)
            for _ in range(runs):
                for name, session in pair.items():
                    start = time.perf_counter()
                    session.run(None, batch)
                    samples[name][batch_size].append((time.perf_counter() - start) * 1e3)
        del pair  # released before the next pair opens: rebinding would hold both pairs while the new one loads
    return {name: {batch: statistics.median(values) for batch, values in by_batch.items()} for name, by_batch in samples.items()}


def zipped_mb(path: Path) -> float:
    """Size after deflate: the only size in which unstructured sparsity shows (ONNX stores dense tensors)."""
    return len(zlib.compress(path.read_bytes(), 6)) / 1e6


def compression_order(names: Sequence[str]) -> list[str]:
    """Most compressed first: full INT8, INT8 with the fewest FP32 nodes, pruned, FP32."""

    def key(name: str) -> tuple[int, int]:
        if name == "int8":
            return (0, 0)
        mixed = re.fullmatch(MIXED_PREFIX + r"(\d+)", name)
        if mixed:
            return (1, int(mixed.group(1)))
        return {"pruned": (2, 0), "fp32": (3, 0)}[name]

    return sorted(names, key=key)


def choose(
    accuracy: dict[str, dict[str, float]], budget: Budget, agreement: dict[str, float] | None = None,
    latency_ratio: dict[str, float] | None = None, max_latency_ratio: float | None = None,
) -> tuple[str, str, dict[str, bool]]:
    """(shipped candidate, reason, within-budget flags): the most compressed candidate within `budget`.

    `accuracy`: each candidate's val accuracy per task, the primary first; `agreement`: each candidate's share of
    val answers that match FP32's (in its worst task), 1.0 where not given. `latency_ratio` is each candidate's
    worst latency over FP32's across the timed batch sizes; with `max_latency_ratio` set, a candidate slower than
    that is passed over whatever its accuracy.
    """
    agreement = agreement or {}
    short = {name: budget.shortfalls(scores, agreement.get(name, 1.0)) for name, scores in accuracy.items()}
    within = {name: not why for name, why in short.items()}
    fast = {name: name == "fp32" or max_latency_ratio is None or latency_ratio is None
            or latency_ratio[name] <= max_latency_ratio for name in accuracy}
    rule = budget.describe()
    if max_latency_ratio is not None and latency_ratio is not None:
        rule += f" and latency <= {max_latency_ratio:g}x fp32's (compress.max_latency_ratio)"
    ranked = compression_order(list(accuracy))
    shipped = next(name for name in ranked if within[name] and fast[name])  # fp32 always passes
    passed_over = [f"{name} " + " and ".join(short[name] + ([] if fast[name] else [f"{latency_ratio[name]:.2f}x fp32's latency"]))
                   for name in ranked[: ranked.index(shipped)]]
    primary = next(iter(budget.fp32))
    reason = f"{shipped} is the most compressed candidate with {rule}: {accuracy[shipped][primary]:.4f}"
    if passed_over:
        reason += f"; more compressed but over budget: {', '.join(passed_over)}"
    if len(ranked) == 1:
        reason += " (the only candidate: compress.quantize is off and export wrote no pruned model)"
    return shipped, reason, within


def check_serving_cpu(cfg: CompressConfig) -> dict[str, object]:
    """This machine's CPU; refused before any work when objective=latency names another serving CPU."""
    here = describe_cpu()
    if cfg.objective == "latency" and cfg.serving_cpu and cfg.serving_cpu.lower() not in str(here["model"]).lower():
        raise UserError(f"compress.objective=latency times candidates on this machine ({here['model']}, "
                        f"{', '.join(here['flags'])}), but compress.serving_cpu is {cfg.serving_cpu!r}: run compress on "
                        f"the serving CPU, or set compress.objective=size to ship by accuracy and size alone.")
    return here


def run(cfg: CompressConfig, export_dir: Path, dataset: Dataset, out_dir: Path) -> StageResult:
    serving_cpu = check_serving_cpu(cfg)
    exported = StageResult.load(export_dir)
    if not exported.is_intact():
        raise ExportChangedError(f"{export_dir}: the exported files changed since export wrote them; re-run export.")
    candidates = {name: path for name, path in exported.artifacts.items() if name in ("fp32", "pruned")}
    if "fp32" not in candidates:
        raise KeyError(f"{export_dir}: the export result lists no `fp32` model; re-run export.")
    out_dir.mkdir(parents=True, exist_ok=True)
    answers = {name: task_answers(path, dataset, "val") for name, path in candidates.items()}
    budget = Budget(accuracies(answers["fp32"], dataset, "val"), cfg.max_accuracy_drop, cfg.min_agreement)
    search: dict[str, object] = {}
    texts = is_text_metadata(read_metadata(candidates["fp32"]))
    if cfg.quantize and texts:
        int8_models, int8_answers = dynamic_int8(cfg, candidates["fp32"], dataset, out_dir)
        candidates |= int8_models
        answers |= int8_answers
        search = {"method": "dynamic", "stopped": "text models are quantized dynamically: no mixed-precision search"}
    elif cfg.quantize:
        source = candidates.get("pruned", candidates["fp32"])
        int8_models, int8_answers, search = search_int8(cfg, source, dataset, answers["fp32"], budget, out_dir)
        candidates |= int8_models
        answers |= int8_answers
    per_task = {name: accuracies(given, dataset, "val") for name, given in answers.items()}
    agrees = {name: agreement(given, answers["fp32"]) for name, given in answers.items()}
    accuracy = {name: next(iter(scores.values())) for name, scores in per_task.items()}  # the primary task's
    others = {name: dict(list(scores.items())[1:]) for name, scores in per_task.items()}  # the tasks after it

    timing_inputs = model_feeds(candidates["fp32"], read_metadata(candidates["fp32"]),
                                [dataset.image_path(p) for p in dataset.split("val")["path"].head(8)])
    latency = latencies_ms(candidates, timing_inputs, cfg.latency_threads, cfg.latency_runs)
    ratio = {name: {batch: latency[name][batch] / latency["fp32"][batch] for batch in LATENCY_BATCHES}
             for name in candidates}
    speed_rule = cfg.max_latency_ratio if cfg.objective == "latency" else None
    shipped, reason, within = choose(per_task, budget, agrees, {n: max(r.values()) for n, r in ratio.items()}, speed_rule)
    log.info("shipping %s: %s", shipped, reason)

    model_path = out_dir / SHIPPED_FILE
    temporary = out_dir / (SHIPPED_FILE + ".tmp")
    shutil.copyfile(candidates[shipped], temporary)
    stamp_metadata(
        temporary,
        {
            "compression": shipped,
            "val_accuracy": f"{accuracy[shipped]:.6f}",
            "val_accuracy_fp32": f"{accuracy['fp32']:.6f}",
            "max_accuracy_drop": f"{cfg.max_accuracy_drop:g}",
        },
    )
    os.replace(temporary, model_path)

    sizes = {name: path.stat().st_size / 1e6 for name, path in candidates.items()}
    report = {
        "candidates": {
            name: {
                "file": path.name,
                "size_mb": sizes[name],
                "zipped_mb": zipped_mb(path),
                "val_accuracy": accuracy[name],
                "val_accuracy_drop": accuracy["fp32"] - accuracy[name],
                **({"val_accuracy_tasks": per_task[name]} if others[name] else {}),
                "val_agreement_fp32": agrees[name],
                "within_budget": within[name],
                "latency_ms_batch1": latency[name][1],
                "latency_ms_batch32": latency[name][32],
                "latency_ratio_fp32_batch1": ratio[name][1],
                "latency_ratio_fp32_batch32": ratio[name][32],
            }
            for name, path in candidates.items()
        },
        "val_images": len(dataset.split("val")),
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "min_agreement": cfg.min_agreement,
        "latency_threads": cfg.latency_threads,
        "objective": cfg.objective,
        "max_latency_ratio": cfg.max_latency_ratio if cfg.objective == "latency" else None,
        # The CPU the latencies were measured on; with objective=latency, the CPU the choice holds for.
        "latency_cpu": serving_cpu,
        "int8_search": search,
        "pruning": exported.info.get("pruning") or ({"method": "unstructured magnitude", "sparsity": exported.info["sparsity"]}
                                                    if "pruned" in candidates else None),
        "shipped": shipped,
        "reason": reason,
    }
    report_path = write_json(out_dir / REPORT_FILE, report)

    metrics = {f"val_accuracy_{name}": value for name, value in accuracy.items()}
    metrics |= {f"val_accuracy_{name}.{task}": value for name, scores in others.items() for task, value in scores.items()}
    metrics |= {f"val_agreement_fp32_{name}": value for name, value in agrees.items()}
    metrics |= {f"size_mb_{name}": value for name, value in sizes.items()}
    metrics |= {f"zipped_mb_{name}": entry["zipped_mb"] for name, entry in report["candidates"].items()}
    for name in candidates:
        metrics |= {f"latency_ms_b{batch}_{name}": latency[name][batch] for batch in LATENCY_BATCHES}
    if "int8" in sizes:
        metrics["size_ratio_int8"] = sizes["int8"] / sizes["fp32"]
    metrics["fp32_nodes_shipped"] = float(len(search.get("fp32_nodes", [])) if shipped.startswith(MIXED_PREFIX) else 0)
    artifacts = {"model": model_path, "report": report_path}
    artifacts |= {name: path for name, path in candidates.items() if path.parent == out_dir}
    if "sensitivity" in search:
        artifacts["sensitivity"] = out_dir / SENSITIVITY_FILE
        artifacts["sensitivity_plot"] = out_dir / SENSITIVITY_PLOT
    result = StageResult(
        stage="compress", out_dir=out_dir, metrics=metrics, artifacts=artifacts,
        info={"shipped": shipped, "reason": reason},
    )
    result.save()
    return result
