"""Typed, frozen configuration: params.yaml blocks -> one pydantic model per stage.

Loading is strict: an unknown key or a value of the wrong type fails before any work, naming
the dotted key. Overrides use the same dotted keys as `dvc exp run -S`.
"""

from __future__ import annotations

import re
import warnings
import zoneinfo
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from components.core.config import StageConfig
from components.core.errors import UserError
from components.data.config import IngestConfig, ValidateConfig
from components.evaluation.config import EvaluateConfig, FewshotConfig
from components.features.config import FeaturesConfig, SelectConfig
from components.monitoring.config import DriftConfig
from components.packaging.config import CompressConfig, ExportConfig
from components.registry.config import PromoteConfig, RegisterConfig
from components.serving.config import ServeConfig
from components.training.config import FinetuneConfig, TuneConfig

# `validate` and `register` are stage names, hence block and path names; pydantic warns that they shadow
# BaseModel.validate (deprecated) and ABCMeta.register, neither of which a params block uses.
warnings.filterwarnings("ignore", message=r'Field name "(validate|register)" in "(PathsConfig|Params)" shadows',
                        category=UserWarning)


class ConfigError(UserError):
    """A params file or override that does not fit the schema."""


class PathsConfig(StageConfig):
    """Where every stage writes, relative to the working directory (the repo root)."""

    dataset: str = "outputs/ingest"
    validate: str = "outputs/validate"
    features: str = "outputs/features"
    feature_cache: str = ".cache/features"
    train_state: str = ".cache/train"  # per-epoch resume files of partial/full fine-tuning
    select: str = "outputs/select"
    finetune: str = "outputs/finetune"
    export: str = "outputs/export"
    compress: str = "outputs/compress"
    evaluate: str = "outputs/evaluate"
    register: str = "outputs/register"
    promote: str = "outputs/promote"
    drift: str = "outputs/drift"  # appended to by `tlops drift`, never emptied
    tune: str = "outputs/tune"  # `tlops tune`: best.json, best_params.yaml, the optimisation history
    fewshot: str = "outputs/fewshot"  # `tlops fewshot`: fewshot.json, fewshot.png
    add_class: str = "outputs/add_class"  # `tlops add-class`: the new model.onnx, its registration and promotion


class ScheduleConfig(StageConfig):
    deployment: str = Field("tlops-retrain", min_length=1)
    cron: str = "0 3 * * 1"  # Mondays at 03:00
    timezone: str = "UTC"
    work_pool: str = Field("tlops", min_length=1)
    work_queue: str | None = None  # None = the pool's default queue
    active: bool = True  # false keeps the deployment but creates no scheduled runs
    concurrency_limit: int = Field(1, ge=1)  # retrains write the same outputs/: never two at once
    # Drift-started retrains: the first flagged check starts one, further flags within this interval do not
    # (the drift trigger's `within`; ISO 8601 like PT6H or P1D, or seconds; 0 = one retrain per flagged check).
    min_retrain_interval: timedelta = Field(timedelta(days=1), ge=timedelta(0), le=timedelta(days=365))

    @field_validator("cron")
    @classmethod
    def five_fields(cls, value: str) -> str:
        # Prefect checks the expression itself when the deployment is created; this catches the shape
        # at load time without importing Prefect for every `tlops stage`.
        if len(value.split()) != 5:
            raise ValueError(f"{value!r} is not a 5-field cron expression (minute hour day month weekday)")
        return value

    @field_validator("timezone")
    @classmethod
    def known_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)") from None
        return value


