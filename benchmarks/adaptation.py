"""Domain adaptation on ELPV: mono -> poly and poly -> mono, target-domain test accuracy over seeds.

For each direction (the target domain's train/val labels hidden by the same `labelled_view` the pipeline
uses) and each method, `finetune.run` trains with the repo's params plus `--set` overrides, export writes
the FP32 ONNX file, and evaluate scores the whole test split in ONNX Runtime; the table reports the
target domain's test accuracy (`by_domain.<target>.accuracy`) and the source domain's beside it.

Methods: `none` (source only, the same bottleneck head without an alignment loss), `coral`, `dann`, and
`oracle`: the same head and recipe trained with every domain's labels (nothing hidden), the upper bound.
`probe` adds the pipeline's plain logistic-regression probe trained on the source domain alone, and
`probe_per_domain` the same probe with each domain standardised by its own statistics (a reference
outside the pipeline: the simplest unsupervised adaptation there is).

Tuning uses no target label: `--select` picks, per direction and method, the value of one key (e.g.
`finetune.adapt.weight`) among `--grid` by source val accuracy or by an unsupervised criterion on the
target's unlabelled val images (`entropy`: mean prediction entropy, lower is better), and reports the
target test accuracy of the picked value only.

Work folders go under benchmarks/results/adaptation/ (ignored by git). The first run ingests ELPV and
caches its features there.

    python -m benchmarks.adaptation --strategy linear --seeds 0 1 2 [--set finetune.adapt.weight=0.3 ...]
    python -m benchmarks.adaptation --strategy partial --methods none dann --directions poly --seeds 0 \
        --set finetune.partial.epochs=8 --set finetune.partial.views=2
    python -m benchmarks.adaptation --grid finetune.adapt.weight=0.1,0.3,1,3 --select entropy --methods dann
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.feature_extraction import cpu_description
from components.data.config import IngestConfig
from components.data.domains import TARGET_SPLITS, UNLABELLED_VAL, domain_of, labelled_view
from components.data.ingest import run as ingest_run
from components.data.manifest import read_manifest
from components.evaluation import evaluate
from components.features import extract
from components.features.cache import split_features
from components.models.classifier import checkpoint_head, load_checkpoint
from components.models.onnx_io import predict_frame, softmax
from components.packaging import export
from components.training import finetune
from tlops.cli import configure_logging
from tlops.config import load_params

RESULTS = Path(__file__).parent / "results" / "adaptation"
BACKBONE = "efficientnet_lite0"
DIRECTIONS = {"poly": "mono", "mono": "poly"}  # target -> source


def prepare(params, work: Path):  # noqa: ANN001, ANN201 - Params in, the dataset and its features folder out
    """ELPV ingested and its Lite0 features cached under `work` (once)."""
    data = work / f"elpv-{params.ingest.label_mode}"
    if not (data / "manifest.csv").exists():
        ingest_run(IngestConfig(label_mode=params.ingest.label_mode, seed=params.ingest.seed), data)
    dataset = read_manifest(data / "manifest.csv")
    features_dir = work / f"features-{params.ingest.label_mode}-{params.features.image_size or 'native'}"
    if not (features_dir / BACKBONE / "features.npz").exists():
        extract.run(params.features, (BACKBONE,), dataset, work / "cache", features_dir)
    return dataset, data / "manifest.csv", features_dir


def target_entropy(model_path: Path, dataset, target: str) -> float:  # noqa: ANN001
    """Mean prediction entropy on the target's unlabelled val images: an unsupervised selection criterion."""
    frame = dataset.split(UNLABELLED_VAL)
    probabilities = softmax(predict_frame(model_path, dataset, frame))
    return float(-(probabilities * np.log(np.clip(probabilities, 1e-12, 1))).sum(1).mean())


def with_every_label(dataset, target: str):  # noqa: ANN001, ANN201
    """The oracle's data: every domain labelled in train/val, and the target's train/val rows copied as the
    unlabelled batch the adapting head draws beside each source batch (unused: the oracle's alignment weight is 0)."""
    frame = dataset.manifest
    copy = frame[(frame["domain"] == target) & frame["split"].isin(list(TARGET_SPLITS))].copy()
    copy["split"] = copy["split"].map(TARGET_SPLITS)
    return replace(dataset, manifest=pd.concat([frame, copy], ignore_index=True))


