"""Params of the evaluate stage (`evaluate:` in params.yaml); no framework imported."""

from __future__ import annotations

from pydantic import Field, field_validator

from components.core.config import StageConfig

TASKS_FOLDER = "tasks"  # evaluate's <task>.predictions.csv, <task>.confusion_matrix.png, ... per task (a DVC output)


class EvaluateConfig(StageConfig):
    batch_size: int = Field(32, ge=1)
    calibration_bins: int = Field(10, ge=1)




class FewshotConfig(StageConfig):
    """`tlops fewshot`: episodic evaluation on cached features, prototypes vs a linear probe on the same shots."""

    shots: tuple[int, ...] = Field((1, 5, 10, 20), min_length=1)  # support images per class (K), drawn from train
    episodes: int = Field(100, ge=2)  # episodes per K; the 95% interval is 1.96 sd / sqrt(episodes)
    seed: int = 0  # the same seed, data and features give the same episodes and numbers
    tap: str = "pooled"  # cached features both classifiers read
    backbone: str = "auto"  # auto = the backbone the select stage chose
    linear_c: float = Field(1.0, gt=0)  # the probe's inverse L2 strength (no val set in an episode to choose it)

    @field_validator("shots")
    @classmethod
    def _distinct_positive(cls, shots: tuple[int, ...]) -> tuple[int, ...]:
        if any(k < 1 for k in shots) or len(set(shots)) != len(shots):
            raise ValueError(f"shots must be distinct positive integers (got {list(shots)})")
        return tuple(sorted(shots))
