"""Drift: real ELPV cells embedded by the real Lite0 trunk at 64 px; shifted batches are flagged, held-out cells are not.

The slow tests start a real Prefect server, deploy retraining with `tlops deploy`'s own function,
and watch a flagged check start a run of that deployment, and a second one inside the cooldown not.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageEnhance, ImageFilter
from pydantic import ValidationError

from components.core.result import StageResult
from components.data.config import IngestConfig
from components.data.ingest import run as ingest_run
from components.data.manifest import Dataset, read_manifest
from components.features import extract as features
from components.features.config import FeaturesConfig
from components.monitoring.config import DriftConfig
from components.monitoring.drift import (
    HISTORY_FILE,
    DriftInputError,
    Reference,
    domain_classifier_test,
    features_reference,
    mmd_test,
    plot_history,
    read_history,
    run,
    split_reference,
    tracking_record,
)
from tests.test_deploy import prefect_api, prefect_env  # noqa: F401 - the real Prefect server fixture
from tlops.config import ConfigError, build

BACKBONE = "efficientnet_lite0"
# Two taps, as a features stage may cache: drift must read them under the stage's own key, not recompute.
FEATURES = FeaturesConfig(image_size=64, taps=("pooled", "stage5"))


@dataclass(frozen=True)
class Cells:
    dataset: Dataset
    features_dir: Path  # the features stage's output on all ~100 cells
    cache_dir: Path
    train: Reference  # the train split only, with its sha256
    held_out: list[Path]  # test-split cells: never in `train`
    train_images: list[Path]
    root: Path


def save_each(paths: list[Path], folder: Path, change) -> Path:  # noqa: ANN001 - PIL image -> PIL image
    folder.mkdir(parents=True)
    for path in paths:
        with Image.open(path) as image:
            change(image.convert("L")).save(folder / path.name)
    return folder


def gradient_noise_images(folder: Path, count: int, seed: int = 0) -> Path:
    """Another domain: RGB colour gradients with sensor-like noise, the size of an ELPV cell."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:300, 0:300] / 300
    for i in range(count):
        base, slope = rng.uniform(0, 255, 3), rng.uniform(-150, 150, (2, 3))
        pixels = base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + rng.normal(0, 25, (300, 300, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"gradient_{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Cells:
    root = tmp_path_factory.mktemp("drift")
    # ~100 real cells: ~63 train (the reference), ~25 test (held out), the rest val.
    ingest_run(IngestConfig(limit=100, seed=3, test_fraction=0.33), root / "ingest")
    dataset = read_manifest(root / "ingest/manifest.csv")
    features.run(FEATURES, (BACKBONE,), dataset, root / "cache", root / "features")
    train = split_reference(dataset, root / "features", BACKBONE, "pooled", "train")
    held_out = [dataset.image_path(p) for p in dataset.split("test")["path"]]
    train_images = [dataset.image_path(p) for p in dataset.split("train")["path"]]
    assert len(train.embeddings) >= 55 and len(held_out) >= 20
    return Cells(dataset, root / "features", root / "cache", train, held_out, train_images, root)


def check(cells: Cells, reference, images, out: Path, **cfg):  # noqa: ANN001, ANN201
    return run(DriftConfig(backbone=BACKBONE, **cfg), reference, images, out, features_cfg=FEATURES,
               cache_dir=cells.cache_dir)


def test_held_out_cells_are_not_flagged(cells: Cells, tmp_path: Path) -> None:
    result = check(cells, cells.train, cells.held_out, tmp_path)
    assert not result.info["flagged"]
    assert result.metrics["p_value"] > 0.05 and result.metrics["auc_p_value"] > 0.05
    assert result.metrics["n_reference"] == len(cells.train.embeddings)  # no held-out cell is in the train split


def test_new_images_already_in_the_reference_are_left_out_of_it(cells: Cells, tmp_path: Path) -> None:
    # What the CLI passes: the train split with its sha256. Ten train cells come back as "new".
    batch = cells.held_out + cells.train_images[:10]
    result = check(cells, cells.train, batch, tmp_path / "split")
    assert result.metrics["n_reference"] == len(cells.train.embeddings) - 10
    assert not result.info["flagged"]
    # A features folder holds every split, the held-out cells included: they are dropped as well.
    every = features_reference(cells.features_dir, BACKBONE, "pooled")
    result = check(cells, cells.features_dir, cells.held_out, tmp_path / "folder")
    assert result.metrics["n_reference"] == len(every.embeddings) - len(cells.held_out)


def test_features_come_from_the_features_stage_cache(cells: Cells, tmp_path: Path) -> None:
    # Train cells were embedded by the features stage (two taps): nothing to compute.
    seen = check(cells, cells.train, cells.train_images[:20] + cells.held_out, tmp_path / "seen")
    assert seen.metrics["n_computed"] == 0
    # New images are computed once; a second check of the same images computes nothing.
    blurred = save_each(cells.held_out, tmp_path / "blurred", lambda image: image.filter(ImageFilter.GaussianBlur(2)))
    first = check(cells, cells.train, blurred, tmp_path / "drift")
    again = check(cells, cells.train, blurred, tmp_path / "drift")
    assert first.metrics["n_computed"] == len(cells.held_out)
    assert again.metrics["n_computed"] == 0
    assert again.metrics["p_value"] == first.metrics["p_value"] and again.metrics["auc"] == first.metrics["auc"]


@pytest.mark.parametrize(
    "shift",
    [
        pytest.param(lambda image: image.filter(ImageFilter.GaussianBlur(6)), id="gaussian-blur-6px"),
        pytest.param(lambda image: ImageEnhance.Contrast(image).enhance(0.4), id="contrast-x0.4"),
        pytest.param(lambda image: ImageEnhance.Contrast(image).enhance(2.5), id="contrast-x2.5"),
    ],
)
def test_shifted_cells_are_flagged(cells: Cells, tmp_path: Path, shift) -> None:  # noqa: ANN001
    shifted = save_each(cells.held_out, tmp_path / "shifted", shift)
    result = check(cells, cells.train, shifted, tmp_path / "drift")
    assert result.info["flagged"]
    assert min(result.metrics["p_value"], result.metrics["auc_p_value"]) < 0.005
    assert result.metrics["auc"] > 0.8


def test_another_domain_gets_the_smallest_p_values(cells: Cells, tmp_path: Path) -> None:
    other = gradient_noise_images(tmp_path / "gradients", count=30)
    result = check(cells, cells.train, other, tmp_path / "drift", permutations=299, auc_permutations=299)
    assert result.info["flagged"]
    assert result.metrics["p_value"] == pytest.approx(1 / 300)  # no permutation comes close
    assert result.metrics["auc_p_value"] == pytest.approx(1 / 300)
    assert result.metrics["auc"] > 0.95


def test_new_images_are_capped_by_a_seeded_subsample(cells: Cells, tmp_path: Path) -> None:
    capped = check(cells, cells.train, cells.held_out, tmp_path, max_new_images=12)
    same = check(cells, cells.train, cells.held_out, tmp_path, max_new_images=12)
    other = check(cells, cells.train, cells.held_out, tmp_path, max_new_images=12, seed=1)
    assert (capped.info["n_found"], capped.info["n_new"]) == (len(cells.held_out), 12)
    assert capped.info["new_sha256"] == same.info["new_sha256"] != other.info["new_sha256"]
    recorded = read_history(tmp_path / HISTORY_FILE)[0]
    assert (recorded["n_found"], recorded["n_new"], recorded["max_new_images"]) == (len(cells.held_out), 12, 12)


def test_history_is_appended_and_drawn(cells: Cells, tmp_path: Path) -> None:
    first = check(cells, cells.train, cells.held_out, tmp_path)
    before = (tmp_path / HISTORY_FILE).read_text()
    blurred = save_each(cells.held_out, tmp_path / "blurred", lambda image: image.filter(ImageFilter.GaussianBlur(6)))
    second = check(cells, cells.train, blurred, tmp_path)
    after = (tmp_path / HISTORY_FILE).read_text()
    assert after.startswith(before)  # earlier lines are kept as they were
    history = read_history(tmp_path / HISTORY_FILE)
    assert [h["flagged"] for h in history] == [False, True]
    assert history[0]["new_sha256"] != history[1]["new_sha256"]
    assert history[1]["per_test_threshold"] == 0.005 and history[1]["auc_p_value"] == second.metrics["auc_p_value"]
    assert not list(tmp_path.glob(".*.tmp"))

    record = tracking_record(second)
    assert record["step"] == 1 and tracking_record(first)["step"] == 0
    assert record["metrics"]["drift_flagged"] == 1.0
    assert record["metrics"]["drift_auc_p_value"] == second.metrics["auc_p_value"]
    assert record["tags"]["tlops.drift.flagged"] == "true"
    json.dumps(record)  # MLflow-loggable: plain JSON values only

    # A line written before the classifier had a p-value still draws.
    old = {k: v for k, v in history[0].items() if k not in ("auc_p_value", "per_test_threshold")}
    (tmp_path / HISTORY_FILE).write_text(json.dumps(old) + "\n" + after)
    plot = plot_history(tmp_path / HISTORY_FILE)
    assert plot.name == "drift_over_time.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mmd_permutation_p_values_are_calibrated_and_powerful() -> None:
    rng = np.random.default_rng(0)
    same = [mmd_test(rng.normal(size=(60, 16)), rng.normal(size=(30, 16)), permutations=99, seed=i)[1]
            for i in range(40)]
    shifted = [mmd_test(rng.normal(size=(60, 16)), rng.normal(0.8, 1.0, size=(30, 16)), permutations=99, seed=i)[1]
               for i in range(5)]
    # Under no shift the p-value is uniform: mean near 0.5, few below 0.05; a real shift gives the minimum, 1/100.
    assert 0.35 < np.mean(same) < 0.65 and np.mean(np.array(same) < 0.05) <= 0.15
    assert shifted == pytest.approx([0.01] * 5)


def test_classifier_permutation_p_values_are_uniform_without_shift_and_small_with_one() -> None:
    rng = np.random.default_rng(1)
    same = np.array([domain_classifier_test(rng.normal(size=(40, 48)), rng.normal(size=(10, 48)), 99, seed=i)
                     for i in range(40)])
    # Uniform p-values: mean near 0.5, each decile about as full; an AUC threshold would not be (at 10 new rows
    # an in-distribution AUC is spread wide: the permutation null absorbs it).
    assert 0.35 < same[:, 1].mean() < 0.65 and np.mean(same[:, 1] < 0.1) <= 0.2
    assert same[:, 0].std() > 0.08
    shifted = [domain_classifier_test(rng.normal(size=(40, 48)), rng.normal(1.0, 1.0, size=(10, 48)), 99, seed=i)
               for i in range(3)]
    assert [p for _, p in shifted] == pytest.approx([0.01] * 3)


def test_bad_config_fails_at_load_with_the_key() -> None:
    with pytest.raises(ValidationError, match="drift.backbone: unknown backbone 'efficientnet_lite9'"):
        DriftConfig(backbone="efficientnet_lite9")
    with pytest.raises(ValidationError, match="drift.tap='stage9'"):
        DriftConfig(backbone=BACKBONE, tap="stage9")
    with pytest.raises(ValidationError, match="p_value_threshold"):
        DriftConfig(p_value_threshold=1.5)
    with pytest.raises(ValidationError, match=r"drift.auc_permutations=150: its smallest p-value, 1/151"):
        DriftConfig(auc_permutations=150)
    with pytest.raises(ValidationError, match="drift.max_new_images=20 is below drift.min_new_images=30"):
        DriftConfig(max_new_images=20, min_new_images=30)
    with pytest.raises(ValidationError, match="permutatoins"):
        DriftConfig(permutatoins=100)
    # The reference is the features stage's output: a tap it does not cache is refused when params load.
    with pytest.raises(ConfigError, match=r"drift.tap='stage5' is not in features.taps \['pooled'\]"):
        build({"drift": {"tap": "stage5"}})


def not_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"cell_{i}.png").write_bytes(b"not a png, a text file named like one\n")
    return folder


def test_unusable_inputs_are_refused_with_one_line(cells: Cells, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DriftInputError, match="holds no files"):
        check(cells, cells.train, tmp_path / "empty", tmp_path / "out")
    # Five files that are not images: named as such, not counted as too few images.
    with pytest.raises(DriftInputError, match=r"5 of 5 files are not images: cell_0.png \(cannot identify"):
        check(cells, cells.train, not_images(tmp_path / "fake", 5), tmp_path / "out")
    mixed = save_each(cells.held_out, tmp_path / "mixed", lambda image: image)
    (mixed / "notes.txt").write_text("taken on the new line\n")
    with pytest.raises(DriftInputError, match=rf"1 of {len(cells.held_out) + 1} files are not images: notes.txt"):
        check(cells, cells.train, mixed, tmp_path / "out")
    with pytest.raises(DriftInputError, match="min_new_images is 10"):
        check(cells, cells.train, cells.held_out[:4], tmp_path / "out")
    narrow = Reference(cells.train.sha256, np.zeros((len(cells.train.sha256), 8), np.float32))
    with pytest.raises(DriftInputError, match="reference embeddings have 8 features"):
        check(cells, narrow, cells.held_out, tmp_path / "out")
    with pytest.raises(DriftInputError, match="no cached features"):
        check(cells, tmp_path / "empty", cells.held_out, tmp_path / "out")
    with pytest.raises(DriftInputError, match="'auto'"):
        run(DriftConfig(), cells.train, cells.held_out, tmp_path / "out")
    assert not (tmp_path / "out" / HISTORY_FILE).exists()  # nothing recorded for a refused check


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`tlops ARGS` in a fresh process with no PREFECT_API_URL; it also reports whether Prefect was imported."""
    env = prefect_env(cwd / "prefect-home", None)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd / 'mlflow.db'}"
    code = ("import sys; from tlops.cli import main; code = main(sys.argv[1:]); "
            "print('prefect imported' if 'prefect' in sys.modules else 'prefect not imported'); sys.exit(code)")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, check=False)


def test_cli_refuses_non_images_and_an_empty_folder_in_one_line_before_prefect(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("drift: {backbone: efficientnet_lite0}\n")
    (tmp_path / "empty").mkdir()
    for folder, message in [(not_images(tmp_path / "fake", 5), "5 of 5 files are not images: cell_0.png"),
                            (tmp_path / "empty", "holds no files")]:
        done = run_cli(["drift", "--images", str(folder), "--params", str(params)], tmp_path)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("tlops: error: "), done.stderr
        assert message in done.stderr
        assert done.stdout == "prefect not imported\n"


def drift_params(cells: Cells, tmp_path: Path, **schedule: object) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "paths": {"dataset": str(cells.root / "ingest"), "validate": str(cells.root / "ingest"),
                  "features": str(cells.features_dir), "feature_cache": str(cells.cache_dir),
                  "drift": str(tmp_path / "drift")},
        "features": {"image_size": 64, "taps": list(FEATURES.taps)},
        "drift": {"backbone": BACKBONE},
        "register": {"model_name": "watched"},
        "schedule": {"deployment": "on-drift", "work_pool": "drift-pool", **schedule},
    }))
    return params


@pytest.mark.slow
def test_tlops_deploy_and_a_flagged_check_start_one_retrain_per_cooldown(
    cells: Cells, tmp_path: Path, prefect_api: str, capsys: pytest.CaptureFixture  # noqa: F811
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import deploy
    from flows.drift import DRIFT_EVENT, emit_drift_event
    from tlops.cli import main

    cooldown = timedelta(seconds=45)
    params = drift_params(cells, tmp_path, min_retrain_interval=int(cooldown.total_seconds()))
    # Held-out cells and ten train cells, copied byte for byte: those ten must leave the reference (it carries
    # the train split's sha256).
    calm = tmp_path / "calm"
    calm.mkdir()
    for path in cells.held_out + cells.train_images[:10]:
        shutil.copyfile(path, calm / path.name)
    shifted = gradient_noise_images(tmp_path / "gradients", count=30)

    def retrains(client, deployment_id) -> list:  # noqa: ANN001
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [deployment_id]}))

    def wait_for(count: int, client, deployment_id) -> list:  # noqa: ANN001
        deadline = time.monotonic() + 90
        while len(runs := retrains(client, deployment_id)) < count and time.monotonic() < deadline:
            time.sleep(1)
        return runs

    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        deploy(str(params))  # the product: the deployment, its schedule and its drift trigger
        deployment = client.read_deployment_by_name("tlops-train/on-drift")

        assert main(["drift", "--images", str(calm), "--params", str(params)]) == 0
        assert "-> no drift" in capsys.readouterr().out
        assert main(["drift", "--images", str(shifted), "--params", str(params)]) == 0
        printed = capsys.readouterr().out
        assert "-> FLAGGED" in printed
        assert (f"event tlops.drift.detected sent to {prefect_api}: automation 'retrain watched on drift' runs "
                f"tlops-train/on-drift (at most once per 0:00:45)") in printed
        first_flag = time.monotonic()
        EventsWorker.drain_all()
        runs = wait_for(1, client, deployment.id)
        assert len(runs) == 1 and runs[0].parameters == deployment.parameters

        # A second flagged check inside the cooldown: its event arrives, no retrain starts.
        assert main(["drift", "--images", str(shifted), "--params", str(params)]) == 0
        assert "-> FLAGGED" in capsys.readouterr().out

        # After the cooldown, a flag starts the next retrain; the events are evaluated in order, so once
        # its run exists the second event has been evaluated too, and it started nothing.
        time.sleep(max(0.0, cooldown.total_seconds() + 2 - (time.monotonic() - first_flag)))
        history = read_history(tmp_path / "drift" / HISTORY_FILE)
        assert [h["flagged"] for h in history] == [False, True, True]
        assert history[0]["n_reference"] == len(cells.train.embeddings) - 10
        assert emit_drift_event(StageResult(stage="drift", out_dir=tmp_path, info={**history[-1], "batch": 3}),
                                "watched") is not None
        EventsWorker.drain_all()
        runs = wait_for(2, client, deployment.id)
        time.sleep(3)
        assert len(retrains(client, deployment.id)) == 2
        events = client.read_events(EventFilter(event=EventNameFilter(name=[DRIFT_EVENT])), limit=10).events
    occurred = sorted(e.occurred for e in events if e.resource.id == "tlops.model.watched")
    assert len(occurred) == 3
    assert occurred[1] - occurred[0] < cooldown <= occurred[2] - occurred[0]  # the test's own premise


@pytest.mark.slow
def test_cli_says_a_flag_went_to_a_temporary_server_when_no_api_is_set(cells: Cells, tmp_path: Path) -> None:
    params = drift_params(cells, tmp_path)
    shifted = gradient_noise_images(tmp_path / "gradients", count=30)
    done = run_cli(["drift", "--images", str(shifted), "--params", str(params)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "-> FLAGGED" in done.stdout
    assert "went to a temporary Prefect server that stopped with this command, so nothing will retrain" in done.stdout
    assert "set PREFECT_API_URL" in done.stdout
