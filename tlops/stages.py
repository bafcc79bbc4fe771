"""Stage wiring: where each stage reads its inputs and writes its outputs.

One function per stage, `(params, progress) -> StageResult`. `tlops stage NAME` (what dvc.yaml
calls), the Prefect flow and the tests all call these, so the three ways of running the
pipeline cannot drift apart. Logic lives in `components/`; this module only passes paths.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from components import compress, evaluate, export, features, finetune, ingest, select, validate
from components.progress import Progress, no_progress
from components.manifest import Dataset, read_manifest
from components.result import RESULT_FILE, StageResult, write_json
from tlops.config import Params

METRICS_FILE = "metrics.json"

ORDER = ("ingest", "validate", "features", "select", "finetune", "export", "compress", "evaluate", "register")

# The params blocks (or single keys) each stage depends on; dvc.yaml lists the same ones.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "ingest": ("ingest",),
    "validate": ("validate",),
    "features": ("features", "select.candidates"),
    "select": ("select",),
    "finetune": ("finetune", "select.tap"),
    "export": ("export", "compress.sparsity"),
    "compress": ("compress",),
    "evaluate": ("evaluate",),
    "register": ("register",),
}


def stage_params(params: Params, stage: str) -> dict[str, object]:
    """The flat `block.key -> value` params a stage depends on (for cache keys and MLflow)."""
    flat: dict[str, object] = {}
    raw = params.to_dict()
    for name in STAGE_PARAMS[stage]:
        block, _, key = name.partition(".")
        values = {key: raw[block][key]} if key else raw[block]
        flat.update({f"{block}.{k}": v for k, v in values.items()})
    return flat


def stage_dir(params: Params, stage: str) -> Path:
    """The output folder of `stage` (ingest writes the dataset folder)."""
    return params.path("dataset" if stage == "ingest" else stage)


OWNED_MARKER = ".tlops-stage"  # marks a folder as a stage's output, so tlops may empty it


def fresh_dir(path: Path) -> Path:
    """Empty a stage's output folder, refusing to touch one tlops did not write."""
    if path.exists() and any(path.iterdir()):
        if not ((path / RESULT_FILE).exists() or (path / OWNED_MARKER).exists()):
            raise FileExistsError(
                f"{path} holds files tlops did not write; point this stage's paths.* key at a new or empty folder."
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / OWNED_MARKER).touch()
    return path


def validated_dataset(params: Params) -> Dataset:
    return read_manifest(params.path("validate") / "manifest.csv", root=params.path("dataset"))


def selected_backbone(params: Params) -> str:
    return StageResult.load(params.path("select")).info["selected"]


def run_ingest(params: Params, progress: Progress = no_progress) -> StageResult:
    return ingest.run(params.ingest, fresh_dir(stage_dir(params, "ingest")))


def run_validate(params: Params, progress: Progress = no_progress) -> StageResult:
    dataset_dir = params.path("dataset")
    return validate.run(params.validate, dataset_dir / "manifest.csv", dataset_dir, fresh_dir(params.path("validate")))


def run_features(params: Params, progress: Progress = no_progress) -> StageResult:
    return features.run(
        params.features, params.select.candidates, validated_dataset(params),
        params.path("feature_cache"), fresh_dir(params.path("features")), progress,
    )


def run_select(params: Params, progress: Progress = no_progress) -> StageResult:
    return select.run(params.select, validated_dataset(params), params.path("features"), fresh_dir(params.path("select")))


def run_finetune(params: Params, progress: Progress = no_progress) -> StageResult:
    return finetune.run(
        params.finetune, selected_backbone(params), params.select.tap, params.path("features"),
        validated_dataset(params), params.path("validate") / "manifest.csv", fresh_dir(params.path("finetune")), progress,
    )


def run_export(params: Params, progress: Progress = no_progress) -> StageResult:
    return export.run(
        params.export, params.compress.sparsity, params.path("finetune") / finetune.CHECKPOINT_FILE,
        validated_dataset(params), fresh_dir(params.path("export")),
    )


def run_compress(params: Params, progress: Progress = no_progress) -> StageResult:
    return compress.run(params.compress, params.path("export"), validated_dataset(params), fresh_dir(params.path("compress")))


def run_evaluate(params: Params, progress: Progress = no_progress) -> StageResult:
    result = evaluate.run(
        params.evaluate, params.path("compress") / compress.SHIPPED_FILE, validated_dataset(params),
        fresh_dir(params.path("evaluate")),
    )
    write_json(result.out_dir / METRICS_FILE, result.metrics)  # DVC metrics, beside the plots
    return result


def run_register(params: Params, progress: Progress = no_progress, parent_run_id: str | None = None) -> StageResult:
    """Register the shipped model; under the flow, as a nested run of its pipeline run."""
    from tlops import tracking

    return tracking.register_model(params, fresh_dir(params.path("register")), parent_run_id)


STAGES: dict[str, Callable[[Params, Progress], StageResult]] = {
    "ingest": run_ingest,
    "validate": run_validate,
    "features": run_features,
    "select": run_select,
    "finetune": run_finetune,
    "export": run_export,
    "compress": run_compress,
    "evaluate": run_evaluate,
    "register": run_register,
}
