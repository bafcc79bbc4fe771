import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.classifier import CheckpointError, build_model, load_checkpoint, save_checkpoint
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
    write_json(folder / "backbone.json", {"preprocessing": get_entry("efficientnet_lite0").preprocessing(64).model_dump(mode="json"),
                                          "cache_key": "synthetic"})
    return Dataset(frame, tmp_path, ("a", "b")), tmp_path / "features", manifest


def test_linear_head_learns_and_checkpoint_describes_itself(tmp_path: Path) -> None:
    dataset, features, manifest = synthetic(tmp_path)
    result = run(FinetuneConfig(epochs=60, lr=0.01), "efficientnet_lite0", "pooled", features, dataset, manifest, tmp_path / "out")
    assert result.metrics["val_accuracy"] > 0.9
    checkpoint = load_checkpoint(result.artifacts["checkpoint"])
    assert checkpoint["labels"] == ["a", "b"] and checkpoint["strategy"] == "linear"
    assert checkpoint["backbone"]["name"] == "efficientnet_lite0" and checkpoint["preprocessing"]["input_size"] == 64
    assert checkpoint["config"]["lr"] == 0.01 and checkpoint["data"]["version"] == hashlib.md5(manifest.read_bytes()).hexdigest()
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


def test_the_seed_decides_the_weights(tmp_path: Path) -> None:
    dataset, features, manifest = synthetic(tmp_path)

    def head(seed: int, out: str) -> torch.Tensor:
        result = run(FinetuneConfig(epochs=3, lr=0.01, seed=seed), "efficientnet_lite0", "pooled", features, dataset,
                     manifest, tmp_path / out)
        return load_checkpoint(result.artifacts["checkpoint"])["head"]["weight"]

    first = head(0, "a")
    assert torch.equal(first, head(0, "b"))  # the same seed reproduces the run exactly
    assert not torch.equal(first, head(1, "c"))  # and a different one really is different


def test_the_checkpoint_loader_refuses_what_is_not_a_tlops_checkpoint(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a tlops checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(ValueError, match="lacks"):
        save_checkpoint(tmp_path / "incomplete.pt", torch.nn.Linear(2, 2), None, backbone={}, tap="pooled")
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")
