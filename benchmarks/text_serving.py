"""Text serving on loopback: `tlops serve` against `mlflow models serve` on BBC News articles.

In one run:

- **the model**: BBC News (`ingest.source: bbcnews`, a seeded subset) through the real stages: ingest,
  validate, features (`all_minilm_l6_v2` at `--max-length` tokens), `linear` finetune, export and
  compress, which writes the dynamically quantized INT8 file (what ships when it is within the accuracy
  budget) beside the FP32 one. Each file (`--models`) is registered with `log_model` in a temporary
  MLflow sqlite store and served by both servers.
- **throughput and latency**: one real test-split article per request (tlops: `{"texts": [text]}`;
  mlflow: `/invocations` with a `text` column), at each concurrency, the servers and the in-process
  baselines taking turns in rotating rounds (`benchmarks/serving.py`, whose load generator, checks and
  memory readings this reuses). Every answer is checked against ONNX Runtime's own scoring of that
  text alone (the pipeline's `predict_frame` at batch 1): the same label, and probabilities within
  1e-4 (FP32) or `--int8-tolerance` (INT8, whose activations are quantized per call over the whole
  batch, so a text's probabilities move with the texts `tlops serve` batches it with). The baseline
  is ONNX Runtime in this process on the same texts with the serving session settings, tokenizing
  and running at batch 1 and at `max_batch`.
- **batch company** (INT8, and FP32 as the control): each test text scored alone and inside a batch of
  `--company` texts drawn from the test split, `--company-repeats` times each; max and 99th-percentile
  |Δp| over the classes, and how many labels change. Twice: whole articles among whole articles (what
  the throughput run sends) and texts of mixed lengths (a title, 8 to 64 words, or whole) among mixed.

    python -m benchmarks.text_serving [--texts 400] [--models fp32 int8] [--concurrency 1 8 32]
                                      [--requests 320] [--rounds 4]   # writes benchmarks/results/text_serving.json
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from benchmarks.serving import (
    Baseline,
    Reference,
    add_load_arguments,
    cpu_description,
    load_average,
    measure,
    mlflow_workdir,
    register,
    servers,
    settings_report,
    started,
    write_results,
)
from components.data.config import IngestConfig, ValidateConfig
from components.data.ingest import run as ingest
from components.data.manifest import Dataset, read_manifest
from components.data.tokenization import encode
from components.data.validate import run as validate
from components.features.config import FeaturesConfig
from components.features.extract import run as features
from components.models.onnx_io import predict_frame, softmax
from components.packaging.compress import run as compress
from components.packaging.config import CompressConfig, ExportConfig
from components.packaging.export import run as export
from components.serving.served_model import LoadedModel, ModelSource, load_onnx
from components.training.config import FinetuneConfig, LinearConfig
from components.training.finetune import run as finetune

ENCODER = "all_minilm_l6_v2"
FP32_TOLERANCE = 1e-4


def build_models(work: Path, texts: int, max_length: int) -> tuple[Dataset, dict[str, Path], dict[str, object]]:
    """The validated BBC subset, the exported FP32 and compressed INT8 files, and what compress decided."""
    ingest(IngestConfig(source="bbcnews", limit=texts, seed=3, test_fraction=0.5, val_fraction=0.25), work / "ingest")
    validate(ValidateConfig(on_invalid="exclude", min_per_class_split=1), work / "ingest" / "manifest.csv",
             work / "ingest", work / "validate")
    dataset = read_manifest(work / "validate" / "manifest.csv", root=work / "ingest")
    folders = {name: work / name for name in ("cache", "features", "finetune", "state", "export", "compress")}
    features(FeaturesConfig(taps=("pooled",), max_length=max_length), (ENCODER,), dataset, folders["cache"],
             folders["features"])
    finetune(FinetuneConfig(strategy="linear", linear=LinearConfig(taps=("pooled",))), ENCODER, folders["features"],
             dataset, dataset.root / "manifest.csv", folders["finetune"], folders["cache"], folders["state"])
    exported = export(ExportConfig(), 0.0, folders["finetune"] / "model.pt", dataset, folders["export"],
                      features_dir=folders["features"])
    compressed = compress(CompressConfig(latency_runs=1), folders["export"], dataset, folders["compress"])
    return dataset, {"fp32": exported.artifacts["fp32"], "int8": compressed.artifacts["int8"]}, compressed.info


def text_references(model_path: Path, dataset: Dataset, frame: pd.DataFrame, tolerance: float) -> list[Reference]:
    """Each text of `frame` with the pipeline's own scoring of it alone (batch 1: no other text in the call)."""
    probabilities = softmax(predict_frame(model_path, dataset, frame, batch_size=1).astype(np.float64))
    references = []
    for path, row in zip(frame["path"], probabilities, strict=True):
        text = dataset.image_path(path).read_text(encoding="utf-8")
        references.append(Reference(text.encode("utf-8"), text, dataset.labels[int(row.argmax())],
                                    dict(zip(dataset.labels, map(float, row), strict=True)), tolerance))
    return references


