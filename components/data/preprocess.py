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
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


def preprocess_image(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """A decoded image -> the normalised CHW float32 array the network takes.

    PIL and numpy only, so a server runs it without torch. It is bitwise what torchvision's
    Resize(antialias) -> ToTensor -> Normalize computes on a PIL image: Resize on PIL input is
    PIL's own resize, and both divide by 255 and then normalise in float32 (a test holds them equal).
    """
    rgb = (model_mode(image) or image).convert(preprocessing.color)
    size = preprocessing.input_size
    resized = rgb.resize((size, size), Image.Resampling[preprocessing.interpolation.upper()])
    pixels = np.asarray(resized, dtype=np.uint8).astype(np.float32) / np.float32(255)
    normalised = (pixels - np.asarray(preprocessing.mean, np.float32)) / np.asarray(preprocessing.std, np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def load_batch(paths: Sequence[Path], preprocessing: Preprocessing | Mapping[str, object]) -> np.ndarray:
    """Decode and preprocess images into one float32 NCHW array."""
    preprocessing = Preprocessing.of(preprocessing)
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(preprocess_image(image, preprocessing))
    return np.stack(arrays)
