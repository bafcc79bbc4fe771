"""Feature extraction on ELPV: ONNX Runtime vs torch eager on the same trunk, cache cold vs warm.

Both runtimes go through the same loop (`features.decode_ahead`: the next batch decodes on a
thread while this one runs), on the same images, with the same preprocessing, in the same
process, and neither writes the cache, so their ratio measures the runtime alone. The features
stage itself (which also writes the cache) is timed cold and warm. Absolute images/s depend on
the machine; the CPU and its vector extensions are recorded with the figures.

    python benchmarks/feature_extraction.py [--images N] [--backbone NAME] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from components.data.config import IngestConfig
from components.data.ingest import run as ingest
from components.data.manifest import read_manifest
from components.data.preprocess import Preprocessing, load_batch
from components.features.cache import FeatureStore
from components.features.config import FeaturesConfig
from components.features.extract import decode_ahead, run, space_key
from components.models.backbones import build_trunk
from components.models.onnx_io import open_session
from components.models.registry import get_entry

RESULTS = Path(__file__).parent / "results"


def cpu_description() -> dict[str, object]:
    """Model name and the vector extensions that decide fp32/int8 speed (x86 Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {"model": platform.processor(), "flags": []}

    def field(name: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(name)), "")

    flags = sorted(f for f in field("flags").split() if f.startswith(("avx2", "avx512", "amx", "fma")))
    return {"model": field("model name"), "flags": flags}


def throughput(paths: list[Path], preprocessing: Preprocessing, batch_size: int,
               infer: Callable[[np.ndarray], object]) -> float:
    """Images/s of decode + preprocess + `infer`, decoding the next batch while this one infers."""
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    infer(load_batch(batches[0], preprocessing))  # warm-up: first-call allocations, lazy init
    started = time.perf_counter()
    for _, images in decode_ahead(batches, lambda batch: load_batch(batch, preprocessing)):
        infer(images)
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="stratified subset size (default: all 2,624)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per runtime; the best counts")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ingest(IngestConfig(limit=args.images), work / "data")
        dataset = read_manifest(work / "data" / "manifest.csv")
        cfg = FeaturesConfig(batch_size=args.batch_size)
        entry = get_entry(args.backbone)

        started = time.perf_counter()
        cold = run(cfg, (args.backbone,), dataset, work / "cache", work / "cold")
        cold_s = time.perf_counter() - started
        started = time.perf_counter()
        run(cfg, (args.backbone,), dataset, work / "cache", work / "warm")
        warm_s = time.perf_counter() - started

        # The trunk the stage exported and verified, against the torch trunk it came from.
        session = open_session(FeatureStore(work / "cache" / entry.name, space_key(entry, cfg)).trunk_path)
        trunk = build_trunk(entry, cfg.taps)
        paths = [dataset.image_path(p) for p in dataset.manifest["path"]]
        preprocessing = entry.preprocessing(cfg.image_size)

        def onnx_runtime(images: np.ndarray) -> object:
            return session.run(list(cfg.taps), {"image": images})

        def torch_eager(images: np.ndarray) -> object:
            with torch.inference_mode():
                return trunk(torch.from_numpy(images))

        best = {"onnxruntime": 0.0, "torch_eager": 0.0}
        for _ in range(args.repeats):  # alternate, so a noisy neighbour slows both rather than one
            for name, infer in (("onnxruntime", onnx_runtime), ("torch_eager", torch_eager)):
                best[name] = max(best[name], throughput(paths, preprocessing, args.batch_size, infer))

    report = {
        "backbone": args.backbone,
        "images": len(dataset.manifest),
        "input_size": preprocessing.input_size,
        "batch_size": args.batch_size,
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_threads": "all cores (intra_op_num_threads=0)",
        "onnxruntime_images_per_s": round(best["onnxruntime"], 1),
        "torch_eager_images_per_s": round(best["torch_eager"], 1),
        "onnxruntime_vs_torch_eager": round(best["onnxruntime"] / best["torch_eager"], 2),
        "features_stage_images_per_s (cold, writes cache)": round(cold.metrics[f"{args.backbone}.images_per_s"], 1),
        "cold_stage_s (export + verify + extract)": round(cold_s, 2),
        "warm_stage_s (all cached)": round(warm_s, 2),
        "warm_vs_cold_time": round(warm_s / cold_s, 4),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "feature_extraction.json").write_text(json.dumps(report, indent=2) + "\n")
    for key, value in report.items():
        print(f"{key:50s} {value}")


if __name__ == "__main__":
    main()
