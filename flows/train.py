"""The training pipeline as a Prefect flow: one task per stage, wiring only.

Each task's cache key is the content of what the stage depends on (its params, the
fingerprints of upstream outputs, the code version), the same things DVC hashes, so a rerun
with nothing changed replays every stage from cache in seconds. A cache hit whose files have
been removed or edited since is detected and recomputed.
"""

from __future__ import annotations

import hashlib
import logging
from functools import partial
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.context import TaskRunContext
from tqdm.auto import tqdm

import components
import tlops
from components.ingest import source_fingerprint
from components.result import StageResult, sha256_json
from tlops import tracking
from tlops.config import build, load_params
from tlops.stages import ORDER, STAGES, run_register, stage_dir, stage_params

log = logging.getLogger(__name__)

IO_BOUND = {"ingest", "register"}  # retried: they copy files or talk to a tracking server


def code_version() -> str:
    """Hash of the pipeline's source: any code change invalidates cached stages."""
    digest = hashlib.sha256()
    for package in (components, tlops):
        for path in sorted(Path(package.__file__).parent.rglob("*.py")):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def content_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return sha256_json(parameters["cache_inputs"])


@task(cache_key_fn=content_key, persist_result=True)
def run_stage(stage: str, params: dict[str, Any], cache_inputs: dict[str, Any], parent_run_id: str) -> dict[str, Any]:
    """Run one stage; returns where its result lives and its content fingerprint.

    Only `cache_inputs` enters the cache key; `params` and `parent_run_id` are what the run needs.
    """
    progress = partial(tqdm, dynamic_ncols=True, mininterval=1.0)
    resolved = build(params)
    if stage == "register":
        result = run_register(resolved, progress, parent_run_id)
    else:
        result = STAGES[stage](resolved, progress)
    return {"out_dir": str(result.out_dir), "fingerprint": result.fingerprint(), "info": result.info}


def still_valid(stage: str, record: dict[str, Any]) -> bool:
    """A cached record is only trusted while its outputs are still on disk unchanged."""
    try:
        result = StageResult.load(Path(record["out_dir"]))
    except FileNotFoundError:
        return False
    if not result.is_intact() or result.fingerprint() != record["fingerprint"]:
        return False
    return stage != "register" or tracking.version_exists(result.info["model_name"], result.info["version"])


@flow(name="tlops-train")
def train(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Ingest -> validate -> features -> select -> finetune -> export -> compress -> evaluate -> register."""
    params = load_params(Path(params_file), overrides or [])
    code = code_version()
    upstream: dict[str, str] = {"source": source_fingerprint(params.ingest)}
    summary: dict[str, Any] = {}
    with tracking.pipeline_run(params, runner="prefect") as parent_run_id:
        for stage in ORDER:
            inputs = {"stage": stage, "params": stage_params(params, stage), "paths": params.to_dict()["paths"],
                      "upstream": dict(upstream), "code": code}
            if stage == "register":
                inputs["tracking_uri"] = tracking.mlflow.get_tracking_uri()
            task_run = run_stage.with_options(name=stage, retries=2 if stage in IO_BOUND else 0, retry_delay_seconds=5)
            call = {"stage": stage, "params": params.to_dict(), "cache_inputs": inputs,
                    "parent_run_id": parent_run_id}
            state = task_run(**call, return_state=True)
            if state.is_failed():
                # Keep what the stage reported (e.g. the GX data docs of a failed validation) in MLflow.
                tracking.log_failed_stage(params, parent_run_id, stage, stage_dir(params, stage), stage_params(params, stage))
            record = state.result()  # re-raises the stage's own error
            cached = state.name == "Cached"
            if cached and not still_valid(stage, record):
                log.warning("%s: cached outputs changed on disk since they were recorded; recomputing", stage)
                record = task_run.with_options(refresh_cache=True)(**call)
                cached = False
            if stage != "register":
                tracking.log_stage(params, parent_run_id, StageResult.load(Path(record["out_dir"])),
                                   stage_params(params, stage), cached, runner="prefect")
            upstream[stage] = record["fingerprint"]
            summary[stage] = {"out_dir": record["out_dir"], "cached": cached, **record["info"]}
        tracking.summarize_pipeline(params, parent_run_id)
        summary["parent_run_id"] = parent_run_id
    return summary
