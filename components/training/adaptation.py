"""Unsupervised domain adaptation: the alignment losses, the gradient-reversal layer, and how they are judged.

A model adapting to a target domain trains on labelled source images and unlabelled target images
together: cross-entropy on the source part of each batch, plus `weight` times an alignment loss on
the features the classifier sees, computed from the source and target parts alike. Two losses:

- **CORAL** (Sun & Saenko, "Deep CORAL", 2016): the squared Frobenius distance between the source
  and target feature covariances, divided by 4 d^2.
- **DANN** (Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016): a domain
  discriminator learns to tell source features from target features behind a gradient-reversal
  layer, so the features learn to make it fail. The reversal's coefficient warms up from 0 to 1 as
  2 / (1 + exp(-alpha * step / warmup_steps)) - 1, the schedule of thuml's Transfer-Learning-Library
  (`WarmStartGradientReverseLayer`): early on, when the discriminator is random, its gradients would
  only add noise to the features.

How well the domains are aligned is measured the way DA papers measure it, on held-out images and
without any label: a fresh logistic regression is trained to tell source from target features and
scored on other images of each (its accuracy, and the proxy A-distance 2 (1 - 2 error)). 0.5 and 0:
the domains are indistinguishable; 1.0 and 2: fully separable.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.autograd import Function

log = logging.getLogger(__name__)

# Features -> (source, target) alignment loss, for a batch whose first `n_source` rows are source images.
AlignmentLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GradientReverse(Function):
    """Identity forward; backward multiplies the gradient by -coeff."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:  # noqa: ANN001 - autograd's context
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return -ctx.coeff * grad, None


def warm_start_coefficient(step: int, warmup_steps: int, alpha: float = 1.0, low: float = 0.0, high: float = 1.0) -> float:
    """The reversal's coefficient after `step` training steps: `low` at step 0, rising smoothly towards `high`."""
    return float(2.0 * (high - low) / (1.0 + math.exp(-alpha * step / warmup_steps)) - (high - low) + low)


