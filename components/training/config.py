"""Params of the finetune stage and `tlops tune` (`finetune:` and `tune:` in params.yaml).

One typed, frozen block per strategy beside the keys every strategy shares. Configs import no
framework (only pydantic), so a typo in params fails in well under a second, before torch is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import Field, PositiveFloat, ValidationError, field_validator, model_validator

from components.core.config import StageConfig

if TYPE_CHECKING:
    import optuna

Choice = bool | int | float | str  # what Optuna's suggest_categorical stores
# How a task's head reads its classes: unrelated (softmax), ordered (CORN), or a value with class thresholds.
HeadKind = Literal["classify", "ordinal", "regress"]
INPUT_NAME = "image"  # the exported model's input: no task (hence no output) may take its name


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
    keep: Literal["best", "last"] = "best"  # the epoch returned: best val accuracy, or the last one trained


class ReferenceConfig(StageConfig):
    image_size: int = Field(32, ge=4)  # side of the downsampled grayscale image the reference reads
    margin: float = Field(0.02, ge=0, lt=1)  # val accuracy the transferred model must gain over the reference
    # Inverse L2 strengths (scikit-learn's C) tried; the best on val accuracy wins, ties go to lower log loss.
    regularization: tuple[PositiveFloat, ...] = Field((0.001, 0.01, 0.1, 1.0), min_length=1)
    max_iter: int = Field(1000, ge=1)  # lbfgs iterations per fit
    # Texts: TF-IDF of 1..text_ngrams word n-grams seen in at least text_min_df train texts, C from this grid.
    text_ngrams: int = Field(2, ge=1, le=3)
    text_min_df: int = Field(2, ge=1)
    text_regularization: tuple[PositiveFloat, ...] = Field((1.0, 10.0, 100.0), min_length=1)


class DistillConfig(StageConfig):
    teacher: str | None = None  # a teacher model.pt from an earlier finetune run; None = no distillation
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the teacher term; 0 = plain cross-entropy
    temperature: float = Field(4.0, gt=0)  # softens both distributions; the KL term is scaled by T^2


class SoftLabelsConfig(StageConfig):
    """Soft ordinal labels (SORD, Diaz & Marathe 2019): an ordered classify task learns the distribution
    softmax_k(-sharpness * (p - k)^2) over its classes (k: a class's rank in the declared order) instead of a
    one-hot class, where p is the image's place in the order: its class's rank, or its own value from a manifest
    column placed between the classes' values (ELPV's `defect_probability` for the binary label)."""

    # The tasks so trained (classify heads with an order); () = off; "auto": each classify task whose source
    # declares a value column (ELPV binary: label <- defect_probability) wherever partial or full train it
    # without a teacher or domain adaptation; elsewhere one-hot.
    tasks: tuple[str, ...] | Literal["auto"] = "auto"
    sharpness: float = Field(3.0, gt=0)  # higher: closer to one-hot; the next class's share is exp(-sharpness) of its own
    # task -> manifest column of each image's value (numbers); over what the source declares
    values: dict[str, str] = Field(default_factory=dict)


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
    # The new head's starting weights: random, or the linear probe fitted on the cached pooled features (LP-FT,
    # Kumar et al. 2022: fine-tuning then starts from a head that already separates the classes). Text encoders only.
    head_init: Literal["random", "probe"] = "random"

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


class AdaptConfig(StageConfig):
    """Unsupervised domain adaptation: a labelled source domain, an unlabelled target domain."""

    # A `domain` value of the manifest whose labels are never used (its train images are unlabelled target data,
    # its test images are scored as usual); None = off.
    target_domain: str | None = Field(None, min_length=1)
    method: Literal["none", "coral", "dann"] = "dann"  # none = source only; coral = correlation alignment; dann = GRL
    weight: float = Field(1.0, ge=0)  # the alignment loss's weight beside the source cross-entropy
    # DANN: the gradient reversal's coefficient warms up as 2 / (1 + exp(-step / w)) - 1 (tllib's schedule, its
    # max_iters = w), with w this many epochs' steps: 0.46 after them, 0.91 after three times as many
    grl_warmup_epochs: float = Field(2.0, gt=0)
    discriminator_width: int = Field(256, ge=1)  # DANN: hidden units of the domain discriminator's two layers
    # linear: standardise each domain's features with its own statistics (target: its unlabelled train images;
    # the exported model, the target's, then uses those) or every image with the source's
    normalise: Literal["per_domain", "source"] = "per_domain"
    # linear: the trainable head on cached features (a bottleneck, then the classifier)
    bottleneck: int = Field(256, ge=2)
    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    batch_size: int = Field(64, ge=4)
    dropout: float = Field(0.2, ge=0, lt=1)
    # Which epoch is kept, chosen without target labels: `last` (the usual DA practice: source val accuracy falls as
    # the features align, so choosing on it undoes the adaptation) or `best_source_val` (with early stopping).
    keep: Literal["last", "best_source_val"] = "last"
    patience: int = Field(10, ge=1)  # keep=best_source_val: epochs without a better source val accuracy before stopping

    def loop(self, seed: int) -> LoopConfig:
        last = self.keep == "last"
        return LoopConfig(self.epochs, self.lr, 1.0, self.weight_decay, min(1, self.epochs - 1), "cosine",
                          self.epochs if last else self.patience, seed, keep="last" if last else "best")


class PrototypesConfig(StageConfig):
    """Nearest class centroid on cached features, centred and L2-normalised (SimpleShot)."""

    taps: tuple[str, ...] = Field(("pooled",), min_length=1)  # concatenated; each must be in features.taps
    shots: int | None = Field(None, ge=1)  # at most this many train images per class make a prototype; None = all
    # Softmax temperatures tried (logits = scale x cosine); the one with the lowest val log loss is kept. It changes
    # no prediction, only how confident the probabilities are.
    scales: tuple[PositiveFloat, ...] = Field((1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0), min_length=1)


class FinetuneConfig(StageConfig):
    strategy: Literal["linear", "partial", "full", "prototypes", "auto"] = "auto"
    # auto: train no deeper strategy than its counted cost fits in, in minutes of a reference 2-core AVX2 CPU
    budget_minutes: float = Field(25.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast where the hardware has native bf16
    class_weights: Literal["balanced", "none"] = "balanced"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    guard: ReferenceConfig = ReferenceConfig()
    distill: DistillConfig = DistillConfig()  # partial strategy only: a teacher's cached logits in the loss
    soft_labels: SoftLabelsConfig = SoftLabelsConfig()  # partial and full: ordered tasks learn soft targets
    linear: LinearConfig = LinearConfig()
    partial: PartialConfig = PartialConfig()
    full: FullConfig = FullConfig()
    prototypes: PrototypesConfig = PrototypesConfig()
    adapt: AdaptConfig = AdaptConfig()
    # Several tasks from one trunk: the manifest columns learned, one head each; the first is the primary
    # task (early stopping, promotion, compress's budget and the headline accuracy use it).
    tasks: tuple[str, ...] = Field(("label",), min_length=1)
    # A kind for the primary task (the others classify), or a kind per task: {label: ordinal, cell_type: classify}.
    head: HeadKind | dict[str, HeadKind] = "classify"
    # Weights of the tasks' losses, in task order (None: 1 each), or "uncertainty": learned (Kendall et al. 2018).
    task_weights: tuple[PositiveFloat, ...] | Literal["uncertainty"] | None = None
    # The declared order of a task's classes, lowest first (ordinal and regress heads need one); ELPV declares
    # its own `label` order, and a column whose values are all numbers is ordered by value.
    orders: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _adaptable(self) -> FinetuneConfig:
        if self.adapt.target_domain is None:
            return self
        if not self.single_task:
            raise ValueError(f"finetune.adapt.target_domain is set, but tasks are {list(self.tasks)} with head "
                             f"{self.head!r}: domain adaptation trains one classify task; train that, or set "
                             f"finetune.adapt.target_domain=null")
        if self.strategy in ("full", "prototypes"):
            raise ValueError(f"finetune.adapt.target_domain is set, but finetune.strategy={self.strategy} does not "
                             f"adapt; use linear or partial (auto tries those), or set finetune.adapt.target_domain=null")
        if self.distill.teacher is not None:
            raise ValueError("finetune.adapt.target_domain and finetune.distill.teacher cannot be combined (the "
                             "teacher was trained with labels of every domain); set one of them to null")
        return self

    @field_validator("head", mode="before")
    @classmethod
    def _head_kinds(cls, head: Any) -> Any:
        kinds = get_args(HeadKind)
        named = head.items() if isinstance(head, dict) else [(None, head)]
        for task, kind in named:
            if kind not in kinds:
                where = f" for task {task!r}" if task is not None else ""
                raise ValueError(f"{kind!r}{where} is not a head kind; use one of {list(kinds)}, or a kind per task "
                                 f"such as {{label: ordinal}}")
        return head

    @model_validator(mode="after")
    def _tasks(self) -> FinetuneConfig:
        repeated = sorted({task for task in self.tasks if self.tasks.count(task) > 1})
        if repeated:
            raise ValueError(f"tasks {list(self.tasks)} name {repeated} more than once; each column is one task")
        if INPUT_NAME in self.tasks or any(not task.strip() for task in self.tasks):
            raise ValueError(f"tasks {list(self.tasks)}: a task may not be empty or named {INPUT_NAME!r} (the model's "
                             f"input); rename that column")
        if isinstance(self.head, dict):
            unknown = sorted(set(self.head) - set(self.tasks))
            if unknown:
                raise ValueError(f"head names {unknown}, which are not in tasks {list(self.tasks)}")
        if isinstance(self.task_weights, tuple) and len(self.task_weights) != len(self.tasks):
            raise ValueError(f"task_weights has {len(self.task_weights)} value(s) for {len(self.tasks)} task(s) "
                             f"{list(self.tasks)}; give one per task, in the same order")
        if self.distill.teacher is not None and not self.single_task:
            raise ValueError(f"distill.teacher is set, but distillation learns one classify task's logits and tasks are "
                             f"{list(self.tasks)} with head {self.head!r}; drop the teacher or train one classify task")
        if self.strategy == "prototypes" and not self.single_task:
            raise ValueError(f"finetune.strategy=prototypes is one classify task's nearest class centroid, but tasks are "
                             f"{list(self.tasks)} with head {self.head!r}; use linear, partial or full for several tasks")
        self._soft_labels()
        for task, order in self.orders.items():
            if len(order) < 2 or len(set(order)) != len(order):
                raise ValueError(f"orders.{task}: {list(order)} must list two or more distinct classes, lowest first")
        return self

    def _soft_labels(self) -> None:
        soft = self.soft_labels
        stray = sorted(set(soft.values) - set(self.tasks))
        if stray:
            raise ValueError(f"soft_labels.values names {stray}, which are not in tasks {list(self.tasks)}")
        if soft.tasks == "auto":
            return
        unknown = sorted(set(soft.tasks) - set(self.tasks))
        if unknown:
            raise ValueError(f"soft_labels.tasks names {unknown}, which are not in tasks {list(self.tasks)}")
        not_classify = [task for task in soft.tasks if self.head_of(task) != "classify"]
        if not_classify:
            raise ValueError(f"soft_labels.tasks: {not_classify} have head {self.head_of(not_classify[0])}, which "
                             f"has its own ordered loss; soft labels are for classify heads")
        excluded = self._targets_set_otherwise()
        if not soft.tasks or excluded is None:
            return
        if excluded == "strategy":
            raise ValueError(f"soft_labels.tasks is set, but finetune.strategy={self.strategy} fits class labels; use "
                             f"partial, full or auto (whose linear probe then fits class labels), or set "
                             f"soft_labels.tasks=[]")
        raise ValueError(f"soft_labels.tasks and finetune.{excluded} cannot be combined (each sets the targets "
                         f"its own way); set soft_labels.tasks=[] or finetune.{excluded}=null")

    def _targets_set_otherwise(self) -> str | None:
        """The key that leaves no room for soft labels (None: there is room): a strategy fitting class labels
        (linear, prototypes), a teacher's logits or domain adaptation. `auto` then stays one-hot; a list is refused."""
        if self.strategy in ("linear", "prototypes"):
            return "strategy"
        if self.distill.teacher is not None:
            return "distill.teacher"
        if self.adapt.target_domain is not None:
            return "adapt.target_domain"
        return None

    def soft_plan(self, declared: Mapping[str, str]) -> dict[str, str | None]:
        """The tasks trained on soft labels, each with its value column (None: its class's rank); `declared`: the
        value columns the source declares (`soft_labels.values` over them)."""
        soft, columns = self.soft_labels, {**declared, **self.soft_labels.values}
        if soft.tasks != "auto":
            return {task: columns.get(task) for task in soft.tasks}
        if self._targets_set_otherwise() is not None:
            return {}
        return {task: columns[task] for task in self.tasks if task in columns and self.head_of(task) == "classify"}

    def head_of(self, task: str) -> HeadKind:
        """The kind of head `task` gets: a per-task mapping, or `head` for the primary task; classify otherwise."""
        if isinstance(self.head, dict):
            return self.head.get(task, "classify")
        return self.head if task == self.tasks[0] else "classify"

    @property
    def single_task(self) -> bool:
        """Today's model: one classify head on `label`, exported with one `logits` output (nothing else changes)."""
        return self.tasks == ("label",) and self.head_of("label") == "classify"


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


