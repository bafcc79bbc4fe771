"""MLflow tracking at a run's edges: one `Recorder` per `tlops run` or `tlops stage`.

A pipeline run is a parent MLflow run with one nested run per stage; a single `tlops stage` (what
`dvc repro` calls) is one top-level stage run. The flow and the CLI hold a `Recorder` and tell it
four things: the run started (entering it), a stage started, a stage is done (or failed), the run
finished (leaving it). Nothing else in the loop talks to MLflow; the one stage that writes to the
registry itself (register) is handed its stage run's id so the version links back to it.

With no `MLFLOW_TRACKING_URI`, MLflow uses its embedded default (`sqlite:///mlflow.db` plus
`mlruns/` artifacts in the working directory); pointing the variable at a server works as is.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from components.core.errors import UserError
from components.core.lineage import data_version as manifest_version
from components.core.lineage import git_commit
from components.core.result import StageResult, metric_key
from components.data.manifest import read_manifest

if TYPE_CHECKING:  # the schema imports every component's config; tracking needs none of them
    from tlops.config import Params
    from tlops.stages import Stage

log = logging.getLogger(__name__)

# What is worth showing in the MLflow UI; data (images, features) stays with DVC, and the
# shipped ONNX model is logged once, as an MLflow model, by the register stage.
LOGGED_SUFFIXES = {".json", ".png", ".csv", ".md", ".html"}
LOGGED_FOLDERS = {"data_docs", "tasks"}  # Great Expectations' HTML report; evaluate's per-task plots
MAX_LOGGED_FILE_BYTES = 5 * 2**20
INFO_TAGS = ("selected", "backbone", "shipped", "strategy", "negative_transfer", "device", "precision", "adapt", "soft_labels")
NEVER_CACHED_NOTE = "stages that never replay (promote) do not count"


class TrackingError(UserError):
    """The tracking server or model registry cannot be reached or read."""


def check_tracking_server(timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when the tracking server is down or the registry unreadable,
    rather than after minutes of retries in the middle of a run."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                response.read()
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise TrackingError(
                f"MLFLOW_TRACKING_URI={uri}: the tracking server does not answer ({reason}); start it, "
                f"or unset MLFLOW_TRACKING_URI to use the local store (mlflow.db)."
            ) from None
    try:
        MlflowClient().search_registered_models(max_results=1)
    except MlflowException as error:
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={uri}: the model registry cannot be read ({str(error).splitlines()[0][:200]})."
        ) from None


def data_version(params: Params) -> str:
    """The dataset's one version everywhere (MLflow, checkpoint, ONNX metadata, registry): the md5
    DVC records for the validated manifest, which pins every image's sha256, label and split."""
    manifest = params.path("validate") / "manifest.csv"
    return manifest_version(manifest) if manifest.exists() else "unknown"


def flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flat(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def experiment(params: Params) -> str:
    found = mlflow.set_experiment(params.register.experiment)
    if found.tags.get("mlflow.experimentKind") != "custom_model_development":
        # Open on the runs table: MLflow 3 shows a GenAI overview for experiments it takes for GenAI.
        MlflowClient().set_experiment_tag(found.experiment_id, "mlflow.experimentKind", "custom_model_development")
    return found.experiment_id


def run_name(backbone: str, strategy: str, shipped: str, data: str, overrides: list[str] | tuple[str, ...],
             replay: bool = False) -> str:
    """What the runs table shows: `efficientnet_lite0 partial int8 · d1a2b3c4`, `replay` first when nothing
    was trained, and how many `--set` overrides (their values are the tag `tlops.overrides` and the params)."""
    words = (["replay"] if replay else []) + [backbone, strategy, shipped, f"· d{data[:8]}"]
    if overrides:
        words.append(f"+{len(overrides)} set")
    return " ".join(words)


def log_dataset(params: Params, run_id: str) -> None:
    """The validated manifest as the run's MLflow dataset input, its digest the data version."""
    manifest = params.path("validate") / "manifest.csv"
    frame = read_manifest(manifest, root=params.path("dataset")).manifest
    with warnings.catch_warnings():  # MLflow's hints about local paths and integer columns do not apply here
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(frame, source=str(manifest.resolve()), targets="label",
                                          name=f"{params.ingest.source}-{params.ingest.label_mode}",
                                          digest=data_version(params))
        with mlflow.start_run(run_id=run_id):  # resumed only to attach the input; the caller ends the run
            mlflow.log_input(dataset, context="training")


def log_artifacts(client: MlflowClient, run_id: str, result: StageResult) -> None:
    """The stage's report files (top level of its folder) and report sites, never its data."""
    if not result.out_dir.is_dir():
        return
    for path in sorted(result.out_dir.iterdir()):
        if path.is_file() and path.suffix in LOGGED_SUFFIXES and path.stat().st_size <= MAX_LOGGED_FILE_BYTES:
            client.log_artifact(run_id, str(path))
        elif path.is_dir() and path.name in LOGGED_FOLDERS:
            client.log_artifacts(run_id, str(path), artifact_path=path.name)


def history_metrics(result: StageResult) -> list[Metric]:
    """Per-epoch curves (a stage's `history.json`) as MLflow metric steps, so the UI draws them."""
    history = result.artifacts.get("history")
    if history is None or not Path(history).is_file():
        return []
    now = int(time.time() * 1000)
    return [Metric(metric_key(f"epoch.{key}"), float(value), now, int(entry.get("epoch", step)))
            for step, entry in enumerate(json.loads(Path(history).read_text())) for key, value in entry.items()
            if key != "epoch" and isinstance(value, (int, float))]


def log_batch(client: MlflowClient, run_id: str, metrics: list[Metric] | None = None,
              params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> None:
    """Within MLflow's batch limits: 1,000 metrics, 100 params, 100 tags a call."""
    params_list = [Param(k, str(v)[:500]) for k, v in (params or {}).items()]
    tags_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for start in range(0, len(params_list), 100):
        client.log_batch(run_id, params=params_list[start:start + 100])
    for start in range(0, len(tags_list), 100):
        client.log_batch(run_id, tags=tags_list[start:start + 100])
    for start in range(0, len(metrics or []), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


class Recorder:
    """`with Recorder(params, runner, overrides) as recorder:` — one run's record in MLflow.

    `runner="prefect"` (a `tlops run`) opens a parent run on entering and, on leaving, names it for
    what it trained and gives it the test metrics, the dataset and, when nothing was recomputed, the
    mark of a replay. `runner="stage"` (a `tlops stage`, i.e. `dvc repro`) records stage runs only.
    """

    def __init__(self, params: Params, runner: str, overrides: list[str] | tuple[str, ...] = (),
                 killed: dict[str, Any] | None = None):
        self.params, self.runner, self.overrides, self.killed = params, runner, list(overrides), killed
        self.client = MlflowClient()
        self.run_id: str | None = None  # the parent run, for a pipeline
        self.cached: dict[str, bool] = {}  # per stage that can replay from cache: whether it did
        self._stage_runs: dict[str, str] = {}
        self._experiment_id = ""

    def __enter__(self) -> Recorder:
        self._experiment_id = experiment(self.params)
        if self.killed:
            mark_killed(self.killed)
        if self.runner == "prefect":
            params, overrides = self.params, self.overrides
            name = " ".join([params.select.backbone, params.finetune.strategy, "(running)"])
            tags = {"tlops.kind": "pipeline", "tlops.runner": self.runner, "git.commit": git_commit(),
                    "tlops.overrides": " ".join(overrides) or "none", "mlflow.runName": name}
            self.run_id = self.client.create_run(self._experiment_id, run_name=name, tags=tags).info.run_id
            log_batch(self.client, self.run_id, params=flat("", params.to_dict()))
        return self

    def stage_started(self, stage: Stage) -> str:
        """Open the stage's run (nested under the pipeline's, if any) and return its id."""
        tags = {"tlops.kind": "stage", "tlops.stage": stage.name, "tlops.runner": self.runner,
                "git.commit": git_commit()}
        if self.run_id:
            tags["mlflow.parentRunId"] = self.run_id
        run_id = self.client.create_run(self._experiment_id, run_name=stage.name, tags=tags).info.run_id
        self._stage_runs[stage.name] = run_id
        return run_id

    def stage_done(self, stage: Stage, result: StageResult, stage_params: dict[str, Any], cached: bool) -> None:
        """Params, metrics, curves, tags and report files of a finished (or replayed) stage."""
        run_id = self._stage_runs.pop(stage.name)
        if stage.cached:
            self.cached[stage.name] = cached
        tags = {"tlops.cached": str(cached).lower(), "data.version": data_version(self.params)}
        tags |= {f"tlops.{key}": str(result.info[key]) for key in INFO_TAGS if key in result.info}
        if "why" in result.info:
            tags["mlflow.note.content"] = str(result.info["why"])  # shown as the run's description in the UI
        metrics = [Metric(metric_key(k), float(v), int(time.time() * 1000), 0)
                   for k, v in result.metrics.items() if isinstance(v, (int, float))]
        log_batch(self.client, run_id, metrics + history_metrics(result), stage_params, tags)
        log_artifacts(self.client, run_id, result)
        if "model_uri" in result.info:  # a registered version: its source run shows the data it was trained on
            log_dataset(self.params, run_id)
        self.client.set_terminated(run_id, status="FINISHED")

    def stage_failed(self, stage: Stage, out_dir: Path, stage_params: dict[str, Any]) -> None:
        """A FAILED stage run holding whatever the stage wrote before it stopped (reports, data docs)."""
        run_id = self._stage_runs.pop(stage.name, None)
        if run_id is None:
            return
        try:
            result = StageResult.load(out_dir)
        except FileNotFoundError:
            result = StageResult(stage=stage.name, out_dir=out_dir)
        log_batch(self.client, run_id, params=stage_params, tags={"tlops.cached": "false"})
        log_artifacts(self.client, run_id, result)
        self.client.set_terminated(run_id, status="FAILED")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        for run_id in self._stage_runs.values():  # stages interrupted between started and done
            self.client.set_terminated(run_id, status="KILLED" if kind is KeyboardInterrupt else "FAILED")
        if self.run_id is None:
            return
        if kind is None:
            self.finished()
        else:
            self.client.set_terminated(self.run_id, status="KILLED" if kind is KeyboardInterrupt else "FAILED")

    def replayed(self) -> bool:
        """Nothing was recomputed: every stage that can replay from cache did."""
        return bool(self.cached) and all(self.cached.values())

    def finished(self) -> None:
        """Headline name, tags, dataset and test metrics on the parent run, so runs compare side by side."""
        params, run_id = self.params, self.run_id
        assert run_id is not None
        evaluated = StageResult.load(params.path("evaluate"))
        selected = StageResult.load(params.path("select")).info["selected"]
        shipped = StageResult.load(params.path("compress")).info["shipped"]
        finetuned = StageResult.load(params.path("finetune")).info
        version, replay = data_version(params), self.replayed()
        tags = {"mlflow.runName": run_name(selected, finetuned["strategy"], shipped, version, self.overrides, replay),
                "tlops.backbone": selected, "tlops.strategy": finetuned["strategy"], "tlops.shipped": shipped,
                "tlops.negative_transfer": finetuned.get("negative_transfer", "unknown"), "data.version": version,
                "tlops.replay": str(replay).lower()}
        note = [f"Overrides: `{' '.join(self.overrides)}`." if self.overrides else "params.yaml as it is."]
        if replay:
            note.insert(0, f"Replayed from cache: no stage was recomputed ({NEVER_CACHED_NOTE}); the metrics are "
                           f"those of the run that trained this model.")
        tags["mlflow.note.content"] = " ".join(note)
        now = int(time.time() * 1000)
        metrics = [Metric(metric_key(f"test_{k}"), float(v), now, 0) for k, v in evaluated.metrics.items()
                   if isinstance(v, (int, float))]
        log_batch(self.client, run_id, metrics, tags=tags)
        log_dataset(params, run_id)
        self.client.set_terminated(run_id, status="FINISHED")


def log_drift(params: Params, record: dict[str, Any], plot: Path) -> str:
    """Drift checks in one long-lived run per model: metrics at step = check number, so MLflow
    charts them over time, with the latest drift_over_time.png."""
    experiment_id = experiment(params)
    name = f"drift-{params.register.model_name}"
    found = MlflowClient().search_runs(
        [experiment_id], f"tags.`tlops.kind` = 'drift-monitor' and attributes.run_name = '{name}'", max_results=1)
    with mlflow.start_run(run_id=found[0].info.run_id if found else None, run_name=None if found else name,
                          tags={"tlops.kind": "drift-monitor"}) as run:
        mlflow.set_tags(record["tags"])
        mlflow.log_metrics(record["metrics"], step=record["step"], timestamp=record["timestamp_ms"])
        mlflow.log_artifact(str(plot))
        return run.info.run_id


def mark_killed(previous: dict[str, Any]) -> None:
    """A run whose process died while running: KILLED in MLflow (with its stage runs), Crashed in Prefect."""
    client = MlflowClient()
    if run_id := previous.get("mlflow_run_id"):
        try:
            run = client.get_run(run_id)
            stale = [run] + client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
            for each in stale:
                if each.info.status == "RUNNING":
                    client.set_terminated(each.info.run_id, status="KILLED")
        except MlflowException as error:
            log.warning("could not mark MLflow run %s as killed: %s", run_id, error)
    if flow_run_id := previous.get("prefect_flow_run_id"):
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        try:
            with get_client(sync_client=True) as prefect:
                prefect.set_flow_run_state(flow_run_id, Crashed(message="the process was killed; a later run found it"),
                                           force=True)
        except Exception as error:  # noqa: BLE001 - another API's run id: note it and go on
            log.warning("could not mark Prefect flow run %s as crashed: %s", flow_run_id, error)
    log.warning("the previous run (%s) was killed; marked it in MLflow and Prefect", previous.get("run_id"))
