"""Params of the finetune stage and `tlops tune` (`finetune:` and `tune:` in params.yaml).

One typed, frozen block per strategy beside the keys every strategy shares. Configs import no
framework (only pydantic), so a typo in params fails in well under a second, before torch is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, PositiveFloat, ValidationError, field_validator, model_validator

from components.core.config import StageConfig

if TYPE_CHECKING:
    import optuna

Choice = bool | int | float | str  # what Optuna's suggest_categorical stores


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    lr: float  # the head's peak learning rate
    layer_decay: float  # lr factor from one layer group to the one before it
    weight_decay: float
    warmup_epochs: int
    schedule: Literal["cosine", "onecycle"]
    patience: int
    seed: int
    ema: float = 0.0  # per-step decay of an exponential moving average of the weights; 0 = off


class ReferenceConfig(StageConfig):
    image_size: int = Field(32, ge=4)  # side of the downsampled grayscale image the reference reads
    margin: float = Field(0.02, ge=0, lt=1)  # val accuracy the transferred model must gain over the reference
    # Inverse L2 strengths (scikit-learn's C) tried; the best on val accuracy wins, ties go to lower log loss.
    regularization: tuple[PositiveFloat, ...] = Field((0.001, 0.01, 0.1, 1.0), min_length=1)
    max_iter: int = Field(1000, ge=1)  # lbfgs iterations per fit


class DistillConfig(StageConfig):
    teacher: str | None = None  # a teacher model.pt from an earlier finetune run; None = no distillation
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the teacher term; 0 = plain cross-entropy
    temperature: float = Field(4.0, gt=0)  # softens both distributions; the KL term is scaled by T^2


class LinearConfig(StageConfig):
    taps: tuple[str, ...] = Field(("pooled",), min_length=1)  # concatenated; each must be in features.taps
    regularization: tuple[float, ...] = Field((0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0), min_length=1)  # sklearn C grid


class TrainConfig(StageConfig):
    """The epoch loop of partial and full fine-tuning."""

    epochs: int = Field(12, ge=1)
    lr: float = Field(1e-3, gt=0)  # the head's peak learning rate
    layer_decay: float = Field(0.7, gt=0, le=1)  # each earlier layer group: this times the next one's lr
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(64, ge=2)
    warmup_epochs: int = Field(1, ge=0)
    schedule: Literal["cosine", "onecycle"] = "cosine"
    patience: int = Field(4, ge=1)  # epochs without a better val accuracy before early stopping
    dropout: float = Field(0.2, ge=0, lt=1)
    ema: float = Field(0.0, ge=0, lt=1)  # per-step decay of a moving average of the weights, which is kept; 0 = off

    def loop(self, seed: int) -> LoopConfig:
        return LoopConfig(self.epochs, self.lr, self.layer_decay, self.weight_decay, min(self.warmup_epochs, self.epochs - 1),
                          self.schedule, self.patience, seed, self.ema)


class PartialConfig(TrainConfig):
    blocks: int = Field(5, ge=1)  # the last N blocks trained (Lite0 has 16)
    views: int = Field(8, ge=1, le=8)  # cached views per train image: 4 rotations, then their mirrors
    # Also train on the frozen part's INT8 activations (compress's recipe), when compress quantizes.
    int8_views: bool = True


class FullConfig(TrainConfig):
    epochs: int = Field(15, ge=1)
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(32, ge=2)
    crop_scale_min: float = Field(0.8, gt=0, le=1)  # RandomResizedCrop's smallest area share
    jitter: float = Field(0.2, ge=0, lt=1)  # brightness/contrast jitter
    workers: int = Field(1, ge=0)  # DataLoader processes decoding and augmenting (per training process)
    # Training processes (DistributedDataParallel through torch.distributed.run); batch_size stays the global batch.
    processes: int = Field(1, ge=1, le=1024)

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> FullConfig:
        if self.batch_size % self.processes:
            raise ValueError(f"batch_size {self.batch_size} is the global batch and must split evenly over "
                             f"processes={self.processes} (each process takes batch_size / processes images)")
        return self


class FinetuneConfig(StageConfig):
    strategy: Literal["linear", "partial", "full", "auto"] = "auto"
    # auto: train no deeper strategy than its counted cost fits in, in minutes of a reference 2-core AVX2 CPU
    budget_minutes: float = Field(25.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast where the hardware has native bf16
    class_weights: Literal["balanced", "none"] = "balanced"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    guard: ReferenceConfig = ReferenceConfig()
    distill: DistillConfig = DistillConfig()  # partial strategy only: a teacher's cached logits in the loss
    linear: LinearConfig = LinearConfig()
    partial: PartialConfig = PartialConfig()
    full: FullConfig = FullConfig()


class SearchSpec(StageConfig):
    """One dimension: a float range (`low`, `high`, optional `log`/`step`), an int range (`integer: true`) or `choices`."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    integer: bool = False
    choices: tuple[Choice, ...] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_kind(self) -> SearchSpec:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices)")
        if self.low >= self.high:
            raise ValueError(f"low {self.low} is not below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (an Optuna rule)")
        return self

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """What `suggest` draws from, for trials whose values are drawn when they are asked (`study.ask`)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices is not None:
            return CategoricalDistribution(list(self.choices))
        assert self.low is not None and self.high is not None
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def corners(self) -> list[Any]:
        """The values a study can reach at its edges, checked against finetune's schema at load time."""
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None and self.high is not None
        return [int(self.low), int(self.high)] if self.integer else [self.low, self.high]


