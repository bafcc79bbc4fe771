"""The pipeline, declared once: each stage's code, params, inputs and outputs.

`STAGES` is the single declaration. The Prefect flow (`flows/train.py`) runs it and derives its
cache keys from it; `dvc.yaml` is generated from it (`tlops dvc-yaml`, and a test checks that the
committed file is current); `tlops stage NAME` and the tests call the same `execute`. Logic lives
in `components/`; a stage here only says where its inputs are and where its outputs go.

A stage writes into a sibling staging folder that replaces its output folder only when the
stage has finished, so a killed or failed stage never leaves a half-written folder that could
pass for a result.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.core.errors import UserError
from components.core.lineage import data_version, git_commit
from components.core.progress import Progress, no_progress
from components.core.result import RESULT_FILE, StageResult, sha256_file, write_json
from components.evaluation.config import TASKS_FOLDER
from components.models.int8_recipe import Recipe
from components.packaging.config import SHIPPED_FILE
from tlops.config import Params
from tlops.fingerprints import code_hash, library_versions, project_modules

if TYPE_CHECKING:
    from components.data.manifest import Dataset
    from components.monitoring.config import DriftConfig

METRICS_FILE = "metrics.json"
OWNED_MARKER = ".tlops-stage"  # marks a folder as a stage's output, so tlops may replace it
# Files every stage depends on besides its component: the stage table and the params schema.
WIRING = ("tlops/stages.py", "tlops/config.py", "tlops/fingerprints.py")
TRAINING_FLOW = "flows/train.py"  # part of every Prefect cache key (DVC runs stages without it)


@dataclass(frozen=True)
class StageContext:
    """What a run passes to every stage besides params: progress bars and the stage's tracking run."""

    progress: Progress = no_progress
    run_id: str | None = None  # the MLflow run the recorder opened for this stage


@dataclass(frozen=True)
class Output:
    """One DVC output of a stage, relative to the stage's folder ("" is the whole folder)."""

    name: str = ""
    kind: str = "outs"  # outs | metrics | plots
    cache: bool = True
    plot: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Shards:
    """One wave of a stage's work cut into pieces that can run on other machines (`runner.kind: dask`).

    `plan(params, done)` lists the pieces the caches still lack (piece id -> small JSON: names, image sha256s),
    given `done`, the fingerprints of earlier waves' pieces; `run(params, arguments)` computes one piece into a
    content-addressed cache and returns its fingerprint. The stage's `compute` then finds them cached and only
    merges; without the pieces (`tlops stage`, `dvc repro`, `runner.kind: local`) it computes the same in one pass.
    """

    name: str
    plan: Callable[[Params, dict[str, str]], dict[str, dict[str, Any]]]
    run: Callable[[Params, dict[str, Any]], str]


@dataclass(frozen=True)
class Stage:
    name: str
    component: str  # the module doing the work; it and its project imports are the stage's code
    compute: Callable[[Params, StageContext, Path], StageResult]  # writes into the given folder
    params: tuple[str, ...]  # params blocks or dotted keys it reads
    reads: tuple[str, ...]  # upstream outputs: a `paths` key, optionally with a file ("validate/manifest.csv")
    folder: str  # the `paths` key of its output folder
    outputs: tuple[Output, ...] = (Output(),)
    cached: bool = True  # False: runs every time (DVC: always_changed)
    io_bound: bool = False  # retried on I/O errors (never on bad data)
    # A cached result is reused only while this holds (its files are checked for every stage).
    still_valid: Callable[[StageResult], bool] = lambda result: True
    # Files outside the pipeline's folders that params name and the stage reads (a distillation teacher):
    # their content is part of the Prefect cache key.
    files: Callable[[Params], tuple[Path, ...]] = lambda params: ()
    # Modules its compute calls besides the component (finetune: the source's declared orders and values), so
    # their code is part of the stage's too.
    also_code: tuple[str, ...] = ()
    # Its work in pieces for Dask workers, wave after wave (empty: the stage runs whole, in one process).
    fan_out: tuple[Shards, ...] = ()

    def modules(self) -> tuple[str, ...]:
        return tuple(sorted(set(project_modules(self.component, *self.also_code)) | set(WIRING)))


