"""`tlops tune` on Dask workers (runner.kind: dask): the Optuna study's trials in parallel, one study in a shared storage.

This process asks each round of `runner.workers` trials (their values drawn here by the one seeded TPE sampler),
each trial trains as a Prefect task on a worker, reporting its epochs to the shared study storage (a journal file
in `paths.tune`, or `tune.storage`: PostgreSQL in the team setup), and the round is told here before the next is
asked; MLflow hears of each trial from here, never from a worker. How rounds keep a seeded study reproducible,
and what they cost, is `components.training.tune.tune_in_rounds`.
"""

from __future__ import annotations

import uuid
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from components.training import tune as tuning
from flows.workers import check_code, expected_code, workers_for
from tlops.config import Params
from tlops.fingerprints import project_modules

TRIAL_FILES = ("flows/tune.py", "flows/workers.py", "tlops/config.py")


def study_storage(params: Params) -> str:
    return params.tune.storage or str(params.path("tune") / "optuna.journal")


@task(name="trial", cache_policy=NO_CACHE, persist_result=False, task_run_name="trial-{number}")
def train_trial(params: Params, study_name: str, storage: str, trial_id: int, number: int, first_of_round: int,
                expected: dict[str, Any]) -> tuning.TrialOutcome:
    """One trial of the shared study, trained on the worker running this task from the pipeline's outputs."""
    from components.data.ingest import declared_orders
    from tlops.stages import labelled_dataset, selected_backbone, served_views

    check_code(expected)
    return tuning.run_trial(params.tune, params.finetune, selected_backbone(params), params.path("features"),
                            labelled_dataset(params), params.path("validate") / "manifest.csv",
                            params.path("tune") / ".trials", params.path("feature_cache"), params.features.opset,
                            params.features.parity_atol, params.compress.planned_recipe(served_views(params)), storage,
                            study_name, trial_id, first_of_round, declared_orders(params.ingest))


@flow(name="tlops-tune")
def tune_on_workers(params: Params, callbacks: list[tuning.TrialCallback] | None = None) -> tuning.TuneResult:
    """The study in rounds of `runner.workers` trials on the workers (`callbacks` hear of each trial, here)."""
    expected = expected_code(tuple(sorted(set(project_modules("components.training.tune")) | set(TRIAL_FILES))))
    storage, study_name = study_storage(params), f"tune-{params.tune.strategy}-{uuid.uuid4().hex[:8]}"
    with workers_for(params) as workers:
        assert workers is not None, "tune_on_workers needs runner.kind: dask"

        def run_round(trials: list[tuple[int, int]], first: int) -> list[tuning.TrialOutcome]:
            futures = [workers.runner.submit(train_trial, {
                "params": params, "study_name": study_name, "storage": storage, "trial_id": trial_id, "number": number,
                "first_of_round": first, "expected": expected}) for trial_id, number in trials]
            return [future.result() for future in futures]

        return tuning.tune_in_rounds(params.tune, params.finetune, storage, study_name, params.runner.workers,
                                     run_round, callbacks or [])
