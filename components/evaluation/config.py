"""Params of the evaluate stage (`evaluate:` in params.yaml); no framework imported."""

from __future__ import annotations

from pydantic import Field

from components.core.config import StageConfig


class EvaluateConfig(StageConfig):
    batch_size: int = Field(32, ge=1)
    calibration_bins: int = Field(10, ge=1)


