"""INT8 vs FP32 in ONNX Runtime: latency ratio at batch 1 and 32, sizes and val accuracy.

Reads a compress stage's output folder (its compress.json names every candidate with its val
accuracy and size; the FP32 model is the export's, found through the compress result) and times
every candidate in this one process with the same threads, rounds interleaved so that a busy
machine slows all candidates alike. Ratios hold across machines of one kind; the INT8 speed-up
depends on the CPU (AVX2 only vs AVX512-VNNI/AMX), so the report records its flags.

    python benchmarks/compression.py --compress outputs/compress --export outputs/export [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from components.models.onnx_io import open_session

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 32)


def cpu_description() -> dict[str, object]:
    """CPU model and the flags that decide INT8 speed (avx2, avx512*, amx*)."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = sorted(f for f in fields.get("flags", "").split() if f == "avx2" or f.startswith(("avx512", "amx")))
    return {"model": fields.get("model name", platform.processor()), "flags": flags}


def time_candidates(models: dict[str, Path], threads: int, rounds: int) -> dict[str, dict[int, float]]:
    """Median ms per session.run for each model and batch size; rounds alternate between models."""
    sessions = {name: open_session(path, threads) for name, path in models.items()}
    shape = [d if isinstance(d, int) else 1 for d in next(iter(sessions.values())).get_inputs()[0].shape[1:]]
    rng = np.random.default_rng(0)
    samples: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCHES} for name in models}
    for batch in BATCHES:
        images = rng.uniform(-1, 1, (batch, *shape)).astype(np.float32)
        for name, session in sessions.items():
            session.run(None, {session.get_inputs()[0].name: images})  # warm-up
        for _ in range(rounds):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {session.get_inputs()[0].name: images})
                samples[name][batch].append((time.perf_counter() - start) * 1e3)
    return {name: {b: statistics.median(v) for b, v in per.items()} for name, per in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compress", type=Path, default=Path("outputs/compress"), help="the compress stage's folder")
    parser.add_argument("--export", type=Path, default=Path("outputs/export"), help="the export stage's folder")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    report = json.loads((args.compress / "compress.json").read_text())
    models = {}
    for name, entry in report["candidates"].items():
        folder = args.export if name in ("fp32", "pruned") else args.compress
        models[name] = folder / entry["file"]
    latency = time_candidates(models, args.threads, args.rounds)

    candidates = {}
    for name, entry in report["candidates"].items():
        candidates[name] = {
            "size_mb": round(entry["size_mb"], 3),
            "val_accuracy": round(entry["val_accuracy"], 4),
            "val_accuracy_drop": round(report["candidates"]["fp32"]["val_accuracy"] - entry["val_accuracy"], 4),
            **{f"latency_ms_batch{b}": round(latency[name][b], 2) for b in BATCHES},
            **{f"speedup_vs_fp32_batch{b}": round(latency["fp32"][b] / latency[name][b], 3) for b in BATCHES},
            "size_vs_fp32": round(entry["size_mb"] / report["candidates"]["fp32"]["size_mb"], 3),
        }
    result = {
        "cpu": cpu_description(),
        "threads": args.threads,
        "rounds": args.rounds,
        "shipped": report["shipped"],
        "candidates": candidates,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compression.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"cpu: {result['cpu']['model']} {' '.join(result['cpu']['flags'])}; threads {args.threads}; shipped {report['shipped']}")
    print(f"{'candidate':14s} {'MB':>7s} {'val acc':>8s} {'drop':>7s} {'b1 ms':>8s} {'b32 ms':>8s} {'x b1':>6s} {'x b32':>6s}")
    for name, row in candidates.items():
        print(f"{name:14s} {row['size_mb']:7.2f} {row['val_accuracy']:8.4f} {row['val_accuracy_drop']:7.4f} "
              f"{row['latency_ms_batch1']:8.2f} {row['latency_ms_batch32']:8.2f} "
              f"{row['speedup_vs_fp32_batch1']:6.2f} {row['speedup_vs_fp32_batch32']:6.2f}")


if __name__ == "__main__":
    main()