# Each stage imports its component when it runs, never at import: the CLI reads this table (and checks
# params) before anything loads torch, ONNX Runtime, Great Expectations or MLflow.


def validated_dataset(params: Params) -> Dataset:
    from components.data.manifest import read_manifest

    return read_manifest(params.path("validate") / "manifest.csv", root=params.path("dataset"))


def labelled_dataset(params: Params) -> Dataset:
    """What every stage after features reads: with `finetune.adapt.target_domain` set, the target domain's
    train and val labels hidden (components/data/domains.py), so no stage can use them."""
    from components.data.domains import labelled_view

    return labelled_view(validated_dataset(params), params.finetune.adapt.target_domain)


def selected_backbone(params: Params) -> str:
    return StageResult.load(params.path("select")).info["selected"]


def drift_config(params: Params, cfg: DriftConfig | None = None) -> DriftConfig:
    """`cfg` (default: params' `drift`) with its backbone resolved: `auto` is the select stage's choice. The
    backbone's registry entry says whether a check reads images or texts."""
    cfg = cfg or params.drift
    if cfg.backbone != "auto":
        return cfg
    try:
        backbone = selected_backbone(params)
    except FileNotFoundError:
        raise UserError(f"drift.backbone is 'auto', but {params.path('select')} holds no select stage result: run "
                        f"the pipeline first (`tlops run`), or name the backbone (--set drift.backbone=NAME).") from None
    return cfg.model_copy(update={"backbone": backbone})


def _ingest(params: Params, ctx: StageContext, out: Path) -> StageResult:
    from components.data import ingest

    return ingest.run(params.ingest, out)


def _validate(params: Params, ctx: StageContext, out: Path) -> StageResult:
    from components.data import validate

    dataset_dir = params.path("dataset")
    return validate.run(params.validate, dataset_dir / "manifest.csv", dataset_dir, out, params.finetune.tasks)


def _features(params: Params, ctx: StageContext, out: Path) -> StageResult:
    from components.features import extract

    return extract.run(params.features, params.select.scored(), validated_dataset(params),
                       params.path("feature_cache"), out, ctx.progress)


def _select(params: Params, ctx: StageContext, out: Path) -> StageResult:
    from components.features import select

    return select.run(params.select, labelled_dataset(params), params.path("features"), out,
                      params.path("feature_cache"))


def _trunks_missing_work(params: Params, done: dict[str, str]) -> dict[str, dict[str, Any]]:
    """One piece per image backbone with images its cache lacks: its trunk, exported or checked once for all chunks."""
    return {backbone: {"backbone": backbone} for backbone, missing in _missing_images(params).items() if missing}


