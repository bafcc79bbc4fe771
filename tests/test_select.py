"""Select: LogME against a dense brute force, and the ranking stage on synthetic cached features."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.data.manifest import Dataset
from components.features.cache import FeatureCacheError, load_features, split_features
from components.features.config import SelectConfig
from components.features.select import candidate_score, logme_evidences, logme_score, run, score_path

LABELS = ("defective", "functional")


def dense_log_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y | 0, beta^-1 I + alpha^-1 F F^T): Bayesian linear regression's evidence, no SVD."""
    n = f.shape[0]
    cov = np.eye(n) / beta + f @ f.T / alpha
    if np.linalg.cond(cov) > 1e12:  # beta = inf with rank(F) < n: a degenerate Gaussian
        return -np.inf
    _, logdet = np.linalg.slogdet(cov)
    return float(-0.5 * (n * np.log(2 * np.pi) + logdet + y @ np.linalg.solve(cov, y)))


def class_features(rng: np.random.Generator, labels: np.ndarray, dim: int, signal: float) -> np.ndarray:
    centres = rng.normal(size=(labels.max() + 1, dim))
    return (signal * centres[labels] + rng.normal(size=(labels.size, dim))).astype(np.float32)


def low_rank_features(rng: np.random.Generator, labels: np.ndarray, dim: int) -> np.ndarray:
    """Three strong directions plus faint noise: interpolating y would cost more than it gains."""
    latent = np.eye(labels.max() + 1)[labels] + 0.5 * rng.normal(size=(labels.size, labels.max() + 1))
    return latent @ rng.normal(size=(latent.shape[1], dim)) + 0.05 * rng.normal(size=(labels.size, dim))


# (n, d, features, whether the evidence peaks at beta = inf for some class)
CASES = {
    "n>d": (80, 12, "class", False),
    "n<d-interior": (20, 60, "low_rank", False),  # here the D - k zero directions of F^T F matter
    "n<d-noise-free": (15, 40, "class", True),  # full row rank: y interpolated exactly
}


@pytest.mark.parametrize("case", CASES)
def test_logme_is_the_dense_evidence_at_its_maximum(case: str) -> None:
    n, d, kind, noise_free = CASES[case]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=n)
    f = class_features(rng, labels, d, 0.7) if kind == "class" else low_rank_features(rng, labels, d)
    f = f.astype(np.float64)
    evidences = logme_evidences(f, labels)
    assert [e.label for e in evidences] == [0, 1, 2]
    assert any(np.isinf(e.beta) for e in evidences) == noise_free
    grid = np.logspace(-2, 6, 17)
    dense = []
    for e in evidences:
        y = (labels == e.label).astype(np.float64)
        dense.append(dense_log_evidence(f, y, e.alpha, e.beta))
        assert e.log_evidence == pytest.approx(dense[-1], rel=1e-9, abs=1e-9)
        # The returned (alpha, beta) maximises the evidence: no nudge of either and no point
        # of a coarse grid (noise-free column included) does better.
        for da, db in [(1.001, 1), (0.999, 1), (1, 1.001), (1, 0.999)]:
            assert dense_log_evidence(f, y, e.alpha * da, e.beta * db) <= dense[-1] + 1e-9
        best_on_grid = max(dense_log_evidence(f, y, a, b) for a in grid for b in [*grid, np.inf])
        assert best_on_grid <= dense[-1] + 1e-9
    assert logme_score(f, labels) == pytest.approx(np.mean(dense) / n, rel=1e-9)


@pytest.mark.parametrize("n, d", [(120, 16), (30, 64)], ids=["n>d", "n<d"])
def test_logme_ranks_informative_features_above_noise(n: int, d: int) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=n)
    informative = class_features(rng, labels, d, signal=1.5)
    noise = rng.normal(size=(n, d)).astype(np.float32)
    assert logme_score(informative, labels) > logme_score(noise, labels)


def sha(i: int) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


@pytest.fixture()
def dataset() -> Dataset:
    n = 40
    splits = ["train"] * 30 + ["val"] * 5 + ["test"] * 5
    manifest = pd.DataFrame({
        "path": [f"img/{i:03d}.png" for i in range(n)],
        "label": [LABELS[i % 2] for i in range(n)],
        "split": splits,
        "sha256": [sha(i) for i in range(n)],
        "width": 32, "height": 32, "mode": "L",
    })
    return Dataset(manifest=manifest, root=Path("."), labels=LABELS)


def write_cache(features_dir: Path, backbone: str, dataset: Dataset, informative: bool, seed: int) -> np.ndarray:
    """Train rows only, stored shuffled; returns them in manifest order."""
    train = dataset.split("train")
    rng = np.random.default_rng(seed)
    labels = np.asarray(dataset.label_index(train))
    pooled = class_features(rng, labels, 24, signal=2.0 if informative else 0.0)
    order = rng.permutation(len(train))
    (features_dir / backbone).mkdir(parents=True, exist_ok=True)
    np.savez(
        features_dir / backbone / "features.npz",
        sha256=train["sha256"].to_numpy(dtype=str)[order],
        pooled=pooled[order],
    )
    return pooled


