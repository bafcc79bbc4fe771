"""The INT8 recipe: how a float model becomes static QDQ INT8 (compress's keys of the same names).

A plain value with no framework behind it: the packaging stage builds it from params, and the
`partial` strategy trains its tail on activations quantized with the same recipe
(`components/models/quantization.py` applies it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True)
class Recipe:
    """How a float model becomes static QDQ INT8 (compress's keys of the same names)."""

    calibration_images: int = 256
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    per_channel: bool = True
    activation_type: Literal["uint8", "int8"] = "uint8"
    reduce_range: bool = True
    # Dihedral views of each calibration image the quantized graph sees. Compress calibrates the exported model,
    # whose test-time averaging feeds its trunk `tta_views` views of every image; a part of that trunk quantized
    # on its own (partial's frozen part) must see the same views, or its ranges are not the shipped model's.
    calibration_views: int = 1

    def describe(self, n_images: int) -> str:
        views = f" x {self.calibration_views} views" if self.calibration_views > 1 else ""
        return (f"static QDQ, {self.activation_type} activations, int8 weights"
                f"{' (7-bit range)' if self.reduce_range else ''}, {'per-channel' if self.per_channel else 'per-tensor'}, "
                f"{self.calibration_method} calibration on {n_images} images{views}")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


