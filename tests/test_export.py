"""Export: checked, self-describing ONNX files that compute what the PyTorch model computes,
and what the head was trained on (the cached features)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from pydantic import ValidationError

from components.core.lineage import data_version
from components.core.result import StageResult
from components.data.preprocess import Preprocessing
from components.data.views import dihedral
from components.models.classifier import build_model, dihedral_view, load_checkpoint
from components.models.onnx_io import open_session, read_metadata, stamp_metadata
from components.packaging.config import ExportConfig
from components.packaging.export import (
    ExportParityError,
    TrainServeSkewError,
    check_parity,
    check_train_serve,
    parity_images,
    run,
)
from tests.tiny_features import BACKBONE, make_features
from tests.tiny_model import IMAGE_SIZE, make_checkpoint, make_dataset

SPARSITY = 0.3


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("export")
    dataset = make_dataset(root / "data")
    features_dir = make_features(dataset, root)
    checkpoint = make_checkpoint(root / "model.pt", dataset)
    result = run(ExportConfig(), SPARSITY, checkpoint, dataset, root / "export", features_dir=features_dir)
    return result, dataset, checkpoint, features_dir


def test_export_writes_checked_models_that_describe_themselves(exported) -> None:
    result, dataset, _, features_dir = exported
    assert set(result.artifacts) == {"fp32", "pruned"}
    record = json.loads((features_dir / BACKBONE / "backbone.json").read_text())
    for name, path in result.artifacts.items():
        onnx.checker.check_model(str(path), full_check=True)
        session = open_session(path)
        batch = np.zeros((3, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
        assert session.run(None, {"image": batch})[0].shape == (3, len(dataset.labels))  # dynamic batch
        metadata = read_metadata(path)
        assert json.loads(metadata["labels"]) == list(dataset.labels)
        assert metadata["input_size"] == str(IMAGE_SIZE)
        assert metadata["mean"] == metadata["std"] == "0.5,0.5,0.5"
        assert Preprocessing.from_metadata(metadata) == Preprocessing.of(record["preprocessing"])
        assert metadata["features_cache_key"] == record["cache_key"]
        assert metadata["backbone"] == "efficientnet_lite0"
        assert len(metadata["backbone_weights_sha256"]) == 64
        assert json.loads(metadata["data"])["version"] == data_version(dataset.root / "manifest.csv")
        assert metadata["strategy"] == "linear" and metadata["taps"] == '["pooled"]'
        assert metadata["tlops_version"] not in ("", "unknown")
        assert result.metrics[f"parity_max_diff_{name}"] <= ExportConfig().parity_atol
    assert read_metadata(result.artifacts["fp32"])["sparsity"] == "0"
    assert read_metadata(result.artifacts["pruned"])["sparsity"] == f"{SPARSITY:g}"
    assert result.metrics["zero_weight_fraction_pruned"] >= SPARSITY
    assert result.metrics["zero_weight_fraction_fp32"] < 0.01
    # The served FP32 file, on raw images, gives the trained head's logits on the cached features.
    assert result.metrics["train_serve_max_diff"] <= ExportConfig().train_serve_atol
    assert StageResult.load(result.out_dir).is_intact()


def test_pruned_onnx_weights_are_actually_sparse(exported) -> None:
    result = exported[0]
    def zero_share(path: Path) -> float:
        weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.data_type == 1]
        weights = [w for w in weights if w.ndim >= 2]  # conv and linear kernels, not biases
        return sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert zero_share(result.artifacts["pruned"]) >= SPARSITY - 0.01
    assert zero_share(result.artifacts["fp32"]) < 0.01


def test_parity_check_rejects_a_tampered_model(exported, tmp_path: Path) -> None:
    result, dataset, checkpoint, _ = exported
    model = build_model(load_checkpoint(checkpoint))
    images = parity_images(dataset, 4, Preprocessing.of(load_checkpoint(checkpoint)["preprocessing"]))
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


def test_views_in_torch_are_the_views_partial_trains_on() -> None:
    images = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    for view in range(8):
        assert np.array_equal(dihedral_view(torch.from_numpy(images), view).numpy(), dihedral(images, view)), view
    assert len({dihedral(images, view).tobytes() for view in range(8)}) == 8


def with_train_views(checkpoint: Path, views: int, path: Path) -> Path:
    """The checkpoint as a model trained on `views` dihedral views of each image would record it."""
    torch.save(load_checkpoint(checkpoint) | {"train_views": views}, path)
    return path


def test_tta_export_serves_the_mean_over_views(exported, tmp_path: Path) -> None:
    """`export.tta_views=4`: one ONNX call on an image gives the plain model's mean logits over its 4 rotations."""
    _, dataset, checkpoint, features_dir = exported
    checkpoint = with_train_views(checkpoint, 8, tmp_path / "model.pt")
    result = run(ExportConfig(parity_images=4, tta_views=4), 0.0, checkpoint, dataset, tmp_path / "export",
                 features_dir=features_dir)
    served = result.artifacts["fp32"]
    assert read_metadata(served)["tta_views"] == "4" and result.info["tta_views"] == 4
    assert result.metrics["train_serve_max_diff"] <= ExportConfig().train_serve_atol  # checked on the plain twin
    images = parity_images(dataset, 4, Preprocessing.of(load_checkpoint(checkpoint)["preprocessing"]))
    plain = open_session(exported[0].artifacts["fp32"])
    want = np.mean([plain.run(None, {"image": dihedral(images, view)})[0] for view in range(4)], axis=0)
    got = open_session(served).run(None, {"image": images})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - plain.run(None, {"image": images})[0]).max() > 1e-3  # the views are not all the same


