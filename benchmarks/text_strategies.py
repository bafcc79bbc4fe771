"""Text encoder x strategy on BBC News through the pipeline's own stages: test accuracy and macro-F1, the TF-IDF
reference beside them, FP32 vs INT8 (accuracy, latency at batch 1 and 32), and the time of every stage.

Runs `params.text.yaml` (plus `--set` overrides) in a project folder of its own under benchmarks/results: ingest and
validate once, then for each encoder the features stage with `select.candidates: [encoder]` (the embedding, paid
once: the feature cache is shared by every run), and for each strategy select, finetune, export, compress and
evaluate, exactly as `tlops run --params params.text.yaml --set select.candidates=[encoder] --set
finetune.strategy=<strategy>` runs them. The negative-transfer guard is left on: what it says is recorded per row.
Every candidate compress made (FP32, INT8) is also scored on test, so FP32 and INT8 are compared on the same texts;
the shipped model's figures are evaluate's. The TF-IDF reference is the guard's own (features, classifier and the C
it chose on val), refitted on train and scored on test.

    python -m benchmarks.text_strategies --encoders all_minilm_l6_v2 all_minilm_l6_v2_cls --strategies linear partial \
        [--full all_minilm_l6_v2] [--set finetune.partial.epochs=4 ...] [--name text-strategies]

Writes benchmarks/results/<name>.json after every row (a stopped run keeps what it measured) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from components.core.cpu import describe_cpu
from tlops.cli import configure_logging
from tlops.config import Params, load_params
from tlops.stages import execute, get_stage, labelled_dataset

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def project_params(params_path: Path, work: Path, overrides: list[str]) -> tuple[Path, list[str]]:
    """The params file with every path moved under `work` (the feature cache shared by all runs)."""
    raw = yaml.safe_load(params_path.read_text())
    raw["paths"] = {key: str(work / value) for key, value in raw["paths"].items()}
    path = work / "params.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path, overrides


def timed(name: str, params: Params, times: dict[str, float]) -> Any:
    began = time.perf_counter()
    result = execute(get_stage(name), params)
    times[name] = time.perf_counter() - began
    print(f"  {name}: {times[name]:.1f} s", flush=True)
    return result


def tfidf_on_test(params: Params) -> dict[str, Any]:
    """The guard's TF-IDF reference (its vectorizer, classifier and C chosen on val), scored on test."""
    from components.evaluation.evaluate import classification_metrics
    from components.training import reference

    dataset = labelled_dataset(params)
    cfg = params.finetune.guard
    began = time.perf_counter()
    chosen = reference.fit_text_reference(cfg, dataset)
    train_texts, y_train = reference.labelled_texts(dataset, "train")
    test_texts, y_test = reference.labelled_texts(dataset, "test")
    vectorizer = reference.text_vectorizer(cfg, len(train_texts))
    model = reference.fit_classifier(vectorizer.fit_transform(train_texts), y_train, chosen.regularization, cfg.max_iter)
    scored = classification_metrics(y_test, model.predict(vectorizer.transform(test_texts)), dataset.labels)
    return {"kind": chosen.kind, "C": chosen.regularization, "val_accuracy": chosen.val_accuracy,
            "val_macro_f1": chosen.val_macro_f1, "test_accuracy": scored["accuracy"], "test_macro_f1": scored["macro_f1"],
            "n_test": len(y_test), "seconds": time.perf_counter() - began}


def one(base: Path, overrides: list[str], work: Path, encoder: str, strategy: str) -> dict[str, Any]:
    """select .. evaluate for one encoder and strategy, on the features the encoder's own features stage wrote."""
    from components.evaluation import evaluate
    from components.packaging.compress import REPORT_FILE

    out = work / encoder / strategy
    params = load_params(base, [*overrides, f"select.candidates=[{encoder}]", f"finetune.strategy={strategy}",
                                f"paths.features={work / encoder / 'features'}", f"paths.select={work / encoder / 'select'}",
                                *(f"paths.{stage}={out / stage}" for stage in ("finetune", "export", "compress", "evaluate"))])
    load = os.getloadavg()
    times: dict[str, float] = {}
    for stage in ("select", "finetune", "export", "compress", "evaluate"):
        timed(stage, params, times)
    finetuned = json.loads((out / "finetune" / "finetune.json").read_text())
    compressed = json.loads((out / "compress" / REPORT_FILE).read_text())
    evaluated = json.loads((out / "evaluate" / "result.json").read_text())["metrics"]
    ranking = json.loads((work / encoder / "select" / "ranking.json").read_text())
    dataset = labelled_dataset(params)
    candidates: dict[str, Any] = {}
    for name, entry in compressed["candidates"].items():  # every candidate on the same test texts
        path = next(p for p in (out / "compress" / entry["file"], out / "export" / entry["file"]) if p.exists())
        test = evaluate.run(params.evaluate, path, dataset, out / f"test_{name}").metrics
        candidates[name] = {"test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
                            **{k: entry[k] for k in ("val_accuracy", "size_mb", "latency_ms_batch1", "latency_ms_batch32",
                                                     "latency_ratio_fp32_batch1", "latency_ratio_fp32_batch32")}}
    return {"encoder": encoder, "strategy": strategy, "load_average_at_start": load, "stage_seconds": times,
            "logme": ranking["ranking"][0]["logme"], "val_accuracy": finetuned["best"]["val_accuracy"],
            "epochs_run": len(json.loads((out / "finetune" / "history.json").read_text())),
            "negative_transfer": finetuned["negative_transfer"], "reference_val_accuracy": finetuned["reference"]["val_accuracy"],
            "shipped": compressed["shipped"], "shipped_reason": compressed["reason"],
            "latency_threads": compressed["latency_threads"], "test_accuracy": evaluated["accuracy"],
            "test_macro_f1": evaluated["macro_f1"], "candidates": candidates}


