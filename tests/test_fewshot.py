"""`tlops fewshot`'s episodic evaluation: seeded and reproducible, on real cached features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from components.core.errors import UserError
from components.evaluation.config import FewshotConfig
from components.evaluation.fewshot import draw_support, run
from components.features.cache import split_features
from tests.tiny_features import make_features
from tests.tiny_model import make_dataset


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fewshot")
    dataset = make_dataset(root / "data")
    return root, dataset, make_features(dataset, root)


def test_the_same_seed_gives_the_same_episodes_and_numbers_another_seed_other_ones(cached, tmp_path: Path) -> None:
    root, dataset, features = cached
    cfg = FewshotConfig(shots=(1, 2), episodes=6, seed=3)
    first = run(cfg, "efficientnet_lite0", dataset, features, tmp_path / "a")
    again = run(cfg, "efficientnet_lite0", dataset, features, tmp_path / "b")
    assert (tmp_path / "a" / "fewshot.json").read_bytes() == (tmp_path / "b" / "fewshot.json").read_bytes()
    assert first.metrics == again.metrics
    report = json.loads((tmp_path / "a" / "fewshot.json").read_text())
    assert set(report) == {"1", "2"} and set(report["1"]) == {"prototypes", "linear"}
    # The 1-shot figures, replayed here: the seeded support draws, cosine to each class's mean, a probe per episode.
    x = {s: split_features(dataset, features, "efficientnet_lite0", "pooled", s) for s in ("train", "test")}
    y = {s: np.asarray(dataset.label_index(dataset.split(s))) for s in ("train", "test")}
    centre = x["train"].mean(0)
    rng, found = np.random.default_rng([3, 1]), {"prototypes": [], "linear": []}
    for _ in range(6):
        rows = draw_support(y["train"], 2, 1, rng)
        means = np.stack([(x["train"][rows][y["train"][rows] == c] - centre).mean(0) for c in (0, 1)])
        test = x["test"] - centre
        cosine = (test @ means.T) / np.linalg.norm(test, axis=1, keepdims=True) / np.linalg.norm(means, axis=1)
        found["prototypes"].append((cosine.argmax(1) == y["test"]).mean())
        unit = (x["train"][rows] - centre) / np.linalg.norm(x["train"][rows] - centre, axis=1, keepdims=True)
        probe = LogisticRegression(C=1.0, max_iter=1000).fit(unit, y["train"][rows])
        found["linear"].append((probe.predict(test / np.linalg.norm(test, axis=1, keepdims=True)) == y["test"]).mean())
    for method, accuracies in found.items():
        assert report["1"][method]["mean"] == pytest.approx(np.mean(accuracies))
        assert report["1"][method]["ci95"] == pytest.approx(1.96 * np.std(accuracies, ddof=1) / np.sqrt(6))
    assert first.metrics["fewshot.1.prototypes.mean"] == report["1"]["prototypes"]["mean"]  # the run logs what it writes
    assert (tmp_path / "a" / "fewshot.png").read_bytes()[:4] == b"\x89PNG"
    # Different seeds draw different support sets.
    rng = [np.random.default_rng([seed, 1]) for seed in (3, 4)]
    labels = np.array([0, 0, 0, 1, 1, 1])
    draws = [[tuple(draw_support(labels, 2, 1, r)) for _ in range(6)] for r in rng]
    assert draws[0] != draws[1]


def test_more_shots_than_the_train_split_has_is_one_clear_line(cached, tmp_path: Path) -> None:
    root, dataset, features = cached
    with pytest.raises(UserError, match=r"fewshot.shots \[1, 5\]: the train split has fewer than 5 images"):
        run(FewshotConfig(shots=(1, 5), episodes=2), "efficientnet_lite0", dataset, features, tmp_path / "c")


def test_episodes_are_a_function_of_the_seed() -> None:
    from components.evaluation.fewshot import episode_accuracies

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    train = rng.normal(size=(200, 16)) + labels[:, None] * 0.3  # overlapping classes: episodes differ
    test_labels = np.repeat(np.arange(4), 25)
    test = rng.normal(size=(100, 16)) + test_labels[:, None] * 0.3
    args = (train, labels, test, test_labels, 4, 5, 8)
    first, again, other = (episode_accuracies(*args, seed, 1.0) for seed in (0, 0, 1))
    for method in ("prototypes", "linear"):
        np.testing.assert_array_equal(first[method], again[method])
        assert not np.array_equal(first[method], other[method])
        assert len(set(first[method].tolist())) > 1  # the episodes really drew different support sets
