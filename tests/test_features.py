from pathlib import Path

import numpy as np
import pytest
import torch

from components.backbones import build_trunk, get_entry
from components.features import FeaturesConfig, FeatureStore, run, space_key
from components.manifest import Dataset
from components.preprocess import load_batch

CFG = FeaturesConfig(image_size=64, taps=("stage3", "pooled"), batch_size=8)


def test_onnx_features_match_the_torch_trunk(elpv_small: Dataset, tmp_path: Path) -> None:
    result = run(CFG, ("efficientnet_lite0",), elpv_small, tmp_path / "cache", tmp_path / "out")
    with np.load(result.artifacts["efficientnet_lite0.features"]) as data:
        assert list(data["sha256"]) == list(elpv_small.manifest["sha256"])
        pooled, stage3 = data["pooled"][:4], data["stage3"][:4]
    entry = get_entry("efficientnet_lite0")
    images = load_batch([elpv_small.image_path(p) for p in elpv_small.manifest["path"][:4]], entry.preprocessing(64))
    with torch.no_grad():
        expected_stage3, expected_pooled = build_trunk(entry, ("stage3", "pooled"))(torch.from_numpy(images))
    assert pooled.shape == (4, 1280) and stage3.shape == (4, 80)
    np.testing.assert_allclose(pooled, expected_pooled.numpy(), atol=1e-4)
    np.testing.assert_allclose(stage3, expected_stage3.numpy(), atol=1e-4)


def test_rerun_computes_only_missing_images(elpv_small: Dataset, tmp_path: Path) -> None:
    first = run(CFG, ("efficientnet_lite0",), elpv_small, tmp_path / "cache", tmp_path / "a")
    assert first.metrics["efficientnet_lite0.n_computed"] == len(elpv_small.manifest)
    entry = get_entry("efficientnet_lite0")
    store = FeatureStore(tmp_path / "cache" / "efficientnet_lite0", space_key(entry, CFG))
    dropped = elpv_small.manifest["sha256"].iloc[:3]
    for sha in dropped:  # as if these three images were new
        store.path(sha).unlink()
    second = run(CFG, ("efficientnet_lite0",), elpv_small, tmp_path / "cache", tmp_path / "b")
    assert second.metrics["efficientnet_lite0.n_computed"] == 3
    assert second.metrics["efficientnet_lite0.n_cached"] == len(elpv_small.manifest) - 3
    with np.load(first.artifacts["efficientnet_lite0.features"]) as a, np.load(second.artifacts["efficientnet_lite0.features"]) as b:
        np.testing.assert_allclose(a["pooled"], b["pooled"], atol=1e-5)


def test_cache_key_changes_with_preprocessing_and_taps() -> None:
    entry = get_entry("efficientnet_lite0")
    base = space_key(entry, CFG)
    assert space_key(entry, FeaturesConfig(image_size=96, taps=CFG.taps)) != base
    assert space_key(entry, FeaturesConfig(image_size=64, taps=("pooled",))) != base
    assert space_key(get_entry("efficientnet_lite1"), CFG) != base
    assert space_key(entry, FeaturesConfig(image_size=64, taps=("stage3", "pooled"), batch_size=2)) == base


def test_unknown_backbone_or_tap_fails_before_work(elpv_small: Dataset, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="efficientnet_b0"):
        run(CFG, ("efficientnet_b0",), elpv_small, tmp_path / "cache", tmp_path / "out")
    with pytest.raises(KeyError, match="features.taps"):
        run(FeaturesConfig(taps=("nope",)), ("efficientnet_lite0",), elpv_small, tmp_path / "cache", tmp_path / "out")
    assert not (tmp_path / "cache").exists()