class PrunerConfig(StageConfig):
    """Optuna's MedianPruner."""

    n_startup_trials: int = Field(2, ge=0)  # trials that always run to the end before any is pruned
    n_warmup_steps: int = Field(1, ge=0)  # epochs of each trial never pruned


DEFAULT_SPACE = {
    "partial.lr": SearchSpec(low=1e-4, high=3e-3, log=True),
    "partial.layer_decay": SearchSpec(low=0.3, high=1.0),
    "partial.weight_decay": SearchSpec(low=1e-4, high=0.1, log=True),
    "label_smoothing": SearchSpec(low=0.0, high=0.2),
}


def apply_values(base: FinetuneConfig, strategy: str, values: dict[str, Any]) -> FinetuneConfig:
    """`base` with `strategy` and each dotted key set; a scalar for a list key (e.g. `linear.regularization`)
    becomes a one-item list, so a probe is fitted at exactly the sampled value."""
    raw = base.model_dump(mode="json")
    raw["strategy"] = strategy
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = [value] if isinstance(node.get(leaf), list) and not isinstance(value, list) else value
    return FinetuneConfig.model_validate(raw)


def check_key(key: str) -> None:
    """A dotted key must name a value (not a block) of FinetuneConfig."""
    model: Any = FinetuneConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "finetune"
            raise ValueError(f"space key {key!r} is not a finetune key; {where} has {list(fields)}")
        model = fields[part].annotation
    if isinstance(model, type) and issubclass(model, StageConfig):
        raise ValueError(f"space key {key!r} is a block; name one of its keys, e.g. {key}.{next(iter(model.model_fields))}")
    if key == "strategy":
        raise ValueError("space key 'strategy' cannot be searched; set tune.strategy (one study tunes one strategy)")


class TuneConfig(StageConfig):
    strategy: Literal["linear", "partial", "full"] = "partial"  # the finetune strategy every trial trains
    trials: int | None = Field(20, ge=1)  # stop after this many trials (pruned ones count)
    minutes: float | None = Field(None, gt=0)  # or after this much wall time (whichever comes first)
    seed: int = 0  # TPE's seed: the same seed, space and data give the same sequence of trials
    space: dict[str, SearchSpec] = Field(default_factory=lambda: dict(DEFAULT_SPACE), min_length=1)
    pruner: PrunerConfig = PrunerConfig()
    # Trials on Dask workers (runner.kind: dask) share the study here: an SQLAlchemy URL (PostgreSQL in the team
    # setup) or null, a journal file in paths.tune. Unused by a study in one process.
    storage: str | None = None

    @field_validator("storage")
    @classmethod
    def _shared_safely(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("sqlite"):
            raise ValueError("SQLite is not safe for trials written by several processes at once (Optuna's RDBStorage "
                             "docs); leave it null (a journal file, safe across processes) or give a PostgreSQL URL")
        if value is not None and "://" not in value:
            raise ValueError(f"{value!r} is not a database URL (e.g. postgresql+psycopg://user:pass@host/optuna); "
                             f"null keeps the study in a journal file in paths.tune")
        return value

    @model_validator(mode="after")
    def _budget_and_space(self) -> TuneConfig:
        if self.trials is None and self.minutes is None:
            raise ValueError("set trials, minutes or both; with neither the study would never stop")
        for key, spec in self.space.items():
            check_key(key)
            block = key.split(".")[0]
            if block in ("linear", "partial", "full") and block != self.strategy:
                raise ValueError(f"space key {key!r} has no effect when tune.strategy is {self.strategy!r}; "
                                 f"tune {self.strategy}.* keys or set tune.strategy={block}")
            for value in spec.corners():
                try:
                    apply_values(FinetuneConfig(), self.strategy, {key: value})
                except ValidationError as error:
                    detail = error.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"space key {key!r}: value {value!r} is outside finetune's range ({detail})") from None
        return self