def score_on_features(checkpoint_path: Path, dataset, features_dir: Path) -> dict[str, float]:  # noqa: ANN001
    """Per-domain test metrics and the target's val entropy of a head trained on cached features."""
    checkpoint = load_checkpoint(checkpoint_path)
    head = checkpoint_head(checkpoint)

    def logits(split: str) -> np.ndarray:
        x = np.concatenate([split_features(dataset, features_dir, BACKBONE, tap, split) for tap in checkpoint["taps"]], 1)
        with torch.no_grad():
            return head(torch.from_numpy(x)).numpy()

    test = dataset.split("test")
    predicted, actual = logits("test").argmax(1), np.asarray(dataset.label_index(test))
    metrics = evaluate.domain_metrics(actual, predicted, softmax(logits("test")).max(1), domain_of(test), dataset.labels, 10)
    probabilities = softmax(logits(UNLABELLED_VAL))
    metrics["target_val_entropy"] = float(-(probabilities * np.log(np.clip(probabilities, 1e-12, 1))).sum(1).mean())
    return metrics


def one(params, strategy: str, method: str, target: str, seed: int, work: Path, overrides: list[str],  # noqa: ANN001
        onnx: bool = False) -> dict:
    dataset, manifest, features_dir = prepare(params, work)
    adapt = {"target_domain": target, "method": method}
    if method == "probe":  # the pipeline's logistic-regression probe, source labels only
        adapt = {"target_domain": None}
    elif method == "oracle":  # the same head and recipe with the target's labels too, one standardisation for all
        adapt = {"target_domain": target, "method": "none", "weight": 0.0, "normalise": "source"}
    cfg = params.finetune.model_copy(update={"strategy": strategy, "seed": seed,
                                             "adapt": params.finetune.adapt.model_copy(update=adapt)})
    view = with_every_label(dataset, target) if method == "oracle" else labelled_view(dataset, target)
    out = work / "runs" / "-".join([strategy, method, target, f"s{seed}", *overrides]).replace("/", "_")[:200]
    began = time.perf_counter()
    trained = finetune.run(cfg, BACKBONE, features_dir, view, manifest, out / "finetune", work / "cache",
                           out / "state", params.features.opset, params.features.parity_atol)
    wall = time.perf_counter() - began
    scoring = labelled_view(dataset, target)  # the test split, scored the same way for every method
    if strategy == "linear" and not onnx:
        # The head on the cached features: what the FP32 ONNX file computes within export.train_serve_atol.
        metrics = score_on_features(trained.artifacts["checkpoint"], scoring, features_dir)
    else:
        exported = export.run(params.export, 0.0, trained.artifacts["checkpoint"], scoring, out / "export",
                              features_dir=features_dir)
        metrics = evaluate.run(params.evaluate, exported.artifacts["fp32"], scoring, out / "evaluate").metrics
        metrics["target_val_entropy"] = target_entropy(exported.artifacts["fp32"], scoring, target)
    source = DIRECTIONS[target]
    row = {"strategy": strategy, "method": method, "target": target, "source": source, "seed": seed,
           "overrides": overrides, "wall_s": wall, "source_val_accuracy": trained.metrics["val_accuracy"],
           "target_test_accuracy": metrics[f"by_domain.{target}.accuracy"],
           "source_test_accuracy": metrics[f"by_domain.{source}.accuracy"],
           "target_test_macro_f1": metrics[f"by_domain.{target}.macro_f1"],
           "target_val_entropy": metrics["target_val_entropy"]}
    row |= {k.removeprefix("adapt."): v for k, v in trained.metrics.items() if k.startswith("adapt.domain")}
    print(json.dumps(row), flush=True)
    return row


