"""Killed, concurrent and failing runs, and a tracking server that is not there: real `tlops run` processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import small_params, venv_env

pytestmark = pytest.mark.slow


def start_tlops(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tlops.cli", *args], cwd=cwd, env=venv_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def tlops(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlops.cli", *args], cwd=cwd, env=env or venv_env(),
                          capture_output=True, text=True, timeout=1200)


def prefect_state(flow_run_id: str, cwd: Path) -> str:
    code = ("from prefect.client.orchestration import get_client\n"
            f"with get_client(sync_client=True) as c: print(c.read_flow_run({flow_run_id!r}).state.type.value)")
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=venv_env(), capture_output=True, text=True,
                          timeout=300, check=True)
    return done.stdout.strip().splitlines()[-1]


def test_kill_9_then_rerun_reuses_finished_work_and_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    killed_dir.mkdir()
    clean_dir.mkdir()
    params = small_params(killed_dir)
    process = start_tlops("run", "--params", str(params), cwd=killed_dir)
    state_file = killed_dir / "outputs/run.json"
    deadline = time.monotonic() + 900
    # Kill once features are done and a later stage is under way.
    while time.monotonic() < deadline and process.poll() is None:
        stages = json.loads(state_file.read_text()).get("stages", {}) if state_file.exists() else {}
        if "select" in stages:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.stdout.read()
    first = json.loads(state_file.read_text())
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert json.loads(state_file.read_text())["status"] == "running"  # nobody could say otherwise

    resumed = tlops("run", "--params", str(params), cwd=killed_dir)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    state = json.loads(state_file.read_text())
    assert state["status"] == "completed" and state["previous"]["status"] == "killed"
    client = MlflowClient()
    assert client.get_run(first["mlflow_run_id"]).info.status == "KILLED"
    assert prefect_state(first["prefect_flow_run_id"], killed_dir) == "CRASHED"
    # Features were not recomputed: the stage replayed from cache or found every image in the feature store.
    runs = client.search_runs([client.get_run(state["mlflow_run_id"]).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{state['mlflow_run_id']}' and tags.`tlops.stage` = 'features'")
    assert runs and (runs[0].data.tags["tlops.cached"] == "true"
                     or runs[0].data.metrics["efficientnet_lite0.n_computed"] == 0)
    assert not list((killed_dir / "outputs").glob(".*.partial-*"))

    clean = tlops("run", "--params", str(small_params(clean_dir)), cwd=clean_dir)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    for name in ("evaluate/metrics.json", "evaluate/predictions.csv"):
        assert (killed_dir / "outputs" / name).read_text() == (clean_dir / "outputs" / name).read_text()


def test_an_unreachable_tracking_server_fails_at_once_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = venv_env() | {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    done = tlops("run", "--params", str(small_params(tmp_path)), cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"tlops: error: MLFLOW_TRACKING_URI=http://127.0.0.1:{port}")
    assert "Beginning flow run" not in done.stdout + done.stderr  # checked before Prefect starts
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "outputs/ingest").exists()  # checked before any work


def test_a_run_that_fails_midway_says_which_outputs_are_older(tmp_path: Path) -> None:
    params = small_params(tmp_path)
    assert tlops("run", "--params", str(params), cwd=tmp_path).returncode == 0
    # Export is pointed at a folder holding a file tlops did not write, which it refuses to replace: the run
    # gets through finetune (a changed path is in every stage's cache key, so they run again) and stops there.
    theirs = tmp_path / "outputs" / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("someone else's")
    broken = tlops("run", "--params", str(params), "--set", f"paths.export={theirs}", cwd=tmp_path)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "did not write" in broken.stderr and "Traceback" not in broken.stderr
    state = json.loads((tmp_path / "outputs/run.json").read_text())
    assert state["status"] == "failed"
    assert state["stages"]["finetune"] == state["run_id"]  # it got that far in this run ...
    assert {"compress", "evaluate", "register"} <= set(state["older_stages"])  # ... and no further
    assert "still holds" in broken.stderr and "compress" in broken.stderr
    assert (theirs / "notes.txt").read_text() == "someone else's"
