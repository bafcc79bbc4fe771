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

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.events import Event, emit_event

from components.core.result import StageResult
from components.models.registry import get_entry
from components.monitoring import drift
from tlops import tracking
from tlops.config import Params, load_params
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


DRIFT_PIECES = "flows/drift.py"  # with the modules below and flows/workers.py: the code each piece expects


@task(name="drift-embed", cache_policy=NO_CACHE, persist_result=False, task_run_name="drift-{backbone}-{key}")
def embed_piece(backbone: str, key: str, features_cfg: Any, paths: list[str], cache_dir: str, trunk: str | None,
                expected: dict[str, Any]) -> str:
    """On a worker: the backbone's trunk readied (`trunk` None; its sha256), or the feature cache entries of
    `paths` computed with that trunk (the store's key). Paths in, fingerprints out."""
    from components.features.shards import compute_chunk, prepare_trunk
    from flows.workers import check_code

    check_code(expected)
    dataset = drift.images_dataset([Path(p) for p in paths])
    if trunk is None:
        return prepare_trunk(backbone, features_cfg, dataset, Path(cache_dir))
    return compute_chunk(backbone, features_cfg, dataset, Path(cache_dir), list(dataset.manifest["sha256"]), trunk)


def embed_on_workers(params: Params, cfg: drift.DriftConfig, new_data: Path) -> int:
    """With `runner.kind: dask`, the new images the feature cache lacks embedded on the Dask workers, in chunks of
    whole `features.batch_size` batches in the order one process embeds them, so the check that follows reads
    every vector from the cache. Text encoders embed in the check itself (as the features stage does). Returns
    the images computed on workers."""
    if params.runner.kind != "dask" or get_entry(cfg.backbone).modality != "image":
        return 0
    from components.features.shards import store_for
    from flows.workers import WIRING, expected_code, workers_for
    from tlops.fingerprints import project_modules

    _, used = drift.new_inputs(cfg, new_data)
    dataset = drift.images_dataset(used)
    cache_dir = params.path("feature_cache")
    store = store_for(cfg.backbone, params.features, cache_dir)
    rows = dataset.manifest.drop_duplicates("sha256").sort_values("sha256")
    missing = [path for path, sha in zip(rows["path"], rows["sha256"], strict=True) if not store.has(sha)]
    if not missing:
        return 0
    size = params.runner.shard_batches * params.features.batch_size
    chunks = [missing[start:start + size] for start in range(0, len(missing), size)]
    files = (*project_modules("components.features.shards", "components.monitoring.drift"), DRIFT_PIECES)
    with workers_for(params) as workers:
        assert workers is not None  # runner.kind: dask
        expected = expected_code(tuple(sorted({*files, *WIRING})))
        features_cfg = workers.piece_params(params).features
        log.info("drift: %d new images in %d chunks on Dask workers", len(missing), len(chunks))
        trunk = workers.runner.submit(embed_piece, {
            "backbone": cfg.backbone, "key": "trunk", "features_cfg": features_cfg, "paths": missing[:features_cfg.parity_images],
            "cache_dir": str(cache_dir), "trunk": None, "expected": expected}).result()
        futures = [workers.runner.submit(embed_piece, {
            "backbone": cfg.backbone, "key": str(index), "features_cfg": features_cfg, "paths": chunk,
            "cache_dir": str(cache_dir), "trunk": trunk, "expected": expected}) for index, chunk in enumerate(chunks)]
        for future in futures:
            future.result()
    return len(missing)


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
    on_workers = embed_on_workers(params, cfg, Path(new_data))
    result = drift.run(cfg, reference, Path(new_data), Path(out_dir) if out_dir else params.path("drift"),
                       features_cfg=params.features, cache_dir=params.path("feature_cache"))
    result.info["n_computed_on_workers"] = on_workers
    plot = drift.plot_history(result.artifacts["history"])
    tracking.log_drift(params, drift.tracking_record(result), plot)
    event = emit_drift_event(result, params.register.model_name)
    listeners = event_listeners(event) if event is not None and persistent_api_url() else None
    if event is not None:
        log.warning("drift detected (MMD p=%.3g, classifier p=%.3g): emitted %s", result.info["p_value"],
                    result.info["auc_p_value"], DRIFT_EVENT)
    return {**result.info, "plot": str(plot), "event_id": str(event.id) if event else None, "listeners": listeners}
