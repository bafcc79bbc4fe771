"""Tune: an Optuna study (seeded TPE, median pruning) over finetune's hyperparameters.

Each trial is the finetune stage itself (`finetune.run`) with the trial's values applied to the
params' finetune block, written into a temporary folder that is removed when the trial ends: the
cached features and activations are shared, so a trial costs only its training. Partial and full
report val accuracy after every epoch; a trial below the median of earlier trials at the same
epoch is pruned there. MLflow logging is the caller's (`tlops/tune.py`), through `callbacks`.

`tune` runs the study in this process; `tune_in_rounds` runs it with trials elsewhere (Dask workers,
`flows/tune.py`), in seeded rounds that keep it reproducible (see the comment above it).
"""

from __future__ import annotations

import logging
import tempfile
import time
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


# A diverging trial (NaN loss, a too-high lr) is a FAIL in the study, not the end of it.
CAUGHT = (RuntimeError, ValueError, FloatingPointError)


def train_trial(trial: optuna.Trial, cfg: TuneConfig, base: FinetuneConfig, backbone: str, features_dir: Path,
                dataset: Dataset, manifest_path: Path, work_dir: Path, cache_dir: Path, opset: int, atol: float,
                int8_recipe: Recipe | None, orders: Mapping[str, Sequence[str]] | None = None) -> float:
    """One trial: the finetune stage with the trial's values, in a temporary folder under `work_dir`; its val accuracy.

    Reports val accuracy after every epoch of partial and full, and stops (`optuna.TrialPruned`) where the study's
    pruner says so."""
    values = {key: spec.suggest(trial, key) for key, spec in cfg.space.items()}
    config = apply_values(base, cfg.strategy, values)

    def report(epoch: int, entry: dict[str, float]) -> None:
        trial.report(entry["val_accuracy"], epoch)
        trial.set_user_attr("history", [*trial.user_attrs.get("history", []), entry])
        if trial.should_prune():
            raise optuna.TrialPruned(f"trial {trial.number} pruned after epoch {epoch} "
                                     f"(val accuracy {entry['val_accuracy']:.4f} below the median)")

    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"trial-{trial.number}-", dir=work_dir) as scratch:
        result = finetune_run(config, backbone, features_dir, dataset, manifest_path, Path(scratch) / "out",
                              cache_dir, Path(scratch) / "state", opset, atol, on_epoch=report, int8_recipe=int8_recipe,
                              orders=orders)
    for key in ("val_loss", "best_epoch", "epochs_run", "train_seconds"):
        trial.set_user_attr(key, result.metrics[key])
    log.info("trial %d: val accuracy %.4f with %s", trial.number, result.metrics["val_accuracy"], values)
    return float(result.metrics["val_accuracy"])


def pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner.n_startup_trials,
                                       n_warmup_steps=cfg.pruner.n_warmup_steps)


def tune(cfg: TuneConfig, base: FinetuneConfig, backbone: str, features_dir: Path, dataset: Dataset,
         manifest_path: Path, work_dir: Path, cache_dir: Path, opset: int = 17, atol: float = 1e-4,
         int8_recipe: Recipe | None = None, callbacks: Sequence[TrialCallback] = (),
         orders: Mapping[str, Sequence[str]] | None = None) -> TuneResult:
    """Run the study until `cfg.trials` trials or `cfg.minutes` have passed. Every trial's files live in a
    temporary folder under `work_dir`, removed when the trial ends (completed, pruned or failed).

    `int8_recipe`, `orders`: as for the finetune stage, so a trial trains the way the pipeline will."""
    work_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(direction="maximize", study_name=f"tune-{cfg.strategy}",
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed), pruner=pruner(cfg))
    study.optimize(lambda trial: train_trial(trial, cfg, base, backbone, features_dir, dataset, manifest_path, work_dir,
                                             cache_dir, opset, atol, int8_recipe, orders),
                   n_trials=cfg.trials, timeout=None if cfg.minutes is None else cfg.minutes * 60,
                   catch=CAUGHT, callbacks=list(callbacks))
    return tune_result(study, cfg, base)


def tune_result(study: optuna.Study, cfg: TuneConfig, base: FinetuneConfig) -> TuneResult:
    counts = {state.name: sum(t.state == state for t in study.trials)
              for state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)}
    if counts["COMPLETE"] == 0:
        from components.core.errors import UserError

        raise UserError(f"tune: none of {len(study.trials)} trials completed ({counts}); widen tune.trials/minutes "
                        f"or narrow tune.space (see the log for why they stopped).")
    best = study.best_trial
    return TuneResult(study, float(best.value), dict(best.params), apply_values(base, cfg.strategy, best.params), counts)


