"""Lineage: the dataset's version and the code's commit, written the same way into MLflow, checkpoints, ONNX and the registry."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def data_version(manifest_csv: Path) -> str:
    """md5 of the validated manifest: the hash DVC records for it in dvc.lock. The manifest lists
    every image's sha256, label and split, so this one hash pins the dataset a model saw, also
    when validation excluded images."""
    return hashlib.md5(Path(manifest_csv).read_bytes()).hexdigest()


def git_commit() -> str:
    """HEAD of the working tree's repository, `-dirty` when tracked files differ from it; `unknown` outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
