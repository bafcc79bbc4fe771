"""ELPV four-class from one trunk: test accuracy, macro-F1 and the binary accuracy the same model gives, per head kind.

Each row is one configuration (a head kind for `label`, with or without the `cell_type` task) trained over
seeds through the same `finetune.run` the pipeline uses, exported to FP32 ONNX and scored on the test split in
ONNX Runtime; the first seed also goes through compress (INT8 under the budget, which counts every task)
and is scored as shipped. The binary accuracy is read from the four-class prediction as ELPV's binary
labels are made (defect probability >= 0.5: p067 and p100 are defective), so it is the same model's.
Everything else (split, backbone, strategy, params) is alike across rows; caches (features, activations)
are shared, so train time is the training itself.

Needs four-class outputs up to `features` (`tlops stage ingest|validate|features|select` with
`--set ingest.label_mode=four_class` and its own `paths.*`, or a `--params` file that says so).

    python -m benchmarks.multitask --params four_class.yaml --name classify --head classify [--cell-type] \
        --seeds 0 1 2 [--ship-every-seed] [--backbone efficientnet_lite1] [--set finetune.class_weights=none ...]
    python -m benchmarks.multitask --table NAME [NAME ...]   # one table from earlier runs' rows

A name's seeds accumulate: a rerun of the same configuration keeps the seeds it already measured (and measures
again only those it is given), so a stopped benchmark resumes and seeds can be added one run at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.feature_extraction import cpu_description
from components.core.result import atomic_path
from components.data.ingest import ELPV_BINARY, ELPV_FOUR_CLASS, declared_orders, declared_values
from components.evaluation import evaluate
from components.models.onnx_io import predict_tasks
from components.packaging import compress, export
from components.training import finetune
from tlops.cli import configure_logging
from tlops.config import load_params
from tlops.stages import selected_backbone, served_views, validated_dataset

RESULTS = Path(__file__).parent / "results"
# four-class label -> binary label, as ingest derives ELPV's binary labels from the same defect probability
BINARY = {ELPV_FOUR_CLASS[level]: ELPV_BINARY[level] for level in ELPV_FOUR_CLASS}


def scores(model: Path, dataset: Any) -> dict[str, float]:
    """Four-class accuracy and macro-F1, the binary accuracy of the same predictions, and cell-type accuracy."""
    test = dataset.split("test")
    outputs = {task.name: (task, logits) for task, logits in predict_tasks(model, dataset, test).items()}
    task, logits = outputs["label"]
    predicted = np.asarray(task.labels)[logits.argmax(axis=1)]
    actual = test["label"].to_numpy()
    metrics = evaluate.classification_metrics(np.asarray(dataset.label_index(test)), logits.argmax(axis=1), dataset.labels)
    result = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
              "binary_accuracy": float(np.mean([BINARY[p] == BINARY[a] for p, a in zip(predicted, actual)]))}
    if "cell_type" in outputs:
        task, logits = outputs["cell_type"]
        result["cell_type_accuracy"] = float(np.mean(np.asarray(task.labels)[logits.argmax(axis=1)] == test["cell_type"]))
    return result


def one(params: Any, backbone: str, seed: int, out: Path, shipped: bool) -> dict[str, object]:
    cfg = params.finetune.model_copy(update={"seed": seed})
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
    fp32 = scores(exported.artifacts["fp32"], dataset)
    row: dict[str, object] = {"seed": seed, "backbone": backbone, "wall_s": wall, "train_s": trained.metrics["train_seconds"],
                              "val_accuracy": trained.metrics["val_accuracy"], **{f"test_{k}": v for k, v in fp32.items()},
                              "calibration": json.loads(trained.artifacts["report"].read_text())["info"].get("calibration")}
    if shipped:
        compressed = compress.run(params.compress, out / "export", dataset, out / "compress")
        ship = scores(out / "compress" / compress.SHIPPED_FILE, dataset)
        row |= {"shipped": compressed.info["shipped"], **{f"shipped_{k}": v for k, v in ship.items()}}
    return row


def summary(name: str, config: dict[str, object], rows: list[dict[str, object]]) -> dict[str, object]:
    def spread(key: str) -> tuple[float, float] | None:
        values = [float(r[key]) for r in rows if key in r]
        if not values:
            return None
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    first = min(rows, key=lambda r: r["seed"])
    return {"name": name, **config, "seeds": [r["seed"] for r in rows],
            **{key: spread(f"test_{key}") for key in ("accuracy", "macro_f1", "binary_accuracy", "cell_type_accuracy")},
            # every seed that went through compress: the shipped model's mean and sd
            **{f"shipped_{key}_seeds": spread(f"shipped_{key}") for key in ("accuracy", "binary_accuracy")},
            "seeds_compressed": sum("shipped" in r for r in rows),
            "train_s": statistics.mean(float(r["train_s"]) for r in rows),
            **{key: first.get(key) for key in ("shipped", "shipped_accuracy", "shipped_binary_accuracy")}}


def markdown(table: list[dict[str, object]]) -> str:
    def pm(value: object) -> str:
        return "—" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}"

    def f(value: object) -> str:
        return "—" if value is None else f"{value:.3f}"

    header = ("| head | tasks | four-class test acc | macro-F1 | binary acc (same model) | cell-type acc | seeds | "
              "train s | shipped (first seed) | shipped four-class / binary | seeds compressed |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        shipped = (f"{pm(r['shipped_accuracy_seeds'])} / {pm(r['shipped_binary_accuracy_seeds'])}"
                   if r.get("seeds_compressed", 1) > 1 else f"{f(r['shipped_accuracy'])} / {f(r['shipped_binary_accuracy'])}")
        lines.append(f"| {r['head']} | {', '.join(r['tasks'])} | {pm(r['accuracy'])} | {pm(r['macro_f1'])} | "
                     f"{pm(r['binary_accuracy'])} | {pm(r['cell_type_accuracy'])} | {len(r['seeds'])} | {r['train_s']:.0f} | "
                     f"{r['shipped'] or '—'} | {shipped} | {r.get('seeds_compressed', 1)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--head", choices=["classify", "ordinal", "regress"], default="classify")
    parser.add_argument("--cell-type", action="store_true", help="also learn the cell_type task from the same trunk")
    parser.add_argument("--backbone", help="default: the one the select stage chose")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--name", default="multitask")
    parser.add_argument("--ship-every-seed", action="store_true",
                        help="compress every seed, not only the first: the shipped model's mean over seeds")
    parser.add_argument("--table", nargs="+", metavar="NAME", help="train nothing: one table of these earlier runs")
    args = parser.parse_args()
    configure_logging()
    if args.table:
        print(markdown([json.loads((RESULTS / f"{name}.json").read_text())["summary"] for name in args.table]))
        return
    tasks = ["label", "cell_type"] if args.cell_type else ["label"]
    overrides = [*args.overrides, f"finetune.tasks=[{', '.join(tasks)}]", f"finetune.head={args.head}"]
    params = load_params(args.params, overrides)
    if params.ingest.label_mode != "four_class":
        raise SystemExit("benchmarks.multitask: needs ELPV four-class outputs (ingest.label_mode=four_class)")
    backbone = args.backbone or selected_backbone(params)
    config = {"head": args.head, "tasks": tasks, "backbone": backbone, "overrides": overrides,
              "strategy": params.finetune.strategy}
    # A run of the same name and configuration keeps its measured seeds: a stopped benchmark resumes, and seeds
    # can be added one at a time (`--seeds 1`, later `--seeds 2`); another configuration under the name is refused.
    earlier = RESULTS / f"{args.name}.json"
    rows: list[dict[str, object]] = []
    if earlier.exists():
        document = json.loads(earlier.read_text())
        if document["config"] != config:
            raise SystemExit(f"benchmarks.multitask: {earlier} holds another configuration ({document['config']}); "
                             "choose another --name or remove it")
        rows = [row for row in document["rows"] if row["seed"] not in args.seeds]
    first = min([*args.seeds, *(int(row["seed"]) for row in rows)])
    for seed in args.seeds:  # at least one: --seeds takes one or more
        rows.append(one(params, backbone, seed, RESULTS / args.name / str(seed), args.ship_every_seed or seed == first))
        print(json.dumps(rows[-1]), flush=True)
        rows.sort(key=lambda row: int(row["seed"]))
        table = summary(args.name, config, rows)  # after every seed: a stopped benchmark keeps what it measured
        with atomic_path(earlier) as partial:
            partial.write_text(json.dumps({"cpu": cpu_description(), "config": config, "rows": rows, "summary": table},
                                          indent=2))
    print(markdown([table]))


if __name__ == "__main__":
    main()
