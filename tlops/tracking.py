"""MLflow tracking: a parent run per pipeline run, a nested run per stage, the model registry.

With no `MLFLOW_TRACKING_URI`, MLflow uses its embedded default (`sqlite:///mlflow.db` plus
`mlruns/` artifacts in the working directory); pointing the variable at a server works as is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from components.core.errors import UserError
from components.core.lineage import data_version as manifest_version
from components.core.result import StageResult, sha256_file, write_json
from components.data.manifest import read_manifest
from components.packaging.compress import SHIPPED_FILE
from components.serving import pyfunc as pyfunc_model

if TYPE_CHECKING:  # the schema imports every component; tracking needs none of them
    from tlops.config import Params

log = logging.getLogger(__name__)

# What is worth showing in the MLflow UI; data (images, features) stays with DVC, and the
# shipped ONNX model is logged once, as an MLflow model, by `register_model`.
LOGGED_SUFFIXES = {".json", ".png", ".csv", ".md", ".html"}
LOGGED_FOLDERS = {"data_docs"}  # Great Expectations' HTML report
MAX_LOGGED_FILE_BYTES = 5 * 2**20


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class TrackingError(UserError):
    """The tracking server or model registry cannot be reached or read."""


def check_tracking_server(timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when the tracking server is down or the registry unreadable,
    rather than after minutes of retries in the middle of a run."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                response.read()
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise TrackingError(
                f"MLFLOW_TRACKING_URI={uri}: the tracking server does not answer ({reason}); start it, "
                f"or unset MLFLOW_TRACKING_URI to use the local store (mlflow.db)."
            ) from None
    try:
        MlflowClient().search_registered_models(max_results=1)
    except MlflowException as error:
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={uri}: the model registry cannot be read ({str(error).splitlines()[0][:200]})."
        ) from None


def data_version(params: Params) -> str:
    """The dataset's one version everywhere (MLflow, checkpoint, ONNX metadata, registry): the md5
    DVC records for the validated manifest, which pins every image's sha256, label and split."""
    manifest = params.path("validate") / "manifest.csv"
    return manifest_version(manifest) if manifest.exists() else "unknown"


def metric_key(name: str) -> str:
    """A metric name MLflow accepts whatever the labels are (commas, spaces, any script): unsafe
    characters become `_`, plus a short hash of the original so two labels never collide."""
    clean = re.sub(r"[^A-Za-z0-9_.\- ]", "_", name)
    return clean if clean == name else f"{clean}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"


def flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flat(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def experiment(params: Params) -> str:
    found = mlflow.set_experiment(params.register.experiment)
    if found.tags.get("mlflow.experimentKind") != "custom_model_development":
        # Open on the runs table: MLflow 3 shows a GenAI overview for experiments it takes for GenAI.
        MlflowClient().set_experiment_tag(found.experiment_id, "mlflow.experimentKind", "custom_model_development")
    return found.experiment_id


@contextmanager
def pipeline_run(params: Params, runner: str, overrides: list[str] | tuple[str, ...] = ()) -> Iterator[str]:
    """The parent run of one pipeline execution; yields its run id. Named for what it trained
    once that is known (`summarize_pipeline`); until then for the backbone choice and overrides."""
    experiment(params)
    name = " ".join([f"{params.select.backbone}/{params.finetune.strategy}", *overrides])
    tags = {"tlops.kind": "pipeline", "tlops.runner": runner, "git.commit": git_commit(),
            "tlops.overrides": " ".join(overrides) or "none"}
    with mlflow.start_run(run_name=name, tags=tags) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flat("", params.to_dict()).items()})
        yield run.info.run_id


def log_dataset(params: Params) -> None:
    """The validated manifest as the active run's MLflow dataset input, its digest the data version."""
    manifest = params.path("validate") / "manifest.csv"
    frame = read_manifest(manifest, root=params.path("dataset")).manifest
    with warnings.catch_warnings():  # MLflow's hints about local paths and integer columns do not apply here
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(frame, source=str(manifest.resolve()), targets="label",
                                          name=f"{params.ingest.source}-{params.ingest.label_mode}",
                                          digest=data_version(params))
        mlflow.log_input(dataset, context="training")


