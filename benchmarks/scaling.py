"""Scaling out: the features stage on 1 and 2 local Dask workers against one process; DDP on 1 and 2 processes.

features  The features stage on the same ELPV images and candidates, each run with an empty feature cache:
          in this process as `tlops stage features` runs it (runner.kind: local), then through prefect-dask
          on a `distributed.LocalCluster` of 1 and of 2 worker processes (the pieces the stage declares, then
          its merge), in the order local, 1 worker, 2 workers, so shared load drifts across all three. Each
          piece's own duration comes from its Prefect task run; with the merge and the serial start-up it
          gives an Amdahl projection for N machines, which is a projection, not a measurement.
ddp       `full` fine-tuning in 1 and in 2 processes at the same global batch: seconds per epoch (median) and
          the final val accuracy and loss curves.
partial   whether DDP would pay for `partial`: one training step of its trained tail (forward and backward
          on cached activations) on the whole batch with 2 threads, against half the batch with 1 thread plus
          an all-reduce of the tail's gradients between two gloo processes; and the whole batch on 1 thread, which
          shows what the second thread gains (on a machine other work keeps busy, it can lose).

    python benchmarks/scaling.py features [--images N] [--candidates a,b,c] [--shard-batches B]
    python benchmarks/scaling.py ddp [--images N] [--image-size S] [--epochs E] [--batch-size B]
    python benchmarks/scaling.py partial

Writes benchmarks/results/scaling-<part>.json (and a picture) and prints the table docs/scaling.md shows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def cpu() -> dict[str, object]:
    from components.core.cpu import describe_cpu

    return {**describe_cpu(), "cores": len(os.sched_getaffinity(0))}


def params_file(root: Path, images: int | None, candidates: list[str], **blocks: dict[str, Any]) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"] = {k: str(root / v) for k, v in params["paths"].items()}
    params["ingest"]["limit"] = images
    params["select"]["candidates"] = candidates
    for block, values in blocks.items():
        params[block].update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def features(args: argparse.Namespace) -> dict[str, Any]:
    """One process, then 1 and 2 local Dask workers, each with an empty cache, on the same validated images."""
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.workers import workers_for
    from tlops.config import load_params
    from tlops.stages import execute, get_stage

    work = Path(tempfile.mkdtemp(prefix="scaling-", dir=RESULTS))
    base = params_file(work, args.images, args.candidates.split(","))
    params = load_params(base)
    for name in ("ingest", "validate"):
        execute(get_stage(name), params)
    stage = get_stage("features")
    runs: dict[str, Any] = {}

    def fresh(name: str, **runner: Any) -> Any:
        overrides = [f"paths.feature_cache={work / name / 'cache'}", f"paths.features={work / name / 'features'}",
                     *(f"runner.{k}={v}" for k, v in runner.items())]
        return load_params(base, overrides)

    load = os.getloadavg()[0]
    started = time.perf_counter()
    execute(stage, fresh("local"))
    runs["local"] = {"seconds": time.perf_counter() - started, "load_average_at_start": load}
    print(f"one process: {runs['local']['seconds']:.1f} s", flush=True)

    @flow(name="scaling-benchmark")
    def on_workers(workers: int) -> dict[str, float]:
        p = fresh(f"dask{workers}", kind="dask", workers=workers, shard_batches=args.shard_batches)
        times: dict[str, float] = {"load_average_at_start": os.getloadavg()[0]}
        began = time.perf_counter()
        with workers_for(p) as pool:
            assert pool is not None
            pool.runner.client.wait_for_workers(workers)  # the cluster's start-up, timed on its own
            times["cluster_start"] = time.perf_counter() - began
            mark = time.perf_counter()
            pool.run_pieces(stage, p)
            times["pieces"] = time.perf_counter() - mark
            mark = time.perf_counter()
        times["cluster_stop"] = time.perf_counter() - mark  # the workers' shutdown, timed on its own too
        mark = time.perf_counter()
        execute(stage, p)  # the merge: every entry is cached by now
        times["merge"] = time.perf_counter() - mark
        times["seconds"] = time.perf_counter() - began
        return times

    with prefect_test_harness(server_startup_timeout=180):
        for workers in (1, 2):
            runs[f"dask{workers}"] = on_workers(workers)
            runs[f"dask{workers}"]["piece_seconds"] = piece_durations(f"dask{workers}")
            print(f"{workers} Dask worker(s): {runs[f'dask{workers}']['seconds']:.1f} s "
                  f"({runs[f'dask{workers}']})", flush=True)
    for name in ("dask1", "dask2"):
        runs[name]["speedup_vs_local"] = runs["local"]["seconds"] / runs[name]["seconds"]
    runs["dask2"]["speedup_vs_dask1"] = runs["dask1"]["seconds"] / runs["dask2"]["seconds"]
    n_images = len(load_params(base).select.candidates) * len(__import__("pandas").read_csv(
        work / "outputs/validate/manifest.csv"))
    return {"images_x_backbones": n_images, "shard_batches": args.shard_batches, "runs": runs,
            "projection": amdahl(runs["dask1"]), "cpu": cpu(), "command": " ".join(sys.argv)}


def piece_durations(flow_marker: str) -> dict[str, list[float]]:
    """Each piece's run time, from its Prefect task run (the benchmark's last flow run), by wave."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (latest,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=None)),
                                          sort=FlowRunSort.START_TIME_DESC, limit=1)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [latest.id]}))
    waves: dict[str, list[float]] = {}
    for run in task_runs:
        if run.name.startswith("features-") and run.total_run_time:
            waves.setdefault(run.name.split("-")[1], []).append(run.total_run_time.total_seconds())
    return waves