class WarmStartGradientReverse(nn.Module):
    """A gradient-reversal layer whose coefficient warms up with the number of training forwards it has seen.

    The step count is a buffer, so it is saved with the weights and a resumed run continues the schedule.
    """

    def __init__(self, warmup_steps: int, alpha: float = 1.0, low: float = 0.0, high: float = 1.0):
        super().__init__()
        self.warmup_steps, self.alpha, self.low, self.high = warmup_steps, alpha, low, high
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def coefficient(self) -> float:
        return warm_start_coefficient(int(self.step), self.warmup_steps, self.alpha, self.low, self.high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coeff = self.coefficient()
        if self.training:
            self.step += 1
        return GradientReverse.apply(x, coeff)


def coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||C_s - C_t||_F^2 / (4 d^2) between the two batches' feature covariances (Deep CORAL)."""
    d = source.shape[1]

    def covariance(x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(0, keepdim=True)
        return centred.T @ centred / max(x.shape[0] - 1, 1)

    return ((covariance(source.float()) - covariance(target.float())) ** 2).sum() / (4 * d * d)


class DomainDiscriminator(nn.Module):
    """Features -> one logit, "this is a source image", through two hidden layers."""

    def __init__(self, in_features: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU(),
                                 nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


class Aligner(nn.Module):
    """The alignment loss of one method, with whatever it trains (DANN: the reversal and the discriminator).

    `forward(source_features, target_features)` returns the loss to add; `last` holds its parts for logging.
    """

    def __init__(self, method: str, in_features: int, width: int = 256, warmup_steps: int = 1000):
        super().__init__()
        if method not in ("none", "coral", "dann"):
            raise ValueError(f"unknown adaptation method {method!r}")
        self.method = method
        self.reverse = WarmStartGradientReverse(warmup_steps) if method == "dann" else None
        self.discriminator = DomainDiscriminator(in_features, width) if method == "dann" else None

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.method == "none":
            return source.new_zeros(())
        if self.method == "coral":
            return coral_loss(source, target)
        assert self.reverse is not None and self.discriminator is not None
        logits = self.discriminator(self.reverse(torch.cat([source, target]).float()))
        is_source = torch.cat([torch.ones(len(source)), torch.zeros(len(target))]).to(logits.device)
        # Each domain weighs half, whatever the batch's mix (tllib averages the two domains' losses too).
        loss = nn.functional.binary_cross_entropy_with_logits
        return 0.5 * (loss(logits[: len(source)], is_source[: len(source)])
                      + loss(logits[len(source):], is_source[len(source):]))


def domain_separability(source_train: np.ndarray, target_train: np.ndarray, source_test: np.ndarray,
                        target_test: np.ndarray, seed: int = 0) -> dict[str, float]:
    """A fresh linear domain classifier fitted on the first two, scored on the last two (no class labels).

    Returns its balanced accuracy on the held-out images and the proxy A-distance 2 (1 - 2 error).
    """
    x = np.concatenate([source_train, target_train])
    y = np.concatenate([np.ones(len(source_train)), np.zeros(len(target_train))])
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced", random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(scaler.transform(x), y)
    hits = [float((model.predict(scaler.transform(part)) == label).mean())
            for part, label in ((source_test, 1.0), (target_test, 0.0))]
    accuracy = float(np.mean(hits))  # balanced: each domain counts half
    return {"domain_accuracy": accuracy, "proxy_a_distance": 2.0 * (1.0 - 2.0 * (1.0 - accuracy))}


def alignment_report(target_domain: str, method: str, before: dict[str, np.ndarray], after: dict[str, np.ndarray],
                     source_val_accuracy: float, seed: int) -> dict[str, object]:
    """What DA users look at, measured without any label: can a fresh domain classifier still tell the domains
    apart on the features the classifier read before and after adaptation (fitted on the train images of each
    domain, scored on their held-out val images). `before`/`after` map train, val, unlabelled, unlabelled_val
    to features."""
    splits = ("train", "unlabelled", "val", "unlabelled_val")
    was = domain_separability(*(before[s] for s in splits), seed=seed)
    now = domain_separability(*(after[s] for s in splits), seed=seed)
    report = {"target_domain": target_domain, "method": method, "n_source_train": int(len(before["train"])),
              "n_target_unlabelled": int(len(before["unlabelled"])),
              "domain_accuracy_before": was["domain_accuracy"], "domain_accuracy_after": now["domain_accuracy"],
              "proxy_a_distance_before": was["proxy_a_distance"], "proxy_a_distance_after": now["proxy_a_distance"],
              "source_val_accuracy": source_val_accuracy}
    log.info("adapt %s to %r: domain classifier accuracy %.3f -> %.3f on held-out images, source val accuracy %.4f",
             method, target_domain, report["domain_accuracy_before"], report["domain_accuracy_after"],
             source_val_accuracy)
    return report


TARGET = -1  # the label a batch carries for its target rows: they have none


class AdaptingModel(nn.Module):
    """`model` (with `features(x)` and `classify(features)`) and an `Aligner`, trained on [source; target] batches.

    `forward` returns (logits, features) of every row; `adaptation_loss` reads the source rows' labels and
    aligns the two parts' features.
    """

    def __init__(self, model: nn.Module, aligner: Aligner):
        super().__init__()
        self.model, self.aligner = model, aligner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(x)
        return self.model.classify(features), features

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The model's groups (earliest first); the aligner trains with the last one, at the head's rate."""
        groups = self.model.layer_groups() if hasattr(self.model, "layer_groups") else [list(self.model.parameters())]
        return groups[:-1] + [groups[-1] + list(self.aligner.parameters())]


def adaptation_loss(model: AdaptingModel, weight: float,
                    class_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Cross-entropy on the source rows plus `weight` x the aligner's loss between source and target features."""

    def loss(output: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        logits, features = output
        source = labels != TARGET
        aligned = model.aligner(features[source], features[~source]) if weight > 0 else logits.new_zeros(())
        return class_loss(logits[source], labels[source]) + weight * aligned

    return loss


def mixed_batches(n_source: int, n_target: int, batch_size: int, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's (source indices, target indices): every source image once, each batch beside as many target
    images drawn at random (the target set is usually smaller or larger than the source)."""
    order = torch.randperm(n_source, generator=generator)
    return [(index, torch.randint(0, n_target, (len(index),), generator=generator)) for index in order.split(batch_size)]


def plot_alignment(before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray],
                   scores: dict[str, float], title: str, path):  # noqa: ANN001, ANN201 - a Path in, the Path out
    """Held-out source and target features in their first two principal components, before and after
    adaptation, and the domain classifier's accuracy beside the source val accuracy."""
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA

    figure = Figure(figsize=(13, 4))
    axes = figure.subplots(1, 3)
    for ax, (name, (source, target)) in zip(axes, (("before (trunk features)", before), ("after (adapted features)", after))):
        joint = np.concatenate([source, target])
        points = PCA(n_components=2, random_state=0).fit_transform((joint - joint.mean(0)) / (joint.std(0) + 1e-6))
        ax.scatter(*points[: len(source)].T, s=6, alpha=0.5, label=f"source ({len(source)})")
        ax.scatter(*points[len(source):].T, s=6, alpha=0.5, label=f"target ({len(target)})")
        ax.set_title(name)
        ax.legend(loc="upper right", fontsize=8)
    names = ["domain acc.\nbefore", "domain acc.\nafter", "source val\naccuracy"]
    values = [scores["domain_accuracy_before"], scores["domain_accuracy_after"], scores["source_val_accuracy"]]
    axes[2].bar(names, values, color=["tab:gray", "tab:blue", "tab:green"])
    for i, value in enumerate(values):
        axes[2].text(i, value + 0.01, f"{value:.3f}", ha="center")
    axes[2].axhline(0.5, color="black", linestyle="--", linewidth=0.8)
    axes[2].set_ylim(0, 1.1)
    axes[2].set_title("held-out images, no labels used")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
