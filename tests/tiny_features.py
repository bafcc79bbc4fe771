"""Real cached features for the tiny dataset of tests/tiny_model.py, as the features stage writes them.

Export checks the served model against the trained head on these, so every test that exports
needs them: `export.run(..., features_dir=make_features(dataset, root))`.
"""

from __future__ import annotations

from pathlib import Path

from components.data.manifest import Dataset
from components.features import extract as features
from components.features.config import FeaturesConfig
from tests.tiny_model import IMAGE_SIZE

BACKBONE = "efficientnet_lite0"


def make_features(dataset: Dataset, root: Path, image_size: int = IMAGE_SIZE) -> Path:
    """`root/features/<backbone>/{features.npz, backbone.json}` (cache in `root/feature_cache`)."""
    cfg = FeaturesConfig(image_size=image_size, batch_size=16)
    features.run(cfg, (BACKBONE,), dataset, root / "feature_cache", root / "features")
    return root / "features"
