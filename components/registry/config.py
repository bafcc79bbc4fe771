"""Params of the register and promote stages (`register:` and `promote:` in params.yaml); no framework imported."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from components.core.config import StageConfig


class RegisterConfig(StageConfig):
    experiment: str = Field("tlops", min_length=1)
    model_name: str = Field("tlops-elpv", min_length=1)
    alias: str = Field("challenger", pattern=r"^[\w\-]+$")  # MLflow's alias characters

    @field_validator("alias")
    @classmethod
    def _not_a_version(cls, alias: str) -> str:
        if re.fullmatch(r"[vV]\d+", alias):
            raise ValueError(f"{alias!r} reads as a version number to MLflow; choose an alias like 'challenger'")
        return alias


class PromoteConfig(StageConfig):
    alias: str = Field("champion", min_length=1)
    # Accuracy difference as a fraction of the test split (0.01 = one percentage point).
    min_improvement: float = Field(0.0, ge=0.0, le=1.0)
    significance: float = Field(0.05, gt=0.0, lt=1.0)
    # How far the challenger's recall on any one class may fall below the champion's (0.05 = five points):
    # a better accuracy must not be bought with missed defects. 1 turns the guard off.
    max_recall_drop: float = Field(0.05, ge=0.0, le=1.0)
    # bootstrap is used only from significance.MIN_DISCORDANT_FOR_BOOTSTRAP (25) discordant pairs; below, the exact test.
    test: Literal["mcnemar", "bootstrap"] = "mcnemar"
    bootstrap_samples: int = Field(10_000, ge=100)
    seed: int = 0
    # A bound for one request on one CPU core: Lite0 at 224 px measured 52-72 ms median, 74-89 ms p95 on
    # one core of a 2-core AVX2 machine at load average 12, so 250 leaves room for a busy box.
    max_p95_latency_ms: float = Field(250.0, gt=0.0)
    latency_images: int = Field(50, ge=5)
    # One thread: the latency of a single request on one core, steady on a shared machine.
    latency_threads: int = Field(1, ge=0)
    parity_atol: float = Field(1e-3, ge=0.0)
    batch_size: int = Field(32, ge=1)
    # A candidate that adds classes the test split has no images of (`tlops add-class`) cannot be shown better on
    # it; it is promoted if it loses at most this much accuracy on the test split's classes (non-inferiority).
    max_drop_new_classes: float = Field(0.01, ge=0.0, le=1.0)


