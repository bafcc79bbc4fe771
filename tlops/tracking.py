"""MLflow tracking: a parent run per pipeline run, a nested run per stage, the model registry.

With no `MLFLOW_TRACKING_URI`, MLflow uses its embedded default (`sqlite:///mlflow.db` plus
`mlruns/` artifacts in the working directory); pointing the variable at a server works as is.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import onnx
from mlflow import MlflowClient

from components.compress import SHIPPED_FILE
from components.result import StageResult, write_json
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


def data_version(params: Params) -> str:
    """md5 of the ingested manifest: the hash DVC records for it, and it pins every image's sha256."""
    manifest = params.path("dataset") / "manifest.csv"
    return hashlib.md5(manifest.read_bytes()).hexdigest() if manifest.exists() else "unknown"


def flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flat(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def experiment(params: Params) -> str:
    mlflow.set_experiment(params.register.experiment)
    return mlflow.get_experiment_by_name(params.register.experiment).experiment_id


@contextmanager
def pipeline_run(params: Params, runner: str) -> Iterator[str]:
    """The parent run of one pipeline execution; yields its run id."""
    experiment(params)
    with mlflow.start_run(run_name=f"pipeline-{runner}", tags={"tlops.kind": "pipeline", "tlops.runner": runner,
                                                             "git.commit": git_commit()}) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flat("", params.to_dict()).items()})
        yield run.info.run_id


def summarize_pipeline(params: Params, parent_run_id: str) -> None:
    """Headline tags and test metrics on the parent run, so pipeline runs compare side by side."""
    evaluated = StageResult.load(params.path("evaluate"))
    selected = StageResult.load(params.path("select")).info["selected"]
    shipped = StageResult.load(params.path("compress")).info["shipped"]
    client = MlflowClient()
    for key, value in {"tlops.backbone": selected, "tlops.shipped": shipped, "dvc.manifest_md5": data_version(params)}.items():
        client.set_tag(parent_run_id, key, value)
    for key, value in evaluated.metrics.items():
        if isinstance(value, (int, float)):
            client.log_metric(parent_run_id, f"test_{key}", float(value))


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
            "git.commit": git_commit(), "dvc.manifest_md5": data_version(params)}
    for key in ("selected", "backbone", "shipped"):
        if key in result.info:
            tags[f"tlops.{key}"] = str(result.info[key])
    with mlflow.start_run(run_name=result.stage, nested=parent_run_id is not None, parent_run_id=parent_run_id,
                          tags=tags) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in stage_params.items()})
        numeric = {k.replace("/", "_"): float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
        if numeric:
            mlflow.log_metrics(numeric)
        log_artifacts(result)
        return run.info.run_id


def log_failed_stage(params: Params, parent_run_id: str | None, stage: str, out_dir: Path,
                     stage_params: dict[str, Any]) -> None:
    """A FAILED nested run holding whatever the stage wrote before it stopped (reports, data docs)."""
    try:
        result = StageResult.load(out_dir)
    except FileNotFoundError:
        result = StageResult(stage=stage, out_dir=out_dir)
    run_id = log_stage(params, parent_run_id, result, stage_params, cached=False, runner="prefect")
    MlflowClient().set_terminated(run_id, status="FAILED")


def register_model(params: Params, out_dir: Path, parent_run_id: str | None = None) -> StageResult:
    """Log the shipped ONNX model with MLflow's ONNX flavor and register it as a new version."""
    compressed = StageResult.load(params.path("compress"))
    evaluated = StageResult.load(params.path("evaluate"))
    finetuned = StageResult.load(params.path("finetune"))
    model_path = params.path("compress") / SHIPPED_FILE
    experiment(params)
    name = params.register.model_name
    with mlflow.start_run(run_name="register", nested=parent_run_id is not None, parent_run_id=parent_run_id,
                          tags={"tlops.kind": "stage", "tlops.stage": "register", "git.commit": git_commit()}):
        info = mlflow.onnx.log_model(
            onnx.load(str(model_path)), name="model", registered_model_name=name,
            onnx_execution_providers=["CPUExecutionProvider"],
        )
        mlflow.log_metrics({f"test_{k}": float(v) for k, v in evaluated.metrics.items() if isinstance(v, (int, float))})
    client = MlflowClient()
    version = str(info.registered_model_version)
    lineage = {
        "backbone": finetuned.info["backbone"],
        "strategy": finetuned.info["strategy"],
        "compression": str(compressed.info.get("shipped")),
        "dvc.manifest_md5": data_version(params),
        "git.commit": git_commit(),
        "model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
    }
    metrics = {f"test.{k}": f"{v:.4f}" for k, v in evaluated.metrics.items() if isinstance(v, (int, float))}
    for key, value in {**lineage, **metrics}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, params.register.alias, version)
    log.info("registered %s version %s (alias %s)", name, version, params.register.alias)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "registration.json", {"model_name": name, "version": version, "alias": params.register.alias,
                                                "model_uri": f"models:/{name}/{version}", "tracking_uri": mlflow.get_tracking_uri(),
                                                **lineage})
    result = StageResult(stage="register", out_dir=out_dir, metrics={"version": float(version)},
                         artifacts={"registration": out_dir / "registration.json"},
                         info={"model_name": name, "version": version, "model_uri": f"models:/{name}/{version}"})
    result.save()
    return result


def version_exists(model_name: str, version: str) -> bool:
    try:
        MlflowClient().get_model_version(model_name, version)
        return True
    except mlflow.exceptions.MlflowException:
        return False
