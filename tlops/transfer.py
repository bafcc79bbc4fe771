"""`tlops fewshot` and `tlops add-class`: few-shot evaluation and a new class from a few images, in MLflow.

Wiring only: the episodes are `components.evaluation.fewshot`, the new prototype
`components.packaging.add_class`, and the new version goes through the register and promote stages'
own functions, so it meets the same gates as a trained model. Each command is one MLflow run
(`tlops.kind` fewshot or add-class) and writes its folder through the stage runner's staging, so a
killed command never leaves a half-written folder.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient

from components.core.lineage import git_commit
from components.core.result import StageResult, metric_key
from tlops import tracking

if TYPE_CHECKING:
    from tlops.config import Params

log = logging.getLogger(__name__)


def run_fewshot(params: Params) -> dict[str, Any]:
    """Prerequisites (ingest..select) where missing, then the episodes, logged as one MLflow run."""
    from components.evaluation import fewshot
    from tlops.run_state import RunLock
    from tlops.stages import check_owned, labelled_dataset, publish, selected_backbone, staging_dir
    from tlops.tune import ensure_prerequisites

    cfg, target = params.fewshot, params.path("fewshot")
    with RunLock(params, "tlops fewshot") as lock:
        ran = ensure_prerequisites(params, lock)
        backbone = selected_backbone(params) if cfg.backbone == "auto" else cfg.backbone
        check_owned(target)
        staging = staging_dir(target)
        try:
            result = fewshot.run(cfg, backbone, labelled_dataset(params), params.path("features"), staging)
        except BaseException:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            raise
        publish(staging, target)
        result = StageResult.load(target)
        tracking.experiment(params)
        tags = {"tlops.kind": "fewshot", "tlops.backbone": backbone, "git.commit": git_commit(),
                "data.version": tracking.data_version(params)}
        with mlflow.start_run(run_name="fewshot", tags=tags) as run:
            mlflow.log_params({k: str(v)[:500] for k, v in tracking.flat("fewshot", cfg.model_dump(mode="json")).items()})
            mlflow.log_metrics({metric_key(k): v for k, v in result.metrics.items()})
            for path in result.artifacts.values():
                mlflow.log_artifact(str(path))
    return {"ran_stages": ran, "out_dir": str(target), "run_id": run.info.run_id, "backbone": backbone,
            "report": {k: v for k, v in result.metrics.items()}, **result.info}


def slug(name: str) -> str:
    return "_".join(re.findall(r"[A-Za-z0-9_-]+", name))[:48] or "class"


def fetch_model(uri: str, into: Path) -> tuple[Path, str]:
    """The ONNX file `uri` names (a models:/ URI, resolved to its version now and downloaded, or a file), and what
    it is. The registry is asked in this process: the lookup `tlops serve` makes in a child process, here with
    MLflow already imported."""
    from components.serving.config import check_model_uri, parse_registry_uri
    from components.serving.registry_fetch import download_onnx, resolve_version
    from components.serving.served_model import sha256_of

    check_model_uri(uri)
    if not uri.startswith("models:/"):
        return Path(uri), f"file {uri} (sha256:{sha256_of(Path(uri))[:12]})"
    version = resolve_version(uri)
    return download_onnx(uri, parse_registry_uri(uri)[0], version, into), f"{uri} (version {version})"


def run_add_class(params: Params, name: str, images: Path, model_uri: str | None) -> dict[str, Any]:
    """The new prototype, the new ONNX model, its registration as @challenger and the promotion gate."""
    from components.packaging.add_class import add_class
    from components.registry import promote, register
    from tlops.run_state import RunLock
    from tlops.stages import check_owned, execute, get_stage, labelled_dataset, publish, staging_dir

    uri = model_uri or f"models:/{params.register.model_name}@{params.promote.alias}"
    target = params.path("add_class")
    with RunLock(params, "tlops add-class") as lock, tempfile.TemporaryDirectory(prefix="tlops-add-class-") as scratch:
        parent, described = fetch_model(uri, Path(scratch))
        check_owned(target)
        staging = staging_dir(target)
        try:
            added = add_class(parent, name, images, staging / "model.onnx")  # refuses bad input before anything else
            for stage in ("ingest", "validate"):  # promotion scores the current test split
                if not (params.path(get_stage(stage).folder) / "result.json").exists():
                    execute(get_stage(stage), params)
                    lock.stage_done(stage)
            client = MlflowClient()
            tags = {"tlops.kind": "add-class", "tlops.added_class": name, "tlops.parent_model": described,
                    "git.commit": git_commit(), "data.version": tracking.data_version(params)}
            run_id = client.create_run(tracking.experiment(params), run_name=f"add-class {name}", tags=tags).info.run_id
            tracking.log_batch(client, run_id, params={"class": name, "images": str(images), "model": uri,
                                                       "n_images": len(added.images), "n_skipped": len(added.skipped)})
            lineage = {"strategy": "prototypes", "added_class": name, "parent_model": described,
                       "git.commit": git_commit()}
            registered = register.run(params.register, added.path, {}, lineage, staging / "register", run_id)
            promoted = promote.run(params.promote, registered.info["model_name"], registered.info["version"],
                                   labelled_dataset(params), staging / "promote")
            client.log_metric(run_id, "predicted_as_new", added.predicted_as_new)
            for path in promoted.artifacts.values():
                client.log_artifact(run_id, str(path))
            client.set_terminated(run_id, "FINISHED")
        except BaseException:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            raise
        publish(staging, target)
    return {"model": str(target / "model.onnx"), "labels": added.labels, "parent": described,
            "predicted_as_new": added.predicted_as_new, "skipped": added.skipped,
            "model_uri": registered.info["model_uri"], "promotion": promoted.info["summary"], "run_id": run_id}
