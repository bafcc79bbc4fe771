"""Scheduled retraining: the training flow as a Prefect deployment on a cron schedule (wiring only).

`tlops deploy` creates (or updates) a deployment on a Prefect server: the flow's code stays in
this checkout (`flow.from_source` on the repo folder), runs go to a `process` work pool, and a
worker started next to the data executes them. A work pool rather than `flow.serve` because the
deployment then lives on the server, not in a terminal: anyone on the team can trigger, pause
or reschedule it in the UI or API, the worker can be restarted without losing the schedule, the
pool caps concurrent retrains, and moving to Docker or Kubernetes later is a new pool, not new
code. `tlops deploy --serve` is the one-process alternative for a single machine: it registers
the same deployment and executes its runs itself until stopped.

Each run starts from the same params file, so new images in the source (an ImageFolder or CSV
that grew) change ingest's source fingerprint, miss the cache and flow through every stage to
a new registered version, which then meets the champion at the promotion gate.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from components.core.errors import UserError
from components.registry import promote
from components.registry.config import PromoteConfig
from flows.train import train
from tlops.config import ScheduleConfig, load_params
from tlops.stages import check_owned, validated_dataset

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
# The flow a scheduled run executes: training, then the promotion gate.
ENTRYPOINT = "flows/deploy.py:retrain"
WORK_POOL_TYPE = "process"  # runs each flow in a subprocess of the worker, in this checkout


class DeployError(UserError):
    """No Prefect server to deploy to, or a schedule Prefect refuses."""


@task(name="promote", cache_policy=NO_CACHE, persist_result=False)  # the champion moves between runs
def promote_stage(cfg: PromoteConfig, model_name: str, version: str, params_file: str,
                  overrides: list[str], out_dir: str) -> dict[str, Any]:
    dataset = validated_dataset(load_params(Path(params_file), overrides))
    check_owned(Path(out_dir))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    result = promote.run(cfg, model_name, version, dataset, Path(out_dir))
    return {"out_dir": str(result.out_dir), "cached": False, **result.info}


@flow(name="tlops-retrain")
def retrain(params_file: str = "params.yaml", overrides: list[str] | None = None,
            promote_config: PromoteConfig = PromoteConfig()) -> dict[str, Any]:
    """Train (ingest ... register), then the champion/challenger gate on the version just registered.

    Once `flows.train.train` ends in the promote stage itself, its decision is returned as is and
    `promote_config` is unused (the params file's `promote` block rules).
    """
    summary = train(params_file=params_file, overrides=overrides)
    if "promote" not in summary:
        register = summary["register"]
        out_dir = str(Path(register["out_dir"]).parent / "promote")
        summary["promote"] = promote_stage(promote_config, register["model_name"], register["version"],
                                           params_file, list(overrides or []), out_dir)
    log.info("promote: %s", summary["promote"]["summary"])
    return summary


def api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError(
            "PREFECT_API_URL is not set: a schedule needs a Prefect server that outlives this command. Start one "
            "with `prefect server start` and run `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`."
        )
    return str(url)


def ensure_work_pool(name: str, concurrency_limit: int) -> None:
    """Create the `process` work pool if the server does not have it yet; an existing one is left as is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=WORK_POOL_TYPE, concurrency_limit=concurrency_limit))
            log.info("created %s work pool %r", WORK_POOL_TYPE, name)


def deployment_parameters(params_file: str, overrides: list[str]) -> dict[str, Any]:
    # The params file is named relative to the checkout: runs execute with the repo as working folder.
    return {"params_file": params_file, "overrides": list(overrides)}


def schedules(cfg: ScheduleConfig) -> list[Any]:
    from prefect.schedules import Cron

    try:
        return [Cron(cfg.cron, timezone=cfg.timezone, active=cfg.active)]
    except ValueError as error:
        raise DeployError(f"schedule.cron: {error}") from None


def forwarded_env() -> dict[str, str]:
    """Where this command's MLflow lives, so scheduled runs register into the same registry."""
    return {key: os.environ[key] for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI") if os.environ.get(key)}


def create_deployment(cfg: ScheduleConfig, parameters: dict[str, Any], source: Path = REPO_ROOT,
                      entrypoint: str = ENTRYPOINT) -> UUID:
    """Create or update (same flow and name) the work-pool deployment; returns its id."""
    from prefect import flow as prefect_flow

    api_url()
    planned = schedules(cfg)
    ensure_work_pool(cfg.work_pool, cfg.concurrency_limit)
    deployable = prefect_flow.from_source(source=str(source), entrypoint=entrypoint)
    env = forwarded_env()
    return deployable.deploy(
        name=cfg.deployment, work_pool_name=cfg.work_pool, work_queue_name=cfg.work_queue,
        build=False, push=False,  # the code is this checkout, not an image
        schedules=planned, parameters=parameters, concurrency_limit=cfg.concurrency_limit,
        job_variables={"env": env} if env else None, tags=["tlops", "retrain"],
        description="Retrain on the current data, register a version, and let the promotion gate decide.",
        print_next_steps=False, ignore_warnings=True,  # its hint suggests .serve; the docstring says why not
    )


def next_steps(cfg: ScheduleConfig, url: str) -> str:
    name = f"tlops-retrain/{cfg.deployment}"
    return "\n".join([
        f"deployment {name}: cron '{cfg.cron}' ({cfg.timezone}){'' if cfg.active else ', paused'}, "
        f"work pool '{cfg.work_pool}', API {url}",
        "to execute its runs, keep these running (from this folder, venv active):",
        "  prefect server start                      # API + UI on http://127.0.0.1:4200, unless PREFECT_API_URL "
        "points at a shared server",
        f"  prefect worker start --pool {cfg.work_pool}     # picks up scheduled and manual runs",
        f"run it now:  prefect deployment run '{name}'",
    ])


def deploy(params_file: str = "params.yaml", overrides: list[str] | None = None, serve: bool = False) -> str:
    """`tlops deploy`: create/update the scheduled deployment (or, with `serve`, serve it in this process)."""
    params = load_params(Path(params_file), overrides or [])
    cfg: ScheduleConfig = params.schedule
    parameters = deployment_parameters(params_file, overrides or [])
    if serve:
        url = api_url()
        log.info("serving %s on cron '%s' (%s) against %s; Ctrl-C stops it", cfg.deployment, cfg.cron, cfg.timezone, url)
        retrain.serve(name=cfg.deployment, schedules=schedules(cfg), parameters=parameters, limit=cfg.concurrency_limit,
                      tags=["tlops", "retrain"])
        return "stopped serving"
    create_deployment(cfg, parameters)
    return next_steps(cfg, api_url())
