"""Feature extraction on ELPV with EfficientNet-Lite0: ONNX Runtime pipeline vs torch eager, cache cold vs warm.

Both paths decode, preprocess and run the same frozen trunk on the same images in the same
process, so the ratios hold on any machine; absolute images/s depend on it.

    python benchmarks/feature_extraction.py [--images N] [--backbone NAME]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from components.backbones import build_trunk, get_entry
from components.features import FeaturesConfig, run
from components.ingest import IngestConfig
from components.ingest import run as ingest
from components.manifest import Dataset, read_manifest
from components.preprocess import load_batch

RESULTS = Path(__file__).parent / "results"


def torch_eager(dataset: Dataset, backbone: str, batch_size: int) -> float:
    entry = get_entry(backbone)
    trunk = build_trunk(entry)
    paths = [dataset.image_path(p) for p in dataset.manifest["path"]]
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            trunk(torch.from_numpy(load_batch(paths[start : start + batch_size], entry.preprocessing())))
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="stratified subset size (default: all 2,624)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ingest(IngestConfig(limit=args.images), work / "data")
        dataset = read_manifest(work / "data" / "manifest.csv")
        cfg = FeaturesConfig(batch_size=args.batch_size)

        started = time.perf_counter()
        cold = run(cfg, (args.backbone,), dataset, work / "cache", work / "cold")
        cold_s = time.perf_counter() - started
        started = time.perf_counter()
        run(cfg, (args.backbone,), dataset, work / "cache", work / "warm")
        warm_s = time.perf_counter() - started
        onnx_ips = cold.metrics[f"{args.backbone}.images_per_s"]
        eager_ips = torch_eager(dataset, args.backbone, args.batch_size)

    report = {
        "backbone": args.backbone,
        "images": len(dataset.manifest),
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_images_per_s": round(onnx_ips, 1),
        "torch_eager_images_per_s": round(eager_ips, 1),
        "onnxruntime_vs_torch_eager": round(onnx_ips / eager_ips, 2),
        "cold_stage_s (export + extract)": round(cold_s, 2),
        "warm_stage_s (all cached)": round(warm_s, 2),
        "warm_vs_cold_time": round(warm_s / cold_s, 4),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "feature_extraction.json").write_text(json.dumps(report, indent=2) + "\n")
    for key, value in report.items():
        print(f"{key:36s} {value}")


if __name__ == "__main__":
    main()
