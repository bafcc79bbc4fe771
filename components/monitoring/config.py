"""Params of `tlops drift` (`drift:` in params.yaml); no framework imported."""

from __future__ import annotations

from pydantic import Field, model_validator

from components.core.config import StageConfig
from components.models.registry import get_entry


class DriftConfig(StageConfig):
    backbone: str = "auto"  # "auto": the caller passes the backbone the select stage chose
    tap: str = "pooled"
    p_value_threshold: float = Field(0.01, gt=0.0, lt=1.0)  # MMD permutation p-value below this flags
    auc_threshold: float | None = Field(0.8, gt=0.5, le=1.0)  # domain-classifier AUC above this flags; null = off
    permutations: int = Field(1000, ge=99, le=100_000)
    max_reference: int = Field(1000, ge=10)  # reference rows used (a seeded subsample beyond this)
    min_new_images: int = Field(10, ge=5)  # fewer new images give a test with no power
    seed: int = 0

    @model_validator(mode="after")
    def _known_backbone(self) -> DriftConfig:
        if self.backbone != "auto":
            try:
                entry = get_entry(self.backbone)
            except KeyError as error:  # names the unknown backbone and the closest registered one
                raise ValueError(f"drift.backbone: {error.args[0]}") from None
            if self.tap not in entry.taps:
                raise ValueError(f"drift.tap={self.tap!r}: backbone {self.backbone!r} has taps {sorted(entry.taps)}.")
        return self


