"""Params of the export and compress stages (`export:` and `compress:` in params.yaml).

Configs import no framework (only pydantic and plain values), so a typo in params fails in well
under a second, before torch or ONNX Runtime are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import Field, model_validator

from components.core.config import StageConfig
from components.data.views import MAX_VIEWS
from components.features.config import MAX_OPSET, MIN_OPSET
from components.models.int8_recipe import Recipe

# The model compress ships (in its output folder). Named here, beside the params, so the stage table can
# point evaluate and register at it without importing ONNX.
SHIPPED_FILE = "model.onnx"


class ExportConfig(StageConfig):
    opset: int = Field(17, ge=MIN_OPSET, le=MAX_OPSET)
    parity_images: int = Field(16, ge=1)  # held-out (val split) images for the parity checks
    parity_atol: float = Field(1e-4, ge=0)  # max |logit_torch - logit_onnx|
    # model_pruned.onnx may also differ by this share of its largest |logit|: a recovery-trained pruned model
    # gives logits of ~40 on ELPV, where float32 rounding alone reaches 1e-4 (np.allclose's atol + rtol).
    pruned_parity_rtol: float = Field(1e-5, ge=0)
    # max |served logit - trained head on cached features|: two ONNX graphs of the same trunk
    train_serve_atol: float = Field(1e-3, ge=0)
    # Test-time augmentation in the graph: the served logits are the mean over this many dihedral views
    # (the rotations, then their mirrors: the views `partial` trains on). 1 = off; n views cost n times the work.
    tta_views: int = Field(1, ge=1, le=MAX_VIEWS)


@dataclass(frozen=True)
class ChannelPruning:
    """What `compress.prune: structured` asks for (built by `CompressConfig.channel_pruning`)."""

    ratio: float  # share of each prunable layer's channels removed
    round_to: int  # channel counts kept at multiples of this
    recovery_epochs: int  # 0: no recovery fine-tuning
    recovery_lr: float
    recovery_batch_size: int
    recovery_patience: int
    seed: int = 0


class CompressConfig(StageConfig):
    # Which pruned candidate export writes as model_pruned.onnx. Unset: "unstructured" when sparsity > 0, else "none".
    prune: Literal["none", "unstructured", "structured"] = "none"
    sparsity: float = Field(0.0, ge=0.0, lt=1.0)  # unstructured: share of conv+linear weights zeroed (smaller zipped only)
    prune_ratio: float = Field(0.3, gt=0.0, lt=1.0)  # structured: share of each layer's channels removed (faster)
    prune_round_to: int = Field(8, ge=1)  # structured: channel counts kept at multiples of this (SIMD widths)
    recovery_epochs: int = Field(3, ge=0)  # structured: fine-tuning epochs after pruning; 0 = none
    recovery_lr: float = Field(1e-4, gt=0)  # structured: peak lr of the recovery fine-tuning (every layer)
    recovery_batch_size: int = Field(32, ge=2)
    recovery_patience: int = Field(2, ge=1)  # structured: epochs without a better val accuracy before stopping
    quantize: bool = True  # post-training static INT8 (onnxruntime.quantization)
    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0)  # absolute val accuracy the shipped model may lose vs FP32
    # Each task's val answers must match FP32's on at least this share: accuracy alone misses flips that cancel out
    # (ELPV four-class INT8 changed 8% of answers, gained on val and lost 2.2 points on test; binary changes 2%).
    min_agreement: float = Field(0.95, ge=0.0, le=1.0)
    calibration_images: int = Field(256, ge=1)  # training images (stratified by label) used to calibrate activations
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    per_channel: bool = True  # per-output-channel weight scales (depthwise convs need them)
    activation_type: Literal["uint8", "int8"] = "uint8"  # asymmetric u8 suits ReLU6 outputs and x86 kernels
    reduce_range: bool = True  # 7-bit weights: no 16-bit saturation on CPUs without VNNI
    max_fp32_nodes: int = Field(16, ge=0)  # mixed precision: most nodes kept in FP32; 0 = full INT8 only
    # Mixed precision is searched only when full INT8 loses at most this much val accuracy: beyond it, keeping up
    # to 32 nodes in FP32 never came within the budget on ELPV (full INT8 -10.6 points: the best was -1.04).
    max_search_drop: float = Field(0.05, ge=0.0, le=1.0)
    sensitivity_images: int = Field(8, ge=1)  # calibration images compared float vs INT8 to rank nodes
    # What "most compressed" serves. `size`: the smallest candidate within the accuracy budget ships, decided by
    # val accuracy alone, so the same inputs ship the same model on any machine; latencies are still measured and
    # recorded. `latency`: a candidate must also be no slower than FP32 (max_latency_ratio) on THIS machine, timed,
    # which is only meaningful when this CPU is the one that will serve (serving_cpu).
    objective: Literal["size", "latency"] = "size"
    # objective=latency: the CPU model the model will be served on (part of /proc/cpuinfo's "model name"); compress
    # refuses to decide on latency measured on another CPU. null: this machine is taken as the serving CPU.
    serving_cpu: str | None = None
    latency_threads: int = Field(0, ge=0)  # ONNX Runtime threads when timing candidates; 0 = all cores
    latency_runs: int = Field(5, ge=1)  # timed rounds per batch size, candidates alternating (median reported)
    # objective=latency: a candidate ships only if its latency at every timed batch size is at most this times FP32's.
    # Above 1.0 so that a candidate as fast as FP32 (unstructured pruning) is not refused on timing noise.
    max_latency_ratio: float = Field(1.05, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _legacy_sparsity(cls, data: Any) -> Any:
        """params written before `prune` existed turned unstructured pruning on with sparsity alone; params
        written before `objective` existed said "size alone" with `max_latency_ratio: null`."""
        if isinstance(data, dict) and "prune" not in data and float(data.get("sparsity", 0) or 0) > 0:
            data = {**data, "prune": "unstructured"}
        if isinstance(data, dict) and "max_latency_ratio" in data and data["max_latency_ratio"] is None:
            data = {key: value for key, value in data.items() if key != "max_latency_ratio"}
            data.setdefault("objective", "size")
        return data

    @model_validator(mode="after")
    def _one_pruning(self) -> CompressConfig:
        if self.prune == "unstructured" and self.sparsity == 0:
            raise ValueError("sparsity: compress.prune=unstructured needs compress.sparsity > 0")
        if self.prune != "unstructured" and self.sparsity > 0:
            raise ValueError(f"sparsity: compress.sparsity > 0 applies to compress.prune=unstructured only, "
                             f"not {self.prune}; set it to 0")
        return self

    def recipe(self) -> Recipe:
        """The INT8 recipe these keys describe (also what `partial` fine-tuning quantizes its frozen part with)."""
        return Recipe(self.calibration_images, self.calibration_method, self.per_channel, self.activation_type,
                           self.reduce_range)

    def planned_recipe(self, served_views: int = 1) -> Recipe | None:
        """What `partial` fine-tuning prepares its tail for: the recipe, calibrated on the views the exported model
        will average (`served_views`), or None when compress will not quantize."""
        return replace(self.recipe(), calibration_views=served_views) if self.quantize else None

    def unstructured_sparsity(self) -> float:
        """What export's `sparsity` argument gets: 0 unless unstructured pruning is on."""
        return self.sparsity if self.prune == "unstructured" else 0.0

    def channel_pruning(self, seed: int = 0) -> ChannelPruning | None:
        """What export's `channel_pruning` argument gets: None unless structured pruning is on."""
        if self.prune != "structured":
            return None
        return ChannelPruning(self.prune_ratio, self.prune_round_to, self.recovery_epochs, self.recovery_lr,
                              self.recovery_batch_size, self.recovery_patience, seed)