class RunnerConfig(StageConfig):
    """Where the work that parallelises runs (feature shards, LogME per candidate, tune's trials): this process, or
    Dask workers through prefect-dask. Results are the same either way (docs/scaling.md); no other key changes."""

    kind: Literal["local", "dask"] = "local"
    address: str | None = None  # a running Dask scheduler, tcp://host:8786; null = a local cluster for the run
    workers: int = Field(2, ge=1, le=256)  # processes of that local cluster (with address null)
    shard_batches: int = Field(8, ge=1)  # features: a shard is this many features.batch_size batches of one backbone
    connect_seconds: float = Field(10.0, gt=0)  # how long the scheduler at `address` has to answer (and have a worker)

    @field_validator("address")
    @classmethod
    def _scheduler_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"(tcp|tls|inproc|ws|wss)://[^\s/]+(:\d+)?/?", value):
            raise ValueError(f"{value!r} is not a Dask scheduler address; write tcp://host:8786 (or null for a local "
                             f"cluster of runner.workers processes)")
        return value


class Params(StageConfig):
    paths: PathsConfig = PathsConfig()
    ingest: IngestConfig = IngestConfig()
    validate: ValidateConfig = ValidateConfig()
    features: FeaturesConfig = FeaturesConfig()
    select: SelectConfig = SelectConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    export: ExportConfig = ExportConfig()
    compress: CompressConfig = CompressConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = RegisterConfig()
    promote: PromoteConfig = PromoteConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    serve: ServeConfig = ServeConfig()
    drift: DriftConfig = DriftConfig()
    tune: TuneConfig = TuneConfig()
    fewshot: FewshotConfig = FewshotConfig()
    runner: RunnerConfig = RunnerConfig()

    @model_validator(mode="after")
    def _distinct_aliases(self) -> Params:
        if self.promote.alias == self.register.alias:
            raise ValueError(f"promote.alias and register.alias are both {self.register.alias!r}: every new version "
                             f"would take the alias the promotion gate guards; give them different names")
        return self

    @model_validator(mode="after")
    def _linear_taps_cached(self) -> Params:
        for block, used_by in (("linear", ("linear", "auto")), ("prototypes", ("prototypes",))):
            taps = getattr(self.finetune, block).taps
            missing = [t for t in taps if t not in self.features.taps]
            if missing and self.finetune.strategy in used_by:
                raise ValueError(f"finetune.{block}.taps {list(taps)} needs {missing}, which "
                                 f"features.taps {list(self.features.taps)} does not cache; add them there")
        if self.fewshot.tap not in self.features.taps:
            raise ValueError(f"fewshot.tap {self.fewshot.tap!r} is not cached (features.taps {list(self.features.taps)})")
        return self

    @model_validator(mode="after")
    def _drift_tap_cached(self) -> Params:
        # Drift embeds new images through the features stage's cache, and compares them with its features.
        if self.drift.tap not in self.features.taps:
            raise ValueError(f"drift.tap={self.drift.tap!r} is not in features.taps {list(self.features.taps)}, so "
                             f"the train split has no such features to compare with; pick one of those taps")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def path(self, name: str) -> Path:
        return Path(getattr(self.paths, name))


def _message(error: dict[str, Any]) -> str:
    """One pydantic error as `dotted.key: what is wrong`."""
    key = ".".join(str(part) for part in error["loc"]) or "params"
    if error["type"] == "extra_forbidden":
        *parents, _ = error["loc"]
        model: Any = Params
        for part in parents:
            model = model.model_fields[part].annotation
        where = ".".join(map(str, parents)) or "params"
        return f"{key}: unknown key; {where} accepts {list(model.model_fields)}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message} (got {error['input']!r})" if error["type"] != "value_error" else f"{key}: {message}"


def build(data: Any) -> Params:
    """Params from a mapping, rejecting unknown keys, wrong types and out-of-range values."""
    try:
        return Params.model_validate(data if data is not None else {})
    except ValidationError as error:
        raise ConfigError(_message(error.errors()[0])) from None


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """`a.b.c=VALUE`, VALUE parsed as YAML (so `0.1` is a float, `[a, b]` a list, `null` None)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE with a dotted key, e.g. finetune.lr=0.01")
    *parents, leaf = key.strip().split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parents[: i + 1])} is not a block of keys")
        node = child
    node[leaf] = yaml.safe_load(text)


def load_params(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: params file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return build(raw)
    except ConfigError as error:
        source = f"{path}: " if path else ""
        raise ConfigError(f"{source}{error}") from None