def test_run_selects_the_informative_backbone(tmp_path: Path, dataset: Dataset) -> None:
    features_dir = tmp_path / "features"
    # The noise backbone comes first, so picking the first candidate would fail this test.
    write_cache(features_dir, "efficientnet_lite0", dataset, informative=False, seed=2)
    write_cache(features_dir, "efficientnet_lite1", dataset, informative=True, seed=3)
    cfg = SelectConfig(candidates=("efficientnet_lite0", "efficientnet_lite1"))
    result = run(cfg, dataset, features_dir, tmp_path / "select")

    assert result.info["selected"] == "efficientnet_lite1"
    assert result.metrics["logme.efficientnet_lite1"] > result.metrics["logme.efficientnet_lite0"]
    for name in ("ranking.json", "ranking.csv", "ranking.png", "result.json"):
        assert (tmp_path / "select" / name).stat().st_size > 0
    record = json.loads((tmp_path / "select" / "ranking.json").read_text())
    assert record["selected"] == "efficientnet_lite1"
    assert [r["backbone"] for r in record["ranking"]] == ["efficientnet_lite1", "efficientnet_lite0"]
    assert record["ranking"][0]["n_samples"] == 30 and record["ranking"][0]["feature_dim"] == 24
    csv = pd.read_csv(tmp_path / "select" / "ranking.csv")
    assert list(csv.columns) == ["backbone", "logme"] and csv["backbone"][0] == "efficientnet_lite1"
    assert result.is_intact()

    pinned = run(SelectConfig(candidates=cfg.candidates, backbone="efficientnet_lite0"),
                 dataset, features_dir, tmp_path / "pinned")
    assert pinned.info["selected"] == "efficientnet_lite0"
    assert pinned.info["ranking"][0]["backbone"] == "efficientnet_lite1"


def test_a_kept_score_is_reused_only_for_the_same_features_rows_and_labels(tmp_path: Path, dataset: Dataset) -> None:
    features_dir, cache = tmp_path / "features", tmp_path / "cache"
    write_cache(features_dir, "efficientnet_lite0", dataset, informative=True, seed=5)
    computed = candidate_score(dataset, features_dir, "efficientnet_lite0", "pooled", cache)
    kept = score_path(dataset, features_dir, "efficientnet_lite0", "pooled", cache)
    assert json.loads(kept.read_text())["score"] == computed  # what a select piece on a worker leaves for the stage
    kept.write_text(json.dumps({"score": {**computed, "logme": 123.0}}))
    assert candidate_score(dataset, features_dir, "efficientnet_lite0", "pooled", cache)["logme"] == 123.0  # reused
    relabelled = Dataset(dataset.manifest.assign(label=dataset.manifest["label"].iloc[::-1].to_numpy()),
                         dataset.root, dataset.labels)
    assert candidate_score(relabelled, features_dir, "efficientnet_lite0", "pooled", cache)["logme"] != 123.0
    write_cache(features_dir, "efficientnet_lite0", dataset, informative=False, seed=6)  # other features, same path
    fresh = candidate_score(dataset, features_dir, "efficientnet_lite0", "pooled", cache)
    assert fresh["logme"] != 123.0 and fresh["logme"] < computed["logme"]
    assert run(SelectConfig(candidates=("efficientnet_lite0",)), dataset, features_dir, tmp_path / "select",
               cache).metrics["logme.efficientnet_lite0"] == fresh["logme"]


def test_cached_features_are_matched_to_train_rows_by_sha256(tmp_path: Path, dataset: Dataset) -> None:
    expected = write_cache(tmp_path, "efficientnet_lite0", dataset, informative=True, seed=4)
    sha256, pooled = load_features(tmp_path, "efficientnet_lite0")
    assert sorted(sha256) == sorted(dataset.split("train")["sha256"])
    assert pooled.dtype == np.float32 and pooled.shape == (30, 24)
    np.testing.assert_array_equal(split_features(dataset, tmp_path, "efficientnet_lite0", "pooled"), expected)
    with pytest.raises(KeyError, match="stage3"):
        load_features(tmp_path, "efficientnet_lite0", tap="stage3")


@pytest.mark.parametrize("kwargs, bad", [
    ({"candidates": ("efficientnet_lite0", "efficientnet_lit1")}, "efficientnet_lit1"),
    ({"backbone": "resnet50"}, "resnet50"),
])
def test_unknown_backbone_is_named(kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        SelectConfig(**kwargs)


def test_cache_missing_a_train_image_is_a_clear_error(tmp_path: Path, dataset: Dataset) -> None:
    write_cache(tmp_path, "efficientnet_lite0", dataset, informative=True, seed=5)
    path = tmp_path / "efficientnet_lite0" / "features.npz"
    with np.load(path) as cache:
        np.savez(path, sha256=cache["sha256"][1:], pooled=cache["pooled"][1:])
    with pytest.raises(FeatureCacheError, match=r"efficientnet_lite0.*1 of 30 train.*rerun the features stage"):
        run(SelectConfig(candidates=("efficientnet_lite0",)), dataset, tmp_path, tmp_path / "select")
