"""Beyond one process: the pipeline's pieces on real Dask workers (prefect-dask), with one process's results.

~80 real ELPV cells, Lite0 and Lite1 at 64 px. The reference is `tlops run` with `runner.kind: local` in a
fresh interpreter (which must not import Dask at all); against it: a `distributed.LocalCluster` started for
the run, a cluster the test owns with a worker killed by SIGKILL while it computes a feature chunk, a worker
started from a different copy of tlops (refused), a scheduler nobody runs (one line, before any work), and
`tlops tune` with its trials on two workers sharing an Optuna journal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import yaml

from tests.conftest import REPO, small_params, venv_env
from tlops import cli
from tlops.config import ConfigError, load_params

pytestmark = pytest.mark.slow

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1")
NOT_IMPORTED = "import sys; print('DASK', sorted({m.split('.')[0] for m in sys.modules} & {'dask', 'distributed', 'prefect_dask'}))"


def scaled_params(root: Path, **blocks: dict) -> Path:
    """`small_params` with two candidate backbones and 16-image batches (several chunks of one batch each)."""
    return small_params(root, select={"candidates": list(BACKBONES)}, features={"batch_size": 16}, **blocks)


def dask_env() -> dict[str, str]:
    return venv_env() | {"PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tlops run` as it was before Dask existed: one process, which never imports Dask."""
    root = tmp_path_factory.mktemp("local")
    script = f"import sys; from tlops import cli; code = cli.main(['run', '--params', sys.argv[1]]); {NOT_IMPORTED}; sys.exit(code)"
    done = subprocess.run([sys.executable, "-c", script, str(scaled_params(root))], env=dask_env(), cwd=root,
                          capture_output=True, text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "DASK []" in done.stdout
    return root


def same_results(local: Path, scaled: Path) -> None:
    """The features bit for bit, the ranking and selection, the model's val and test figures."""
    for backbone in BACKBONES:
        with np.load(local / "outputs/features" / backbone / "features.npz") as a, \
                np.load(scaled / "outputs/features" / backbone / "features.npz") as b:
            assert a.files == b.files
            for name in a.files:
                assert np.array_equal(a[name], b[name]), f"{backbone} {name}"
    ranking = [json.loads((root / "outputs/select/ranking.json").read_text()) for root in (local, scaled)]
    assert ranking[0]["ranking"] == ranking[1]["ranking"] and ranking[0]["selected"] == ranking[1]["selected"]
    for name in ("finetune/result.json", "evaluate/metrics.json"):
        results = [json.loads((root / "outputs" / name).read_text()) for root in (local, scaled)]
        figures = [{k: v for k, v in r.get("metrics", r).items() if "seconds" not in k} for r in results]
        assert figures[0] == figures[1], name


def computed_by_the_stage(root: Path) -> dict[str, float]:
    metrics = json.loads((root / "outputs/features/result.json").read_text())["metrics"]
    return {backbone: metrics[f"{backbone}.n_computed"] for backbone in BACKBONES}


def test_a_local_dask_cluster_gives_the_one_process_results(local_run: Path, prefect_server, tmp_path: Path) -> None:
    params = scaled_params(tmp_path, runner={"kind": "dask", "workers": 2, "shard_batches": 1})
    assert cli.main(["run", "--params", str(params)]) == 0
    same_results(local_run, tmp_path)
    # Every vector came from the workers' pieces: the stage itself only merged what they cached.
    assert computed_by_the_stage(tmp_path) == {backbone: 0.0 for backbone in BACKBONES}
    assert computed_by_the_stage(local_run) == {backbone: 79.0 for backbone in BACKBONES}
    assert len(list((tmp_path / ".cache/features").glob("*/logme/*.json"))) == len(BACKBONES)  # LogME per candidate


def test_a_worker_killed_mid_stage_has_its_pieces_run_elsewhere(local_run: Path, prefect_server, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        params = scaled_params(tmp_path, runner={"kind": "dask", "address": cluster.scheduler_address,
                                                 "shard_batches": 1})
        killed: dict[str, object] = {}
        trunks = [tmp_path / ".cache/features" / b for b in BACKBONES]

        def kill_a_worker_computing_a_chunk() -> None:
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline and not killed:
                ready = all(any(folder.glob("*/trunk.onnx")) for folder in trunks)  # the chunk wave has begun
                busy = {w: keys for w, keys in client.processing().items() if keys} if ready else {}
                if busy:
                    worker, keys = next(iter(busy.items()))
                    pid = client.run(os.getpid, workers=[worker])[worker]
                    os.kill(pid, signal.SIGKILL)
                    killed.update(worker=worker, pid=pid, keys=list(keys))
                time.sleep(0.05)

        killer = threading.Thread(target=kill_a_worker_computing_a_chunk, daemon=True)
        killer.start()
        code = cli.main(["run", "--params", str(params)])
        killer.join(timeout=5)
        assert code == 0
        assert killed, "no worker was killed: the chunks finished before the test could kill one"
        assert killed["pid"] not in client.run(os.getpid).values()  # the killed process is gone (its nanny restarted one)
    same_results(local_run, tmp_path)
    assert computed_by_the_stage(tmp_path) == {backbone: 0.0 for backbone in BACKBONES}  # the lost piece ran elsewhere


def test_a_worker_running_other_tlops_code_is_refused(prefect_server, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other-tlops"
    for package in ("components", "tlops", "flows"):
        shutil.copytree(REPO / package, other / package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(other / "components/features/extract.py", "a") as f:
        f.write("\n# an edit the client does not have\n")
    scheduler_file = tmp_path / "scheduler.json"
    env = venv_env() | {"PYTHONPATH": str(other)}
    dask = Path(sys.executable).parent / "dask"
    processes = [subprocess.Popen([str(dask), "scheduler", "--port", "0", "--no-dashboard", "--scheduler-file",
                                   str(scheduler_file)], env=env, cwd=other)]
    try:
        deadline = time.monotonic() + 120
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        processes.append(subprocess.Popen([str(dask), "worker", "--scheduler-file", str(scheduler_file), "--nthreads",
                                           "1", "--no-dashboard"], env=env, cwd=other))
        address = json.loads(scheduler_file.read_text())["address"]
        (tmp_path / "run").mkdir()
        params = scaled_params(tmp_path / "run", runner={"kind": "dask", "address": address, "connect_seconds": 120})
        capsys.readouterr()
        assert cli.main(["run", "--params", str(params)]) == 1
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=60)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("tlops: error: Dask worker tcp://")
    assert "runs other tlops code than the client (components/features/extract.py differs" in error
    assert not any((tmp_path / "run/.cache/features").glob("*/*/*/*.npz"))  # refused before computing anything


def test_a_scheduler_that_does_not_answer_fails_in_one_line_before_any_work(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    params = scaled_params(tmp_path, runner={"kind": "dask", "address": f"tcp://127.0.0.1:{port}", "connect_seconds": 2})
    done = subprocess.run([sys.executable, "-m", "tlops.cli", "run", "--params", str(params)], env=dask_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"tlops: error: runner.address tcp://127.0.0.1:{port}: no Dask scheduler answers")
    assert "Beginning flow run" not in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "outputs/ingest").exists()


def test_zero_workers_are_refused_when_params_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"runner.workers: Input should be greater than or equal to 1 \(got 0\)"):
        load_params(REPO / "params.yaml", ["runner.kind=dask", "runner.workers=0"])
    with pytest.raises(ConfigError, match="runner.address: 'localhost:8786' is not a Dask scheduler address"):
        load_params(REPO / "params.yaml", ["runner.address=localhost:8786"])
    with pytest.raises(ConfigError, match="tune.storage: SQLite is not safe for trials written by several processes"):
        load_params(REPO / "params.yaml", ["tune.storage=sqlite:///optuna.db"])


def test_tune_trials_run_on_workers_in_reproducible_rounds(local_run: Path, prefect_server, tmp_path: Path) -> None:
    params = local_run / "params.yaml"
    tune = ["--set", "tune.strategy=linear", "--set", "tune.seed=3", "--set",
            "tune.space={linear.regularization: {low: 1.0e-4, high: 10, log: true}}", "--trials", "4"]
    studies = []
    for name in ("first", "second"):
        folder = tmp_path / name
        assert cli.main(["tune", "--params", str(params), "--set", f"paths.tune={folder}", "--set", "runner.kind=dask",
                         "--set", "runner.workers=2", *tune]) == 0
        journal = folder / "optuna.journal"
        assert journal.exists()  # the study the workers shared
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        (summary,) = optuna.get_all_study_summaries(storage)
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        studies.append([(t.number, t.params, t.value, t.state.name) for t in study.trials])
        assert not (folder / ".trials").exists()  # every trial removed its folder, on whichever worker ran it
    assert len(studies[0]) == 4 and all(state == "COMPLETE" for *_, state in studies[0])
    assert studies[0] == studies[1]  # same seed, space, data and round width: the same trials, values and all
    # Trials that trained in other processes are recorded by this one: a nested MLflow run each.
    parent = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("tlops").experiment_id], "tags.`tlops.kind` = 'tune'",
        order_by=["attributes.start_time DESC"], max_results=1)[0]
    nested = mlflow.MlflowClient().search_runs([parent.info.experiment_id],
                                               f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(nested) == 4
    assert yaml.safe_load((tmp_path / "second" / "best_params.yaml").read_text())["finetune"]["strategy"] == "linear"


def test_drift_embeds_new_images_on_the_workers_as_one_process_does(local_run: Path, prefect_server, tmp_path: Path) -> None:
    """`tlops drift` with runner.kind: dask: the new images the cache lacks are embedded on the workers, and the
    check reads them from the cache, with the one-process check's vectors and p-values."""
    from PIL import Image

    from components.monitoring.drift import read_history

    new = tmp_path / "new"
    new.mkdir()
    for index, cell in enumerate(sorted((local_run / "outputs/ingest/images").rglob("*.png"))[:40]):
        Image.open(cell).rotate(90).save(new / f"{index:02d}.png")  # content the features cache has never seen
    checks = {}
    for kind, runner in (("local", []), ("dask", ["runner.kind=dask", "runner.workers=2", "runner.shard_batches=1"])):
        cache = tmp_path / kind / "cache"
        shutil.copytree(local_run / ".cache/features", cache)
        overrides = [f"paths.feature_cache={cache}", f"paths.drift={tmp_path / kind / 'drift'}", *runner]
        assert cli.main(["drift", "--params", str(local_run / "params.yaml"),
                         *[arg for item in overrides for arg in ("--set", item)], str(new)]) == 0
        checks[kind] = read_history(tmp_path / kind / "drift" / "history.jsonl")[-1]
    assert (checks["local"]["n_new"], checks["local"]["n_computed"]) == (40, 40)
    assert checks["dask"]["n_computed"] == 0  # every new vector came from the workers' pieces
    for key in ("mmd2", "p_value", "auc", "auc_p_value", "flagged", "bandwidth"):
        assert checks["dask"][key] == checks["local"][key], key
