"""Heads: what turns the trunk's pooled features into logits, rebuilt from a spec stored in the checkpoint.

A checkpoint stores its head's spec (its kind and sizes) beside the weights, so export, compress,
serving and promotion rebuild any head without knowing which strategy trained it. A new kind of head
is a module with a `spec()` method and one entry in `HEADS` (kind -> builder from a spec). The linear
head is torch's own `nn.Linear`; checkpoints written before specs existed hold one, rebuilt from its
weight's shape.

- `bottleneck`: standardise, a bottleneck layer, then the classifier: the trainable head of `linear`
  with domain adaptation (the alignment acts on the bottleneck's output, `features`).
- `prototypes`: nearest class centroid as SimpleShot does it: subtract the train features' mean,
  L2-normalise, one matrix product with the L2-normalised class prototypes, times a temperature.
  Its `embedding` (the centred, normalised features) is a second output of the exported graph, so
  `tlops add-class` computes a new prototype with the model's own trunk and preprocessing.

Several tasks from one trunk: `TaskHeads` holds one head per task and returns their outputs as a
tuple (the primary task first), which export writes as one named ONNX output per task. Whatever the
kind, a head's output (in eval mode) is one score per class, in the task's label order, whose argmax
is its decision and whose softmax its probabilities, so every consumer decides alike: `CornHead`
(ordered classes) returns log class probabilities, `RegressHead` (a value with class thresholds)
returns each class's signed distance into its interval of the value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Spec = dict[str, Any]



class BottleneckHead(nn.Module):
    """features -> standardised -> Linear -> BatchNorm -> ReLU -> Dropout -> Linear -> logits."""

    def __init__(self, in_features: int, bottleneck: int, out_features: int, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))
        self.bottleneck = nn.Sequential(nn.Linear(in_features, bottleneck), nn.BatchNorm1d(bottleneck), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(bottleneck, out_features)
        self.dims = (in_features, bottleneck, out_features, dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the classifier reads (and domain adaptation aligns)."""
        return self.bottleneck((x - self.mean) / self.scale)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def spec(self) -> Spec:
        in_features, bottleneck, out_features, dropout = self.dims
        return {"kind": "bottleneck", "in_features": in_features, "bottleneck": bottleneck,
                "out_features": out_features, "dropout": dropout}


