"""Params of the features and select stages (`features:` and `select:` in params.yaml).

Configs import no framework (only pydantic and the backbone registry), so a typo in params fails
in well under a second, before torch, ONNX Runtime or MLflow are loaded.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from components.core.config import StageConfig
from components.models.registry import get_entry, known_taps

# Opset 13 is the first with per-channel QuantizeLinear (compress's INT8); 20 is the newest the
# TorchScript exporter (the one usable without onnxscript) writes.
MIN_OPSET, MAX_OPSET = 13, 20


class FeaturesConfig(StageConfig):
    image_size: int | None = Field(None, ge=32)  # None = each backbone's native size; the trunks stride 32
    max_length: int | None = Field(None, ge=8, le=512)  # text: tokens kept per text; None = each encoder's native
    taps: tuple[str, ...] = Field(("pooled",), min_length=1)
    batch_size: int = Field(32, ge=1)
    num_threads: int = Field(0, ge=0)  # ONNX Runtime intra-op threads; 0 = its default (all cores)
    opset: int = Field(17, ge=MIN_OPSET, le=MAX_OPSET)
    parity_images: int = Field(4, ge=1)  # real images the exported trunk is checked on against torch
    parity_atol: float = Field(1e-4, ge=0)  # max |feature difference| ONNX Runtime vs torch

    @field_validator("taps")
    @classmethod
    def _taps_are_known(cls, taps: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [t for t in taps if t not in known_taps()]
        if unknown:
            raise ValueError(f"unknown tap(s) {unknown}; the registered backbones offer {known_taps()}")
        if len(set(taps)) != len(taps):
            raise ValueError(f"taps {list(taps)} name a tap twice")
        return taps


class SelectConfig(StageConfig):
    candidates: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    backbone: str = "auto"  # "auto": the top LogME; a registry name: use it, still rank all
    tap: str = "pooled"

    @model_validator(mode="after")
    def _known_backbones(self) -> SelectConfig:
        if not self.candidates:
            raise ValueError("select.candidates is empty; list at least one registered backbone.")
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"select.candidates lists a backbone twice: {list(self.candidates)}.")
        for name in self.scored():
            try:
                entry = get_entry(name)
            except KeyError as error:  # names the unknown backbone and the closest registered one
                raise ValueError(error.args[0]) from None
            if self.tap not in entry.taps:
                raise ValueError(f"select.tap={self.tap!r}: backbone {name!r} has taps {sorted(entry.taps)}.")
        return self

    def scored(self) -> tuple[str, ...]:
        """Every backbone to score: the candidates, plus a pinned backbone outside them."""
        extra = () if self.backbone == "auto" or self.backbone in self.candidates else (self.backbone,)
        return tuple(self.candidates) + extra