def markdown(result: dict[str, Any]) -> str:
    def f(value: Any, spec: str = ".3f") -> str:
        return "—" if value is None else format(value, spec)

    lines = [("| encoder | strategy | val acc | guard | shipped | test acc | test macro-F1 | FP32 test acc | INT8 test acc "
              "| FP32 / INT8 ms, batch 1 | INT8 speed-up b1 | FP32 / INT8 ms, batch 32 | INT8 speed-up b32 |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fp32, int8 = r["candidates"]["fp32"], r["candidates"].get("int8")
        lines.append(
            f"| {r['encoder']} | {r['strategy']} | {r['val_accuracy']:.3f} | "
            f"{'fires' if r['negative_transfer']['fired'] else 'passes'} | {r['shipped']} | {r['test_accuracy']:.3f} | "
            f"{r['test_macro_f1']:.3f} | {fp32['test_accuracy']:.3f} | {f(int8 and int8['test_accuracy'])} | "
            f"{fp32['latency_ms_batch1']:.1f} / {f(int8 and int8['latency_ms_batch1'], '.1f')} | "
            f"{f(int8 and 1 / int8['latency_ratio_fp32_batch1'], '.2f')}x | "
            f"{fp32['latency_ms_batch32']:.0f} / {f(int8 and int8['latency_ms_batch32'], '.0f')} | "
            f"{f(int8 and 1 / int8['latency_ratio_fp32_batch32'], '.2f')}x |")
    if "tfidf" in result:
        t = result["tfidf"]
        lines.append(f"| TF-IDF reference ({t['kind']}, C={t['C']:g}) | — | {t['val_accuracy']:.3f} | — | — | "
                     f"{t['test_accuracy']:.3f} | {t['test_macro_f1']:.3f} | | | | | | |")
    stages = ["select", "finetune", "export", "compress", "evaluate"]
    lines += ["", "| encoder | strategy | " + " | ".join(f"{s} s" for s in stages) + " |", "|---|---|" + "---|" * len(stages)]
    for r in result["rows"]:
        lines.append(f"| {r['encoder']} | {r['strategy']} | " + " | ".join(f"{r['stage_seconds'][s]:.0f}" for s in stages) + " |")
    lines += ["", "shared: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result["shared_seconds"].items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.text.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--encoders", nargs="+", default=["all_minilm_l6_v2", "all_minilm_l6_v2_cls"])
    parser.add_argument("--strategies", nargs="+", default=["linear", "partial"])
    parser.add_argument("--full", nargs="*", default=[], metavar="ENCODER",
                        help="encoders also trained with `full` (every layer: the slowest by far)")
    parser.add_argument("--name", default="text-strategies")
    args = parser.parse_args()
    configure_logging()  # stages run for minutes: show their progress as `tlops` does
    work = RESULTS / args.name  # kept: a rerun finds the feature and activation caches warm
    base, overrides = project_params(args.params, work, args.overrides)
    result: dict[str, Any] = {"cpu": {**describe_cpu(), "cores": len(os.sched_getaffinity(0))},
                              "load_average_at_start": os.getloadavg(), "overrides": args.overrides,
                              "encoders": args.encoders, "strategies": args.strategies, "full": args.full, "shared_seconds": {}, "rows": []}

    def save() -> None:
        (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=str))

    params = load_params(base, overrides)
    for stage in ("ingest", "validate"):
        timed(stage, params, result["shared_seconds"])
    result["tfidf"] = tfidf_on_test(params)
    print(f"TF-IDF reference: test accuracy {result['tfidf']['test_accuracy']:.4f}", flush=True)
    save()
    for encoder in args.encoders:
        features = load_params(base, [*overrides, f"select.candidates=[{encoder}]",
                                      f"paths.features={work / encoder / 'features'}"])
        began = time.perf_counter()
        execute(get_stage("features"), features)
        result["shared_seconds"][f"features {encoder}"] = time.perf_counter() - began
        print(f"features {encoder}: {result['shared_seconds'][f'features {encoder}']:.0f} s", flush=True)
        save()
        for strategy in [*args.strategies, *(["full"] if encoder in args.full else [])]:
            print(f"{encoder} / {strategy}", flush=True)
            result["rows"].append(one(base, overrides, work, encoder, strategy))
            save()
            print(markdown(result), flush=True)
    result["load_average_at_end"] = os.getloadavg()
    save()
    print(markdown(result))


if __name__ == "__main__":
    main()
