"""Channel vs unstructured pruning of a fine-tuned EfficientNet-Lite on real ELPV cells.

Builds a small real run in `--work` (ingest `--cells` cells, features and a `--strategy` finetune
of Lite0 at `--size` px), then, from that checkpoint: channel pruning at each `--ratios` with
recovery fine-tuning, and unstructured magnitude pruning at `--sparsity`. Every variant is
exported to ONNX (checker + parity vs torch) and timed in this one process at batch 1 and 32
with the same threads, rounds interleaved (benchmarks/compression.py's `time_candidates`), so
the latency ratios compare. Params and MACs are torch-pruning's counts.

    python benchmarks/pruning.py --work benchmarks/results/prune-bench --cells 300 --size 128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.compression import BATCHES, RESULTS, cpu_description, time_candidates
from components.data.config import IngestConfig
from components.data.ingest import run as ingest_run
from components.data.manifest import read_manifest
from components.data.preprocess import Preprocessing
from components.features import extract as features
from components.features.config import FeaturesConfig
from components.models.classifier import build_model, load_checkpoint
from components.models.onnx_export import export_onnx
from components.packaging.budget import onnx_accuracy
from components.packaging.compress import zipped_mb
from components.packaging.config import ChannelPruning
from components.packaging.export import check_parity, model_metadata, parity_images
from components.packaging.pruning import macs_and_params, prune_and_recover, prune_model
from components.training import finetune
from components.training.config import FinetuneConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the small run's outputs and models")
    parser.add_argument("--cells", type=int, default=300)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--strategy", default="linear", choices=["linear", "partial", "full"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--recovery-epochs", type=int, default=4)
    parser.add_argument("--recovery-lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    work = args.work
    if not (work / "data" / "manifest.csv").exists():
        ingest_run(IngestConfig(limit=args.cells, seed=7), work / "data")
    dataset = read_manifest(work / "data" / "manifest.csv")
    backbone = "efficientnet_lite0"
    features.run(FeaturesConfig(image_size=args.size, batch_size=32), (backbone,), dataset,
                 work / "feature_cache", work / "features")
    checkpoint_path = work / "finetune" / finetune.CHECKPOINT_FILE
    if not checkpoint_path.exists():
        finetune.run(FinetuneConfig(strategy=args.strategy, device="cpu", precision="fp32"), backbone,
                     work / "features", dataset, work / "data" / "manifest.csv", work / "finetune",
                     work / "feature_cache", work / "state")
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint)
    preprocessing = Preprocessing.of(checkpoint["preprocessing"])
    images = parity_images(dataset, 8, preprocessing)
    example = images[:1]
    import torch

    example_tensor = torch.from_numpy(example)
    metadata = model_metadata(checkpoint, checkpoint_path, 0.0, "")
    models, rows = {}, {}

    def add(name: str, module: torch.nn.Module, extra: dict) -> None:
        path = export_onnx(module, work / "models" / f"{name}.onnx", metadata, args.size, 17)
        check_parity(module, path, images, 1e-4, 0.0 if name == "fp32" else 1e-5)
        macs, params = macs_and_params(module, example_tensor)
        models[name] = path
        rows[name] = {"params": params, "macs": macs, "size_mb": path.stat().st_size / 1e6,
                      "zipped_mb": zipped_mb(path), "val_accuracy_onnx": onnx_accuracy(path, dataset, "val"), **extra}

    add("fp32", model, {})
    for ratio in args.ratios:
        spec = ChannelPruning(ratio, 8, args.recovery_epochs, args.recovery_lr, 32, 2)
        began = time.perf_counter()
        pruned, report = prune_and_recover(model, spec, dataset, preprocessing)
        add(f"channels{ratio:g}", pruned, {"val_accuracy_before_recovery": report.val_accuracy_pruned,
                                           "val_accuracy_recovered": report.val_accuracy_recovered,
                                           "recovery_epochs_run": len(report.recovery_history),
                                           "prune_and_recover_s": time.perf_counter() - began})
    add(f"unstructured{args.sparsity:g}", prune_model(model, args.sparsity), {})

    latency = time_candidates(models, args.threads, args.rounds)
    for name, row in rows.items():
        row |= {f"latency_ms_batch{b}": latency[name][b] for b in BATCHES}
        row |= {f"speedup_vs_fp32_batch{b}": latency["fp32"][b] / latency[name][b] for b in BATCHES}
    result = {"cpu": cpu_description(), "threads": args.threads, "rounds": args.rounds, "cells": len(dataset.manifest),
              "val_images": len(dataset.split("val")), "size": args.size, "strategy": args.strategy,
              "finetune_val_accuracy": json.loads((work / "finetune" / "finetune.json").read_text())["best"]["val_accuracy"],
              "variants": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pruning.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"cpu: {result['cpu']['model']} {' '.join(result['cpu']['flags'])}; threads {args.threads}; "
          f"{result['cells']} cells, {result['val_images']} val, {args.size} px, {args.strategy}")
    print(f"{'variant':16s} {'params':>9s} {'MMACs':>7s} {'MB':>6s} {'zip MB':>6s} {'acc pre':>7s} {'acc':>6s} "
          f"{'b1 ms':>7s} {'b32 ms':>7s} {'x b1':>5s} {'x b32':>5s}")
    for name, row in rows.items():
        before = row.get("val_accuracy_before_recovery")
        print(f"{name:16s} {row['params']:9d} {row['macs'] / 1e6:7.1f} {row['size_mb']:6.2f} {row['zipped_mb']:6.2f} "
              f"{'' if before is None else f'{before:.3f}':>7s} {row['val_accuracy_onnx']:6.3f} "
              f"{row['latency_ms_batch1']:7.2f} {row['latency_ms_batch32']:7.1f} "
              f"{row['speedup_vs_fp32_batch1']:5.2f} {row['speedup_vs_fp32_batch32']:5.2f}")


if __name__ == "__main__":
    main()
