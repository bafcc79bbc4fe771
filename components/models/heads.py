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
    if spec["kind"] not in HEADS:
        raise ValueError(f"head kind {spec['kind']!r} is unknown to this tlops; it knows {sorted(HEADS)}")
    head = HEADS[spec["kind"]](spec)
    head.load_state_dict(state)
    return head.eval()
