"""Dask workers for the work that parallelises: prefect-dask's task runner, the tasks it runs, the checks before any work.

With `runner.kind: dask`, the pieces a stage declares (`Stage.fan_out` in tlops/stages.py: feature chunks per
backbone, LogME per candidate) and `tlops tune`'s trials run as Prefect tasks on Dask workers, through
prefect-dask's `DaskTaskRunner`: on the scheduler at `runner.address`, or on a `distributed.LocalCluster` of
`runner.workers` processes started for the run (only once a piece needs computing). Tasks carry params, paths
and fingerprints, never arrays or models; what they compute lands in the content-addressed caches every
worker reads (the same folders: shared storage across machines).

Every task carries the sha256 of each source file of the work it runs, and the versions of the libraries tlops
runs on: a worker whose copy differs refuses the task in one line before computing anything. A worker lost
mid-task has its tasks rescheduled on the others by the Dask scheduler; a piece computed twice writes equal
cache entries (atomically).

Workers report their task runs to this run's Prefect API: the configured one, or the run's temporary local
server (a worker process would otherwise start a server of its own for every task). Nothing here imports Dask
unless `runner.kind` is `dask`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from components.core.errors import UserError
from tlops.config import Params, RunnerConfig
from tlops.fingerprints import ROOT, library_versions

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner

    from tlops.stages import Stage

log = logging.getLogger(__name__)

WIRING = ("flows/workers.py",)  # this module runs every piece: part of what each task expects


def expected_code(files: tuple[str, ...]) -> dict[str, Any]:
    """What a task expects of the worker that runs it: each source file's sha256 and the library versions."""
    import hashlib

    return {"files": {name: hashlib.sha256((ROOT / name).read_bytes()).hexdigest() for name in sorted(files)},
            "libraries": dict(library_versions())}


def check_code(expected: dict[str, Any]) -> None:
    """Refuse to run a task on a worker whose tlops (or a library it runs on) is not the client's."""
    here = expected_code(tuple(expected["files"]))
    if here == expected:
        return
    changed = [name for name, digest in expected["files"].items() if here["files"][name] != digest]
    libraries = [f"{name} {expected['libraries'].get(name)} (here {version})"
                 for name, version in here["libraries"].items() if expected["libraries"].get(name) != version]
    what = f"{changed[0]} differs" if changed else f"libraries differ: {', '.join(libraries[:3])}"
    raise UserError(f"Dask worker {worker_name()} runs other tlops code than the client ({what}, in {ROOT}); start the "
                    f"workers from the client's commit and image (docs/scaling.md), then run again.")


def worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def shard_files(stage: Stage) -> tuple[str, ...]:
    from tlops.stages import TRAINING_FLOW

    return tuple(sorted(set(stage.modules()) | {TRAINING_FLOW, *WIRING}))


@task(name="shard", cache_policy=NO_CACHE, persist_result=False, task_run_name="{stage}-{wave}-{key}")
def run_shard(stage: str, wave: str, key: str, arguments: dict[str, Any], params: Params,
              expected: dict[str, Any]) -> str:
    """One piece of a stage on a worker; its fingerprint."""
    from tlops.stages import get_stage

    check_code(expected)
    declared = next(w for w in get_stage(stage).fan_out if w.name == wave)
    return declared.run(params, arguments)


class Workers:
    """The run's Dask workers, as the flows use them: map a stage's pieces, submit tasks."""

    def __init__(self, runner: DaskTaskRunner, cfg: RunnerConfig):
        self.runner, self.cfg = runner, cfg

    def piece_params(self, params: Params) -> Params:
        """The params a piece runs with: on a local cluster, ONNX Runtime's `features.num_threads: 0` (all cores)
        becomes each worker's share of this machine's cores (thread counts never change a vector)."""
        if self.cfg.address is not None or params.features.num_threads:
            return params
        share = max(1, (os.cpu_count() or 1) // self.cfg.workers)
        return params.model_copy(update={"features": params.features.model_copy(update={"num_threads": share})})

    def run_pieces(self, stage: Stage, params: Params) -> dict[str, str]:
        """Every piece `stage` declares and still lacks, wave after wave; their fingerprints by piece."""
        done: dict[str, str] = {}
        expected = expected_code(shard_files(stage))
        for wave in stage.fan_out:
            planned = wave.plan(params, done)
            if not planned:
                continue
            log.info("%s: %d %s pieces on Dask workers", stage.name, len(planned), wave.name)
            futures = {key: self.runner.submit(run_shard, {
                "stage": stage.name, "wave": wave.name, "key": key, "arguments": arguments,
                "params": self.piece_params(params), "expected": expected}) for key, arguments in planned.items()}
            done |= {key: future.result() for key, future in futures.items()}
        return done


def task_runner(cfg: RunnerConfig) -> DaskTaskRunner:
    from prefect_dask import DaskTaskRunner

    # Dask's own loggers speak INFO for every connection; a run's log says what tlops does (warnings still show).
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if cfg.address is not None:
        return DaskTaskRunner(address=cfg.address)
    threads = str(max(1, (os.cpu_count() or 1) // cfg.workers))
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": cfg.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
        # torch's threads in each worker: its share of the cores, not all of them
        "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
    })


@contextmanager
def workers_for(params: Params) -> Iterator[Workers | None]:
    """The run's workers (None for runner.kind: local), started on first use and stopped when the block ends."""
    if params.runner.kind != "dask":
        yield None
        return
    with prefect_api_for_workers(), task_runner(params.runner) as runner:
        yield Workers(runner, params.runner)


@contextmanager
def prefect_api_for_workers() -> Iterator[None]:
    """Make this run's Prefect API the one workers report to (a configured server, or this run's temporary one)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the process's temporary server: the one this flow already talks to
    server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


def check_runner(params: Params) -> None:
    """What can be checked before any work: the scheduler answers and has workers; the training processes fit."""
    if params.runner.kind == "dask" and params.runner.address is not None:
        check_scheduler(params.runner.address, params.runner.connect_seconds)
    if params.finetune.full.processes > 1 and params.finetune.strategy in ("full", "auto"):
        from components.core import devices
        from components.training import ddp

        placement = devices.resolve(params.finetune.device, params.finetune.precision)
        ddp.check_processes(params.finetune, "full", placement.device.type == "cuda")


def check_scheduler(address: str, seconds: float) -> None:
    """One line, before any work, when nothing usable answers at `address`."""
    from distributed import Client

    try:
        with Client(address, timeout=f"{seconds}s", set_as_default=False) as client:
            try:
                client.wait_for_workers(1, timeout=seconds)
            except TimeoutError:
                raise UserError(f"runner.address {address}: the Dask scheduler there has no workers (waited "
                                f"{seconds:g} s); start workers (`dask worker {address}`) or set runner.address: null "
                                f"for a local cluster") from None
    except OSError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"runner.address {address}: no Dask scheduler answers ({reason}); start one "
                        f"(docs/scaling.md), check the address, or set runner.address: null for a local cluster "
                        f"of runner.workers processes") from None


def pieces_on_workers(workers: Workers | None, stage: Stage, params: Params) -> None:
    """A stage's pieces on the workers before the stage itself runs (nothing when there are no workers)."""
    if workers is not None and stage.fan_out:
        workers.run_pieces(stage, params)
