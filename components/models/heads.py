"""Heads: what turns the trunk's pooled features into logits, rebuilt from a spec stored in the checkpoint.

A checkpoint stores its head's spec (its kind and sizes) beside the weights, so export, compress,
serving and promotion rebuild any head without knowing which strategy trained it. A new kind of head
is a module with a `spec()` method and one entry in `HEADS` (kind -> builder from a spec). The linear
head is torch's own `nn.Linear`; checkpoints written before specs existed hold one, rebuilt from its
weight's shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Spec = dict[str, Any]

HEADS: dict[str, Callable[[Spec], nn.Module]] = {
    "linear": lambda spec: nn.Linear(spec["in_features"], spec["out_features"]),
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
