"""Image preprocessing as one typed value, the single definition train and serve share.

A `Preprocessing` is derived from a backbone entry, travels as JSON (`model_dump(mode="json")`,
`model_validate`) in `backbone.json` and checkpoints, and as strings in ONNX `metadata_props`
(`to_metadata` / `from_metadata`). Both forms come from the same fields, so what a model was
trained with and what it is served with cannot drift apart through a hand-written inverse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torchvision import transforms

from components.core.errors import UserError


class PreprocessingError(UserError):
    """Preprocessing that cannot be read back (missing or malformed keys); the message names them."""


class Preprocessing(BaseModel):
    """How an image file becomes the network's input tensor.

    `resize="squash"`: images are resized to a square without cropping, because defects at a
    cell's edge must stay in view, so the ImageNet-style centre crop is deliberately not applied.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: int = Field(ge=1)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"]
    color: Literal["RGB"] = "RGB"
    resize: Literal["squash"] = "squash"

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _channels_from_text(cls, value: object) -> object:
        """Accept the metadata form "0.5,0.5,0.5" as well as a list."""
        return value.split(",") if isinstance(value, str) else value

    def to_metadata(self) -> dict[str, str]:
        """ONNX metadata_props form: every field as a string, channels comma-separated."""
        return {
            name: ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            for name, value in self.model_dump().items()
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> Preprocessing:
        """The inverse of `to_metadata`; unrelated keys (labels, backbone, ...) are ignored."""
        missing = [name for name, field in cls.model_fields.items() if field.is_required() and name not in metadata]
        if missing:
            raise PreprocessingError(f"metadata lacks preprocessing key(s) {missing}")
        try:
            return cls.model_validate({name: metadata[name] for name in cls.model_fields if name in metadata})
        except ValidationError as error:
            raise PreprocessingError(f"metadata preprocessing is malformed: {_first_error(error)}") from None

    @classmethod
    def of(cls, value: Preprocessing | Mapping[str, object]) -> Preprocessing:
        """A `Preprocessing` from itself or its JSON form (a checkpoint's or backbone.json's dict)."""
        if isinstance(value, cls):
            return value
        try:
            return cls.model_validate(dict(value))
        except ValidationError as error:
            raise PreprocessingError(f"preprocessing is malformed: {_first_error(error)}") from None

    def differences(self, other: Preprocessing) -> dict[str, tuple[object, object]]:
        """Fields whose values differ: name -> (self's, other's)."""
        mine, theirs = self.model_dump(), other.model_dump()
        return {name: (mine[name], theirs[name]) for name in mine if mine[name] != theirs[name]}


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    return f"{'.'.join(map(str, first['loc'])) or 'value'}: {first['msg']} (got {first.get('input')!r})"


# Modes the model takes as they are, and how every other mode becomes one of them: the one rule
# ingest applies to the dataset copy and preprocessing applies to an image it is served.
MODEL_MODES = ("L", "RGB")
TO_L = ("1", "LA")
TO_RGB = ("P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def model_mode(image: Image.Image) -> Image.Image | None:
    """`image` in `L` or `RGB` by the rule in the module docstring; None when no rule applies."""
    if image.mode in MODEL_MODES:
        return image
    if image.mode in SIXTEEN_BIT:
        pixels = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if image.mode in TO_L or image.mode in TO_RGB:
        return image.convert("L" if image.mode in TO_L else "RGB")
    return None


def build_transform(preprocessing: Preprocessing) -> transforms.Compose:
    """PIL image -> normalised CHW float tensor."""
    size = preprocessing.input_size
    return transforms.Compose(
        [
            transforms.Lambda(lambda image: (model_mode(image) or image).convert(preprocessing.color)),
            transforms.Resize(
                (size, size), interpolation=transforms.InterpolationMode[preprocessing.interpolation.upper()],
                antialias=True,
            ),
            transforms.ToTensor(),
            transforms.Normalize(preprocessing.mean, preprocessing.std),
        ]
    )


def load_batch(paths: Sequence[Path], preprocessing: Preprocessing | Mapping[str, object]) -> np.ndarray:
    """Decode and preprocess images into one float32 NCHW array."""
    transform = build_transform(Preprocessing.of(preprocessing))
    tensors = []
    for path in paths:
        with Image.open(path) as image:
            tensors.append(transform(image))
    return torch.stack(tensors).numpy()