def test_tta_never_averages_over_views_the_model_was_not_trained_on(exported, tmp_path: Path) -> None:
    # The linear probe saw each image as it is (its checkpoint records no views): it is served plain;
    # a model trained on two views (partial.views=2: 0° and 90°) is averaged over those two only.
    _, dataset, checkpoint, features_dir = exported
    plain = run(ExportConfig(parity_images=4, tta_views=4), 0.0, checkpoint, dataset, tmp_path / "linear",
                features_dir=features_dir)
    assert read_metadata(plain.artifacts["fp32"])["tta_views"] == "1"
    assert plain.info["tta_views"] == 1 and plain.info["tta_views_requested"] == 4
    images = parity_images(dataset, 4, Preprocessing.of(load_checkpoint(checkpoint)["preprocessing"]))
    want = open_session(exported[0].artifacts["fp32"]).run(None, {"image": images})[0]
    np.testing.assert_allclose(open_session(plain.artifacts["fp32"]).run(None, {"image": images})[0], want, atol=1e-5)
    two = run(ExportConfig(parity_images=4, tta_views=4), 0.0, with_train_views(checkpoint, 2, tmp_path / "two.pt"),
              dataset, tmp_path / "two", features_dir=features_dir)
    assert read_metadata(two.artifacts["fp32"])["tta_views"] == "2" and two.info["tta_views"] == 2


def train_serve(exported, served: Path | None = None, features_dir: Path | None = None) -> float:
    result, dataset, checkpoint, features = exported
    return check_train_serve(load_checkpoint(checkpoint), checkpoint, served or result.artifacts["fp32"], dataset,
                             features_dir or features, count=4, atol=ExportConfig().train_serve_atol)


def copy_features(exported, tmp_path: Path) -> Path:
    shutil.copytree(exported[3], tmp_path / "features")
    return tmp_path / "features"


def test_served_preprocessing_that_differs_from_training_fails(exported, tmp_path: Path) -> None:
    served = tmp_path / "model_fp32.onnx"
    shutil.copyfile(exported[0].artifacts["fp32"], served)
    assert train_serve(exported, served) <= ExportConfig().train_serve_atol
    stamp_metadata(served, {"interpolation": "bilinear"})
    with pytest.raises(TrainServeSkewError, match=r"model_fp32\.onnx: preprocessing mismatch .*interpolation: metadata 'bilinear', checkpoint 'bicubic'"):
        train_serve(exported, served)


