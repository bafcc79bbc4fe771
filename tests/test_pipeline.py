"""Model tier: the real pipeline on ~80 real ELPV cells, through Prefect and through DVC."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from mlflow import MlflowClient

from components.core.lineage import data_version
from components.core.result import sha256_file
from components.data.preprocess import load_batch
from components.models.classifier import load_checkpoint
from components.models.onnx_io import read_metadata
from tests.conftest import REPO, small_params, venv_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]


def test_prefect_flow_registers_a_model_that_serves(tmp_path: Path) -> None:
    from flows.train import train

    params_file = small_params(tmp_path, register={"model_name": "flow-test"})
    summary = train(params_file=str(params_file))

    version = summary["register"]["version"]
    client = MlflowClient()
    model_version = client.get_model_version("flow-test", version)
    assert model_version.tags["backbone"] == "efficientnet_lite0"
    assert str(client.get_model_version_by_alias("flow-test", "challenger").version) == version
    metrics = json.loads((tmp_path / "outputs/evaluate/metrics.json").read_text())
    assert float(model_version.tags["test.accuracy"]) == pytest.approx(metrics["accuracy"], abs=1e-4)
    # What is registered is, byte for byte, the file evaluate scored.
    assert model_version.tags["model_sha256"] == sha256_file(tmp_path / "outputs/compress/model.onnx")

    # One data version everywhere: MLflow, checkpoint, ONNX metadata, registry, the MLflow dataset input.
    version_hash = data_version(tmp_path / "outputs/validate/manifest.csv")
    checkpoint = load_checkpoint(tmp_path / "outputs/finetune/model.pt")
    assert checkpoint["data"]["version"] == version_hash
    assert json.loads(read_metadata(tmp_path / "outputs/compress/model.onnx")["data"])["version"] == version_hash
    assert model_version.tags["data.version"] == version_hash

    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["tlops.backbone"] == "efficientnet_lite0"
    assert parent.data.tags["data.version"] == version_hash
    assert parent.info.run_name.startswith("efficientnet_lite0 linear ") and f"d{version_hash[:8]}" in parent.info.run_name
    assert parent.data.tags["tlops.replay"] == "false"
    assert [d.dataset.digest for d in parent.inputs.dataset_inputs] == [version_hash]
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.metrics["test_accuracy"] == pytest.approx(float(model_version.tags["test.accuracy"]), abs=1e-4)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.data.tags["tlops.stage"] for r in children} >= {"ingest", "validate", "features", "select", "finetune",
                                                              "export", "compress", "evaluate", "register"}
    logged = {r.data.tags["tlops.stage"]: {a.path for a in client.list_artifacts(r.info.run_id)} for r in children}
    assert "data_docs" in logged["validate"] and "confusion_matrix.png" in logged["evaluate"]
    assert "images" not in logged["ingest"]  # the data stays with DVC, not copied into MLflow per run

    # The registered model, fetched back from the registry, loads in ONNX Runtime and predicts.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/flow-test/{version}", dst_path=str(tmp_path / "dl")))
    session = ort.InferenceSession(str(next(local.rglob("*.onnx"))), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    labels = json.loads(meta["labels"])
    preprocessing = {"input_size": int(meta["input_size"]), "mean": [float(v) for v in meta["mean"].split(",")],
                     "std": [float(v) for v in meta["std"].split(",")], "interpolation": meta["interpolation"]}
    images = sorted((tmp_path / "outputs/ingest/images").rglob("*.png"))[:5]
    logits = session.run(None, {session.get_inputs()[0].name: load_batch(images, preprocessing)})[0]
    assert logits.shape == (5, len(labels)) and np.isfinite(logits).all()

    # The first version ever registered becomes champion.
    assert summary["promote"]["decision"] == "first"
    assert str(client.get_model_version_by_alias("flow-test", "champion").version) == version

    # Nothing changed: every stage replays from Prefect's cache and no new version is registered.
    again = train(params_file=str(params_file))
    assert not again["promote"]["cached"] and again["promote"]["decision"] == "kept"
    assert all(again[stage]["cached"] for stage in ("ingest", "features", "finetune", "evaluate", "register"))
    assert again["register"]["version"] == version
    # ... and the parent run says so, in its name and a tag, so it is not read as a second training run.
    replayed = client.get_run(again["parent_run_id"])
    assert again["replay"] and replayed.data.tags["tlops.replay"] == "true"
    assert replayed.info.run_name.startswith("replay efficientnet_lite0 linear ")
    assert {r.data.tags["tlops.cached"] for r in client.search_runs(
        [replayed.info.experiment_id], f"tags.mlflow.parentRunId = '{replayed.info.run_id}'")} == {"true", "false"}

    # An edited output is not trusted: that stage and only what follows it recompute.
    (tmp_path / "outputs/finetune/model.pt").write_bytes(b"tampered")
    third = train(params_file=str(params_file))
    assert third["features"]["cached"] and not third["finetune"]["cached"]
    assert not third["replay"] and client.get_run(third["parent_run_id"]).data.tags["tlops.replay"] == "false"


def test_flow_on_your_own_imagefolder(tmp_path: Path) -> None:
    from flows.train import train
    from tests.conftest import write_imagefolder

    source = write_imagefolder(tmp_path / "my_images", per_class=16)
    (source / "dark" / "dark_999.png").write_bytes(b"\x89PNG truncated")  # excluded by validation
    # A pinned backbone outside the candidates is extracted and ranked too.
    params = small_params(tmp_path, ingest={"source": "imagefolder", "path": str(source), "limit": None},
                          validate={"min_per_class_split": 1, "on_invalid": "exclude"},
                          select={"candidates": ["efficientnet_lite0"], "backbone": "efficientnet_lite1"},
                          register={"model_name": "my-images"})
    summary = train(params_file=str(params))
    metrics = json.loads((tmp_path / "outputs/evaluate/metrics.json").read_text())
    assert summary["validate"]["labels"] == ["bright", "dark"]
    assert summary["select"]["selected"] == "efficientnet_lite1"
    assert metrics["accuracy"] >= 0.9  # dark vs bright is easy: a broken pipeline would sit near 0.5
    model_version = MlflowClient().get_model_version("my-images", summary["register"]["version"])
    assert model_version.tags["backbone"] == "efficientnet_lite1"
    # With images excluded, every record names the dataset that was trained on: the validated manifest.
    validated = tmp_path / "outputs/validate/manifest.csv"
    assert "dark_999.png" not in validated.read_text()
    version_hash = data_version(validated)
    assert version_hash != data_version(tmp_path / "outputs/ingest/manifest.csv")
    assert model_version.tags["data.version"] == version_hash
    assert load_checkpoint(tmp_path / "outputs/finetune/model.pt")["data"]["version"] == version_hash
    assert json.loads(read_metadata(tmp_path / "outputs/compress/model.onnx")["data"])["version"] == version_hash
    assert MlflowClient().get_run(summary["parent_run_id"]).data.tags["data.version"] == version_hash


def dvc(args: list[str], cwd: Path) -> str:
    done = subprocess.run(["dvc", *args], cwd=cwd, env=venv_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_dvc_repro_runs_the_same_stages_and_then_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    # The project's own registry, as a user's project has: the session's store holds `tlops-elpv` versions of
    # other tests, whose champion would decide this project's promotions.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked + ["dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore"]:
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    params = small_params(tmp_path)  # outputs under tmp_path/outputs, params written beside
    text = params.read_text().replace(str(tmp_path) + "/", "")
    (repo / "params.yaml").write_text(text)
    for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(["git", *command], cwd=repo, check=True)

    first = dvc(["repro"], repo)
    assert "Running stage 'register'" in first
    metrics = json.loads((repo / "outputs/evaluate/metrics.json").read_text())
    # DVC shows the run's metrics: in `metrics show` and in `exp show` (neither reads '!').
    shown = json.loads(dvc(["metrics", "show", "--json"], repo))
    assert next(iter(shown.values()))["data"]["outputs/evaluate/metrics.json"]["data"]["accuracy"] == metrics["accuracy"]
    table = json.loads(dvc(["exp", "show", "--json"], repo))
    workspace = next(row for row in table if row["rev"] == "workspace")["data"]["metrics"]
    assert workspace["outputs/evaluate/metrics.json"]["data"]["accuracy"] == metrics["accuracy"]
    # The data version the model carries is the hash DVC records for the validated manifest.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    recorded = next(o["md5"] for o in lock["stages"]["validate"]["outs"] if o["path"].endswith("manifest.csv"))
    assert json.loads(read_metadata(repo / "outputs/compress/model.onnx")["data"])["version"] == recorded

    # Nothing changed: only the promotion gate runs again (the champion lives in the registry, outside DVC).
    again = dvc(["repro"], repo)
    assert "Running stage 'promote'" in again and "Running stage 'register'" not in again
    assert again.count("Running stage") == 1
    # ... and it only asks the registry: the version register recorded already holds @champion, nothing is scored.
    promoted = json.loads((repo / "outputs/promote/promotion.json").read_text())
    assert promoted["reason"].endswith("already holds @champion") and "n_test" not in promoted

    # A head hyperparameter reruns finetune and what follows, not ingest/features. (Set through YAML: a
    # text replace of a default silently stopped matching when the default moved.)
    changed = yaml.safe_load(text)
    assert changed["finetune"]["strategy"] == "linear" and changed["finetune"]["linear"]["regularization"] != [0.1, 1.0]
    changed["finetune"]["linear"]["regularization"] = [0.1, 1.0]
    (repo / "params.yaml").write_text(yaml.safe_dump(changed))
    third = dvc(["repro"], repo)
    assert "Running stage 'finetune'" in third and "Running stage 'features'" not in third
    assert "Running stage 'ingest'" not in third

    dvc(["push"], repo)
    assert any((repo / ".dvc-remote").rglob("*"))
    # The remote alone can restore the data: drop the local copy and the cache, then pull.
    manifest = (repo / "outputs/ingest/manifest.csv").read_bytes()
    shutil.rmtree(repo / "outputs/ingest")
    shutil.rmtree(repo / ".dvc/cache")
    dvc(["pull", "ingest"], repo)
    assert (repo / "outputs/ingest/manifest.csv").read_bytes() == manifest

    # `tlops run` records its outputs with `dvc commit` + `dvc push`; a remote that refuses fails the command.
    (repo / "not-a-folder").write_text("a file where the remote should be")
    dvc(["remote", "modify", "local", "url", "not-a-folder"], repo)
    done = subprocess.run(["tlops", "run"], cwd=repo, env=venv_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "tlops: error: `dvc push --quiet` failed" in done.stderr and "Traceback" not in done.stderr

    # A run with --set is not what dvc.lock records: it leaves dvc.lock alone and says how to get a recorded run.
    lock = (repo / "dvc.lock").read_text()
    done = subprocess.run(["tlops", "run", "--set", "promote.latency_images=6"], cwd=repo, env=venv_env(),
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("tlops: note:")] == [(
        "tlops: note: this run used --set promote.latency_images=6, so it is not recorded in dvc.lock (which records "
        "params.yaml as it is); for a recorded run of the same params: dvc exp run -S promote.latency_images=6")]
    assert (repo / "dvc.lock").read_text() == lock
