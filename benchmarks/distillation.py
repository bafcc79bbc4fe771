"""Distillation on real ELPV cells: a Lite2 partial teacher into a Lite0 partial student, with and without it.

Reuses (or builds) a small run in `--work`: ingest `--cells` cells, features of both backbones at
`--size` px, the teacher's partial finetune, then the student's partial finetune twice (alpha 0
and `--alpha`) and a third distilled run with another seed, whose teacher pass must be all
cache hits. Reports val accuracies and the teacher's cost: computed once, then read.

    python benchmarks/distillation.py --work benchmarks/results/distill-bench --cells 300 --size 128
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.compression import RESULTS, cpu_description
from components.data.config import IngestConfig
from components.data.ingest import run as ingest_run
from components.data.manifest import read_manifest
from components.features import extract as features
from components.features.config import FeaturesConfig
from components.training import finetune
from components.training.config import FinetuneConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--cells", type=int, default=300)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--teacher", default="efficientnet_lite2")
    parser.add_argument("--student", default="efficientnet_lite0")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=4.0)
    args = parser.parse_args()

    work = args.work
    manifest = work / "data" / "manifest.csv"
    if not manifest.exists():
        ingest_run(IngestConfig(limit=args.cells, seed=7), work / "data")
    dataset = read_manifest(manifest)
    features.run(FeaturesConfig(image_size=args.size, batch_size=32), (args.teacher, args.student), dataset,
                 work / "cache", work / "features")
    partial = {"epochs": args.epochs, "views": args.views, "batch_size": 32}

    def train(name: str, backbone: str, seed: int = 0, **distill: object) -> dict:
        out = work / name
        if not (out / "finetune.json").exists():
            cfg = FinetuneConfig.model_validate({"strategy": "partial", "device": "cpu", "precision": "fp32",
                                                          "seed": seed, "partial": partial, "distill": distill})
            finetune.run(cfg, backbone, work / "features", dataset, manifest, out, work / "cache", work / "state")
        report = json.loads((out / "finetune.json").read_text())
        return {"val_accuracy": report["best"]["val_accuracy"], "val_loss": report["best"]["val_loss"],
                "epochs_run": len(json.loads((out / "history.json").read_text())), **report["info"].get("distill", {})}

    runs = {"teacher": train("teacher", args.teacher),
            "student_plain": train("student_plain", args.student)}
    teacher = str(work / "teacher" / finetune.CHECKPOINT_FILE)
    runs["student_distilled"] = train("student_distilled", args.student, teacher=teacher, alpha=args.alpha,
                                      temperature=args.temperature)
    runs["student_distilled_seed1"] = train("student_distilled_seed1", args.student, seed=1, teacher=teacher,
                                            alpha=args.alpha, temperature=args.temperature)
    runs["student_plain_seed1"] = train("student_plain_seed1", args.student, seed=1)
    result = {"cpu": cpu_description(), "cells": len(dataset.manifest), "val_images": len(dataset.split("val")),
              "size": args.size, "views": args.views, "epochs": args.epochs, "alpha": args.alpha,
              "temperature": args.temperature, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distillation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
