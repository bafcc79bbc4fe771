"""Tune: an Optuna study (seeded TPE, median pruning) over finetune's hyperparameters.

Each trial is the finetune stage itself (`finetune.run`) with the trial's values applied to the
params' finetune block, written into a temporary folder that is removed when the trial ends: the
cached features and activations are shared, so a trial costs only its training. Partial and full
report val accuracy after every epoch; a trial below the median of earlier trials at the same
epoch is pruned there. MLflow logging is the caller's (`tlops/tune.py`), through `callbacks`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import optuna
from pydantic import Field, ValidationError, model_validator

from components.core.config import StageConfig
from components.data.manifest import Dataset
from components.training.finetune import FinetuneConfig
from components.training.finetune import run as finetune_run

if TYPE_CHECKING:
    from components.models import quantization as int8

log = logging.getLogger(__name__)

Choice = bool | int | float | str  # what Optuna's suggest_categorical stores
TrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


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


@dataclass(frozen=True)
class TuneResult:
    study: optuna.Study
    best_value: float
    best_params: dict[str, Any]  # dotted finetune keys -> value
    best_config: FinetuneConfig
    counts: dict[str, int]  # trials per Optuna state: COMPLETE, PRUNED, FAIL

    def overrides(self) -> list[str]:
        """`finetune.KEY=VALUE` assignments (YAML values) that reproduce the best trial."""
        values = {"strategy": self.best_config.strategy, **self.best_params}
        return [f"finetune.{k}={yaml_scalar(_as_set(self.best_config, k, v))}" for k, v in values.items()]

    def params_fragment(self) -> dict[str, Any]:
        """The best trial as a nested params.yaml fragment under `finetune`."""
        fragment: dict[str, Any] = {"strategy": self.best_config.strategy}
        for key, value in self.best_params.items():
            *parents, leaf = key.split(".")
            node = fragment
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = _as_set(self.best_config, key, value)
        return {"finetune": fragment}


def _as_set(cfg: FinetuneConfig, key: str, value: Any) -> Any:
    """The value as the config holds it (a list key keeps its list form)."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return list(node) if isinstance(node, tuple) else value


def yaml_scalar(value: Any) -> str:
    """A value written so that `--set`/`-S` (both parse YAML) read it back unchanged."""
    if isinstance(value, list):
        return "[" + ",".join(yaml_scalar(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def tune(cfg: TuneConfig, base: FinetuneConfig, backbone: str, features_dir: Path, dataset: Dataset,
         manifest_path: Path, work_dir: Path, cache_dir: Path, opset: int = 17, atol: float = 1e-4,
         int8_recipe: int8.Recipe | None = None, callbacks: Sequence[TrialCallback] = ()) -> TuneResult:
    """Run the study until `cfg.trials` trials or `cfg.minutes` have passed. Every trial's files live in a
    temporary folder under `work_dir`, removed when the trial ends (completed, pruned or failed).

    `int8_recipe`: as for the finetune stage, so a trial trains the way the pipeline will."""
    work_dir.mkdir(parents=True, exist_ok=True)

    def objective(trial: optuna.Trial) -> float:
        values = {key: spec.suggest(trial, key) for key, spec in cfg.space.items()}
        config = apply_values(base, cfg.strategy, values)

        def report(epoch: int, entry: dict[str, float]) -> None:
            trial.report(entry["val_accuracy"], epoch)
            trial.set_user_attr("history", [*trial.user_attrs.get("history", []), entry])
            if trial.should_prune():
                raise optuna.TrialPruned(f"trial {trial.number} pruned after epoch {epoch} "
                             f"(val accuracy {entry['val_accuracy']:.4f} below the median)")

        with tempfile.TemporaryDirectory(prefix=f"trial-{trial.number}-", dir=work_dir) as scratch:
            result = finetune_run(config, backbone, features_dir, dataset, manifest_path, Path(scratch) / "out",
                                  cache_dir, Path(scratch) / "state", opset, atol, on_epoch=report,
                                  int8_recipe=int8_recipe)
        for key in ("val_loss", "best_epoch", "epochs_run", "train_seconds"):
            trial.set_user_attr(key, result.metrics[key])
        log.info("trial %d: val accuracy %.4f with %s", trial.number, result.metrics["val_accuracy"], values)
        return float(result.metrics["val_accuracy"])

    study = optuna.create_study(
        direction="maximize", study_name=f"tune-{cfg.strategy}",
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner.n_startup_trials,
                                           n_warmup_steps=cfg.pruner.n_warmup_steps),
    )
    # A diverging trial (NaN loss, a too-high lr) is a FAIL in the study, not the end of it.
    study.optimize(objective, n_trials=cfg.trials, timeout=None if cfg.minutes is None else cfg.minutes * 60,
                   catch=(RuntimeError, ValueError, FloatingPointError), callbacks=list(callbacks))
    counts = {state.name: sum(t.state == state for t in study.trials)
              for state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)}
    if counts["COMPLETE"] == 0:
        from components.core.errors import UserError

        raise UserError(f"tune: none of {len(study.trials)} trials completed ({counts}); widen tune.trials/minutes "
                        f"or narrow tune.space (see the log for why they stopped).")
    best = study.best_trial
    return TuneResult(study, float(best.value), dict(best.params), apply_values(base, cfg.strategy, best.params), counts)
