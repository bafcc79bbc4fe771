"""Training in several processes: DistributedDataParallel, launched through torch.distributed.run.

`finetune.full.processes: N > 1` trains `full` in N processes instead of one. The finetune stage (this
process) writes what the processes need into a folder beside the resume files (`<train_state>/ddp-<key>/`:
the config, the manifest, where the cached features are), starts

    python -m torch.distributed.run --standalone --nproc-per-node N -m components.training.ddp <folder>

and waits. Each process joins the group (gloo on CPU, NCCL on CUDA, one GPU each), builds the same
`Context` with its rank and runs the strategy's own `train` with `Replicas(rank, N)`
(components/training/replicas.py: the sampler, the wrapped model, the shared scores). Rank 0 alone
writes: the per-epoch resume file (so a killed run resumes as a one-process run does), the epochs so
far (which this process follows, to draw progress and call `on_epoch`), and the trained result, which
the stage reads back and publishes exactly as it publishes a one-process result; the stage, not the
processes, reports to the tracker. The processes on the stage's machine exit when the stage's process dies.

Several machines: torch.distributed.run also reads its options from `PET_*` environment variables, so
`PET_NNODES=2 PET_RDZV_BACKEND=c10d PET_RDZV_ENDPOINT=host:29400 PET_RDZV_ID=tlops` in the environment
of the stage makes its launcher join that rendezvous instead of a standalone one; each other machine
runs the same command on the same folder (shared storage), see docs/scaling.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from components.core.errors import UserError
from components.core.progress import no_progress
from components.core.result import atomic_path, write_json
from components.data.manifest import Dataset
from components.training.config import FinetuneConfig
from components.training.context import Context
from components.training.loop import Trained
from components.training.replicas import Replicas
from components.training.strategies import STRATEGIES

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.pkl"
PROGRESS_FILE = "epochs.json"
RESULT_FILE = "trained.pt"
ERROR_FILE = "error.txt"
USER_ERROR_EXIT = 3  # a rank that stopped on bad input, its message in ERROR_FILE
# torch.distributed.run options that, set in the environment, describe a rendezvous across machines.
MULTI_NODE_ENV = ("PET_NNODES", "PET_RDZV_ENDPOINT")


def processes(cfg: FinetuneConfig, strategy: str) -> int:
    """The training processes `strategy` runs in (1 for a strategy that has no `processes` key)."""
    return int(getattr(getattr(cfg, strategy, None), "processes", 1))


def startable(cuda: bool) -> tuple[int, str]:
    """How many training processes this machine can start, and what limits it: one per GPU, or one per CPU core."""
    if cuda:
        return torch.cuda.device_count(), "CUDA devices"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, "CPU cores"


def check_processes(cfg: FinetuneConfig, strategy: str, cuda: bool) -> None:
    """Refuse more training processes than this machine can start, before any work."""
    wanted = processes(cfg, strategy)
    if wanted == 1:
        return
    limit, what = startable(cuda)
    if wanted > limit:
        raise UserError(f"finetune.{strategy}.processes={wanted}: this machine can start {limit} training processes "
                        f"(one per {what.removesuffix('s')}, {limit} {what}); lower it, or start the others on more "
                        f"machines with torch.distributed.run (docs/scaling.md)")


def train(strategy: str, ctx: Context, world: int) -> Trained:
    """`strategy` trained by `world` processes under torch.distributed.run; rank 0's result, as one process returns it."""
    check_processes(ctx.cfg, strategy, ctx.placement.device.type == "cuda")
    _, fingerprint = ctx.resume(strategy, getattr(ctx.cfg, strategy))
    folder = ctx.state_dir / f"ddp-{fingerprint[:16]}"
    for stale in (PROGRESS_FILE, RESULT_FILE, ERROR_FILE):
        (folder / stale).unlink(missing_ok=True)
    write_spec(folder, strategy, ctx, world)
    rendezvous = [] if any(os.environ.get(name) for name in MULTI_NODE_ENV) else ["--standalone"]
    command = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc-per-node", str(world),
               "-m", "components.training.ddp", str(folder)]
    log.info("finetune %s in %d processes (%s): %s", strategy, world,
             "NCCL" if ctx.placement.device.type == "cuda" else "gloo", " ".join(command))
    launcher = subprocess.Popen(command, start_new_session=True)
    try:
        follow(launcher, folder, ctx, getattr(ctx.cfg, strategy).epochs, f"finetune {strategy} x{world}")
    except BaseException:
        stop(launcher)
        raise
    if launcher.returncode != 0:
        if (folder / ERROR_FILE).exists():
            raise UserError((folder / ERROR_FILE).read_text().strip())
        raise RuntimeError(f"finetune {strategy}: the {world} training processes failed (torch.distributed.run exited "
                           f"{launcher.returncode}); their tracebacks are in the log above")
    trained: Trained = torch.load(folder / RESULT_FILE, weights_only=False)  # written by rank 0 of this launch
    shutil.rmtree(folder, ignore_errors=True)
    trained.info["processes"] = world
    return trained


