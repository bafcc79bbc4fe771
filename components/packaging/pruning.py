"""Structured (channel) pruning with torch-pruning, then recovery fine-tuning: a model that is faster, not only sparser.

Unstructured magnitude pruning (`prune_model`, below) zeroes weights inside dense tensors:
ONNX stores and ONNX Runtime multiplies them all the same, so the file only shrinks once
zipped and latency does not move. Channel pruning removes whole output channels of convs
(with every layer that depends on them, found by torch-pruning's DependencyGraph: the
depthwise conv and BatchNorm after a pointwise conv, both sides of a residual add), so the
tensors, the MACs and the latency shrink. Channel counts are rounded to multiples of 8 so
the kernels keep their SIMD-friendly widths. The head is never pruned on its output side:
it keeps one logit per label.

Pruning costs accuracy; a few epochs at a low learning rate on the train split (the shared
`train_loop.fit`, early stopping on val) win most of it back.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader

from components.core import devices
from components.data.augmentation import ImageSplit, Served, augmentation
from components.data.manifest import Dataset
from components.data.preprocess import Preprocessing
from components.models.classifier import Classifier
from components.packaging.config import ChannelPruning
from components.training.config import LoopConfig
from components.training.loop import class_weight_vector, fit, scores

log = logging.getLogger(__name__)


@dataclass
class PruningReport:
    ratio: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    val_accuracy_before: float | None = None  # the unpruned model
    val_accuracy_pruned: float | None = None  # right after pruning, before recovery
    val_accuracy_recovered: float | None = None  # the best recovery epoch
    recovery_history: list[dict[str, float]] = field(default_factory=list)
    recovery_seconds: float = 0.0
    recovery_kept: bool = True  # False: no recovery epoch beat the pruned model, which ships as pruned

    def metadata(self) -> dict[str, str]:
        """ONNX metadata_props: the file says it is pruned and by how much."""
        return {"pruning": "structured", "prune_ratio": f"{self.ratio:g}",
                "params_before": str(self.params_before), "params_after": str(self.params_after),
                "macs_before": str(self.macs_before), "macs_after": str(self.macs_after),
                "val_accuracy_recovered": "" if self.val_accuracy_recovered is None else f"{self.val_accuracy_recovered:.6f}",
                "recovery_kept": str(self.recovery_kept).lower()}


def macs_and_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return int(macs), int(params)


def prune_channels(model: Classifier, ratio: float, example_input: torch.Tensor, ignored: list[nn.Module],
                   round_to: int = 8) -> Classifier:
    """A copy of `model` with `ratio` of the channels of every prunable layer removed (group L2 magnitude).

    `ignored` are modules of `model` whose output channels stay (the head); their copies are
    looked up by name, since the pruned model is a deep copy.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"compress.prune_ratio must be in (0, 1), got {ratio}.")
    names = {id(module): name for name, module in model.named_modules()}
    missing = [module for module in ignored if id(module) not in names]
    if missing:
        raise ValueError(f"ignored modules {missing} are not part of the model being pruned.")
    pruned = copy.deepcopy(model).eval()
    # torch-pruning traces the autograd graph: frozen (requires_grad=False) weights would be invisible to it.
    for parameter in pruned.parameters():
        parameter.requires_grad_(True)
    copies = dict(pruned.named_modules())
    pruner = tp.pruner.BasePruner(
        pruned, example_input, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=[copies[names[id(module)]] for module in ignored], round_to=round_to,
    )
    pruner.step()
    return pruned.eval()


