"""Scheduled retraining: a cron deployment on a real Prefect server, executed by a real worker.

The slow test starts `prefect server start` and `prefect worker start` as subprocesses (state in
tmp), creates the deployment with `flows.deploy.create_deployment`, triggers it twice with
`run_deployment`, and checks that the second run picked up images added to the source and ended
in the promotion decision the data dictates.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from pydantic import ValidationError

from flows.deploy import ENTRYPOINT, DeployError, ScheduleConfig, create_deployment, next_steps, retrain_trigger
from flows.drift import DRIFT_EVENT
from tests.conftest import REPO, small_params, venv_env, write_imagefolder

# The gate as configured for these runs: few timed images, a latency budget a busy CI box cannot miss.
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


def test_schedule_config_reads_the_retrain_interval_as_a_duration() -> None:
    assert ScheduleConfig().min_retrain_interval == timedelta(days=1)
    assert ScheduleConfig(min_retrain_interval="PT6H").min_retrain_interval == timedelta(hours=6)
    assert ScheduleConfig(min_retrain_interval=90).min_retrain_interval == timedelta(seconds=90)
    with pytest.raises(ValidationError, match="min_retrain_interval"):
        ScheduleConfig(min_retrain_interval="-PT1H")
    with pytest.raises(ValidationError, match="min_retrain_interval"):
        ScheduleConfig(min_retrain_interval="P400D")


def test_deploy_refuses_without_a_server() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(DeployError, match="PREFECT_API_URL is not set"):
            create_deployment(ScheduleConfig(), {"params_file": "params.yaml"}, [])


def test_deploy_to_a_server_that_is_down_fails_in_one_line(tmp_path: Path) -> None:
    # The product as a user runs it: nothing answers on the port PREFECT_API_URL names.
    env = prefect_env(tmp_path / "home", f"http://127.0.0.1:{free_port()}/api")
    done = subprocess.run([sys.executable, "-m", "tlops.cli", "deploy", "--params", str(REPO / "params.yaml")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("tlops: error: PREFECT_API_URL=http://127.0.0.1:")
    assert "no Prefect server answers" in done.stderr and "prefect server start" in done.stderr


@pytest.mark.slow
def test_scheduled_retrain_picks_up_new_images_and_ends_in_a_promotion_decision(prefect_api: str, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Two classes no model confuses (dark and bright), before and after new images arrive: both versions
    # score 100% on the test split, so the challenger cannot beat the champion and the gate must keep it.
    source = write_imagefolder(tmp_path / "source", per_class=12)
    params = small_params(tmp_path, ingest={"source": "imagefolder", "path": str(source), "limit": None},
                          validate={"min_per_class_split": 1}, promote=PROMOTE,
                          register={"model_name": "scheduled", "experiment": "scheduled"})
    # Runs execute in the checkout (the deployment's working folder): keep MLflow's artifacts out of it.
    mlflow.create_experiment("scheduled", artifact_location=(tmp_path / "mlartifacts").as_uri())
    schedule = ScheduleConfig(deployment="nightly", cron="0 3 * * 1", timezone="Europe/Berlin", work_pool="test-pool")

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        deployment_id = create_deployment(schedule, {"params_file": str(params)}, [], REPO, ENTRYPOINT)
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment(deployment_id)
            pool = client.read_work_pool("test-pool")
        assert deployment.work_pool_name == "test-pool" and pool.type == "process"
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == \
            [("0 3 * * 1", "Europe/Berlin", True)]
        assert deployment.global_concurrency_limit.limit == 1  # two retrains never write outputs/ at once
        # Deploying again updates the same deployment rather than adding one.
        assert create_deployment(schedule, {"params_file": str(params)}, [], REPO, ENTRYPOINT) == deployment_id

        worker = start(["prefect", "worker", "start", "--pool", "test-pool", "--type", "process"],
                       prefect_env(tmp_path / "worker-home", prefect_api), tmp_path / "worker.log")
        try:
            first = run_deployment("tlops-train/nightly", timeout=RUN_TIMEOUT_S)
            assert first.state.is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
            client = MlflowClient()
            champion = client.get_model_version_by_alias("scheduled", "champion")
            assert champion.tags["promote.decision"] == "first"
            images_first = len(pd.read_csv(tmp_path / "outputs/ingest/manifest.csv"))

            # New images arrive in the source: the next scheduled run must train on them.
            write_imagefolder(tmp_path / "source_new", per_class=6, seed=1)
            for image in (tmp_path / "source_new").rglob("*.png"):
                image.rename(source / image.parent.name / f"new_{image.name}")
            second = run_deployment("tlops-train/nightly", timeout=RUN_TIMEOUT_S)
            assert second.state.is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
        finally:
            stop(worker)

    assert len(pd.read_csv(tmp_path / "outputs/ingest/manifest.csv")) == images_first + 12
    versions = sorted(int(v.version) for v in client.search_model_versions("name = 'scheduled'"))
    assert versions == [1, 2]  # the new data made a new version; nothing was replayed from cache
    second_tags = client.get_model_version("scheduled", "2").tags
    assert second_tags["data.version"] != champion.tags["data.version"]
    assert (second_tags["promote.candidate_accuracy"], second_tags["promote.champion_accuracy"]) == ("1", "1")
    assert second_tags["promote.decision"] == "kept"
    assert second_tags["promote.reason"].startswith("accuracy gain +0.0000 does not beat the champion")
    assert second_tags["promote.champion_version"] == "1"
    assert str(client.get_model_version_by_alias("scheduled", "champion").version) == "1"
    assert (tmp_path / "outputs/promote/promotion.json").exists()


def test_next_steps_name_the_pool_the_deployment_and_the_drift_trigger() -> None:
    text = next_steps(ScheduleConfig(work_pool="gpu-box", deployment="weekly", min_retrain_interval="PT6H"),
                      "http://server:4200/api", "tlops-elpv")
    assert "prefect worker start --pool gpu-box" in text
    assert "prefect deployment run 'tlops-train/weekly'" in text
    assert "cron '0 3 * * 1' (UTC)" in text
    assert "at most once per 6:00:00" in text


def test_the_drift_trigger_is_reactive_with_the_interval_as_its_window() -> None:
    trigger = retrain_trigger("tlops-elpv", timedelta(hours=6))
    assert trigger.expect == {DRIFT_EVENT}
    assert trigger.match.root == {"prefect.resource.id": "tlops.model.tlops-elpv"}
    assert (trigger.posture, trigger.threshold, trigger.within) == ("Reactive", 1, timedelta(hours=6))
    assert trigger.parameters is None  # the runs get the deployment's own parameters


@pytest.mark.slow
def test_tlops_deploy_reads_the_schedule_from_params_and_attaches_the_drift_trigger(prefect_api: str,
                                                                                      tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import deploy

    params = small_params(tmp_path, schedule={"cron": "15 4 * * *", "timezone": "UTC", "work_pool": "from-params",
                                              "deployment": "daily", "min_retrain_interval": "PT2H"},
                          register={"model_name": "watched"})
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        text = deploy(str(params), ["finetune.partial.lr=0.01"])
        deploy(str(params), ["finetune.partial.lr=0.01"])  # deploying again replaces the trigger, not adds one
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("tlops-train/daily")
            automations = client.read_resource_related_automations(f"prefect.deployment.{deployment.id}")
    assert "prefect worker start --pool from-params" in text
    assert deployment.schedules[0].schedule.cron == "15 4 * * *"
    assert deployment.parameters == {"params_file": str(params), "overrides": ["finetune.partial.lr=0.01"]}
    assert len(automations) == 1
    (automation,) = automations
    assert automation.enabled and automation.name == "retrain watched on drift"
    assert automation.trigger.expect == {DRIFT_EVENT}
    assert automation.trigger.match.root == {"prefect.resource.id": "tlops.model.watched"}
    assert automation.trigger.within == timedelta(hours=2)
    assert [a.deployment_id for a in automation.actions] == [deployment.id]