def amdahl(one_worker: dict[str, Any]) -> dict[str, Any]:
    """T(N) = serial + parallel / N from one worker's run (one worker holds all the cores: a piece's time is one
    machine's): the chunk pieces spread over N machines; the trunk pieces (one per backbone) only up to the number
    of backbones. Serial: the cluster's start and stop, the merge, and the dispatch (the pieces' wall time beyond
    their own run times: Prefect's task states, Dask's scheduling), counted serial although part of it overlaps."""
    chunks = sum(one_worker["piece_seconds"].get("chunks", []))
    trunks = one_worker["piece_seconds"].get("trunks", [])
    dispatch = max(0.0, one_worker["pieces"] - sum(trunks) - chunks)
    serial = one_worker["cluster_start"] + one_worker["cluster_stop"] + one_worker["merge"] + dispatch
    total_1 = serial + sum(trunks) + chunks
    rows = []
    for machines in (1, 2, 4, 8, 16, 32, 64):
        trunk_time = sum(trunks) / min(machines, max(len(trunks), 1)) if trunks else 0.0
        seconds = serial + trunk_time + chunks / machines
        rows.append({"machines": machines, "seconds": seconds, "speedup": total_1 / seconds})
    return {"serial_seconds": serial, "dispatch_seconds": dispatch, "trunk_seconds": sum(trunks), "chunk_seconds": chunks,
            "parallel_fraction": (sum(trunks) + chunks) / total_1, "rows": rows}


def ddp(args: argparse.Namespace) -> dict[str, Any]:
    """`full` in 1 and 2 processes (same global batch) through the finetune stage, on the same features."""
    from tlops.config import load_params
    from tlops.stages import execute, get_stage

    work = Path(tempfile.mkdtemp(prefix="ddp-", dir=RESULTS))
    full = {"epochs": args.epochs, "batch_size": args.batch_size, "patience": args.epochs, "workers": 0}
    base = params_file(work, args.images, ["efficientnet_lite0"], features={"image_size": args.image_size},
                       finetune={"strategy": "full"})
    params = load_params(base)
    for name in ("ingest", "validate", "features", "select"):
        execute(get_stage(name), params)
    import torch

    runs: dict[Any, Any] = {}
    # 1 process on all cores (as `tlops` trains), 2 processes of one thread each, then 1 process on one thread:
    # the last says how much of a difference is the second thread's (on a busy machine it can cost, not gain).
    for run, processes, threads in ((1, 1, torch.get_num_threads()), (2, 2, 1), ("1x1thread", 1, 1)):
        p = load_params(base, [f"finetune.full={json.dumps({**full, 'processes': processes})}",
                               f"paths.finetune={work / f'finetune{run}'}", f"paths.train_state={work / f'state{run}'}"])
        before = torch.get_num_threads()
        torch.set_num_threads(threads if processes == 1 else before)  # the 2 processes set their own (1 each)
        load = os.getloadavg()[0]
        began = time.perf_counter()
        execute(get_stage("finetune"), p)
        wall = time.perf_counter() - began
        torch.set_num_threads(before)
        history = json.loads((work / f"finetune{run}" / "history.json").read_text())
        epochs = [b["seconds"] - a["seconds"] for a, b in zip([{"seconds": 0.0}, *history], history)]
        runs[run] = {"processes": processes, "threads_per_process": threads, "load_average_at_start": load,
                     "wall_seconds": wall, "epoch_seconds": epochs, "median_epoch_seconds": statistics.median(epochs),
                     "final_val_accuracy": history[-1]["val_accuracy"], "best_val_accuracy":
                     max(h["val_accuracy"] for h in history), "history": history}
        print(f"{processes} process(es) x {threads} thread(s): {statistics.median(epochs):.1f} s/epoch, final val "
              f"accuracy {history[-1]['val_accuracy']:.4f} (load {load:.1f})", flush=True)
    one, two = runs[1]["history"], runs[2]["history"]
    curve = {key: max(abs(a[key] - b[key]) for a, b in zip(one, two)) for key in ("train_loss", "val_loss", "val_accuracy")}
    plot_curves(one, two, RESULTS / "scaling-ddp.png")
    return {"images": args.images, "image_size": args.image_size, "global_batch": args.batch_size,
            "runs": runs, "epoch_speedup": runs[1]["median_epoch_seconds"] / runs[2]["median_epoch_seconds"],
            "epoch_speedup_vs_one_thread": runs["1x1thread"]["median_epoch_seconds"] / runs[2]["median_epoch_seconds"],
            "max_curve_difference": curve, "cpu": cpu(), "command": " ".join(sys.argv)}