def summarize_pipeline(params: Params, parent_run_id: str, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Headline name, tags, dataset and test metrics on the parent run, so runs compare side by side."""
    evaluated = StageResult.load(params.path("evaluate"))
    selected = StageResult.load(params.path("select")).info["selected"]
    shipped = StageResult.load(params.path("compress")).info["shipped"]
    finetuned = StageResult.load(params.path("finetune")).info
    strategy = finetuned["strategy"]
    version = data_version(params)
    client = MlflowClient()
    name = " ".join([f"{selected}/{strategy}/{shipped}", f"data:{version[:8]}", *overrides])
    client.update_run(parent_run_id, name=name)
    for key, value in {"tlops.backbone": selected, "tlops.strategy": strategy, "tlops.shipped": shipped,
                       "tlops.negative_transfer": finetuned.get("negative_transfer", "unknown"),
                       "data.version": version}.items():
        client.set_tag(parent_run_id, key, value)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == parent_run_id:
        log_dataset(params)
    else:
        with mlflow.start_run(run_id=parent_run_id):
            log_dataset(params)
    for key, value in evaluated.metrics.items():
        if isinstance(value, (int, float)):
            client.log_metric(parent_run_id, metric_key(f"test_{key}"), float(value))


def log_drift(params: Params, record: dict[str, Any], plot: Path) -> str:
    """Drift checks in one long-lived run per model: metrics at step = check number, so MLflow
    charts them over time, with the latest drift_over_time.png."""
    experiment_id = experiment(params)
    name = f"drift-{params.register.model_name}"
    found = MlflowClient().search_runs(
        [experiment_id], f"tags.`tlops.kind` = 'drift-monitor' and attributes.run_name = '{name}'", max_results=1)
    with mlflow.start_run(run_id=found[0].info.run_id if found else None, run_name=None if found else name,
                          tags={"tlops.kind": "drift-monitor"}) as run:
        mlflow.set_tags(record["tags"])
        mlflow.log_metrics(record["metrics"], step=record["step"], timestamp=record["timestamp_ms"])
        mlflow.log_artifact(str(plot))
        return run.info.run_id


def mark_killed(previous: dict[str, Any]) -> None:
    """A run whose process died while running: KILLED in MLflow (with its stage runs), Crashed in Prefect."""
    client = MlflowClient()
    if run_id := previous.get("mlflow_run_id"):
        try:
            run = client.get_run(run_id)
            stale = [run] + client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
            for each in stale:
                if each.info.status == "RUNNING":
                    client.set_terminated(each.info.run_id, status="KILLED")
        except MlflowException as error:
            log.warning("could not mark MLflow run %s as killed: %s", run_id, error)
    if flow_run_id := previous.get("prefect_flow_run_id"):
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        try:
            with get_client(sync_client=True) as prefect:
                prefect.set_flow_run_state(flow_run_id, Crashed(message="the process was killed; a later run found it"),
                                           force=True)
        except Exception as error:  # noqa: BLE001 - another API's run id: note it and go on
            log.warning("could not mark Prefect flow run %s as crashed: %s", flow_run_id, error)
    log.warning("the previous run (%s) was killed; marked it in MLflow and Prefect", previous.get("run_id"))


def log_artifacts(result: StageResult) -> None:
    """The stage's report files (top level of its folder) and report sites, never its data."""
    if not result.out_dir.is_dir():
        return
    for path in sorted(result.out_dir.iterdir()):
        if path.is_file() and path.suffix in LOGGED_SUFFIXES and path.stat().st_size <= MAX_LOGGED_FILE_BYTES:
            mlflow.log_artifact(str(path))
        elif path.is_dir() and path.name in LOGGED_FOLDERS:
            mlflow.log_artifacts(str(path), artifact_path=path.name)


def log_stage(params: Params, parent_run_id: str | None, result: StageResult, stage_params: dict[str, Any],
              cached: bool, runner: str) -> str:
    """A nested run for one stage: its params, metrics, tags and readable artifacts."""
    experiment(params)
    tags = {"tlops.kind": "stage", "tlops.stage": result.stage, "tlops.runner": runner, "tlops.cached": str(cached).lower(),
            "git.commit": git_commit(), "data.version": data_version(params)}
    for key in ("selected", "backbone", "shipped", "strategy", "negative_transfer", "device", "precision"):
        if key in result.info:
            tags[f"tlops.{key}"] = str(result.info[key])
    if "why" in result.info:
        tags["mlflow.note.content"] = str(result.info["why"])  # shown as the run's description in the UI
    with mlflow.start_run(run_name=result.stage, nested=parent_run_id is not None, parent_run_id=parent_run_id,
                          tags=tags) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in stage_params.items()})
        numeric = {metric_key(k): float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
        if numeric:
            mlflow.log_metrics(numeric)
        log_history(result)
        log_artifacts(result)
        return run.info.run_id


def log_history(result: StageResult) -> None:
    """Per-epoch curves (a stage's `history.json`) as MLflow metric steps, so the UI draws them."""
    history = result.artifacts.get("history")
    if history is None or not Path(history).is_file():
        return
    entries = json.loads(Path(history).read_text())
    now = int(time.time() * 1000)
    metrics = [Metric(metric_key(f"epoch.{key}"), float(value), now, int(entry.get("epoch", step)))
               for step, entry in enumerate(entries) for key, value in entry.items()
               if key != "epoch" and isinstance(value, (int, float))]
    for start in range(0, len(metrics), 1000):
        MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=metrics[start:start + 1000])


