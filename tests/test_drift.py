"""Drift: real ELPV cells embedded by the real Lite0 trunk at 64 px; shifted batches are flagged, held-out cells are not."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter
from pydantic import ValidationError

from components.core.result import StageResult
from components.data.config import IngestConfig
from components.data.ingest import run as ingest_run
from components.data.manifest import read_manifest
from components.features import extract as features
from components.features.cache import load_features, split_features
from components.features.config import FeaturesConfig
from components.monitoring.config import DriftConfig
from components.monitoring.drift import (
    HISTORY_FILE,
    DriftInputError,
    mmd_test,
    plot_history,
    read_history,
    run,
    tracking_record,
)

BACKBONE = "efficientnet_lite0"
FEATURES = FeaturesConfig(image_size=64)


@dataclass(frozen=True)
class Cells:
    features_dir: Path  # the features stage's output on all ~100 cells
    cache_dir: Path
    train: np.ndarray  # reference embeddings: the train split only
    held_out: list[Path]  # test-split cells: never in `train`
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
    train = split_features(dataset, root / "features", BACKBONE, "pooled", "train")
    held_out = [dataset.image_path(p) for p in dataset.split("test")["path"]]
    assert len(train) >= 55 and len(held_out) >= 20
    return Cells(root / "features", root / "cache", train, held_out, root)


def check(cells: Cells, reference, images, out: Path, **cfg):  # noqa: ANN001, ANN201
    return run(DriftConfig(backbone=BACKBONE, **cfg), reference, images, out, features_cfg=FEATURES,
               cache_dir=cells.cache_dir)


def test_held_out_cells_are_not_flagged(cells: Cells, tmp_path: Path) -> None:
    result = check(cells, cells.train, cells.held_out, tmp_path)
    assert not result.info["flagged"]
    assert result.metrics["p_value"] > 0.2
    assert result.metrics["auc"] < 0.7


def test_held_out_cells_against_the_features_folder_leave_themselves_out(cells: Cells, tmp_path: Path) -> None:
    # The features folder holds every split, the held-out cells included: they are dropped from the reference.
    all_rows = load_features(cells.features_dir, BACKBONE, "pooled")[1]
    result = check(cells, cells.features_dir, cells.held_out, tmp_path)
    assert result.metrics["n_reference"] == len(all_rows) - len(cells.held_out)
    assert not result.info["flagged"] and result.metrics["p_value"] > 0.2


@pytest.mark.parametrize(
    ("shift", "max_p_value"),
    [
        pytest.param(lambda image: image.filter(ImageFilter.GaussianBlur(6)), 0.01, id="gaussian-blur-6px"),
        pytest.param(lambda image: ImageEnhance.Contrast(image).enhance(0.4), 0.01, id="contrast-x0.4"),
        # MMD alone is weaker here (p ~0.015 at 25 images); the domain classifier carries the flag.
        pytest.param(lambda image: ImageEnhance.Contrast(image).enhance(2.5), 0.05, id="contrast-x2.5"),
    ],
)
def test_shifted_cells_are_flagged(cells: Cells, tmp_path: Path, shift, max_p_value: float) -> None:  # noqa: ANN001
    shifted = save_each(cells.held_out, tmp_path / "shifted", shift)
    result = check(cells, cells.train, shifted, tmp_path / "drift")
    assert result.info["flagged"]
    assert result.metrics["p_value"] < max_p_value
    assert result.metrics["auc"] > 0.8


def test_a_mild_blur_is_flagged_by_the_domain_classifier_alone(cells: Cells, tmp_path: Path) -> None:
    blurred = save_each(cells.held_out, tmp_path / "blurred", lambda image: image.filter(ImageFilter.GaussianBlur(3)))
    result = check(cells, cells.train, blurred, tmp_path / "drift")
    assert result.metrics["p_value"] > 0.01 and result.metrics["auc"] > 0.8 and result.info["flagged"]
    without_classifier = check(cells, cells.train, blurred, tmp_path / "mmd-only", auc_threshold=None)
    assert not without_classifier.info["flagged"]


def test_another_domain_is_flagged_with_the_smallest_p_value(cells: Cells, tmp_path: Path) -> None:
    other = gradient_noise_images(tmp_path / "gradients", count=30)
    result = check(cells, cells.train, other, tmp_path / "drift", permutations=199)
    assert result.info["flagged"]
    assert result.metrics["p_value"] == pytest.approx(1 / 200)  # no permutation comes close
    assert result.metrics["auc"] > 0.95


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
    assert not list(tmp_path.glob(".*.tmp"))

    record = tracking_record(second)
    assert record["step"] == 1 and tracking_record(first)["step"] == 0
    assert record["metrics"]["drift_flagged"] == 1.0
    assert record["metrics"]["drift_p_value"] == second.metrics["p_value"]
    assert record["tags"]["tlops.drift.flagged"] == "true"
    json.dumps(record)  # MLflow-loggable: plain JSON values only

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


def test_bad_config_fails_at_load_with_the_key() -> None:
    with pytest.raises(ValidationError, match="drift.backbone: unknown backbone 'efficientnet_lite9'"):
        DriftConfig(backbone="efficientnet_lite9")
    with pytest.raises(ValidationError, match="drift.tap='stage9'"):
        DriftConfig(backbone=BACKBONE, tap="stage9")
    with pytest.raises(ValidationError, match="p_value_threshold"):
        DriftConfig(p_value_threshold=1.5)
    with pytest.raises(ValidationError, match="permutatoins"):
        DriftConfig(permutatoins=100)


def test_unusable_inputs_are_refused_with_one_line(cells: Cells, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DriftInputError, match="holds no image"):
        check(cells, cells.train, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DriftInputError, match="min_new_images is 10"):
        check(cells, cells.train, cells.held_out[:4], tmp_path / "out")
    with pytest.raises(DriftInputError, match="reference embeddings have 8 features"):
        check(cells, np.zeros((60, 8), np.float32), cells.held_out, tmp_path / "out")
    with pytest.raises(DriftInputError, match="no cached features"):
        check(cells, tmp_path / "empty", cells.held_out, tmp_path / "out")
    with pytest.raises(DriftInputError, match="'auto'"):
        run(DriftConfig(), cells.train, cells.held_out, tmp_path / "out")
    assert not (tmp_path / "out" / HISTORY_FILE).exists()  # nothing recorded for a refused check


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_flagged_check_emits_the_event_that_starts_the_retraining_deployment(cells: Cells, tmp_path: Path) -> None:
    import time

    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.events.worker import EventsWorker

    from flows.drift import DRIFT_EVENT, check_drift, emit_drift_event, retrain_trigger
    from flows.train import train

    # The retraining deployment, started by Prefect's automations when the event arrives (nobody runs it here).
    deployment_id = train.to_deployment(name="retrain-on-drift", triggers=[retrain_trigger("tlops-elpv")]).apply()

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"paths": {"dataset": str(cells.root / "ingest"),
                                                "validate": str(cells.root / "ingest"),
                                                "features": str(cells.features_dir),
                                                "feature_cache": str(cells.cache_dir)},
                                      "features": {"image_size": 64}}))
    calm = check_drift(images=str(save_each(cells.held_out, tmp_path / "calm", lambda image: image)),
                       params_file=str(params), drift_cfg=DriftConfig(backbone=BACKBONE), out_dir=str(tmp_path / "drift"))
    assert not calm["flagged"] and calm["event_id"] is None
    assert calm["n_reference"] == len(cells.train)  # the train split, not every cached row
    shifted = check_drift(images=str(gradient_noise_images(tmp_path / "gradients", count=30)), params_file=str(params),
                          drift_cfg=DriftConfig(backbone=BACKBONE), out_dir=str(tmp_path / "drift"))
    assert shifted["flagged"] and shifted["event_id"] is not None
    assert Path(shifted["plot"]).is_file() and len(read_history(tmp_path / "drift" / HISTORY_FILE)) == 2
    EventsWorker.drain_all()

    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 60
        while True:
            events = client.read_events(EventFilter(event=EventNameFilter(name=[DRIFT_EVENT])), limit=50).events
            ours = [e for e in events if str(e.id) == shifted["event_id"]]
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [deployment_id]}))
            if (ours and runs) or time.monotonic() > deadline:
                break
            time.sleep(1)
        client.delete_deployment(deployment_id)
    assert ours and ours[0].payload["p_value"] == pytest.approx(shifted["p_value"])
    assert ours[0].resource.id == "tlops.model.tlops-elpv"
    assert len(runs) == 1 and runs[0].parameters == {"params_file": "params.yaml"}
    assert emit_drift_event(StageResult(stage="drift", out_dir=tmp_path, info={"flagged": False}), "tlops-elpv") is None
