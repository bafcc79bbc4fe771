"""Image preprocessing derived from a backbone entry: the one definition train and serve share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms


def build_transform(preprocessing: dict) -> transforms.Compose:
    """PIL image -> normalised CHW float tensor.

    Images are resized to a square without cropping: defects at a cell's edge must stay in
    view, so the ImageNet-style centre crop is deliberately not applied.
    """
    size = int(preprocessing["input_size"])
    interpolation = transforms.InterpolationMode[str(preprocessing["interpolation"]).upper()]
    return transforms.Compose(
        [
            transforms.Lambda(lambda image: image.convert("RGB")),
            transforms.Resize((size, size), interpolation=interpolation, antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(preprocessing["mean"], preprocessing["std"]),
        ]
    )


def load_batch(paths: Sequence[Path], preprocessing: dict) -> np.ndarray:
    """Decode and preprocess images into one float32 NCHW array."""
    transform = build_transform(preprocessing)
    tensors = []
    for path in paths:
        with Image.open(path) as image:
            tensors.append(transform(image))
    return torch.stack(tensors).numpy()


def onnx_metadata(preprocessing: dict) -> dict[str, str]:
    """Preprocessing as ONNX metadata_props, so a served model explains its own input."""
    return {
        "input_size": str(preprocessing["input_size"]),
        "mean": ",".join(map(str, preprocessing["mean"])),
        "std": ",".join(map(str, preprocessing["std"])),
        "interpolation": str(preprocessing["interpolation"]),
        "color": str(preprocessing.get("color", "RGB")),
        "resize": "squash",
    }
