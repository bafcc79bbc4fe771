"""Drift checks as a Prefect flow, and the event that lets Prefect start a retraining run.

`check_drift` embeds a batch of new images, compares it with the training features
(`components.monitoring.drift`), draws the history, and, when the batch is flagged, emits the Prefect event
`tlops.drift.detected`. Retraining is not called from here: a deployment of the training flow
carries a `DeploymentEventTrigger` on that event (`retrain_trigger`), so Prefect's automations
decide, the event stays visible in the UI, and the check and the retraining stay decoupled
(one can be redeployed, paused or rate-limited without touching the other).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.events import DeploymentEventTrigger, Event, emit_event

from components.core.result import StageResult
from components.features.cache import split_features
from components.monitoring import drift
from tlops import tracking
from tlops.config import load_params
from tlops.stages import selected_backbone, validated_dataset

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
    return emit_event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": model_resource_id(model_name), "prefect.resource.name": model_name},
        payload={"mmd2": info["mmd2"], "p_value": info["p_value"], "auc": info["auc"],
                 "n_new": info["n_new"], "images": info["images"], "backbone": info["backbone"],
                 "tap": info["tap"], "batch": info["batch"]},
    )


def retrain_trigger(model_name: str, params_file: str = "params.yaml") -> DeploymentEventTrigger:
    """Start the deployment it is attached to on every drift event about `model_name`.

    `within`/`threshold` are Prefect's defaults for a reactive trigger: one event, one run.
    """
    return DeploymentEventTrigger(
        name=f"retrain {model_name} on drift",
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": model_resource_id(model_name)},
        parameters={"params_file": params_file},
    )


@flow(name="tlops-drift")
def check_drift(
    images: str,
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    drift_cfg: drift.DriftConfig | None = None,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """Compare the images in `images` with the train split's features; emit the drift event when flagged."""
    params = load_params(Path(params_file), overrides or [])
    cfg = drift_cfg or params.drift
    if cfg.backbone == "auto":
        cfg = cfg.model_copy(update={"backbone": selected_backbone(params)})
    # The reference is what the model was trained on: the train split's cached features.
    reference = split_features(validated_dataset(params), params.path("features"), cfg.backbone, cfg.tap, "train")
    result = drift.run(cfg, reference, Path(images), Path(out_dir) if out_dir else params.path("drift"),
                       features_cfg=params.features, cache_dir=params.path("feature_cache"))
    plot = drift.plot_history(result.artifacts["history"])
    tracking.log_drift(params, drift.tracking_record(result), plot)
    event = emit_drift_event(result, params.register.model_name)
    if event is not None:
        log.warning("drift detected (p=%.3g, AUC %.3f): emitted %s", result.info["p_value"], result.info["auc"],
                    DRIFT_EVENT)
    return {**result.info, "plot": str(plot), "event_id": str(event.id) if event else None}
