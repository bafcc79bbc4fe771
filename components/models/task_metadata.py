"""What a model's outputs mean, as its `metadata_props` say: one task per output, the primary first; and
whether an input's answer depends on the other inputs of its batch.

Plain Python and JSON (no onnx, no pandas), so the server reads it as cheaply as the pipeline stages do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelTask:
    """One task of a model as its metadata_props describe it; the model's outputs come in task order."""

    name: str  # the manifest column it was trained on, and its ONNX output's name
    kind: str  # classify | ordinal | regress: how the head reads the classes (its scores' argmax decides alike)
    labels: tuple[str, ...]  # the output's columns
    order: tuple[str, ...] | None = None  # the declared order of the labels, lowest first (ordinal, regress)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind, "labels": list(self.labels),
                "order": list(self.order) if self.order else None}


def tasks_from_metadata(metadata: Mapping[str, str]) -> tuple[ModelTask, ...]:
    """The tasks a model answers, the primary first: `metadata["tasks"]`, or (a model of one classify task, which
    does not say) one classify task on `label` with the model's `labels`. `KeyError` when neither is there."""
    if "tasks" not in metadata:
        return (ModelTask("label", "classify", tuple(json.loads(metadata["labels"]))),)
    return tuple(ModelTask(task["name"], task["kind"], tuple(task["labels"]), tuple(task["order"]) if task.get("order") else None)
                 for task in json.loads(metadata["tasks"]))


# "false" on a model whose answer for an input depends on the rest of its batch: dynamic quantization scales
# activations over the whole call (docs/text.md). Such a model is scored and served one input per call, so
# its answer for an input is always the same and is the one evaluate and promote measured.
BATCH_INDEPENDENT_KEY = "batch_independent"


def batch_independent(metadata: Mapping[str, str]) -> bool:
    return metadata.get(BATCH_INDEPENDENT_KEY, "true") != "false"


def inputs_per_call(metadata: Mapping[str, str], batch_size: int) -> int:
    """`batch_size`, or 1 for a model whose answers depend on their batch."""
    return batch_size if batch_independent(metadata) else 1