def write_spec(folder: Path, strategy: str, ctx: Context, world: int) -> None:
    """What every process needs to build the stage's `Context`: paths and settings, never arrays or models."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / MANIFEST_FILE) as partial:
        ctx.dataset.manifest.to_pickle(partial)
    write_json(folder / SPEC_FILE, {
        "strategy": strategy, "world": world, "config": ctx.cfg.model_dump(mode="json"), "backbone": ctx.entry.name,
        "features_dir": str(ctx.features_dir), "root": str(ctx.dataset.root), "labels": list(ctx.dataset.labels),
        "target": ctx.dataset.target, "orders": ctx.orders, "values": ctx.values,
        "cache_dir": str(ctx.cache_dir), "state_dir": str(ctx.state_dir), "opset": ctx.opset, "atol": ctx.atol,
        "int8_recipe": ctx.int8_recipe.as_dict() if ctx.int8_recipe is not None else None,
        "stage_pid": os.getpid(), "stage_host": socket.gethostname(),
    })


def follow(launcher: subprocess.Popen, folder: Path, ctx: Context, epochs: int, desc: str) -> None:
    """Wait for the processes, drawing each epoch rank 0 reports and handing it to `ctx.on_epoch` (which may stop them)."""
    seen = 0
    with ctx.progress(total=epochs, desc=desc, unit="epoch") as bar:
        while True:
            done = launcher.poll() is not None
            try:
                history = json.loads((folder / PROGRESS_FILE).read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                history = []
            for entry in history[seen:]:
                bar.update(1)
                if ctx.on_epoch is not None:
                    ctx.on_epoch(int(entry["epoch"]), entry)
            seen = max(seen, len(history))
            if done:
                return
            time.sleep(0.5)


def stop(launcher: subprocess.Popen) -> None:
    """End the launcher and the processes it started (they share its session)."""
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGTERM)
        try:
            launcher.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def exit_with_stage(spec: dict[str, object]) -> None:
    """A rank on the stage's machine stops once the stage's process is gone (even killed by SIGKILL): nothing is left
    to collect its result, and a rerun must not race it for the resume file. Its launcher then exits too."""
    if spec["stage_host"] != socket.gethostname():
        return
    pid = int(spec["stage_pid"])

    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # alive, another user's: cannot be the stage
                pass
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="exit-with-stage").start()


def context_from_spec(folder: Path, replicas: Replicas, on_epoch: Callable[[int, dict[str, float]], None]) -> Context:
    from components.models.int8_recipe import Recipe

    spec = json.loads((folder / SPEC_FILE).read_text())
    dataset = Dataset(manifest=pd.read_pickle(folder / MANIFEST_FILE), root=Path(spec["root"]),
                      labels=tuple(spec["labels"]), target=spec["target"])
    recipe = Recipe(**spec["int8_recipe"]) if spec["int8_recipe"] is not None else None
    return Context(FinetuneConfig.model_validate(spec["config"]), spec["backbone"], Path(spec["features_dir"]), dataset,
                   Path(spec["cache_dir"]), Path(spec["state_dir"]), spec["opset"], spec["atol"],
                   progress=no_progress, on_epoch=on_epoch, int8_recipe=recipe, orders=spec["orders"], replicas=replicas,
                   values=spec["values"])


def main(argv: list[str]) -> int:
    """One training process, as torch.distributed.run starts it: `python -m components.training.ddp FOLDER`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s rank%(rank)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    rank, world, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    old_factory = logging.getLogRecordFactory()

    def with_rank(*args, **kwargs):  # the log record factory's signature
        record = old_factory(*args, **kwargs)
        record.rank = rank
        return record

    logging.setLogRecordFactory(with_rank)
    folder = Path(argv[0])
    spec = json.loads((folder / SPEC_FILE).read_text())
    exit_with_stage(spec)
    cuda = torch.cuda.is_available() and spec["config"]["device"] in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    replicas = Replicas(rank, world)

    def report(epoch: int, entry: dict[str, float]) -> None:
        if replicas.writer:
            with atomic_path(folder / PROGRESS_FILE) as partial:
                done = json.loads((folder / PROGRESS_FILE).read_text()) if (folder / PROGRESS_FILE).exists() else []
                partial.write_text(json.dumps([*done, entry]))

    try:
        trained = STRATEGIES[spec["strategy"]].train(context_from_spec(folder, replicas, report))
    except UserError as error:  # every rank checks the same inputs, so every rank stops here
        if replicas.writer:
            (folder / ERROR_FILE).write_text(f"{error}\n")
        return USER_ERROR_EXIT
    if replicas.writer:  # the strategy hands its network back on the CPU
        with atomic_path(folder / RESULT_FILE) as partial:
            torch.save(trained, partial)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
