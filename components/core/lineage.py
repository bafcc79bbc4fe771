"""The dataset's version: one hash, written the same way into MLflow, checkpoints, ONNX and the registry."""

from __future__ import annotations

import hashlib
from pathlib import Path


def data_version(manifest_csv: Path) -> str:
    """md5 of the validated manifest: the hash DVC records for it in dvc.lock. The manifest lists
    every image's sha256, label and split, so this one hash pins the dataset a model saw, also
    when validation excluded images."""
    return hashlib.md5(Path(manifest_csv).read_bytes()).hexdigest()
