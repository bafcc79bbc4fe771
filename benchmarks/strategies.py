"""Backbone x strategy on the validated dataset: test accuracy and macro-F1 over seeds, wall time, size, INT8 ratios.

Each (backbone, strategy, seed) trains with the repo's params (plus `--set` overrides) through the
same `finetune.run` the pipeline uses, exports FP32 ONNX and scores the test split in ONNX
Runtime. Seed 0 of each pair (every seed with `--ship-every-seed`) also goes through compress (the INT8 search), which gives the
shipped candidate, its size and the INT8 / FP32 latency ratios at batch 1 and 32, measured in
the same run with the same threads. Where several seeds ran, their FP32 models are also scored
together (softmax averaged): what a seed ensemble would buy, at n times the inference. Caches
(features, activations) are shared, so train time is the training itself; the first partial run
of a backbone also pays for its activations, which the table reports apart.

Needs the outputs of `tlops run` (or `dvc repro`) up to `features` for every backbone listed.

    python -m benchmarks.strategies --backbones efficientnet_lite0 --strategies linear partial \
        --seeds 0 1 2 [--set features.image_size=300 ...] [--name NAME]
    python -m benchmarks.strategies --table NAME [NAME ...]   # one table from earlier runs' rows
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.feature_extraction import cpu_description
from components.data.ingest import declared_orders, declared_values
from components.evaluation import evaluate
from components.models.onnx_io import predict_frame, softmax
from components.packaging import compress, export
from components.training import finetune
from tlops.cli import configure_logging
from tlops.config import load_params
from tlops.stages import served_views, validated_dataset

RESULTS = Path(__file__).parent / "results"


def one(params, backbone: str, strategy: str, seed: int, out: Path, shipped: bool) -> dict[str, object]:
    cfg = params.finetune.model_copy(update={"strategy": strategy, "seed": seed})
    dataset = validated_dataset(params)
    began = time.perf_counter()
    trained = finetune.run(cfg, backbone, params.path("features"), dataset, params.path("validate") / "manifest.csv",
                           out / "finetune", params.path("feature_cache"), out / "state", params.features.opset,
                           params.features.parity_atol, int8_recipe=params.compress.planned_recipe(served_views(params)),
                           orders=declared_orders(params.ingest),
                           values=declared_values(params.ingest))
    wall = time.perf_counter() - began
    exported = export.run(params.export, 0.0, trained.artifacts["checkpoint"], dataset, out / "export",
                          features_dir=params.path("features"))
    scored = evaluate.run(params.evaluate, exported.artifacts["fp32"], dataset, out / "evaluate")
    row = {"label_mode": params.ingest.label_mode, "backbone": backbone, "strategy": strategy, "seed": seed, "wall_s": wall,
           "train_s": trained.metrics["train_seconds"], "val_accuracy": trained.metrics["val_accuracy"],
           "test_accuracy": scored.metrics["accuracy"], "test_macro_f1": scored.metrics["macro_f1"],
           "fp32_mb": exported.metrics["size_mb_fp32"], "fp32_model": str(exported.artifacts["fp32"])}
    return row | (ship(params, dataset, out) if shipped else {})


def ship(params, dataset, out: Path) -> dict[str, object]:
    """`out/export` through compress (the INT8 search) and the shipped model scored on test."""
    compressed = compress.run(params.compress, out / "export", dataset, out / "compress")
    report = json.loads((out / "compress" / compress.REPORT_FILE).read_text())
    name = compressed.info["shipped"]
    latency = {n: {1: c["latency_ms_batch1"], 32: c["latency_ms_batch32"]} for n, c in report["candidates"].items()}
    int8 = next((n for n in report["candidates"] if n.startswith("int8")), None)
    ship_scored = evaluate.run(params.evaluate, out / "compress" / compress.SHIPPED_FILE, dataset, out / "evaluate_shipped")
    return {"shipped": name, "shipped_mb": report["candidates"][name]["size_mb"],
            "shipped_test_accuracy": ship_scored.metrics["accuracy"],
            "int8_fp32_latency_b1": latency[int8][1] / latency["fp32"][1] if int8 else None,
            "int8_fp32_latency_b32": latency[int8][32] / latency["fp32"][32] if int8 else None,
            "shipped_fp32_latency_b1": latency[name][1] / latency["fp32"][1],
            "shipped_fp32_latency_b32": latency[name][32] / latency["fp32"][32]}


def ensemble(params, rows: list[dict[str, object]]) -> dict[str, object]:
    """Test accuracy of the seeds' FP32 models together: their softmax probabilities averaged (n x the work)."""
    dataset = validated_dataset(params)
    test = dataset.split("test")
    probabilities = np.mean([softmax(predict_frame(Path(r["fp32_model"]), dataset, test)) for r in rows], axis=0)
    scored = evaluate.classification_metrics(np.asarray(dataset.label_index(test)), probabilities.argmax(axis=1),
                                             dataset.labels)
    return {"label_mode": rows[0]["label_mode"], "backbone": rows[0]["backbone"], "strategy": rows[0]["strategy"],
            "seeds": [r["seed"] for r in rows], "test_accuracy": scored["accuracy"], "test_macro_f1": scored["macro_f1"]}