def in_process(model: LoadedModel, texts: list[str], batch_size: int, total: int) -> float:
    """Seconds ONNX Runtime in this process takes to tokenize and score `total` of `texts`, `batch_size` per call."""
    calls = max(1, total // batch_size)
    batches = [[texts[(call * batch_size + i) % len(texts)] for i in range(batch_size)] for call in range(calls)]
    model.probabilities(batches[0])
    began = time.perf_counter()
    for batch in batches:
        model.probabilities(batch)
    return (time.perf_counter() - began) * total / (calls * batch_size)


def tokenizing_ms(model: LoadedModel, texts: list[str]) -> dict[str, float]:
    """What tokenizing costs per text, alone and in a batch of 16 (a part of every request's work)."""
    began = time.perf_counter()
    for text in texts:
        encode(model.tokenizer, [text])
    alone = time.perf_counter() - began
    began = time.perf_counter()
    for start in range(0, len(texts), 16):
        encode(model.tokenizer, texts[start : start + 16])
    return {"alone": round(1e3 * alone / len(texts), 3), "batch_16": round(1e3 * (time.perf_counter() - began) / len(texts), 3)}


def shortened(text: str, rng: random.Random) -> str:
    """The article's title (its first line), its first 8 to 64 words, or all of it."""
    cut = rng.choice(["title", 8, 16, 32, 64, "whole"])
    if cut == "title":
        return text.strip().splitlines()[0]
    return text if cut == "whole" else " ".join(text.split()[:cut])


def batch_company(model: LoadedModel, texts: list[str], company: int, repeats: int, mixed: bool,
                  seed: int = 0) -> dict[str, float]:
    """How far each text's probabilities move between being scored alone and inside `company` others."""
    rng = random.Random(seed)
    subjects = [shortened(text, rng) for text in texts] if mixed else texts
    alone = np.vstack([model.probabilities([text]) for text in subjects])
    moves, changed = [], 0
    for _ in range(repeats):
        for index, text in enumerate(subjects):
            others = [shortened(other, rng) if mixed else other for other in rng.sample(texts, company - 1)]
            position = rng.randrange(company)
            row = model.probabilities([*others[:position], text, *others[position:]])[position]
            moves.append(float(np.abs(row - alone[index]).max()))
            changed += int(row.argmax() != alone[index].argmax())
    def figure(value: float) -> float:  # three significant digits: FP32's moves are rounding, around 1e-7
        return float(f"{value:.3g}")

    return {"texts": len(subjects), "batches": len(moves), "batch_size": company, "max_abs_delta_p": figure(max(moves)),
            "p99_abs_delta_p": figure(float(np.percentile(moves, 99))), "median_abs_delta_p": figure(float(np.median(moves))),
            "labels_changed": changed}


def bench_model(args: argparse.Namespace, work: Path, env: dict[str, str], name: str, path: Path, dataset: Dataset,
                frame: pd.DataFrame) -> dict[str, object]:
    refs = text_references(path, dataset, frame, FP32_TOLERANCE if name == "fp32" else args.int8_tolerance)
    texts = [ref.value for ref in refs]
    model = load_onnx(path, ModelSource(str(path), name), args.num_threads)
    baselines: dict[str, Baseline] = {f"onnxruntime_batch{size}": functools.partial(in_process, model, texts, size)
                                      for size in (1, args.max_batch)}
    # Articles run to a few thousand characters; the limit only has to let the longest through.
    setup = servers(args, register(path, f"tlops-bench-text-{name}"), 1.0, "text")
    with started(setup, env, work, name) as processes:
        report = {"model": name, "tolerance": refs[0].tolerance} | measure(args, setup, processes, refs, baselines, name)
    report["tokenizing_ms_per_text"] = tokenizing_ms(model, texts)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=400, help="BBC News articles ingested (half of them the test split)")
    parser.add_argument("--max-length", type=int, default=128, help="features.max_length: tokens per text")
    parser.add_argument("--models", nargs="+", choices=["fp32", "int8"], default=["fp32", "int8"])
    parser.add_argument("--int8-tolerance", type=float, default=0.2,
                        help="how far an INT8 answer's probabilities may be from the text scored alone")
    parser.add_argument("--company", type=int, default=16, help="batch size of the batch-company measurement")
    parser.add_argument("--company-repeats", type=int, default=2, help="batches each test text is scored in")
    add_load_arguments(parser)
    args = parser.parse_args()

    began = time.perf_counter()
    load_before = load_average()
    with mlflow_workdir("tlops-bench-text-serving-") as (work, env):
        dataset, paths, compressed = build_models(work, args.texts, args.max_length)
        frame = dataset.split("test")
        texts = [dataset.image_path(path).read_text(encoding="utf-8") for path in frame["path"]]
        company = {}
        for name, path in paths.items():
            model = load_onnx(path, ModelSource(str(path), name), args.num_threads)
            company[name] = {kind: batch_company(model, texts, args.company, args.company_repeats if name == "int8" else 1,
                                                 mixed=kind == "mixed_lengths")
                             for kind in ("whole_articles", "mixed_lengths")}
            print(name, "batch company", company[name], f"load {os.getloadavg()}", flush=True)
        mlflow.set_experiment("text-serving-benchmark")
        models = {}
        for name in args.models:
            load = load_average()
            models[name] = bench_model(args, work, env, name, paths[name], dataset, frame)
            models[name]["load_average_before_after"] = [load, load_average()]

    write_results({
        "command": "python -m benchmarks.text_serving " + " ".join(sys.argv[1:]),
        "cpu": cpu_description(),
        "load_average_before_after": [load_before, load_average()],
        "minutes": round((time.perf_counter() - began) / 60, 1),
        "model": f"{ENCODER} (mean pooling) + linear head at {args.max_length} tokens, trained on BBC News; "
                 f"one test-split article per request",
        "dataset": {split: int(count) for split, count in dataset.manifest["split"].value_counts().items()},
        "compress": compressed,
        **settings_report(args),
        "batch_company": company,
        "models": models,
    }, "text_serving.json")


if __name__ == "__main__":
    main()