class PrototypeHead(nn.Module):
    """features -> scale x cosine(features - mean, prototypes): SimpleShot's nearest centroid as one matrix product."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        # Stored transposed (features x classes), the MatMul's own layout: `add-class` appends a column in the graph.
        self.register_buffer("prototypes", torch.zeros(in_features, out_features))
        self.register_buffer("scale", torch.ones(()))

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self.mean
        return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x) @ self.prototypes * self.scale

    def spec(self) -> Spec:
        in_features, out_features = self.prototypes.shape
        return {"kind": "prototypes", "in_features": int(in_features), "out_features": int(out_features)}


HEADS: dict[str, Callable[[Spec], nn.Module]] = {
    "linear": lambda spec: nn.Linear(spec["in_features"], spec["out_features"]),
    "bottleneck": lambda spec: BottleneckHead(spec["in_features"], spec["bottleneck"], spec["out_features"],
                                              spec["dropout"]),
    "prototypes": lambda spec: PrototypeHead(spec["in_features"], spec["out_features"]),
    "corn": lambda spec: CornHead(spec["in_features"], spec["ranks"]),
    "regress": lambda spec: RegressHead(spec["in_features"], spec["targets"], spec["lower"], spec["upper"], spec["scale"]),
    "tasks": lambda spec: _task_heads(spec),
}


def head_spec(head: nn.Module) -> Spec:
    """The spec a checkpoint stores for `head`."""
    if isinstance(head, nn.Linear):
        return {"kind": "linear", "in_features": head.in_features, "out_features": head.out_features}
    if hasattr(head, "spec"):
        return head.spec()
    raise TypeError(f"{type(head).__name__} is not a head tlops can store: give it spec() and an entry in HEADS")


def build_head(spec: Spec | None, state: dict[str, torch.Tensor]) -> nn.Module:
    """The head `spec` describes, with `state` loaded, in eval mode; no spec: a linear head sized by its weight."""
    if spec is None:
        weight = state["weight"]
        spec = {"kind": "linear", "in_features": weight.shape[1], "out_features": weight.shape[0]}
    head = _build(spec)
    head.load_state_dict(state)
    return head.eval()


def _build(spec: Spec) -> nn.Module:
    if spec["kind"] not in HEADS:
        raise ValueError(f"head kind {spec['kind']!r} is unknown to this tlops; it knows {sorted(HEADS)}")
    return HEADS[spec["kind"]](spec)


class CornHead(nn.Module):
    """Ordered classes (CORN: Shi, Cao & Raschka, "Deep neural networks for rank-consistent ordinal regression
    based on conditional probabilities", 2023): logit k is P(y > k | y > k-1) in the declared order, so the
    exceedance probabilities P(y > k) = prod_{j<=k} sigmoid(logit j) can only fall as k rises (rank consistency).

    The output is the log probability of each class by the chain rule, in label order (`ranks[i]`: where
    label i stands in the declared order). CORN's loss, the sum of the binary cross-entropies on its
    conditional subsets, telescopes to -log P(y): plain cross-entropy on this output trains it exactly.
    """

    def __init__(self, in_features: int, ranks: list[int]):
        super().__init__()
        if sorted(ranks) != list(range(len(ranks))) or len(ranks) < 2:
            raise ValueError(f"ranks {ranks} must order 2 or more classes: a permutation of 0..{len(ranks) - 1}")
        self.ranks = list(ranks)
        self.linear = nn.Linear(in_features, len(ranks) - 1)

    def exceedance(self, features: torch.Tensor) -> torch.Tensor:
        """P(y > k) for k = 0..K-2 in the declared order, non-increasing in k."""
        return torch.cumprod(torch.sigmoid(self.linear(features)), dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.linear(features)
        log_above = -nn.functional.softplus(-logits)  # log sigmoid, as ONNX Softplus: stable at any logit
        log_below = -nn.functional.softplus(logits)  # log (1 - sigmoid)
        log_exceed = torch.cumsum(log_above, dim=1)  # log P(y > k)
        # P(y = 0) = 1 - s0; P(y = k) = P(y > k-1) (1 - s_k); P(y = K-1) = P(y > K-2)
        ordered = torch.cat([log_below[:, :1], log_exceed[:, :-1] + log_below[:, 1:], log_exceed[:, -1:]], dim=1)
        return ordered[:, self.ranks]

    def spec(self) -> Spec:
        return {"kind": "corn", "in_features": self.linear.in_features, "ranks": self.ranks}


class RegressHead(nn.Module):
    """A value per image (ELPV's defect probability), and classes by thresholds on it, chosen on val.

    In training mode it returns the value (N, 1), which the regression loss reads. In eval mode (what
    is evaluated and exported) it returns, per class i, `scale * min(v - lower[i], upper[i] - v)`: positive
    only inside class i's interval of the value, so the argmax is the class the thresholds give, and
    `scale` (fitted on val) makes their softmax a probability. Bounds and targets are in label order.
    """

    def __init__(self, in_features: int, targets: list[float], lower: list[float], upper: list[float],
                 scale: float = 10.0):
        super().__init__()
        self.linear = nn.Linear(in_features, 1)
        self.targets = list(targets)  # the value each class stands for (what the loss regresses to)
        self.register_buffer("lower", torch.tensor(lower, dtype=torch.float32))
        self.register_buffer("upper", torch.tensor(upper, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def value(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        value = self.linear(features)
        return value if self.training else self.classes(value)

    def classes(self, value: torch.Tensor) -> torch.Tensor:
        """The class scores of values (N, 1) this head returned in training mode, with its current bounds."""
        lower, upper, scale = (buffer.to(value.device) for buffer in (self.lower, self.upper, self.scale))
        return scale * torch.minimum(value - lower, upper - value)

    def spec(self) -> Spec:
        return {"kind": "regress", "in_features": self.linear.in_features, "targets": self.targets,
                "lower": self.lower.tolist(), "upper": self.upper.tolist(), "scale": float(self.scale)}


class TaskHeads(nn.Module):
    """One head per task on the same features; the outputs, a tuple in task order (the primary first).

    With `uncertainty`, it also holds each task's learned log variance, which weighs the tasks' losses
    (Kendall, Gal & Cipolla 2018); the forward pass does not read it.
    """

    def __init__(self, heads: dict[str, nn.Module], uncertainty: bool = False):
        super().__init__()
        self.names = list(heads)
        self.heads = nn.ModuleList(heads.values())
        self.log_variance = nn.Parameter(torch.zeros(len(heads))) if uncertainty else None

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(head(features) for head in self.heads)

    def head(self, name: str) -> nn.Module:
        return self.heads[self.names.index(name)]

    def spec(self) -> Spec:
        return {"kind": "tasks", "tasks": [{"name": name, "head": head_spec(head)} for name, head in zip(self.names, self.heads)],
                "uncertainty": self.log_variance is not None}


def _task_heads(spec: Spec) -> TaskHeads:
    return TaskHeads({task["name"]: _build(task["head"]) for task in spec["tasks"]}, spec.get("uncertainty", False))
