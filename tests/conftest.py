"""Shared fixtures: tiny real datasets (generated images, a handful of real ELPV cells)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components.data.config import IngestConfig
from components.data.ingest import run as ingest_run
from components.data.manifest import Dataset, read_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test writes MLflow or Prefect state into the repo or the user's home.

    The tests also run from that folder: MLflow puts artifacts in `./mlruns` of the working directory.
    """
    state = tmp_path_factory.mktemp("state")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(state)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{state / 'mlflow.db'}")
        patch.setenv("PREFECT_HOME", str(state / "prefect"))
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        yield


@pytest.fixture(scope="session")
def prefect_server(_isolated_state: None) -> Iterator[None]:
    """One real, temporary Prefect API for the session's flow runs, stopped before pytest exits."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_imagefolder(root: Path, per_class: int = 6, size: int = 48, seed: int = 0) -> Path:
    """Two visibly different classes of small RGB images: `dark/` and `bright/`."""
    rng = np.random.default_rng(seed)
    for label, level in [("dark", 40), ("bright", 210)]:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(level, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{label}_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def elpv_small(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """About 40 real ELPV cells, ingested once for the session."""
    out = tmp_path_factory.mktemp("elpv_small")
    ingest_run(IngestConfig(limit=40, seed=7), out)
    return read_manifest(out / "manifest.csv")


def small_params(tmp: Path, **blocks: dict) -> Path:
    """A params file for a fast real run: ~80 ELPV cells, Lite0 at 64 px, outputs under `tmp`."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"] = {k: str(tmp / v) for k, v in params["paths"].items()}
    params["ingest"]["limit"] = 80
    params["validate"]["min_per_class_split"] = 2
    params["features"]["image_size"] = 64
    params["select"]["candidates"] = ["efficientnet_lite0"]
    params["finetune"]["strategy"] = "linear"  # seconds; the deeper strategies have their own tests
    params["export"]["parity_images"] = 4
    params["compress"]["calibration_images"] = 16
    for block, values in blocks.items():
        params[block].update(values)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def venv_env() -> dict[str, str]:
    """The environment for subprocesses: this interpreter's bin first on PATH (tlops, dvc)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(os.sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env
