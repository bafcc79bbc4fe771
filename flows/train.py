"""The training pipeline as a Prefect flow: one typed task per declared stage, wiring only.

Each task's cache key is `tlops.stages.cache_inputs`: the stage's params, the content
fingerprints of upstream outputs, the hash of its code (the same modules `dvc.yaml` lists, plus
this flow) and the installed library versions. So a rerun with nothing changed replays every
stage from cache, and any change that could alter a result misses. A cache hit whose files were
removed or edited since is detected and recomputed. Only I/O errors are retried; bad data fails
once, at once.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.runtime import flow_run
from prefect.tasks import Task
from pydantic import BaseModel
from tqdm.auto import tqdm

from components.core.errors import UserError
from components.core.result import StageResult, sha256_json
from components.data.ingest import source_fingerprint
from flows.workers import Workers, check_runner, pieces_on_workers, workers_for
from tlops import tracking
from tlops.config import Params, load_params
from tlops.run_state import RunLock, killed_run
from tlops.stages import STAGES, Stage, StageContext, cache_inputs, execute, stage_dir, stage_params
from tlops.tracking import Recorder

log = logging.getLogger(__name__)


class StageRecord(BaseModel):
    """What a stage task returns and Prefect caches: where the result is and its content hash."""

    stage: str
    out_dir: str
    fingerprint: str
    info: dict[str, Any]


def io_errors_only(task: Task, task_run: Any, state: Any) -> bool:
    """Retry connection and file-system hiccups, never bad input (a UserError) or a bug."""
    try:
        state.result()
    except UserError:
        return False
    except (OSError, ConnectionError, TimeoutError):
        return True
    except Exception:  # noqa: BLE001 - anything else is a bug or bad data: no retry
        return False
    return False


def stage_key(context: TaskRunContext, arguments: dict[str, Any]) -> str:
    stage = next(s for s in STAGES if s.name == context.task.name)
    return sha256_json(cache_inputs(arguments["params"], stage, arguments["upstream"]))


def stage_task(stage: Stage) -> Task:
    def run(params: Params, upstream: dict[str, str], run_id: str | None) -> StageRecord:
        progress = partial(tqdm, dynamic_ncols=True, mininterval=1.0)
        result = execute(stage, params, StageContext(progress=progress, run_id=run_id))
        return StageRecord(stage=stage.name, out_dir=str(result.out_dir), fingerprint=result.fingerprint(),
                           info=result.info)

    caching = {"cache_key_fn": stage_key, "persist_result": True} if stage.cached else {"cache_policy": NO_CACHE,
                                                                                         "persist_result": False}
    return task(
        run, name=stage.name, **caching,
        retries=2 if stage.io_bound else 0, retry_delay_seconds=5, retry_condition_fn=io_errors_only,
    )


TASKS = {stage.name: stage_task(stage) for stage in STAGES}


def still_valid(stage: Stage, record: StageRecord) -> bool:
    """A cached record is trusted only while its outputs are on disk unchanged and the stage's own
    check holds (a registration: the version still exists in the registry)."""
    try:
        result = StageResult.load(Path(record.out_dir))
    except (UserError, FileNotFoundError):
        return False
    return result.is_intact() and result.fingerprint() == record.fingerprint and stage.still_valid(result)


def run_stage(stage: Stage, params: Params, upstream: dict[str, str], recorder: Recorder,
              workers: Workers | None = None) -> tuple[StageRecord, bool]:
    """(record, cached) of one stage, recorded in MLflow as it starts and ends (a failed one keeps its report).

    With Dask `workers`, the pieces the stage declares run on them first; the stage then merges what they cached."""
    call = {"params": params, "upstream": dict(upstream), "run_id": recorder.stage_started(stage)}
    try:
        pieces_on_workers(workers, stage, params)
    except Exception:
        recorder.stage_failed(stage, stage_dir(params, stage), stage_params(params, stage))
        raise
    state = TASKS[stage.name](**call, return_state=True)
    if state.is_failed():
        recorder.stage_failed(stage, stage_dir(params, stage), stage_params(params, stage))
    record: StageRecord = state.result()  # re-raises the stage's own error
    cached = state.name == "Cached"
    if cached and not still_valid(stage, record):
        log.warning("%s: cached outputs changed on disk since they were recorded; recomputing", stage.name)
        record = TASKS[stage.name].with_options(refresh_cache=True)(**call)
        cached = False
    recorder.stage_done(stage, StageResult.load(Path(record.out_dir)), stage_params(params, stage), cached)
    return record, cached


@flow(name="tlops-train")
def train(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Ingest -> validate -> features -> select -> finetune -> export -> compress -> evaluate -> register -> promote."""
    params = load_params(Path(params_file), overrides or [])
    tracking.check_tracking_server()
    check_runner(params)  # a Dask scheduler that does not answer, more training processes than fit: one line, now
    summary: dict[str, Any] = {}
    with RunLock(params, "tlops run") as lock, \
            tracking.Recorder(params, "prefect", overrides or [], killed=killed_run(lock)) as recorder, \
            workers_for(params) as workers:
        lock.update(mlflow_run_id=recorder.run_id, prefect_flow_run_id=str(flow_run.get_id()))
        upstream: dict[str, str] = {"source": source_fingerprint(params.ingest)}
        for stage in STAGES:
            record, cached = run_stage(stage, params, upstream, recorder, workers)
            lock.stage_done(stage.name)
            upstream[stage.name] = record.fingerprint
            summary[stage.name] = {"out_dir": record.out_dir, "cached": cached, **record.info}
        summary["parent_run_id"] = recorder.run_id
        summary["replay"] = recorder.replayed()
    return summary