def summary(rows: list[dict[str, object]], ensembles: list[dict[str, object]] = ()) -> list[dict[str, object]]:
    table = []
    for key in sorted({(r["label_mode"], r["backbone"], r["strategy"]) for r in rows}):
        group = [r for r in rows if (r["label_mode"], r["backbone"], r["strategy"]) == key]
        accuracy = [float(r["test_accuracy"]) for r in group]
        f1 = [float(r["test_macro_f1"]) for r in group]
        first = min(group, key=lambda r: r["seed"])
        shipped = [float(r["shipped_test_accuracy"]) for r in group if r.get("shipped_test_accuracy") is not None]
        together = next((e for e in ensembles if (e["label_mode"], e["backbone"], e["strategy"]) == key), {})
        table.append({"label_mode": key[0], "backbone": key[1], "strategy": key[2], "seeds": len(group),
                      "test_accuracy_mean": statistics.mean(accuracy),
                      "test_accuracy_sd": statistics.stdev(accuracy) if len(group) > 1 else 0.0,
                      "test_macro_f1_mean": statistics.mean(f1),
                      "test_macro_f1_sd": statistics.stdev(f1) if len(group) > 1 else 0.0,
                      "train_s_mean": statistics.mean(float(r["train_s"]) for r in group),
                      "ensemble_test_accuracy": together.get("test_accuracy"),
                      "ensemble_test_macro_f1": together.get("test_macro_f1"),
                      "shipped_seeds": len(shipped),  # --ship-every-seed: the shipped mean over seeds
                      "shipped_test_accuracy_mean": statistics.mean(shipped) if shipped else None,
                      "shipped_test_accuracy_sd": statistics.stdev(shipped) if len(shipped) > 1 else 0.0,
                      **{k: first.get(k) for k in ("shipped", "shipped_mb", "shipped_test_accuracy", "int8_fp32_latency_b1",
                                                   "int8_fp32_latency_b32", "shipped_fp32_latency_b1", "shipped_fp32_latency_b32")}})
    return table


def markdown(table: list[dict[str, object]]) -> str:
    def f(value: object, spec: str = ".3f") -> str:
        return "—" if value is None else format(value, spec)

    lines = ["| labels | backbone | strategy | test acc (mean ± sd) | macro-F1 (mean ± sd) | seeds averaged: acc / F1 | train s | "
             "shipped | size MB | shipped test acc (seed 0, or mean ± sd) | INT8/FP32 latency b1 | b32 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['label_mode']} | {r['backbone']} | {r['strategy']} | {r['test_accuracy_mean']:.3f} ± {r['test_accuracy_sd']:.3f} "
                     f"(n={r['seeds']}) | {r['test_macro_f1_mean']:.3f} ± {r['test_macro_f1_sd']:.3f} | "
                     f"{f(r['ensemble_test_accuracy'])} / {f(r['ensemble_test_macro_f1'])} | "
                     f"{r['train_s_mean']:.0f} | {r['shipped'] or '—'} | {f(r['shipped_mb'], '.1f')} | "
                     f"{shipped_accuracy(r)} | {f(r['int8_fp32_latency_b1'], '.2f')} | "
                     f"{f(r['int8_fp32_latency_b32'], '.2f')} |")
    return "\n".join(lines)


def shipped_accuracy(row: dict[str, object]) -> str:
    """The first seed's shipped test accuracy, or the mean ± sd where several seeds shipped."""
    if row.get("shipped_seeds", 0) > 1:
        return f"{row['shipped_test_accuracy_mean']:.3f} ± {row['shipped_test_accuracy_sd']:.3f} (n={row['shipped_seeds']})"
    return "—" if row["shipped_test_accuracy"] is None else f"{row['shipped_test_accuracy']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"])
    parser.add_argument("--strategies", nargs="+", default=["linear", "partial"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--name", default="strategies")
    parser.add_argument("--ship-every-seed", action="store_true",
                        help="compress every seed's model, not only the first seed's (the shipped mean over seeds)")
    parser.add_argument("--table", nargs="+", metavar="NAME",
                        help="train nothing: print one table of the rows of these earlier --name runs")
    args = parser.parse_args()
    configure_logging()  # training runs for minutes: show its progress (epochs, activations) as `tlops` does
    if args.table:
        runs = [json.loads((RESULTS / f"{name}.json").read_text()) for name in args.table]
        rows = [{"label_mode": run["label_mode"]} | row for run in runs for row in run["rows"]]
        print(markdown(summary(rows, [e for run in runs for e in run.get("ensembles", [])])))
        return
    params = load_params(args.params, args.overrides)
    work = RESULTS / args.name
    rows: list[dict[str, object]] = []
    ensembles: list[dict[str, object]] = []

    def save() -> list[dict[str, object]]:  # after every row: a stopped benchmark keeps what it measured
        table = summary(rows, ensembles)
        out = {"cpu": cpu_description(), "overrides": args.overrides, "label_mode": params.ingest.label_mode,
               "rows": rows, "ensembles": ensembles, "table": table}
        (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2))
        (RESULTS / f"{args.name}.md").write_text(markdown(table) + "\n")
        return table

    for backbone in args.backbones:
        for strategy in args.strategies:
            pair = []
            for seed in args.seeds:
                pair.append(one(params, backbone, strategy, seed, work / backbone / strategy / str(seed),
                                args.ship_every_seed or seed == min(args.seeds)))
                print(json.dumps(pair[-1]), flush=True)
                rows.append(pair[-1])
                save()
            if len(pair) > 1:
                ensembles.append(ensemble(params, pair))
                print(json.dumps(ensembles[-1]), flush=True)
    print(markdown(save()))


if __name__ == "__main__":
    main()
