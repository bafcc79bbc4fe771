"""Scheduled retraining: a cron deployment on a real Prefect server, executed by a real worker.

The slow test starts `prefect server start` and `prefect worker start` as subprocesses (state in
tmp), creates the deployment with `flows.deploy.create_deployment`, triggers it twice with
`run_deployment`, and checks that the second run picked up images added to the source and ended
in a recorded promotion decision.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from pydantic import ValidationError

from flows.deploy import ENTRYPOINT, DeployError, ScheduleConfig, create_deployment, next_steps
from tests.conftest import REPO, small_params, venv_env, write_imagefolder

# The gate as configured for this run: few timed images, a latency budget a busy CI box cannot miss.
PROMOTE = {"latency_images": 8, "max_p95_latency_ms": 10_000.0}
RUN_TIMEOUT_S = 900  # one retrain on 24-36 generated images takes ~1-3 min on two busy cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # Its own process group, so stopping it also stops the flow-run processes it started.
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def prefect_env(home: Path, api_url: str | None) -> dict[str, str]:
    env = venv_env()
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(REPO),
                "PREFECT_WORKER_QUERY_SECONDS": "2"})
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@pytest.fixture
def prefect_api(tmp_path: Path) -> Iterator[str]:
    """A real Prefect server on a free port with its own database, stopped after the test."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server = start(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                   prefect_env(tmp_path / "server-home", None), tmp_path / "server.log")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("Prefect server did not answer within 180 s:\n" + (tmp_path / "server.log").read_text()[-3000:])
        yield url
    finally:
        stop(server)


def test_schedule_config_rejects_bad_cron_and_time_zone() -> None:
    assert ScheduleConfig(cron="30 2 * * *", timezone="Europe/Berlin").timezone == "Europe/Berlin"
    with pytest.raises(ValidationError, match="5-field cron"):
        ScheduleConfig(cron="every monday")
    with pytest.raises(ValidationError, match="IANA time zone"):
        ScheduleConfig(timezone="Mars/Olympus")
    with pytest.raises(ValidationError, match="extra"):
        ScheduleConfig(crontab="0 3 * * 1")


def test_deploy_refuses_without_a_server() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(DeployError, match="PREFECT_API_URL is not set"):
            create_deployment(ScheduleConfig(), {"params_file": "params.yaml"})


@pytest.mark.slow
def test_scheduled_retrain_picks_up_new_images_and_ends_in_a_promotion_decision(prefect_api: str, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    source = write_imagefolder(tmp_path / "source", per_class=12)
    params = small_params(tmp_path, ingest={"source": "imagefolder", "path": str(source), "limit": None},
                          validate={"min_per_class_split": 1},
                          register={"model_name": "scheduled", "experiment": "scheduled"})
    # Runs execute in the checkout (the deployment's working folder): keep MLflow's artifacts out of it.
    mlflow.create_experiment("scheduled", artifact_location=(tmp_path / "mlartifacts").as_uri())
    schedule = ScheduleConfig(deployment="nightly", cron="0 3 * * 1", timezone="Europe/Berlin", work_pool="test-pool")

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        deployment_id = create_deployment(schedule, {"params_file": str(params),
                                                     "promote_config": PROMOTE}, REPO, ENTRYPOINT)
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment(deployment_id)
            pool = client.read_work_pool("test-pool")
        assert deployment.work_pool_name == "test-pool" and pool.type == "process"
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == \
            [("0 3 * * 1", "Europe/Berlin", True)]
        assert deployment.global_concurrency_limit.limit == 1  # two retrains never write outputs/ at once
        # Deploying again updates the same deployment rather than adding one.
        assert create_deployment(schedule, {"params_file": str(params), "promote_config": PROMOTE},
                                 REPO, ENTRYPOINT) == deployment_id

        worker = start(["prefect", "worker", "start", "--pool", "test-pool", "--type", "process"],
                       prefect_env(tmp_path / "worker-home", prefect_api), tmp_path / "worker.log")
        try:
            first = run_deployment("tlops-retrain/nightly", timeout=RUN_TIMEOUT_S)
            assert first.state.is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
            client = MlflowClient()
            champion = client.get_model_version_by_alias("scheduled", "champion")
            assert champion.tags["promote.decision"] == "first"
            images_first = len(pd.read_csv(tmp_path / "outputs/ingest/manifest.csv"))

            # New images arrive in the source: the next scheduled run must train on them.
            write_imagefolder(tmp_path / "source_new", per_class=6, seed=1)
            for image in (tmp_path / "source_new").rglob("*.png"):
                image.rename(source / image.parent.name / f"new_{image.name}")
            second = run_deployment("tlops-retrain/nightly", timeout=RUN_TIMEOUT_S)
            assert second.state.is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
        finally:
            stop(worker)

    assert len(pd.read_csv(tmp_path / "outputs/ingest/manifest.csv")) == images_first + 12
    versions = sorted(int(v.version) for v in client.search_model_versions("name = 'scheduled'"))
    assert versions == [1, 2]  # the new data made a new version; nothing was replayed from cache
    second_tags = client.get_model_version("scheduled", "2").tags
    assert second_tags["promote.decision"] in {"promoted", "kept"}
    assert second_tags["promote.champion_version"] == "1"
    assert second_tags["data.version"] != champion.tags["data.version"]
    assert (tmp_path / "outputs/promote/promotion.json").exists()
    expected = "1" if second_tags["promote.decision"] == "kept" else "2"
    assert str(client.get_model_version_by_alias("scheduled", "champion").version) == expected


def test_next_steps_name_the_pool_and_the_deployment() -> None:
    text = next_steps(ScheduleConfig(work_pool="gpu-box", deployment="weekly"), "http://server:4200/api")
    assert "prefect worker start --pool gpu-box" in text
    assert "prefect deployment run 'tlops-retrain/weekly'" in text
    assert "cron '0 3 * * 1' (UTC)" in text


@pytest.mark.slow
@pytest.mark.skipif("schedule" not in __import__("tlops.config").config.Params.model_fields,
                    reason="runs once tlops/config.py carries the `schedule` params block")
def test_tlops_deploy_reads_the_schedule_from_params(prefect_api: str, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import deploy

    params = small_params(tmp_path, schedule={"cron": "15 4 * * *", "timezone": "UTC", "work_pool": "from-params",
                                              "deployment": "daily"})
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        text = deploy(str(params), ["finetune.partial.lr=0.01"])
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("tlops-retrain/daily")
    assert "prefect worker start --pool from-params" in text
    assert deployment.schedules[0].schedule.cron == "15 4 * * *"
    assert deployment.parameters == {"params_file": str(params), "overrides": ["finetune.partial.lr=0.01"]}
