"""Preprocessing: one typed value, one serialisation each for JSON and ONNX metadata_props."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from components.data.preprocess import Preprocessing, PreprocessingError, load_batch
from components.models.onnx_io import model_preprocessing
from components.models.registry import get_entry

IMAGENET = Preprocessing(input_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear")


def test_metadata_and_json_forms_read_back_to_the_same_value() -> None:
    metadata = IMAGENET.to_metadata()
    assert metadata == {"input_size": "64", "mean": "0.485,0.456,0.406", "std": "0.229,0.224,0.225",
                        "interpolation": "bilinear", "color": "RGB", "resize": "squash"}
    assert Preprocessing.from_metadata(metadata | {"labels": '["a", "b"]'}) == IMAGENET
    assert Preprocessing.model_validate_json(IMAGENET.model_dump_json()) == IMAGENET
    assert Preprocessing.of(json.loads(json.dumps(IMAGENET.model_dump(mode="json")))) == IMAGENET
    assert Preprocessing.from_metadata(metadata | {"input_size": "96"}) != IMAGENET


def test_an_older_backbone_json_still_reads() -> None:
    """What features wrote before `resize` was a field (finetune copies it into checkpoints)."""
    older = {"input_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
             "color": "RGB"}
    assert Preprocessing.of(older) == get_entry("efficientnet_lite0").preprocessing(64)


def test_missing_or_malformed_metadata_is_named(tmp_path: Path) -> None:
    with pytest.raises(PreprocessingError, match=r"model\.onnx: metadata lacks preprocessing key\(s\) \['mean', 'std'\]"):
        model_preprocessing(tmp_path / "model.onnx", {"input_size": "64", "interpolation": "bicubic"})
    with pytest.raises(PreprocessingError, match="interpolation"):
        Preprocessing.from_metadata(IMAGENET.to_metadata() | {"interpolation": "sinc"})
    with pytest.raises(PreprocessingError, match="mean"):
        Preprocessing.from_metadata(IMAGENET.to_metadata() | {"mean": "0.5,0.5"})
    with pytest.raises(PreprocessingError, match="crop: Extra inputs"):
        Preprocessing.of(IMAGENET.model_dump() | {"crop": 0.875})


def test_the_value_is_frozen() -> None:
    with pytest.raises(ValidationError):
        IMAGENET.input_size = 32  # type: ignore[misc]


def test_load_batch_squashes_to_the_declared_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "cell.png"
    Image.fromarray((rng.random((40, 70)) * 255).astype(np.uint8), mode="L").save(path)
    batch = load_batch([path, path], IMAGENET)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch, load_batch([path, path], IMAGENET.model_dump(mode="json")))
    bicubic = load_batch([path], IMAGENET.model_copy(update={"interpolation": "bicubic"}))
    assert np.abs(bicubic[0] - batch[0]).max() > 1e-3  # the interpolation is applied, not ignored


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest", "lanczos"])
def test_numpy_preprocessing_is_bitwise_torchvisions(elpv_small, interpolation: str) -> None:
    # The server preprocesses without torch; training used torchvision's Resize -> ToTensor -> Normalize.
    # Both must give the very same floats, or a served model would see other inputs than it was trained on.
    from torchvision import transforms

    from components.data.preprocess import model_mode, preprocess_image

    preprocessing = IMAGENET.model_copy(update={"interpolation": interpolation})
    reference = transforms.Compose([
        transforms.Lambda(lambda image: (model_mode(image) or image).convert("RGB")),
        transforms.Resize((64, 64), interpolation=transforms.InterpolationMode[interpolation.upper()], antialias=True),
        transforms.ToTensor(), transforms.Normalize(preprocessing.mean, preprocessing.std)])
    rng = np.random.default_rng(0)
    images = [Image.open(elpv_small.image_path(p)) for p in elpv_small.manifest["path"][:6]]  # grayscale cells
    images.append(Image.fromarray(rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)))  # RGB, not square
    images.append(Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)).convert("P"))  # palette, upsampled
    for image in images:
        ours, theirs = preprocess_image(image, preprocessing), reference(image).numpy()
        assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape == (3, 64, 64)
        assert np.array_equal(ours, theirs)
