"""Export: checked, self-describing ONNX files that compute what the PyTorch model computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from components.classifier import build_model, load_checkpoint
from components.export import ExportConfig, ExportParityError, check_parity, parity_images, run
from components.onnx_runtime import open_session, read_metadata
from components.result import StageResult
from tests.tiny_model import IMAGE_SIZE, make_checkpoint, make_dataset

SPARSITY = 0.3


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("export")
    dataset = make_dataset(root / "data")
    checkpoint = make_checkpoint(root / "model.pt", dataset)
    result = run(ExportConfig(), SPARSITY, checkpoint, dataset, root / "export")
    return result, dataset, checkpoint


def test_export_writes_checked_models_that_describe_themselves(exported) -> None:
    result, dataset, _ = exported
    assert set(result.artifacts) == {"fp32", "pruned"}
    for name, path in result.artifacts.items():
        onnx.checker.check_model(str(path), full_check=True)
        session = open_session(path)
        batch = np.zeros((3, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
        assert session.run(None, {"image": batch})[0].shape == (3, len(dataset.labels))  # dynamic batch
        metadata = read_metadata(path)
        assert json.loads(metadata["labels"]) == list(dataset.labels)
        assert metadata["input_size"] == str(IMAGE_SIZE)
        assert metadata["mean"] == metadata["std"] == "0.5,0.5,0.5"
        assert metadata["backbone"] == "efficientnet_lite0"
        assert len(metadata["backbone_weights_sha256"]) == 64
        assert "manifest_sha256" in json.loads(metadata["data"])
        assert metadata["strategy"] == "linear" and metadata["tap"] == "pooled"
        assert metadata["tlops_version"] not in ("", "unknown")
        assert result.metrics[f"parity_max_diff_{name}"] <= ExportConfig().parity_atol
    assert read_metadata(result.artifacts["fp32"])["sparsity"] == "0"
    assert read_metadata(result.artifacts["pruned"])["sparsity"] == f"{SPARSITY:g}"
    assert result.metrics["zero_weight_fraction_pruned"] >= SPARSITY
    assert result.metrics["zero_weight_fraction_fp32"] < 0.01
    assert StageResult.load(result.out_dir).is_intact()


def test_pruned_onnx_weights_are_actually_sparse(exported) -> None:
    result, _, _ = exported
    def zero_share(path: Path) -> float:
        weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.data_type == 1]
        weights = [w for w in weights if w.ndim >= 2]  # conv and linear kernels, not biases
        return sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert zero_share(result.artifacts["pruned"]) >= SPARSITY - 0.01
    assert zero_share(result.artifacts["fp32"]) < 0.01


def test_parity_check_rejects_a_tampered_model(exported, tmp_path: Path) -> None:
    result, dataset, checkpoint = exported
    model = build_model(load_checkpoint(checkpoint))
    images = parity_images(dataset, 4, load_checkpoint(checkpoint)["preprocessing"])
    assert check_parity(model, result.artifacts["fp32"], images, atol=1e-4) <= 1e-4

    tampered_path = tmp_path / "tampered.onnx"
    shutil.copyfile(result.artifacts["fp32"], tampered_path)
    tampered = onnx.load(str(tampered_path))
    # The head's bias is the only initializer shaped (n_labels,): shifting it moves every logit.
    bias = next(t for t in tampered.graph.initializer if list(t.dims) == [len(dataset.labels)])
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 0.5, bias.name))
    onnx.save(tampered, str(tampered_path))
    with pytest.raises(ExportParityError, match="tampered.onnx.*above export.parity_atol=0.0001"):
        check_parity(model, tampered_path, images, atol=1e-4)
