"""`tlops tune`: the prerequisite stages if their outputs are missing, then the Optuna study, in MLflow.

One parent run "tune" (tag `tlops.kind=tune`) holds the study settings, the best params, the
optimisation history plot and `best.json` / `best_params.yaml`; each trial is a nested run with its
params, its val accuracy per epoch as metric steps and its Optuna state as the tag `optuna.state`
(COMPLETE, PRUNED or FAIL). The study itself is `components.training.tune` (no MLflow there).
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import optuna
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric, RunStatus

from components.core.lineage import git_commit
from components.core.result import RESULT_FILE, StageResult, atomic_path, metric_key, write_json
from components.data.ingest import declared_orders
from components.training import tune as tuning
from tlops import tracking

if TYPE_CHECKING:
    from tlops.config import Params

log = logging.getLogger(__name__)

BEST_FILE = "best.json"
BEST_PARAMS_FILE = "best_params.yaml"
HISTORY_PLOT = "optimization_history.png"
PREREQUISITES = ("ingest", "validate", "features", "select")


def ensure_prerequisites(params: Params, lock: Any) -> list[str]:
    """Run ingest..select through the stage runner where a stage's output is missing or damaged; returns those run.

    Outputs that exist are used as they are (like `tlops stage`); `tlops run` or `dvc repro` refresh stale ones."""
    from tlops.stages import execute, get_stage

    ran = []
    for name in PREREQUISITES:
        stage = get_stage(name)
        folder = params.path(stage.folder)
        if (folder / RESULT_FILE).exists() and StageResult.load(folder).is_intact():
            continue
        log.info("tune: %s output missing at %s; running the stage", name, folder)
        execute(stage, params)
        lock.stage_done(name)
        ran.append(name)
    return ran


def log_trial(parent_run_id: str, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One finished trial as a nested run of the tune run (an Optuna callback)."""
    tags = {"tlops.kind": "tune-trial", "optuna.state": trial.state.name, "optuna.trial": str(trial.number),
            "mlflow.parentRunId": parent_run_id}
    status = RunStatus.to_string(RunStatus.FAILED if trial.state == optuna.trial.TrialState.FAIL else RunStatus.FINISHED)
    client = MlflowClient()
    run = client.create_run(mlflow.get_run(parent_run_id).info.experiment_id, run_name=f"trial-{trial.number}",
                            tags=tags, start_time=int(trial.datetime_start.timestamp() * 1000))
    now = int(time.time() * 1000)
    metrics = [Metric("epoch.val_accuracy", float(v), now, int(step)) for step, v in trial.intermediate_values.items()]
    for entry in trial.user_attrs.get("history", []):
        metrics += [Metric(metric_key(f"epoch.{k}"), float(v), now, int(entry["epoch"]))
                    for k, v in entry.items() if k not in ("epoch", "val_accuracy") and isinstance(v, (int, float))]
    if trial.value is not None:
        metrics.append(Metric("val_accuracy", float(trial.value), now, 0))
    metrics += [Metric(k, float(v), now, 0) for k, v in trial.user_attrs.items() if isinstance(v, (int, float))]
    client.log_batch(run.info.run_id, metrics=metrics,
                     params=[mlflow.entities.Param(k, str(v)[:500]) for k, v in trial.params.items()])
    end = trial.datetime_complete.timestamp() if trial.datetime_complete else time.time()
    client.set_terminated(run.info.run_id, status=status, end_time=int(end * 1000))


def plot_history(study: optuna.Study, path: Path, strategy: str) -> Path:
    """Each trial's val accuracy (pruned ones at their last reported epoch) and the best so far."""
    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values]
    axes.scatter([t.number for t in done], [t.value for t in done], label="completed")
    axes.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                 marker="x", color="grey", label="pruned (last epoch reported)")
    best, running = float("-inf"), []
    for trial in done:
        best = max(best, float(trial.value))
        running.append((trial.number, best))
    axes.step(*zip(*running), where="post", color="C1", label="best so far")
    axes.set(xlabel="trial", ylabel="val accuracy", title=f"Optuna study ({strategy})")
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=100, format="png")
    return path


