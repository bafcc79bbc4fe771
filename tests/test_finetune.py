from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.classifier import build_model, load_checkpoint
from components.features import FeatureCacheError
from components.finetune import FinetuneConfig, class_weight_vector, run
from components.manifest import Dataset, write_manifest
from components.result import write_json
from components.backbones import get_entry


def synthetic(tmp_path: Path, n: int = 60, informative: bool = True) -> tuple[Dataset, Path, Path]:
    rng = np.random.default_rng(0)
    labels = np.array(["a", "b"])[rng.integers(0, 2, n)]
    shas = [f"{i:064x}" for i in range(n)]
    splits = np.array(["train", "val", "test"])[np.arange(n) % 3]
    frame = pd.DataFrame({"path": [f"images/{i}.png" for i in range(n)], "label": labels, "split": splits,
                          "sha256": shas, "width": 8, "height": 8, "mode": "L"})
    manifest = write_manifest(frame, tmp_path / "manifest.csv")
    features = rng.normal(size=(n, 1280)).astype(np.float32)
    if informative:
        features[:, :32] += np.where(labels == "a", 1.5, -1.5)[:, None]
    folder = tmp_path / "features" / "efficientnet_lite0"
    folder.mkdir(parents=True)
    np.savez(folder / "features.npz", sha256=np.array(shas), pooled=features)
    write_json(folder / "backbone.json", {"preprocessing": get_entry("efficientnet_lite0").preprocessing(64)})
    return Dataset(frame, tmp_path, ("a", "b")), tmp_path / "features", manifest


def test_linear_head_learns_and_checkpoint_describes_itself(tmp_path: Path) -> None:
    dataset, features, manifest = synthetic(tmp_path)
    result = run(FinetuneConfig(epochs=60, lr=0.01), "efficientnet_lite0", "pooled", features, dataset, manifest, tmp_path / "out")
    assert result.metrics["val_accuracy"] > 0.9
    checkpoint = load_checkpoint(result.artifacts["checkpoint"])
    assert checkpoint["labels"] == ["a", "b"] and checkpoint["strategy"] == "linear"
    assert checkpoint["backbone"]["name"] == "efficientnet_lite0" and checkpoint["preprocessing"]["input_size"] == 64
    assert checkpoint["config"]["lr"] == 0.01 and len(checkpoint["data"]["manifest_sha256"]) == 64
    assert build_model(checkpoint).head.weight.shape == (2, 1280)
    assert result.artifacts["training_curves"].stat().st_size > 0


def test_uninformative_features_stay_near_chance(tmp_path: Path) -> None:
    dataset, features, manifest = synthetic(tmp_path, n=300, informative=False)
    result = run(FinetuneConfig(epochs=30, lr=0.01), "efficientnet_lite0", "pooled", features, dataset, manifest, tmp_path / "out")
    assert result.metrics["val_accuracy"] < 0.75


def test_balanced_class_weights() -> None:
    weights = class_weight_vector(np.array([0, 0, 0, 1]), 2, "balanced")
    assert weights.tolist() == pytest.approx([4 / 6, 2.0])


def test_missing_features_name_the_stage_to_rerun(tmp_path: Path) -> None:
    dataset, features, manifest = synthetic(tmp_path)
    extra = dataset.manifest.copy()
    extra.loc[0, "sha256"] = "f" * 64
    with pytest.raises(FeatureCacheError, match="rerun the features stage"):
        run(FinetuneConfig(), "efficientnet_lite0", "pooled", features, Dataset(extra, tmp_path, ("a", "b")), manifest, tmp_path / "o")