# Trials in parallel, on other processes or machines, sharing the study through a storage.
#
# The study is run in rounds: this process asks a round of trials at once (each trial's values are drawn when it is
# asked, by the one seeded TPE sampler, treating the round's earlier trials as running: Optuna's constant liar), the
# round's trials train wherever `run_round` sends them, reporting their epochs to the shared storage, and the round is
# told before the next is asked. A trial is pruned only against trials finished before its round (`RoundPruner`), so
# nothing depends on which trial of a round finishes first: the same seed, space, data and round width give the same
# trials. A wider round draws its trials with less information than one-at-a-time would (a round's trials do not see
# each other's results), and its workers wait for the round's slowest trial.


@dataclass(frozen=True)
class TrialOutcome:
    """How a trial run elsewhere ended: COMPLETE with its value, PRUNED or FAIL (with the error)."""

    number: int
    state: str
    value: float | None = None
    error: str | None = None


class EarlierTrials:
    """The parts of a study a pruner reads, limited to the trials numbered below `first`."""

    def __init__(self, study: optuna.Study, first: int):
        self._study, self._first = study, first

    def get_trials(self, deepcopy: bool = True, states: Sequence[optuna.trial.TrialState] | None = None
                   ) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states) if t.number < self._first]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class RoundPruner(optuna.pruners.BasePruner):
    """`inner`, judging a trial only against the trials finished before its round was asked."""

    def __init__(self, inner: optuna.pruners.BasePruner, first_of_round: int):
        self._inner, self._first = inner, first_of_round

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return self._inner.prune(EarlierTrials(study, self._first), trial)  # type: ignore[arg-type]


def open_storage(where: str) -> optuna.storages.BaseStorage:
    """A study storage several processes can write: a database URL (RDBStorage) or a journal file path."""
    if "://" in where:
        return optuna.storages.RDBStorage(where)
    Path(where).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(where))


def run_trial(cfg: TuneConfig, base: FinetuneConfig, backbone: str, features_dir: Path, dataset: Dataset,
              manifest_path: Path, work_dir: Path, cache_dir: Path, opset: int, atol: float, int8_recipe: Recipe | None,
              storage: str, study_name: str, trial_id: int, first_of_round: int,
              orders: Mapping[str, Sequence[str]] | None = None) -> TrialOutcome:
    """One asked trial of a shared study, trained here (on a worker); a bug raises, a diverging trial is a FAIL."""
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage),
                              pruner=RoundPruner(pruner(cfg), first_of_round))
    trial = optuna.Trial(study, trial_id)
    try:
        value = train_trial(trial, cfg, base, backbone, features_dir, dataset, manifest_path, work_dir, cache_dir,
                            opset, atol, int8_recipe, orders)
    except optuna.TrialPruned as pruned:
        log.info("%s", pruned)
        return TrialOutcome(trial.number, "PRUNED")
    except CAUGHT as error:
        log.warning("trial %d failed: %s", trial.number, error)
        return TrialOutcome(trial.number, "FAIL", error=str(error).splitlines()[0][:300])
    return TrialOutcome(trial.number, "COMPLETE", value)


# (trial id, trial number) of each trial of a round, and the round's first number -> how each ended
RunRound = Callable[[list[tuple[int, int]], int], list[TrialOutcome]]


def tune_in_rounds(cfg: TuneConfig, base: FinetuneConfig, storage: str, study_name: str, width: int,
                   run_round: RunRound, callbacks: Sequence[TrialCallback] = ()) -> TuneResult:
    """The study in rounds of `width` trials, each round run by `run_round` (see above); callbacks as `optimize`'s."""
    study = optuna.create_study(storage=open_storage(storage), study_name=study_name, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed), pruner=pruner(cfg))
    distributions = {key: spec.distribution() for key, spec in cfg.space.items()}
    deadline = None if cfg.minutes is None else time.monotonic() + cfg.minutes * 60
    states = {"COMPLETE": optuna.trial.TrialState.COMPLETE, "PRUNED": optuna.trial.TrialState.PRUNED,
              "FAIL": optuna.trial.TrialState.FAIL}
    while (cfg.trials is None or len(study.trials) < cfg.trials) and (deadline is None or time.monotonic() < deadline):
        size = width if cfg.trials is None else min(width, cfg.trials - len(study.trials))
        asked = [study.ask(distributions) for _ in range(size)]
        log.info("tune: round of trials %s", [t.number for t in asked])
        # Trial ids are the storage's handle on a trial; Optuna exposes them only on the Trial object.
        outcomes = run_round([(t._trial_id, t.number) for t in asked], asked[0].number)
        for outcome in sorted(outcomes, key=lambda o: o.number):
            if outcome.state == "COMPLETE":
                study.tell(outcome.number, outcome.value)
            else:
                study.tell(outcome.number, state=states[outcome.state])
            finished = study.get_trials(deepcopy=False)[outcome.number]
            for callback in callbacks:
                callback(study, finished)
    return tune_result(study, cfg, base)
