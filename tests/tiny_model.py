"""A 12-image, 2-label dataset and a checkpoint around real pretrained Lite0 at 64 px.

Shared by the export, compress and evaluate tests: small enough that exporting, quantizing
and scoring take seconds on two cores, real enough that every ONNX Runtime path runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from components.core.lineage import data_version
from components.core.result import sha256_file
from components.data.manifest import Dataset, read_manifest, write_manifest
from components.models.backbones import build_trunk
from components.models.classifier import save_checkpoint
from components.models.registry import get_entry

LABELS = ("defective", "functional")
SPLITS = ("train", "train", "val", "val", "test", "test")  # 2 images of each label per split
IMAGE_SIZE = 64


def make_dataset(root: Path) -> Dataset:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        label = LABELS[i % 2]
        # Defective cells are brighter noise: separable, so accuracies are not all zero.
        pixels = (rng.random((40, 40)) * (255 if label == "defective" else 90)).astype(np.uint8)
        relative = f"images/{label}/cell{i:02d}.png"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(root / relative)
        rows.append(
            {
                "path": relative,
                "label": label,
                "split": SPLITS[i // 2],
                "sha256": sha256_file(root / relative),
                "width": 40,
                "height": 40,
                "mode": "L",
                "cell_type": "mono" if i % 4 < 2 else "poly",
                "domain": "mono" if i % 4 < 2 else "poly",
            }
        )
    return read_manifest(write_manifest(pd.DataFrame(rows), root / "manifest.csv"))


def make_checkpoint(path: Path, dataset: Dataset, taps: tuple[str, ...] = ("pooled",)) -> Path:
    """A random linear head on Lite0's `taps` (joined, as `linear` joins them)."""
    entry = get_entry("efficientnet_lite0")
    with torch.no_grad():
        width = sum(t.shape[1] for t in build_trunk(entry, taps)(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)))
    torch.manual_seed(0)
    return save_checkpoint(
        path,
        nn.Linear(width, len(dataset.labels)),
        None,
        backbone=entry.describe(),
        taps=list(taps),
        labels=list(dataset.labels),
        preprocessing=entry.preprocessing(IMAGE_SIZE).model_dump(mode="json"),  # checkpoints hold plain JSON
        config={"strategy": "linear", "epochs": 0},
        data={"version": data_version(dataset.root / "manifest.csv")},
        strategy="linear",
    )
