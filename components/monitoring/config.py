"""Params of `tlops drift` (`drift:` in params.yaml); no framework imported."""

from __future__ import annotations

from pydantic import Field, model_validator

from components.core.config import StageConfig
from components.models.registry import get_entry


class DriftConfig(StageConfig):
    backbone: str = "auto"  # "auto": the caller passes the backbone the select stage chose
    tap: str = "pooled"
    # The share of in-distribution batches flagged (false alarms): each of the two tests flags below half of it.
    p_value_threshold: float = Field(0.01, gt=0.0, lt=1.0)
    permutations: int = Field(1000, ge=99, le=100_000)  # MMD permutation test
    auc_permutations: int = Field(300, ge=99, le=10_000)  # domain classifier refitted on permuted labels
    max_reference: int = Field(1000, ge=10, le=20_000)  # reference rows used (a seeded subsample beyond this)
    max_new_images: int = Field(500, ge=10, le=20_000)  # new images used (a seeded subsample beyond this)
    min_new_images: int = Field(10, ge=5)  # fewer new images give a test with no power
    max_new_texts: int = Field(500, ge=10, le=20_000)  # the same two bounds for a text model's new texts
    min_new_texts: int = Field(10, ge=5)
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

    @model_validator(mode="after")
    def _permutations_can_reach_the_threshold(self) -> DriftConfig:
        # A permutation p-value is at least 1/(permutations + 1): with fewer, no batch could ever be flagged.
        per_test = self.p_value_threshold / 2
        for key in ("permutations", "auc_permutations"):
            count = getattr(self, key)
            if 1 / (count + 1) >= per_test:
                raise ValueError(
                    f"drift.{key}={count}: its smallest p-value, 1/{count + 1}, is not below p_value_threshold/2="
                    f"{per_test:g}, so no batch could be flagged; use at least {int(1 / per_test)}."
                )
        return self

    @model_validator(mode="after")
    def _batch_bounds(self) -> DriftConfig:
        for kind in ("images", "texts"):
            most, least = getattr(self, f"max_new_{kind}"), getattr(self, f"min_new_{kind}")
            if most < least:
                raise ValueError(f"drift.max_new_{kind}={most} is below drift.min_new_{kind}={least}; raise it.")
        return self

    def per_test_threshold(self) -> float:
        """Each test's p-value threshold: two tests at half the rate keep the batch's false alarms within it."""
        return self.p_value_threshold / 2
