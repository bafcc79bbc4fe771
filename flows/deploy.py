"""Scheduled retraining: the training flow as a Prefect deployment on a cron schedule and on drift (wiring only).

`tlops deploy` creates (or updates) a deployment of `flows.train.train` on a Prefect server: the
flow's code stays in this checkout (`flow.from_source` on the repo folder), runs go to a `process`
work pool, and a worker started next to the data executes them. A work pool rather than
`flow.serve` because the deployment then lives on the server, not in a terminal: anyone on the
team can trigger, pause or reschedule it in the UI or API, the worker can be restarted without
losing the schedule, the pool caps concurrent retrains, and moving to Docker or Kubernetes later
is a new pool, not new code. `tlops deploy --serve` is the one-process alternative for a single
machine: it registers the same deployment, with the same trigger, and executes its runs itself
until stopped.

Besides the cron schedule the deployment carries `retrain_trigger`: a reactive Prefect trigger on
the drift event about this model (`flows.drift`). Its `within` is `schedule.min_retrain_interval`,
and that is the cooldown. Read from Prefect 3.8.8's server (`prefect/server/events/triggers.py`,
`evaluate`): a reactive trigger with threshold 1 fires on the first matching event, removes its
bucket, and opens the next one from the end of the old one for another `within`; an event
earlier than the open bucket's start is ignored. So the first flagged check after a quiet spell
starts a retrain at once and every flagged check in the following interval starts none; under
continued drift there is at most one retrain per interval, the intervals laid end to end. It is
not an exact cooldown: a retrain fired late in one interval can be followed by one early in the
next. Prefect has no per-automation cooldown, and a guard of our own in the flow would bypass the
automation the team sees and pauses in the UI, so the trigger's windows are what is used.
Redeploying replaces the automation, which starts its windows afresh.

Each run starts from the same params file, so new images in the source (an ImageFolder or CSV
that grew) change ingest's source fingerprint, miss the cache and flow through every stage to a
new registered version, which then meets the champion at the promotion gate (the flow's last stage).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.events import DeploymentEventTrigger
from prefect.events.schemas.automations import Posture

from components.core.errors import UserError
from flows.drift import DRIFT_EVENT, model_resource_id
from flows.train import train
from tlops.config import ScheduleConfig, load_params

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
# The flow a scheduled or drift-started run executes: the whole pipeline, ending in the promotion gate.
ENTRYPOINT = "flows/train.py:train"
FLOW_NAME = "tlops-train"
WORK_POOL_TYPE = "process"  # runs each flow in a subprocess of the worker, in this checkout
HEALTH_TIMEOUT_S = 5.0


class DeployError(UserError):
    """No Prefect server to deploy to, or a schedule Prefect refuses."""


def server_problem(url: str) -> str | None:
    """Why the Prefect API at `url` cannot be used (it does not answer, or answers with an error), or None."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True, httpx_settings={"timeout": HEALTH_TIMEOUT_S}) as client:
        error = client.api_healthcheck()
    if error is None:
        return None
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def api_url() -> str:
    """The Prefect API to deploy to: set, and answering, checked before any work."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError(
            "PREFECT_API_URL is not set: a schedule needs a Prefect server that outlives this command. Start one "
            "with `prefect server start` and run `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`."
        )
    check_server(url)
    return str(url)


def check_server(url: str) -> None:
    problem = server_problem(url)
    if problem:
        raise DeployError(f"PREFECT_API_URL={url}: no Prefect server answers ({problem}); start it "
                          f"(`prefect server start`) or point PREFECT_API_URL at a running one.")


def retrain_trigger(model_name: str, cooldown: timedelta) -> DeploymentEventTrigger:
    """Start the deployment it is attached to on a drift event about `model_name`, at most once per `cooldown`.

    No parameters of its own: the run gets the deployment's, so redeploying with other params
    changes scheduled and drift-started runs alike.
    """
    return DeploymentEventTrigger(
        name=f"retrain {model_name} on drift",
        description=f"{DRIFT_EVENT} about {model_name} starts a retrain; further ones within {cooldown} do not.",
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": model_resource_id(model_name)},
        posture=Posture.Reactive, threshold=1, within=cooldown,
    )


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


def create_deployment(cfg: ScheduleConfig, parameters: dict[str, Any], triggers: list[DeploymentEventTrigger],
                      source: Path = REPO_ROOT, entrypoint: str = ENTRYPOINT) -> UUID:
    """Create or update (same flow and name) the work-pool deployment with its triggers; returns its id."""
    from prefect import flow as prefect_flow

    api_url()
    planned = schedules(cfg)
    ensure_work_pool(cfg.work_pool, cfg.concurrency_limit)
    deployable = prefect_flow.from_source(source=str(source), entrypoint=entrypoint)
    env = forwarded_env()
    return deployable.deploy(
        name=cfg.deployment, work_pool_name=cfg.work_pool, work_queue_name=cfg.work_queue,
        build=False, push=False,  # the code is this checkout, not an image
        schedules=planned, triggers=triggers, parameters=parameters, concurrency_limit=cfg.concurrency_limit,
        job_variables={"env": env} if env else None, tags=["tlops", "retrain"],
        description="Retrain on the current data, register a version, and let the promotion gate decide.",
        print_next_steps=False, ignore_warnings=True,  # its hint suggests .serve; the docstring says why not
    )


def next_steps(cfg: ScheduleConfig, url: str, model_name: str) -> str:
    name = f"{FLOW_NAME}/{cfg.deployment}"
    return "\n".join([
        (f"deployment {name}: cron '{cfg.cron}' ({cfg.timezone}){'' if cfg.active else ', paused'}, "
         f"work pool '{cfg.work_pool}', API {url}"),
        (f"  and on drift: a `tlops drift` check that flags {model_name}'s inputs starts it, at most once per "
         f"{cfg.min_retrain_interval} (schedule.min_retrain_interval), when run with this PREFECT_API_URL"),
        "to execute its runs, keep these running (from this folder, venv active):",
        ("  prefect server start                      # API + UI on http://127.0.0.1:4200, unless PREFECT_API_URL "
         "points at a shared server"),
        f"  prefect worker start --pool {cfg.work_pool}     # picks up scheduled, drift-started and manual runs",
        f"run it now:  prefect deployment run '{name}'",
    ])


def deploy(params_file: str = "params.yaml", overrides: list[str] | None = None, serve: bool = False) -> str:
    """`tlops deploy`: create/update the deployment with its schedule and drift trigger (or, with `serve`,
    serve it in this process). The server is checked first: nothing is created when it does not answer."""
    params = load_params(Path(params_file), overrides or [])
    url = api_url()
    cfg: ScheduleConfig = params.schedule
    model_name = params.register.model_name
    parameters = deployment_parameters(params_file, overrides or [])
    triggers = [retrain_trigger(model_name, cfg.min_retrain_interval)]
    if serve:
        log.info("serving %s on cron '%s' (%s) and on drift against %s; Ctrl-C stops it", cfg.deployment, cfg.cron,
                 cfg.timezone, url)
        train.serve(name=cfg.deployment, schedules=schedules(cfg), triggers=triggers, parameters=parameters,
                    limit=cfg.concurrency_limit, tags=["tlops", "retrain"])
        return "stopped serving"
    create_deployment(cfg, parameters, triggers)
    return next_steps(cfg, url, model_name)
