"""Drift checks as a Prefect flow, and the event that lets Prefect start a retraining run.

`check_drift` embeds a batch of new images or texts, compares it with the train split's features
(`components.monitoring.drift`), draws the history, and, when the batch is flagged, emits the
Prefect event `tlops.drift.detected` about the resource `tlops.model.<registered model>`.
Retraining is not called from here: `tlops deploy` attaches a trigger on that event to the
training deployment (`flows.deploy.retrain_trigger`), so Prefect's automations decide, the event
stays visible in the UI, and the check and the retraining stay decoupled (one can be redeployed,
paused or rate-limited without touching the other).

An event reaches something that can react only on a Prefect server that outlives the command
(`PREFECT_API_URL`); without one, Prefect runs the flow on a temporary server that stops with it.
`event_listeners` says which automations on the server react, so the CLI can say where the event went.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.events import Event, emit_event

from components.core.result import StageResult
from components.monitoring import drift
from tlops import tracking
from tlops.config import load_params
from tlops.stages import drift_config, validated_dataset

log = logging.getLogger(__name__)

DRIFT_EVENT = "tlops.drift.detected"


def model_resource_id(model_name: str) -> str:
    """The Prefect resource a drift event is about: the registered model whose inputs drifted."""
    return f"tlops.model.{model_name}"


def emit_drift_event(result: StageResult, model_name: str) -> Event | None:
    """Emit `tlops.drift.detected` for a flagged check (None, and nothing emitted, otherwise)."""
    if not result.info["flagged"]:
        return None
    info = result.info
    keys = ("mmd2", "p_value", "auc", "auc_p_value", "n_new", "n_found", drift.inputs_noun(info), "backbone", "tap",
            "batch")
    return emit_event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": model_resource_id(model_name), "prefect.resource.name": model_name},
        payload={"modality": info.get("modality", "image"), **{key: info[key] for key in keys}},
    )


def persistent_api_url() -> str | None:
    """The Prefect API this process talks to, or None when it would start a temporary one."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def event_listeners(event: Event) -> list[str]:
    """The enabled automations on the server that react to `event`, each with the deployment it runs."""
    from prefect.client.orchestration import get_client
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import matches

    listeners = []
    with get_client(sync_client=True) as client:
        for automation in client.read_automations():
            trigger = automation.trigger
            if not (automation.enabled and isinstance(trigger, EventTrigger) and trigger.posture == Posture.Reactive):
                continue
            expected = not trigger.expect or any(matches(name, event.event) for name in trigger.expect)
            if not (expected and trigger.match.matches(event.resource)):
                continue
            for action in automation.actions:
                if isinstance(action, RunDeployment) and action.deployment_id:
                    deployment = client.read_deployment(action.deployment_id)
                    flow_name = client.read_flow(deployment.flow_id).name
                    listeners.append(f"automation '{automation.name}' runs {flow_name}/{deployment.name} "
                                     f"(at most once per {trigger.within})")
    return listeners


@flow(name="tlops-drift")
def check_drift(
    new_data: str,
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    drift_cfg: drift.DriftConfig | None = None,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """Compare `new_data` (new images, or new texts for a text model) with the train split's features; emit the
    drift event when flagged.

    Returns the check's record plus `plot`, `event_id` (None unless flagged) and `listeners` (what
    reacts to the event on a persistent server; None on a temporary one).
    """
    params = load_params(Path(params_file), overrides or [])
    cfg = drift_config(params, drift_cfg)
    # The reference is what the model was trained on: the train split's cached features, with their sha256.
    reference = drift.split_reference(validated_dataset(params), params.path("features"), cfg.backbone, cfg.tap)
    result = drift.run(cfg, reference, Path(new_data), Path(out_dir) if out_dir else params.path("drift"),
                       features_cfg=params.features, cache_dir=params.path("feature_cache"))
    plot = drift.plot_history(result.artifacts["history"])
    tracking.log_drift(params, drift.tracking_record(result), plot)
    event = emit_drift_event(result, params.register.model_name)
    listeners = event_listeners(event) if event is not None and persistent_api_url() else None
    if event is not None:
        log.warning("drift detected (MMD p=%.3g, classifier p=%.3g): emitted %s", result.info["p_value"],
                    result.info["auc_p_value"], DRIFT_EVENT)
    return {**result.info, "plot": str(plot), "event_id": str(event.id) if event else None, "listeners": listeners}