def _chunks_missing_work(params: Params, done: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per backbone, the chunks of images (whole batches, in extraction order) holding images its cache lacks."""
    from components.features.shards import image_chunks

    pieces = {}
    for backbone, missing in _missing_images(params).items():
        for index, chunk in enumerate(image_chunks(validated_dataset(params), params.runner.shard_batches,
                                                   params.features.batch_size)):
            if missing & set(chunk):
                pieces[f"{backbone}-{index}"] = {"backbone": backbone, "sha256": chunk, "trunk": done[backbone]}
    return pieces


def _missing_images(params: Params) -> dict[str, set[str]]:
    """Per image backbone (text encoders embed in the stage itself), the manifest images its cache lacks."""
    from components.features.shards import missing_images
    from components.models.registry import get_entry

    dataset = validated_dataset(params)
    return {name: missing_images(name, params.features, dataset, params.path("feature_cache"))
            for name in params.select.scored() if getattr(get_entry(name), "modality", "image") == "image"}


def _trunk_piece(params: Params, arguments: dict[str, Any]) -> str:
    from components.features.shards import prepare_trunk

    return prepare_trunk(arguments["backbone"], params.features, validated_dataset(params), params.path("feature_cache"))


def _chunk_piece(params: Params, arguments: dict[str, Any]) -> str:
    from components.features.shards import compute_chunk

    return compute_chunk(arguments["backbone"], params.features, validated_dataset(params), params.path("feature_cache"),
                         arguments["sha256"], arguments["trunk"])


def _scores_missing_work(params: Params, done: dict[str, str]) -> dict[str, dict[str, Any]]:
    """One piece per candidate whose LogME score is not cached for today's features (and labels: select reads the
    labelled view, like the stage)."""
    from components.features import select

    return {name: {"backbone": name} for name in params.select.scored()
            if not select.score_path(labelled_dataset(params), params.path("features"), name, params.select.tap,
                                     params.path("feature_cache")).exists()}


def _score_piece(params: Params, arguments: dict[str, Any]) -> str:
    from components.features import select

    score = select.candidate_score(labelled_dataset(params), params.path("features"), arguments["backbone"],
                                   params.select.tap, params.path("feature_cache"))
    return str(score["logme"])


def _finetune(params: Params, ctx: StageContext, out: Path) -> StageResult:
    from components.data import ingest
    from components.training import finetune

    return finetune.run(params.finetune, selected_backbone(params), params.path("features"), labelled_dataset(params),
                        params.path("validate") / "manifest.csv", out, params.path("feature_cache"),
                        params.path("train_state"), params.features.opset, params.features.parity_atol, ctx.progress,
                        int8_recipe=params.compress.planned_recipe(served_views(params)),
                        orders=ingest.declared_orders(params.ingest), values=ingest.declared_values(params.ingest))


def served_views(params: Params) -> int:
    """The views the exported `partial` model averages (export caps `tta_views` at the views it trained on)."""
    return min(params.export.tta_views, params.finetune.partial.views)


def _export(params: Params, ctx: StageContext, out: Path) -> StageResult:
    from components.packaging import export
    from components.training.finetune import CHECKPOINT_FILE

    return export.run(params.export, params.compress.unstructured_sparsity(),
                      params.path("finetune") / CHECKPOINT_FILE, labelled_dataset(params), out,
                      features_dir=params.path("features"),
                      channel_pruning=params.compress.channel_pruning(seed=params.finetune.seed))


def _compress(params: Params, ctx: StageContext, out: Path) -> StageResult:
    from components.packaging import compress

    return compress.run(params.compress, params.path("export"), labelled_dataset(params), out)


def _evaluate(params: Params, ctx: StageContext, out: Path) -> StageResult:
    from components.evaluation import evaluate

    result = evaluate.run(params.evaluate, params.path("compress") / SHIPPED_FILE, labelled_dataset(params), out)
    write_json(out / METRICS_FILE, evaluate.metrics_document(result.metrics))  # DVC metrics, beside the plots
    return result


def _register(params: Params, ctx: StageContext, out: Path) -> StageResult:
    from components.registry import register

    finetuned, compressed = StageResult.load(params.path("finetune")), StageResult.load(params.path("compress"))
    evaluated = StageResult.load(params.path("evaluate"))
    lineage = {"backbone": finetuned.info["backbone"], "strategy": finetuned.info["strategy"],
               "compression": str(compressed.info["shipped"]),
               "data.version": data_version(params.path("validate") / "manifest.csv"), "git.commit": git_commit()}
    test_metrics = {k: float(v) for k, v in evaluated.metrics.items() if isinstance(v, (int, float))}
    return register.run(params.register, params.path("compress") / SHIPPED_FILE, test_metrics, lineage, out,
                        ctx.run_id)


def _promote(params: Params, ctx: StageContext, out: Path) -> StageResult:
    from components.registry import promote

    registered = StageResult.load(params.path("register"))
    name, version = registered.info["model_name"], registered.info["version"]
    # Asked first: with nothing new (a `dvc repro` after a run) the test split is not even read.
    # Promotion judges the primary task (the first of finetune.tasks): its column is what the labels mean.
    return (promote.already_champion(params.promote, name, version, out)
            or promote.run(params.promote, name, version, labelled_dataset(params).for_task(params.finetune.tasks[0]),
                           out))


def _version_exists(result: StageResult) -> bool:
    from components.registry.register import version_exists

    return version_exists(result.info["model_name"], result.info["version"])


ADAPT_KEY = "finetune.adapt.target_domain"
# compress keys of the INT8 recipe (its calibration views are export's: see `served_views`)
INT8_KEYS = ("quantize", *(key.name for key in fields(Recipe) if key.name != "calibration_views"))

STAGES: tuple[Stage, ...] = (
    Stage("ingest", "components.data.ingest", _ingest, ("ingest",), (), "dataset", io_bound=True),
    Stage("validate", "components.data.validate", _validate, ("validate", "finetune.tasks"), ("dataset",), "validate",
          tuple(Output(n) for n in ("manifest.csv", "report.json", "report.md", RESULT_FILE, "data_docs"))),
    # Pieces: each backbone's trunk, then chunks of images x backbones, each writing its entries of the feature cache.
    Stage("features", "components.features.extract", _features, ("features", "select.candidates", "select.backbone"),
          ("dataset", "validate/manifest.csv"), "features",
          fan_out=(Shards("trunks", _trunks_missing_work, _trunk_piece),
                   Shards("chunks", _chunks_missing_work, _chunk_piece))),
    # `finetune.adapt.target_domain` hides the target's train/val labels from every stage from here on.
    # Pieces: LogME per candidate, each kept by content beside that candidate's cached features.
    Stage("select", "components.features.select", _select, ("select", ADAPT_KEY), ("features", "validate/manifest.csv"),
          "select",
          (Output("ranking.json"), Output("ranking.png"), Output(RESULT_FILE),
           Output("ranking.csv", "plots", cache=False, plot={"x": "logme", "y": "backbone",
                                                               "template": "bar_horizontal"})),
          fan_out=(Shards("logme", _scores_missing_work, _score_piece),)),
    # The compress keys: `partial` also trains on activations quantized the way compress will quantize.
    Stage("finetune", "components.training.finetune", _finetune,
          ("finetune", "features.opset", "features.parity_atol", *(f"compress.{key}" for key in INT8_KEYS),
           "export.tta_views", "ingest.source", "ingest.label_mode"),  # the source's declared orders and values
          ("features", f"select/{RESULT_FILE}", "dataset", "validate/manifest.csv"), "finetune",
          files=lambda params: tuple(Path(t) for t in [params.finetune.distill.teacher] if t),
          also_code=("components.data.ingest",)),
    Stage("export", "components.packaging.export", _export,
          ("export", "compress.prune", "compress.sparsity", "compress.prune_ratio", "compress.prune_round_to",
           "compress.recovery_epochs", "compress.recovery_lr", "compress.recovery_batch_size",
           "compress.recovery_patience", "finetune.seed", ADAPT_KEY),
          ("finetune", "features", "dataset", "validate/manifest.csv"), "export"),
    Stage("compress", "components.packaging.compress", _compress, ("compress", ADAPT_KEY),
          ("export", "dataset", "validate/manifest.csv"),
          "compress"),
    Stage("evaluate", "components.evaluation.evaluate", _evaluate, ("evaluate",),
          (f"compress/{SHIPPED_FILE}", "dataset", "validate/manifest.csv"), "evaluate",
          (Output("confusion_matrix.png"), Output("reliability.png"), Output("by_domain.png"), Output(TASKS_FOLDER),
           Output(RESULT_FILE),
           Output(METRICS_FILE, "metrics"),
           Output("predictions.csv", "plots", cache=False, plot={"template": "confusion", "x": "actual",
                                                                  "y": "predicted"}))),
    Stage("register", "components.registry.register", _register, ("register",),
          (f"compress/{SHIPPED_FILE}", f"compress/{RESULT_FILE}", f"evaluate/{METRICS_FILE}",
           f"finetune/{RESULT_FILE}", "validate/manifest.csv"), "register", (Output(cache=False),), io_bound=True, still_valid=_version_exists),
    # Never cached: the champion it is judged against lives in the registry and moves between runs.
    Stage("promote", "components.registry.promote", _promote, ("promote", "finetune.tasks"),
          (f"register/{RESULT_FILE}", "dataset", "validate/manifest.csv"), "promote",
          (Output(cache=False),), cached=False, io_bound=True),
)
ORDER = tuple(stage.name for stage in STAGES)
BY_NAME = {stage.name: stage for stage in STAGES}


def get_stage(name: str) -> Stage:
    if name not in BY_NAME:
        raise UserError(f"unknown stage {name!r}; stages are {list(ORDER)}.")
    return BY_NAME[name]


def stage_params(params: Params, stage: Stage) -> dict[str, Any]:
    """The flat `block.key -> value` params a stage depends on (for cache keys and MLflow)."""
    flat: dict[str, Any] = {}
    raw = params.to_dict()
    for name in stage.params:
        block, *keys = name.split(".")  # a block, a key of it, or a key of a nested block (finetune.adapt.x)
        value = raw[block]
        for key in keys:
            value = value[key]
        values = {".".join(keys): value} if keys else value
        flat.update({f"{block}.{k}": v for k, v in values.items()})
    return flat


def cache_inputs(params: Params, stage: Stage, upstream: dict[str, str]) -> dict[str, Any]:
    """Everything a stage's result depends on: params, upstream content, code, libraries, paths.

    `upstream` maps each earlier stage (and "source") to the content fingerprint of its output.
    The code covers the stage's modules (as in dvc.yaml) plus the flow that runs it.
    """
    return {
        "stage": stage.name,
        "params": stage_params(params, stage),
        "paths": params.to_dict()["paths"],
        "upstream": upstream,
        "code": code_hash(stage.modules() + (TRAINING_FLOW,)),
        "libraries": library_versions(),
        "files": {str(path): sha256_file(path) if path.is_file() else None for path in stage.files(params)},
    }


def stage_dir(params: Params, stage: Stage) -> Path:
    return params.path(stage.folder)


def check_owned(path: Path) -> None:
    """Refuse to replace a folder holding files tlops did not write."""
    if path.exists() and any(path.iterdir()) and not (
        (path / RESULT_FILE).exists() or (path / OWNED_MARKER).exists()
    ):
        raise UserError(f"{path} holds files tlops did not write; point this stage's paths.* key at a new or empty folder.")


def staging_dir(target: Path) -> Path:
    """A fresh sibling of `target` to write into (a sibling, so relative paths between stages hold)."""
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    (staging / OWNED_MARKER).touch()
    return staging


def publish(staging: Path, target: Path) -> None:
    """Put a finished stage folder in place: the old folder goes only once the new one is complete."""
    retired = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(retired)
    staging.rename(target)
    if retired.exists():
        shutil.rmtree(retired)


def execute(stage: Stage, params: Params, ctx: StageContext = StageContext()) -> StageResult:
    """Run one stage into a staging folder, then publish it; returns the published result."""
    target = stage_dir(params, stage)
    check_owned(target)
    for leftover in target.parent.glob(f".{target.name}.partial-*") if target.parent.exists() else ():
        shutil.rmtree(leftover, ignore_errors=True)  # a killed run's half-written folder, never read
    staging = staging_dir(target)
    try:
        stage.compute(params, ctx, staging)
    except BaseException as error:
        if (staging / RESULT_FILE).exists():  # a report worth keeping (e.g. a failed validation)
            publish(staging, target)
            if isinstance(error, UserError):  # point the message at where the report now is
                error.args = tuple(str(a).replace(str(staging), str(target)) for a in error.args)
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, target)
    return StageResult.load(target)
