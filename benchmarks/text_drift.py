"""Drift on text: false alarms and detection on real BBC News articles, through `drift.run` as `tlops drift` calls it.

A subset of `--pool` articles is ingested, validated and embedded by the features stage (all-MiniLM-L6-v2,
mean pooling, `--max-length` tokens); the train split is the reference. False alarms: `--splits` batches
of held-out (val + test) articles per batch size, drawn at random and drawn in the train split's topic mix. Detection: held-out articles of one topic each,
the in-distribution batch with its words shuffled, and the docstrings of Python modules (another source).
Cost: a check whose texts are all cached, and one that embeds new texts (then the same again, cached).

    python benchmarks/text_drift.py [--pool 600] [--max-length 128] [--splits 40] [--batch-sizes 25 50]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.feature_extraction import cpu_description
from components.data.config import IngestConfig, ValidateConfig
from components.data.ingest import run as ingest
from components.data.manifest import read_manifest
from components.data.validate import run as validate
from components.features.config import FeaturesConfig
from components.features.extract import run as features
from components.monitoring import drift
from components.monitoring.config import DriftConfig

ENCODER = "all_minilm_l6_v2"
MODULES = ("argparse", "base64", "bisect", "collections", "csv", "datetime", "decimal", "fractions", "functools",
           "gzip", "hashlib", "heapq", "inspect", "itertools", "json", "logging", "os", "pickle", "random", "re",
           "shutil", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "uuid",
           "zipfile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=600)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--splits", type=int, default=40)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/text_drift.json"))
    args = parser.parse_args()
    cfg = DriftConfig(backbone=ENCODER)
    feature_cfg = FeaturesConfig(taps=("pooled",), max_length=args.max_length)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        ingest(IngestConfig(source="bbcnews", limit=args.pool, seed=0), root / "ingest")
        validate(ValidateConfig(on_invalid="exclude"), root / "ingest/manifest.csv", root / "ingest", root / "validate")
        dataset = read_manifest(root / "validate/manifest.csv", root=root / "ingest")
        started = time.perf_counter()
        features(feature_cfg, (ENCODER,), dataset, root / "cache", root / "features")
        feature_seconds = time.perf_counter() - started
        reference = drift.split_reference(dataset, root / "features", ENCODER, "pooled")
        held_out = dataset.manifest[dataset.manifest["split"] != "train"].reset_index(drop=True)
        texts = [dataset.image_path(p).read_text(encoding="utf-8") for p in held_out["path"]]

        def check(batch: list[str], name: str) -> dict[str, float]:
            path = root / f"{name}.csv"
            pd.DataFrame({"text": batch}).to_csv(path, index=False)
            started = time.perf_counter()
            result = drift.run(cfg, reference, path, root / "drift", features_cfg=feature_cfg,
                               cache_dir=root / "cache")
            return {**result.metrics, "seconds": time.perf_counter() - started}

        rng = np.random.default_rng(0)
        shares = dataset.split("train")["label"].value_counts(normalize=True)
        by_topic = {label: np.flatnonzero(held_out["label"].to_numpy() == label) for label in shares.index}

        def in_mix(size: int) -> np.ndarray:
            """Held-out rows in the train split's topic mix (what a random batch only approaches)."""
            return np.concatenate([rng.choice(by_topic[label], round(share * size), replace=False)
                                   for label, share in shares.items()])

        false_alarms: dict[str, dict[str, float]] = {}
        draws = {"random": lambda size: rng.choice(len(texts), size, replace=False), "train mix": in_mix}
        for (how, draw), size in [(d, size) for d in draws.items() for size in args.batch_sizes]:
            runs = [check([texts[i] for i in draw(size)], "calm") for _ in range(args.splits)]
            false_alarms[f"{how}, {size}"] = {
                "flagged": sum(r["flagged"] for r in runs), "splits": len(runs),
                "mmd_p_below_0.1": float(np.mean([r["p_value"] < 0.1 for r in runs])),
                "classifier_p_below_0.1": float(np.mean([r["auc_p_value"] < 0.1 for r in runs])),
                "seconds_per_check": float(np.mean([r["seconds"] for r in runs]))}
            print(how, size, false_alarms[f"{how}, {size}"], flush=True)
        calm = [texts[i] for i in rng.choice(len(texts), 50, replace=False)]
        words = random.Random(0)
        batches = {f"topic {label} only": [t for t, lab in zip(texts, held_out["label"]) if lab == label][:50]
                   for label in sorted(held_out["label"].unique())}
        batches["50 held-out, words shuffled"] = [" ".join(words.sample(t.split(), len(t.split()))) for t in calm]
        batches["Python module docstrings"] = [inspect.getdoc(importlib.import_module(m)) for m in MODULES]
        detection = {}
        for name, batch in batches.items():
            detection[name] = {"n": len(batch), **check(batch, "shifted")}
            print(name, detection[name], flush=True)
        again = check(batches["50 held-out, words shuffled"], "again")
    report = {"cpu": cpu_description(), "pool": args.pool, "max_length": args.max_length,
              "n_reference": len(reference.embeddings), "n_held_out": len(texts),
              "topics": pd.crosstab(dataset.manifest["label"], dataset.manifest["split"]).to_dict(),
              "features_seconds": feature_seconds, "features_texts": len(dataset.manifest.drop_duplicates("sha256")),
              "false_alarms": false_alarms, "detection": detection,
              "cached_again": {"n_computed": again["n_computed"], "seconds": again["seconds"]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float))
    print(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
