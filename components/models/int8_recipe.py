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

    def describe(self, n_images: int) -> str:
        return (f"static QDQ, {self.activation_type} activations, int8 weights"
                f"{' (7-bit range)' if self.reduce_range else ''}, {'per-channel' if self.per_channel else 'per-tensor'}, "
                f"{self.calibration_method} calibration on {n_images} images")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