def test_stale_cached_features_fail_the_export(exported, tmp_path: Path) -> None:
    """Features computed at another resolution, left in place of the ones the head was trained on."""
    result, dataset, checkpoint, _ = exported
    features_dir = copy_features(exported, tmp_path)
    other = make_features(dataset, tmp_path / "other", image_size=96)
    shutil.copyfile(other / BACKBONE / "features.npz", features_dir / BACKBONE / "features.npz")
    with pytest.raises(TrainServeSkewError, match=r"train/serve skew: model_fp32\.onnx .* cached features themselves are stale"):
        run(ExportConfig(parity_images=4), 0.0, checkpoint, dataset, tmp_path / "export", features_dir=features_dir)


def test_features_of_other_provenance_fail_naming_it(exported, tmp_path: Path) -> None:
    features_dir = copy_features(exported, tmp_path)
    record_path = features_dir / BACKBONE / "backbone.json"
    record = json.loads(record_path.read_text())

    drifted = json.loads(json.dumps(record))
    drifted["cache_key_inputs"]["versions"]["onnxruntime"] = "1.0.0"
    record_path.write_text(json.dumps(drifted))
    with pytest.raises(TrainServeSkewError, match=r"stale feature cache: .*backbone\.json .*versions\.onnxruntime: 1\.0\.0 ->"):
        train_serve(exported, features_dir=features_dir)

    record_path.write_text(json.dumps(record))
    result, dataset, checkpoint, _ = exported
    # A checkpoint that records the features it was trained on (finetune's `features_cache_key`).
    trained_on_other = load_checkpoint(checkpoint) | {"features_cache_key": "0" * 20}
    with pytest.raises(TrainServeSkewError, match=r"has cache_key \w+, the checkpoint was trained on features with cache_key 0{20}"):
        check_train_serve(trained_on_other, checkpoint, result.artifacts["fp32"], dataset, features_dir, 4, 1e-3)
    same = load_checkpoint(checkpoint) | {"features_cache_key": record["cache_key"]}
    assert check_train_serve(same, checkpoint, result.artifacts["fp32"], dataset, features_dir, 4, 1e-3) <= 1e-3

    resized = json.loads(json.dumps(record))
    resized["preprocessing"]["input_size"] = 96
    record_path.write_text(json.dumps(resized))
    with pytest.raises(TrainServeSkewError, match=r"stale feature cache: .*input_size: features 96, checkpoint 64"):
        train_serve(exported, features_dir=features_dir)


@pytest.mark.parametrize(
    ("field", "value"),
    [("opset", 12), ("opset", 21), ("parity_images", 0), ("parity_atol", -1.0), ("train_serve_atol", -1e-6),
     ("tta_views", 0), ("tta_views", 9)],
)
def test_config_ranges_fail_at_load(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        ExportConfig(**{field: value})
    assert ExportConfig(opset=13, parity_images=1, parity_atol=0.0).opset == 13


def test_a_checkpoint_rebuilds_its_head_from_the_spec_it_stores(exported, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(exported[2])
    assert checkpoint["format"] == "tlops.classifier/3"
    assert checkpoint["head_spec"] == {"kind": "linear", "in_features": checkpoint["head"]["weight"].shape[1],
                                       "out_features": checkpoint["head"]["weight"].shape[0]}
    # A checkpoint written before heads had specs (/2) holds a linear head, rebuilt from its weight's shape.
    older = {key: value for key, value in checkpoint.items() if key != "head_spec"} | {"format": "tlops.classifier/2"}
    torch.save(older, tmp_path / "older.pt")
    image = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(build_model(load_checkpoint(tmp_path / "older.pt"))(image), build_model(checkpoint)(image))
    torch.save(checkpoint | {"head_spec": {"kind": "hypernetwork"}}, tmp_path / "unknown.pt")
    with pytest.raises(ValueError, match="head kind 'hypernetwork' is unknown"):
        build_model(load_checkpoint(tmp_path / "unknown.pt"))
