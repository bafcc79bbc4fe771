"""`tlops tune`: real Optuna studies on ~80 real ELPV cells (Lite0, 64 px), trials in a real MLflow store."""

from __future__ import annotations

import json
import shlex
import statistics
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from components.training import finetune
from components.training.finetune import CHECKPOINT_FILE
from tests.conftest import small_params
from tlops import cli
from tlops.config import ConfigError, load_params
from tlops.stages import execute, get_stage, selected_backbone, validated_dataset
from tlops.tune import PREREQUISITES, run_tune


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ingest..select run once for the module; each test tunes into its own folder."""
    root = tmp_path_factory.mktemp("tune")
    params = load_params(small_params(root))
    for name in PREREQUISITES:
        execute(get_stage(name), params)
    return root


def nested_runs(parent_run_id: str) -> list[mlflow.entities.Run]:
    experiment_id = mlflow.get_run(parent_run_id).info.experiment_id
    return mlflow.MlflowClient().search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def refit(params_file: Path, overrides: list[str], out: Path) -> float:
    """finetune.run with the printed overrides, as `tlops run --set ...` would train it."""
    params = load_params(params_file, overrides)
    result = finetune.run(params.finetune, selected_backbone(params), params.path("features"), validated_dataset(params),
                          params.path("validate") / "manifest.csv", out / "finetune", params.path("feature_cache"),
                          out / "state", params.features.opset, params.features.parity_atol)
    return float(result.metrics["val_accuracy"])


def test_linear_study_through_the_cli(prepared: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tune_dir = prepared / "tune-linear"
    params_file = small_params(prepared, tune={"strategy": "linear", "trials": 9, "minutes": None, "seed": 3,
                                               "space": {"linear.regularization": {"low": 1e-4, "high": 10, "log": True}}})
    assert cli.main(["tune", "--params", str(params_file), "--set", f"paths.tune={tune_dir}", "--trials", "4"]) == 0
    printed = capsys.readouterr().out
    best = json.loads((tune_dir / "best.json").read_text())
    assert (best["n_trials"], best["n_complete"], best["n_pruned"]) == (4, 4, 0)  # --trials replaced the file's 9

    parent = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("tlops").experiment_id], "tags.`tlops.kind` = 'tune'",
        order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert parent.data.tags["tlops.strategy"] == "linear" and parent.data.tags["tlops.n_trials"] == "4"
    trials = nested_runs(parent.info.run_id)
    assert sorted(r.data.tags["optuna.state"] for r in trials) == ["COMPLETE"] * 4
    values = {int(r.data.tags["optuna.trial"]): r.data.metrics["val_accuracy"] for r in trials}
    assert best["best_value"] == pytest.approx(max(values.values()))
    assert values[best["best_trial"]] == pytest.approx(best["best_value"])
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best["best_value"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"best.json", "best_params.yaml", "optimization_history.png"} <= artifacts

    fragment = yaml.safe_load((tune_dir / "best_params.yaml").read_text())
    assert fragment == {"finetune": {"strategy": "linear",
                                     "linear": {"regularization": [best["best_params"]["linear.regularization"]]}}}
    assert not list(tune_dir.rglob(CHECKPOINT_FILE)) and not (tune_dir / ".trials").exists()

    line = next(ln.strip() for ln in printed.splitlines() if ln.strip().startswith("tlops run --set"))
    words = shlex.split(line)
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert overrides == best["overrides"]
    assert any(ln.strip().startswith("dvc exp run -S finetune.strategy=linear") for ln in printed.splitlines())
    assert refit(params_file, overrides, prepared / "refit-linear") == pytest.approx(best["best_value"])


def test_partial_study_prunes_the_diverging_trials(prepared: Path) -> None:
    tune_dir = prepared / "tune-partial"
    params_file = small_params(
        prepared,
        finetune={"partial": {"epochs": 3, "blocks": 1, "views": 2, "batch_size": 16, "warmup_epochs": 0, "patience": 5}},
        tune={"strategy": "partial", "trials": 5, "minutes": None, "seed": 0,
              # two far-apart learning rates: on 13 val cells one trails the other after an epoch, and with
              # one startup trial every later trial of the trailing choice falls below the median
              "space": {"partial.lr": {"choices": [0.002, 30.0]}},
              "pruner": {"n_startup_trials": 1, "n_warmup_steps": 0}})
    params = load_params(params_file, [f"paths.tune={tune_dir}"])
    summary = run_tune(params)
    study: optuna.Study = summary["study"]
    states = {t.number: (t.state.name, t.params["partial.lr"]) for t in study.trials}
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, states
    for trial in pruned:  # stopped before its last epoch, at a value below the median of the trials before it
        step = max(trial.intermediate_values)
        assert step < 2
        earlier = [t.intermediate_values[step] for t in study.trials[:trial.number]
                   if t.state == optuna.trial.TrialState.COMPLETE]
        assert max(v for s, v in trial.intermediate_values.items() if s <= step) < statistics.median(earlier)
    assert len({t.params["partial.lr"] for t in pruned}) == 1  # only the trailing choice is pruned
    assert study.best_trial.params["partial.lr"] != pruned[0].params["partial.lr"]

    trials = nested_runs(summary["parent_run_id"])
    assert {int(r.data.tags["optuna.trial"]): r.data.tags["optuna.state"] for r in trials} == \
        {n: state for n, (state, _) in states.items()}
    for run in trials:
        steps = mlflow.MlflowClient().get_metric_history(run.info.run_id, "epoch.val_accuracy")
        expected = study.trials[int(run.data.tags["optuna.trial"])].intermediate_values
        assert {m.step: m.value for m in steps} == pytest.approx(expected)

    best = json.loads((tune_dir / "best.json").read_text())
    assert (best["n_trials"], best["n_pruned"]) == (5, len(pruned))
    assert best["best_value"] == pytest.approx(study.best_value)
    assert not list(tune_dir.rglob(CHECKPOINT_FILE))  # pruned (and completed) trials leave no checkpoint
    assert not params.path("train_state").exists() or not any(params.path("train_state").iterdir())
    assert refit(params_file, summary["overrides"], prepared / "refit-partial") == pytest.approx(best["best_value"])


@pytest.mark.parametrize(("tune", "message"), [
    ({"space": {"partial.learning_rate": {"low": 1e-4, "high": 1e-2}}},
     "tune: space key 'partial.learning_rate' is not a finetune key"),
    ({"trials": None, "minutes": None}, "tune: set trials, minutes or both"),
    ({"space": {"partial.layer_decay": {"low": 0.5, "high": 1.5}}}, "value 1.5 is outside finetune's range"),
    ({"strategy": "linear", "space": {"partial.lr": {"low": 1e-4, "high": 1e-2}}}, "has no effect when tune.strategy"),
])
def test_bad_tune_block_fails_at_load(tmp_path: Path, tune: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")) as error:
        load_params(small_params(tmp_path, tune=tune))
    assert "\n" not in str(error.value)


def test_a_round_prunes_only_against_trials_finished_before_it() -> None:
    """Trials of one round run at once on workers: which of them ends first must not decide a pruning."""
    from components.training.tune import RoundPruner

    study = optuna.create_study(direction="maximize")
    for value in (0.5, 0.6):  # earlier rounds
        trial = study.ask()
        trial.report(value, 1)
        study.tell(trial, value)
    first_of_round = len(study.trials)
    for value in (0.95, 0.99):  # the same round, done before the trial below reaches epoch 1
        trial = study.ask()
        trial.report(value, 1)
        study.tell(trial, value)
    slow = study.ask()
    slow.report(0.7, 1)
    frozen = study.get_trials(deepcopy=False)[slow.number]
    median = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    assert median.prune(study, frozen)  # below the median of all four finished trials (0.775)
    assert not RoundPruner(median, first_of_round).prune(study, frozen)  # above the earlier rounds' median (0.55)
    weak = study.ask()
    weak.report(0.52, 1)
    assert RoundPruner(median, first_of_round).prune(study, study.get_trials(deepcopy=False)[weak.number])
