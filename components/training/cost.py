"""What a fine-tuning strategy will cost before it runs, counted from its arithmetic rather than timed.

`auto` trains a deeper strategy only if its cost fits what is left of `finetune.budget_minutes`. An
estimate from a few timed steps gave another answer on a loaded or a faster machine (a loaded 2-core
box skipped `partial` and shipped the linear probe; timing `full` itself took 8 minutes), so the
cost is counted instead: the FLOPs of the network parts a strategy runs (torch's `FlopCounterMode` on
one image: exact for a given architecture and input size), times the images, views and epochs it runs
them on, plus one decode per image read, at the throughput of a reference machine. The same data and
params therefore give the same choice on every machine, in milliseconds; what a strategy really took
is recorded beside its estimate in `finetune.json`.

The budget is in minutes of a reference machine, the slowest we run on: a 2-core AVX2-only AMD EPYC
training in fp32. A 2-core AVX-512 BF16 EPYC (the CI kind) trains `partial` about 2.5 times as fast,
a GPU far faster; the choice does not move with either, which is the point (the same data and params
ship the same kind of model everywhere). To let a faster machine try deeper strategies, raise
`finetune.budget_minutes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Throughput:
    """The reference machine's rates: FLOPs per second for inference (ONNX Runtime, the frozen part),
    for training (torch, forward and backward: three forwards' FLOPs per image), and seconds to decode
    and preprocess one image."""

    inference_flops_per_s: float
    training_flops_per_s: float
    decode_s: float


# From the default ELPV recipes (FLOPs counted by `forward_flops`; Lite0 at 224 px: frozen part 0.487 GFLOP,
# 5-block tail 0.281, whole network 0.768). Training: partial's epoch of 1,559 cells (forward + backward, plus
# 386 val forwards: 1,423 GFLOP) took 42 s in fp32 on the AVX2-only EPYC, 34 GFLOP/s; the AVX-512 BF16 EPYC
# trained the same epoch in 11-14 s and full fine-tuning at ~60 GFLOP/s. Inference: caching activations (ONNX
# Runtime, one .npy file written per view) ran ~120 views/s on the AVX-512 EPYC, 58 GFLOP/s, and the AVX2 one's
# plain feature extraction 83 GFLOP/s; 50 is taken for the reference. Decoding and preprocessing a cell: ~5 ms.
REFERENCE = Throughput(inference_flops_per_s=50e9, training_flops_per_s=34e9, decode_s=0.005)


def forward_flops(module: nn.Module, example: torch.Tensor) -> float:
    """FLOPs of one forward pass of `module` on `example` (one image, or one activation), counted, not timed."""
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(example)
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class Cost:
    """A strategy's work in reference seconds, by kind; `seconds` is what the budget is charged."""

    inference_s: float = 0.0  # frozen parts run once per image and view (cached activations)
    training_s: float = 0.0  # forward and backward over every epoch, and the val forward passes
    decode_s: float = 0.0  # images decoded and preprocessed

    @property
    def seconds(self) -> float:
        return self.inference_s + self.training_s + self.decode_s

    def describe(self) -> dict[str, float]:
        return {"seconds": self.seconds, "inference_s": self.inference_s, "training_s": self.training_s,
                "decode_s": self.decode_s}


def training_seconds(flops_per_image: float, epochs: int, n_train: int, n_val: int) -> float:
    """Every epoch: forward and backward (three forwards' FLOPs) over the train images, forward over val."""
    return epochs * flops_per_image * (3 * n_train + n_val) / REFERENCE.training_flops_per_s
