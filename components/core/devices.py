"""Where and in which precision training runs: `finetune.device` and `finetune.precision` resolved.

bf16 autocast is used where the hardware has native bf16 arithmetic (CUDA GPUs that support it,
CPUs with AMX or AVX512-BF16); elsewhere bf16 is emulated and slower than fp32, so `auto` keeps fp32.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from components.core.cpu import cpu_flags, cpu_model
from components.core.errors import UserError

log = logging.getLogger(__name__)

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype | None  # the autocast dtype, None = plain fp32
    reason: str

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def describe(self) -> dict[str, str]:
        described = {"device": str(self.device), "precision": self.precision, "reason": self.reason}
        if self.device.type == "cuda":
            described["gpu"] = torch.cuda.get_device_name(self.device)
        else:
            described["cpu"] = cpu_model()
        return described


def resolve(device: Literal["auto", "cpu", "cuda"], precision: Literal["auto", "fp32", "bf16"],
            flags: frozenset[str] | None = None) -> Placement:
    """The device and autocast dtype for `finetune.device` / `finetune.precision`."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("finetune.device=cuda, but torch sees no CUDA device; use finetune.device=auto or cpu.")
    target = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    if target.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        where = f"CUDA ({torch.cuda.get_device_name(target)})"
    else:
        present = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
        native = bool(present)
        where = f"CPU with {', '.join(present)}" if present else "CPU without AMX/AVX512-BF16"
    if precision == "bf16" and not native:
        raise UserError(f"finetune.precision=bf16, but the {where} has no native bf16; use precision=auto or fp32.")
    use_bf16 = precision == "bf16" or (precision == "auto" and native)
    reason = f"{where}: {'bf16 autocast' if use_bf16 else 'fp32'}" + (" (auto)" if precision == "auto" else "")
    return Placement(target, torch.bfloat16 if use_bf16 else None, reason)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with `count` intra-op threads (0 = leave torch's default), restored afterwards."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