def summary(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["strategy"], row["target"], row["method"], tuple(row["overrides"])), []).append(row)
    table = []
    for (strategy, target, method, overrides), group in sorted(groups.items()):
        entry = {"strategy": strategy, "direction": f"{DIRECTIONS[target]}->{target}", "method": method,
                 "overrides": list(overrides), "seeds": len(group)}
        for key in ("target_test_accuracy", "source_test_accuracy", "source_val_accuracy", "domain_accuracy_before",
                    "domain_accuracy_after", "target_val_entropy"):
            values = [r[key] for r in group if key in r]
            if values:
                entry[key] = statistics.mean(values)
                entry[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(entry)
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| strategy | direction | method | settings | target test acc. | source test acc. | source val acc. "
             "| domain acc. before -> after |", "|---|---|---|---|---|---|---|---|"]
    for e in table:
        domain = (f"{e['domain_accuracy_before']:.3f} -> {e['domain_accuracy_after']:.3f}"
                  if "domain_accuracy_after" in e else "")
        lines.append(f"| {e['strategy']} | {e['direction']} | {e['method']} | {' '.join(e['overrides']) or 'defaults'} "
                     f"| {e['target_test_accuracy']:.3f} ± {e['target_test_accuracy_sd']:.3f} "
                     f"| {e['source_test_accuracy']:.3f} ± {e['source_test_accuracy_sd']:.3f} "
                     f"| {e['source_val_accuracy']:.3f} | {domain} |")
    return "\n".join(lines)


def probe_per_domain(params, target: str, work: Path) -> dict:  # noqa: ANN001
    """A reference outside the pipeline: the pipeline's logistic probe (C chosen on source val), each domain's
    features standardised with its own statistics (the target's from its unlabelled train images)."""
    from components.training.strategies.linear import fit_probe, standardiser

    dataset, _, features_dir = prepare(params, work)
    view = labelled_view(dataset, target)
    taps = params.finetune.linear.taps

    def x(split: str) -> np.ndarray:
        return np.concatenate([split_features(view, features_dir, BACKBONE, t, split) for t in taps], 1)

    source, target_scaler = standardiser(x("train")), standardiser(x("unlabelled"))
    y = {s: np.asarray(view.label_index(view.split(s))) for s in ("train", "val", "test")}
    probe = fit_probe((source.transform(x("train")), y["train"]), (source.transform(x("val")), y["val"]),
                      len(view.labels), params.finetune.linear.regularization, params.finetune.class_weights, 0)
    test = view.split("test")
    is_target = np.asarray(test["domain"] == target)
    features = np.where(is_target[:, None], target_scaler.transform(x("test")), source.transform(x("test")))
    with torch.no_grad():
        predicted = probe.head(torch.from_numpy(features).float()).numpy().argmax(1)
    correct = predicted == y["test"]
    row = {"strategy": "linear", "method": "probe_per_domain", "target": target, "source": DIRECTIONS[target],
           "seed": 0, "overrides": [], "source_val_accuracy": probe.best["val_accuracy"],
           "target_test_accuracy": float(correct[is_target].mean()), "source_test_accuracy": float(correct[~is_target].mean())}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="linear", choices=["linear", "partial"])
    parser.add_argument("--methods", nargs="+", default=["probe", "none", "coral", "dann", "oracle"])
    parser.add_argument("--directions", nargs="+", default=["poly", "mono"], help="target domains")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--grid", help="KEY=V1,V2,...: one run per value (for --select)")
    parser.add_argument("--name", default="linear")
    parser.add_argument("--onnx", action="store_true", help="linear: score the exported ONNX file, not the head on features")
    args = parser.parse_args()
    configure_logging()
    torch.set_num_threads(1)  # a small MLP: one thread avoids contention on a shared 2-core machine
    work = RESULTS
    work.mkdir(parents=True, exist_ok=True)
    variants = [[]]
    if args.grid:
        key, _, values = args.grid.partition("=")
        variants = [[f"{key}={v}"] for v in values.split(",")]
    rows = []
    for target in args.directions:
        for method in args.methods:
            if method == "probe_per_domain":  # deterministic: one row
                rows.append(probe_per_domain(load_params(Path("params.yaml"), args.overrides), target, work))
                (work / f"{args.name}.json").write_text(json.dumps({"cpu": cpu_description(), "rows": rows,
                                                                     "table": summary(rows)}, indent=2))
                continue
            for variant in variants if method in ("coral", "dann") else [[]]:
                params = load_params(Path("params.yaml"), [*args.overrides, *variant])
                for seed in args.seeds:
                    rows.append(one(params, args.strategy, method, target, seed, work, [*args.overrides, *variant],
                                    args.onnx))
                    (work / f"{args.name}.json").write_text(json.dumps({"cpu": cpu_description(), "rows": rows,
                                                                         "table": summary(rows)}, indent=2))
    print(markdown(summary(rows)))
    (work / f"{args.name}.md").write_text(markdown(summary(rows)) + "\n")


if __name__ == "__main__":
    main()
