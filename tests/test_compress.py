"""Compress: pruning reaches its sparsity, INT8 is smaller, and the budget decides what ships."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from components import export
from components.compress import CompressConfig, choose, prune_model, run
from components.onnx_runtime import read_metadata
from tests.tiny_features import make_features
from tests.tiny_model import make_checkpoint, make_dataset


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("compress")
    dataset = make_dataset(root / "data")
    checkpoint = make_checkpoint(root / "model.pt", dataset)
    export.run(export.ExportConfig(), 0.0, checkpoint, dataset, root / "export",
               features_dir=make_features(dataset, root))
    return root, dataset


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def weight_zeros(model: nn.Module) -> tuple[int, int]:
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_prune_model_reaches_the_requested_sparsity_on_a_copy(sparsity: float) -> None:
    model = small_net()
    before = [p.detach().clone() for p in model.parameters()]
    pruned = prune_model(model, sparsity)
    zeros, total = weight_zeros(pruned)
    assert zeros == round(sparsity * total)
    assert not any(name.endswith("_orig") or name.endswith("_mask") for name, _ in pruned.named_parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the input is untouched
    assert weight_zeros(model)[0] == 0


@pytest.mark.parametrize("sparsity", [1.5, 1.0, -0.1])
def test_prune_model_rejects_sparsity_outside_unit_interval(sparsity: float) -> None:
    with pytest.raises(ValueError, match="compress.sparsity must be in"):
        prune_model(small_net(), sparsity)


def test_choose_ships_the_most_compressed_candidate_within_budget() -> None:
    shipped, reason, within = choose({"fp32": 0.90, "pruned": 0.895, "int8": 0.85}, max_drop=0.01)
    assert shipped == "pruned" and within == {"fp32": True, "pruned": True, "int8": False}
    assert "int8 0.8500" in reason
    assert choose({"fp32": 0.90, "int8": 0.89}, max_drop=0.01)[0] == "int8"  # exactly at the floor
    assert choose({"fp32": 0.90}, max_drop=0.01)[0] == "fp32"


def test_compress_quantizes_to_a_smaller_int8_model_and_ships_it(exported) -> None:
    root, dataset = exported
    # A budget of 1.0 admits any accuracy, so the decision cannot depend on a random head.
    result = run(CompressConfig(max_accuracy_drop=1.0, calibration_images=4), root / "export", dataset,
                 root / "lenient")
    report = json.loads((root / "lenient" / "compress.json").read_text())
    assert set(report["candidates"]) == {"fp32", "int8"}
    assert report["candidates"]["int8"]["size_mb"] < 0.5 * report["candidates"]["fp32"]["size_mb"]
    assert report["shipped"] == result.info["shipped"] == "int8"
    assert result.metrics["size_ratio_int8"] < 0.5
    for name in ("fp32", "int8"):
        assert 0.0 <= result.metrics[f"val_accuracy_{name}"] <= 1.0
    shipped = read_metadata(result.artifacts["model"])
    assert shipped["compression"] == "int8"
    assert shipped["labels"] == json.dumps(list(dataset.labels))
    assert shipped["input_size"] == "64"
    assert float(shipped["val_accuracy"]) == pytest.approx(result.metrics["val_accuracy_int8"], abs=1e-6)


def test_an_impossible_budget_ships_fp32_and_says_why(exported) -> None:
    root, dataset = exported
    result = run(CompressConfig(max_accuracy_drop=-1.0, calibration_images=4), root / "export", dataset,
                 root / "strict")
    report = json.loads((root / "strict" / "compress.json").read_text())
    assert report["shipped"] == "fp32"
    assert not any(c["within_budget"] for c in report["candidates"].values())
    assert report["reason"].startswith("no candidate met val accuracy >=")
    assert "max_accuracy_drop -1" in report["reason"]
    assert read_metadata(result.artifacts["model"])["compression"] == "fp32"