def recover(model: Classifier, spec: ChannelPruning, dataset: Dataset, preprocessing: Preprocessing) -> tuple[float, list[dict[str, float]], float]:
    """Fine-tune every weight of `model` in place for a few epochs; returns (best val accuracy, history, seconds)."""
    placement = devices.resolve("auto", "fp32")
    train = ImageSplit(dataset, "train", augmentation(preprocessing, scale_min=0.9, jitter=0.1))
    val = ImageSplit(dataset, "val", Served(preprocessing))
    n_classes = len(dataset.labels)

    def batches(epoch: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from DataLoader(train, batch_size=spec.recovery_batch_size, shuffle=True, generator=generator,
                              drop_last=len(train) > spec.recovery_batch_size)

    def evaluate(network: nn.Module) -> dict[str, float]:
        logits, labels = [], []
        for x, y in DataLoader(val, batch_size=64):
            logits.append(network(x.to(placement.device)).float().cpu())
            labels.append(y)
        return scores(torch.cat(logits), torch.cat(labels))

    loss = nn.CrossEntropyLoss(weight=class_weight_vector(train.labels.tolist(), n_classes, "balanced").to(placement.device))
    steps = max(len(train) // spec.recovery_batch_size, 1)
    loop = LoopConfig(spec.recovery_epochs, spec.recovery_lr, 1.0, 0.0, 0, "cosine", spec.recovery_patience, spec.seed)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    result = fit(model, [list(model.parameters())], batches, steps, evaluate, loss, loop, placement,
                 desc="pruning recovery")
    model.load_state_dict(result.state)
    model.cpu().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    return best["val_accuracy"], result.history, result.seconds


def val_accuracy(model: nn.Module, dataset: Dataset, preprocessing: Preprocessing) -> float:
    val = ImageSplit(dataset, "val", Served(preprocessing))
    model.eval()
    with torch.no_grad():
        pairs = [(model(x), y) for x, y in DataLoader(val, batch_size=64)]
    return float(scores(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))["val_accuracy"])


def prune_and_recover(model: Classifier, spec: ChannelPruning, dataset: Dataset,
                      preprocessing: Preprocessing) -> tuple[Classifier, PruningReport]:
    """Channel-prune a copy of `model` (its head keeps n_classes outputs), then recovery fine-tune it."""
    size = preprocessing.input_size
    example = torch.zeros(1, 3, size, size)
    macs_before, params_before = macs_and_params(model, example)
    pruned = prune_channels(model, spec.ratio, example, ignored=[model.head], round_to=spec.round_to)
    macs_after, params_after = macs_and_params(pruned, example)
    report = PruningReport(spec.ratio, params_before, params_after, macs_before, macs_after,
                           val_accuracy_before=val_accuracy(model, dataset, preprocessing),
                           val_accuracy_pruned=val_accuracy(pruned, dataset, preprocessing))
    log.info("channel pruning %.2f: params %d -> %d, MACs %d -> %d, val accuracy %.4f -> %.4f before recovery",
             spec.ratio, params_before, params_after, macs_before, macs_after, report.val_accuracy_before,
             report.val_accuracy_pruned)
    if spec.recovery_epochs > 0:
        unrecovered = copy.deepcopy(pruned.state_dict())
        report.val_accuracy_recovered, report.recovery_history, report.recovery_seconds = recover(
            pruned, spec, dataset, preprocessing)
        log.info("recovery: val accuracy %.4f after %d epochs (%.0f s)", report.val_accuracy_recovered,
                 len(report.recovery_history), report.recovery_seconds)
        if report.val_accuracy_recovered < report.val_accuracy_pruned:  # early stopping's rule, with epoch 0 included
            pruned.load_state_dict(unrecovered)
            report.recovery_kept = False
            log.warning("recovery fine-tuning lowered val accuracy (%.4f < %.4f): the pruned weights are kept as they "
                        "were; try more compress.recovery_epochs or another compress.recovery_lr",
                        report.val_accuracy_recovered, report.val_accuracy_pruned)
    return pruned, report


def describe(report: PruningReport) -> dict[str, Any]:
    """For result.json / compress.json."""
    return {"method": "structured (torch-pruning channel pruning, group L2 magnitude)", **report.__dict__}


def prune_model(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy of `model` with the smallest `sparsity` share of all conv and linear weights set to zero.

    Global (not per-layer) L1 magnitude pruning; the masks are folded into the weights, so the
    copy is a plain module that exports like the original.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"compress.sparsity must be in [0, 1), got {sparsity}; 0 turns pruning off.")
    pruned = copy.deepcopy(model)
    if sparsity == 0:
        return pruned
    targets = [(module, "weight") for module in pruned.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in targets:
        prune.remove(module, name)
    return pruned