def write_outputs(result: tuning.TuneResult, out_dir: Path, strategy: str) -> dict[str, Path]:
    trials = result.study.trials
    best = result.study.best_trial
    summary = {"strategy": strategy, "best_value": result.best_value, "best_trial": best.number,
               "best_params": result.best_params, "overrides": result.overrides(), "n_trials": len(trials),
               "n_complete": result.counts["COMPLETE"], "n_pruned": result.counts["PRUNED"], "n_failed": result.counts["FAIL"]}
    paths = {"best": write_json(out_dir / BEST_FILE, summary)}
    with atomic_path(out_dir / BEST_PARAMS_FILE) as partial:
        partial.write_text(f"# tlops tune: best of {len(trials)} trials (val accuracy {result.best_value:.4f}); "
                           f"merge into params.yaml or pass as --set / dvc exp run -S\n"
                           + yaml.safe_dump(result.params_fragment(), sort_keys=False))
    paths["best_params"] = out_dir / BEST_PARAMS_FILE
    paths["history_plot"] = plot_history(result.study, out_dir / HISTORY_PLOT, strategy)
    return paths


def command_lines(overrides: list[str]) -> tuple[str, str]:
    """The best params as a `tlops run` and a `dvc exp run` command line."""
    return (" ".join(["tlops run", *(f"--set {shlex.quote(o)}" for o in overrides)]),
            " ".join(["dvc exp run", *(f"-S {shlex.quote(o)}" for o in overrides)]))


def run_tune(params: Params, command: str = "tlops tune") -> dict[str, Any]:
    """Prerequisites, then the study with every trial in MLflow; returns what `tlops tune` prints."""
    from tlops.run_state import RunLock
    from tlops.stages import labelled_dataset, selected_backbone, served_views

    cfg = params.tune
    out_dir = params.path("tune")
    if params.runner.kind == "dask":
        from flows.workers import check_runner

        check_runner(params)  # an unreachable scheduler: one line, before the prerequisites run
    with RunLock(params, command) as lock:
        ran = ensure_prerequisites(params, lock)
        tracking.experiment(params)
        tags = {"tlops.kind": "tune", "tlops.strategy": cfg.strategy, "git.commit": git_commit(),
                "data.version": tracking.data_version(params)}
        with mlflow.start_run(run_name="tune", tags=tags) as parent:
            parent_id = parent.info.run_id
            mlflow.log_params({k: str(v)[:500] for k, v in tracking.flat("tune", cfg.model_dump(mode="json")).items()})
            callbacks = [lambda study, trial: log_trial(parent_id, study, trial)]
            if params.runner.kind == "dask":  # trials in parallel on Dask workers, sharing the study's storage
                from flows.tune import tune_on_workers

                result = tune_on_workers(params, callbacks)
            else:
                result = tuning.tune(
                    cfg, params.finetune, selected_backbone(params), params.path("features"), labelled_dataset(params),
                    params.path("validate") / "manifest.csv", out_dir / ".trials", params.path("feature_cache"),
                    params.features.opset, params.features.parity_atol,
                    int8_recipe=params.compress.planned_recipe(served_views(params)), callbacks=callbacks,
                    orders=declared_orders(params.ingest))
            paths = write_outputs(result, out_dir, cfg.strategy)
            (out_dir / ".trials").rmdir()  # every trial removed its own folder
            mlflow.set_tags({"tlops.n_trials": str(len(result.study.trials)),
                             "tlops.n_pruned": str(result.counts["PRUNED"])})
            mlflow.log_params({f"best.{k}": str(v)[:500] for k, v in result.best_params.items()})
            mlflow.log_metric("best_val_accuracy", result.best_value)
            for path in paths.values():
                mlflow.log_artifact(str(path))
    tlops_line, dvc_line = command_lines(result.overrides())
    return {"ran_stages": ran, "best_value": result.best_value, "best_params": result.best_params,
            "counts": result.counts, "n_trials": len(result.study.trials), "overrides": result.overrides(),
            "tlops_run": tlops_line, "dvc_exp_run": dvc_line, "out_dir": out_dir, "parent_run_id": parent_id,
            "study": result.study}
