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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from components.data.manifest import Dataset
from components.training.config import FinetuneConfig, TuneConfig, apply_values
from components.training.finetune import run as finetune_run

if TYPE_CHECKING:
    from components.models.int8_recipe import Recipe

log = logging.getLogger(__name__)

TrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


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
         int8_recipe: Recipe | None = None, callbacks: Sequence[TrialCallback] = (),
         orders: Mapping[str, Sequence[str]] | None = None) -> TuneResult:
    """Run the study until `cfg.trials` trials or `cfg.minutes` have passed. Every trial's files live in a
    temporary folder under `work_dir`, removed when the trial ends (completed, pruned or failed).

    `int8_recipe`, `orders`: as for the finetune stage, so a trial trains the way the pipeline will."""
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
                                  int8_recipe=int8_recipe, orders=orders)
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