def plot_curves(one: list[dict[str, float]], two: list[dict[str, float]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    loss, accuracy = figure.subplots(1, 2)
    for history, label in ((one, "1 process"), (two, "2 processes (DDP, gloo)")):
        epochs = [h["epoch"] for h in history]
        loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label=f"train, {label}")
        loss.plot(epochs, [h["val_loss"] for h in history], marker="x", linestyle="--", label=f"val, {label}")
        accuracy.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label=label)
    loss.set(xlabel="epoch", ylabel="cross-entropy", title="full fine-tuning, same global batch")
    accuracy.set(xlabel="epoch", ylabel="val accuracy")
    loss.legend(fontsize=7)
    accuracy.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def tail_step_seconds(batch: int) -> float:
    """Median seconds of one forward and backward of partial's tail (Lite0, last 5 blocks, 224 px) on `batch`
    cached activations; in DistributedDataParallel when this process is a rank of torch.distributed.run."""
    import torch
    from torch import nn

    from components.models.backbones import build_classifier
    from components.models.registry import get_entry
    from components.models.trunk_parts import FrozenPart, TrainedTail

    model = build_classifier(get_entry("efficientnet_lite0"))
    tail: nn.Module = TrainedTail(model, 5, nn.Linear(model.num_features, 2), 0.2)
    if "RANK" in os.environ:  # wrapped as the epoch loop would wrap it (components/training/replicas.py)
        from components.training.replicas import Replicas

        torch.distributed.init_process_group("gloo")
        trained = [p for group in tail.layer_groups() for p in group]
        tail = Replicas(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])).wrap(tail, trained)
    with torch.no_grad():
        x = FrozenPart(model, 5)(torch.zeros(1, 3, 224, 224))
    x, y = x.repeat(batch, 1, 1, 1), torch.zeros(batch, dtype=torch.long)
    times = []
    for _ in range(12):
        began = time.perf_counter()
        nn.functional.cross_entropy(tail(x), y).backward()
        times.append(time.perf_counter() - began)
    return statistics.median(times[2:])


def partial(args: argparse.Namespace) -> dict[str, Any]:
    """A training step of partial's tail (Lite0, 5 blocks, 224 px): one process with 2 threads vs 2 gloo processes."""
    import torch

    torch.set_num_threads(1)  # the same batch on one thread: what two threads gain (or lose, on a loaded machine)
    one_thread = tail_step_seconds(args.batch_size)
    torch.set_num_threads(2)
    one = tail_step_seconds(args.batch_size)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__)), "partial-rank", str(args.batch_size // 2)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, check=True)
    two = float(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("STEP")))
    print(f"partial tail step, batch {args.batch_size}: 1 process x 2 threads {one * 1000:.0f} ms, "
          f"2 processes x 1 thread (DDP) {two * 1000:.0f} ms -> {one / two:.2f}x; "
          f"1 process x 1 thread {one_thread * 1000:.0f} ms", flush=True)
    return {"batch": args.batch_size, "one_process_ms": one * 1000, "two_processes_ms": two * 1000,
            "one_process_one_thread_ms": one_thread * 1000, "speedup": one / two, "cpu": cpu(), "command": " ".join(sys.argv)}


def main() -> None:
    if sys.argv[1:2] == ["partial-rank"]:  # a rank of `partial`, started by torch.distributed.run
        seconds = tail_step_seconds(int(sys.argv[2]))
        if os.environ["RANK"] == "0":
            print("STEP", seconds)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["features", "ddp", "partial"])
    parser.add_argument("--images", type=int, default=None, help="stratified ELPV subset (default: all 2,624)")
    parser.add_argument("--candidates", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    parser.add_argument("--shard-batches", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Prefect's state stays under benchmarks/results, and its server does not phone home (offline: an error).
    os.environ.setdefault("PREFECT_HOME", str(RESULTS / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    load = os.getloadavg()  # other work on the machine: the figures are only as quiet as it was
    result = {"features": features, "ddp": ddp, "partial": partial}[args.part](args)
    result["load_average"] = {"start": load, "end": os.getloadavg()}
    out = RESULTS / f"scaling-{args.part}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"written {out}")


if __name__ == "__main__":
    main()
