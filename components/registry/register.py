"""Register: the shipped ONNX model as a new version in the MLflow model registry, with the alias `challenger`.

The model is logged as an MLflow pyfunc whose artifact is the ONNX file byte for byte
(`components/serving/pyfunc.py`), so `mlflow models serve` takes images and the registry holds
exactly the file evaluate scored: the sha256 of the file read back from the registry is the version
tag `model_sha256`. The lineage the caller passes (backbone, strategy, compression, data version,
git commit) and the test metrics are version tags too. Moving `@champion` is the promote stage's work.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import nullcontext
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from components.core.errors import UserError
from components.core.result import StageResult, metric_key, sha256_file, write_json
from components.registry.config import RegisterConfig
from components.serving import pyfunc

log = logging.getLogger(__name__)

REGISTRATION_FILE = "registration.json"


class RegistryError(UserError):
    """The model registry cannot be read; the message names the tracking URI."""


def registered_sha256(model_uri: str) -> str:
    """sha256 of the ONNX file the registry actually holds for `model_uri` (read back, not assumed)."""
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=scratch))
        files = sorted(local.rglob("*.onnx"))
        if len(files) != 1:
            raise RuntimeError(f"{model_uri}: expected one .onnx file in the registered model, found {len(files)}")
        return sha256_file(files[0])


def version_exists(model_name: str, version: str) -> bool:
    """Whether the registry still holds this version. A registry that cannot be read is an
    error, never taken as "the version is gone" (which would register a duplicate)."""
    try:
        MlflowClient().get_model_version(model_name, version)
        return True
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return False
        raise RegistryError(
            f"MLFLOW_TRACKING_URI={mlflow.get_tracking_uri()}: cannot read {model_name} version {version} from the "
            f"registry ({str(error).splitlines()[0][:200]})."
        ) from None


def run(cfg: RegisterConfig, model_path: Path, test_metrics: dict[str, float], lineage: dict[str, str],
        out_dir: Path, run_id: str | None = None) -> StageResult:
    """Register `model_path` as a new version of `cfg.model_name`, tag it and point `cfg.alias` at it.

    `run_id`: the MLflow run the model is logged from (the stage's run), so the version links back to it.
    """
    name = cfg.model_name
    with mlflow.start_run(run_id=run_id) if run_id else nullcontext():
        info = pyfunc.log_model(model_path, registered_model_name=name)
    client = MlflowClient()
    version = str(info.registered_model_version)
    model_uri = f"models:/{name}/{version}"
    tags = {**lineage, "model_sha256": registered_sha256(model_uri)}
    tags |= {metric_key(f"test.{k}"): f"{v:.4f}" for k, v in test_metrics.items()}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, cfg.alias, version)
    log.info("registered %s version %s (alias %s)", name, version, cfg.alias)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"model_name": name, "version": version, "alias": cfg.alias, "model_uri": model_uri,
              "tracking_uri": mlflow.get_tracking_uri(), **lineage, "model_sha256": tags["model_sha256"]}
    result = StageResult(stage="register", out_dir=out_dir, metrics={"version": float(version)},
                         artifacts={"registration": write_json(out_dir / REGISTRATION_FILE, record)},
                         info={"model_name": name, "version": version, "model_uri": model_uri})
    result.save()
    return result