def log_failed_stage(params: Params, parent_run_id: str | None, stage: str, out_dir: Path,
                     stage_params: dict[str, Any]) -> None:
    """A FAILED nested run holding whatever the stage wrote before it stopped (reports, data docs)."""
    try:
        result = StageResult.load(out_dir)
    except FileNotFoundError:
        result = StageResult(stage=stage, out_dir=out_dir)
    run_id = log_stage(params, parent_run_id, result, stage_params, cached=False, runner="prefect")
    MlflowClient().set_terminated(run_id, status="FAILED")


def registered_sha256(model_uri: str) -> str:
    """sha256 of the ONNX file the registry actually holds for `model_uri` (read back, not assumed)."""
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=scratch))
        files = sorted(local.rglob("*.onnx"))
        if len(files) != 1:
            raise RuntimeError(f"{model_uri}: expected one .onnx file in the registered model, found {len(files)}")
        return sha256_file(files[0])


def register_model(params: Params, out_dir: Path, parent_run_id: str | None = None) -> StageResult:
    """Log the shipped ONNX model with MLflow's ONNX flavor and register it as a new version."""
    compressed = StageResult.load(params.path("compress"))
    evaluated = StageResult.load(params.path("evaluate"))
    finetuned = StageResult.load(params.path("finetune"))
    model_path = params.path("compress") / SHIPPED_FILE
    experiment(params)
    name = params.register.model_name
    test_metrics = {k: float(v) for k, v in evaluated.metrics.items() if isinstance(v, (int, float))}
    with mlflow.start_run(run_name="register", nested=parent_run_id is not None, parent_run_id=parent_run_id,
                          tags={"tlops.kind": "stage", "tlops.stage": "register", "git.commit": git_commit(),
                                "data.version": data_version(params)}):
        log_dataset(params)
        # A pyfunc whose artifact is the ONNX file byte for byte: `mlflow models serve` takes images,
        # and what is registered hashes to what evaluate scored.
        info = pyfunc_model.log_model(model_path, registered_model_name=name)
        mlflow.log_metrics({metric_key(f"test_{k}"): v for k, v in test_metrics.items()})
    client = MlflowClient()
    version = str(info.registered_model_version)
    model_uri = f"models:/{name}/{version}"
    lineage = {
        "backbone": finetuned.info["backbone"],
        "strategy": finetuned.info["strategy"],
        "compression": str(compressed.info.get("shipped")),
        "data.version": data_version(params),
        "git.commit": git_commit(),
        "model_sha256": registered_sha256(model_uri),
    }
    metrics = {metric_key(f"test.{k}"): f"{v:.4f}" for k, v in test_metrics.items()}
    for key, value in {**lineage, **metrics}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, params.register.alias, version)
    log.info("registered %s version %s (alias %s)", name, version, params.register.alias)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "registration.json", {"model_name": name, "version": version, "alias": params.register.alias,
                                                "model_uri": model_uri, "tracking_uri": mlflow.get_tracking_uri(),
                                                **lineage})
    result = StageResult(stage="register", out_dir=out_dir, metrics={"version": float(version)},
                         artifacts={"registration": out_dir / "registration.json"},
                         info={"model_name": name, "version": version, "model_uri": model_uri})
    result.save()
    return result


def version_exists(model_name: str, version: str) -> bool:
    """Whether the registry still holds this version. A registry that cannot be read is an
    error, never taken as "the version is gone" (which would register a duplicate)."""
    try:
        MlflowClient().get_model_version(model_name, version)
        return True
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return False
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={mlflow.get_tracking_uri()}: cannot read {model_name} version {version} from the "
            f"registry ({str(error).splitlines()[0][:200]})."
        ) from None
