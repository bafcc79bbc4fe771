"""The fine-tuned model: a pretrained trunk (frozen, partly or fully trained) and a linear head.

A checkpoint is self-describing (nanoGPT style): it carries the resolved config, the backbone
entry, labels, preprocessing and data version, so export and serving need nothing else.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from components.core.errors import UserError
from components.data.views import MAX_VIEWS
from components.models.backbones import Trunk, build_trunk
from components.models.heads import build_head, head_spec
from components.models.registry import get_entry

CHECKPOINT_FORMAT = "tlops.classifier/3"  # /3: `head_spec` (any head kind); /2: `taps` (a list) replaced `tap`
READABLE_FORMATS = ("tlops.classifier/2", CHECKPOINT_FORMAT)  # a /2 checkpoint's head is linear


class Classifier(nn.Module):
    """image -> logits. `trunk` returns one pooled vector per tap; the head reads them concatenated.

    A `TaskHeads` head makes it image -> a tuple of outputs, one per task (the primary first)."""

    def __init__(self, trunk: Trunk, head: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.trunk(images)
        return self.head(pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1))


def dihedral_view(images: torch.Tensor, view: int) -> torch.Tensor:
    """The torch twin of `components.data.views.dihedral` (the views `partial` trains on): view 0-3 rotates NCHW
    images by view x 90° counter-clockwise, 4-7 does the same and mirrors left-right. Written with
    transpose and flip so that the ONNX graph holds Transpose and Slice nodes, which every runtime has."""
    turns = view % 4
    if turns == 1:
        images = images.flip(3).transpose(2, 3)
    elif turns == 2:
        images = images.flip(2).flip(3)
    elif turns == 3:
        images = images.transpose(2, 3).flip(3)
    return images.flip(3) if view >= 4 else images


class ViewAverage(nn.Module):
    """Test-time augmentation inside the model: the mean of `model`'s logits over its first `views` dihedral views.

    The views run as one batch, so an ONNX Runtime consumer gets the averaged prediction from one call
    and `views` times the work of the plain model.
    """

    def __init__(self, model: nn.Module, views: int):
        super().__init__()
        if not 1 <= views <= MAX_VIEWS:
            raise ValueError(f"views={views}: the dihedral group has 1 to {MAX_VIEWS} views")
        self.model, self.views = model, views

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = self.model(torch.cat([dihedral_view(images, view) for view in range(self.views)]))
        if isinstance(outputs, tuple):  # one output per task: each averaged alike
            return tuple(output.reshape(self.views, -1, output.shape[-1]).mean(0) for output in outputs)
        return outputs.reshape(self.views, -1, outputs.shape[-1]).mean(0)


class WithEmbedding(nn.Module):
    """A classifier whose head has an `embedding` (prototypes), answering (logits, embedding): the exported graph's
    second output is what `tlops add-class` builds a new prototype from, with the model's own trunk."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.model.trunk(images)
        features = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)
        return self.model.head(features), self.model.head.embedding(features)


def output_names(model: nn.Module, checkpoint: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The named outputs of an exported model: one per task, named by it, when the checkpoint has `tasks`, else
    `logits` (every single-task consumer reads output 0); then, for a prototype head, its `embedding`."""
    tasks = (checkpoint or {}).get("tasks")
    names = tuple(task["name"] for task in tasks) if tasks else ("logits",)
    return (*names, "embedding") if isinstance(model, WithEmbedding) else names


def save_checkpoint(path: Path, head: nn.Module, trunk_state: dict | None, **description: Any) -> Path:
    """`description` must hold backbone (entry dict), taps, labels, preprocessing, config, data, strategy; a model of
    several tasks (or of another head than classify) also `tasks` (`components.training.tasks.Task.describe`)."""
    required = {"backbone", "taps", "labels", "preprocessing", "config", "data", "strategy"}
    missing = required - description.keys()
    if missing:
        raise ValueError(f"checkpoint description lacks {sorted(missing)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "head": head.state_dict(), "head_spec": head_spec(head),
                "trunk": trunk_state, **description}, path)
    return path


def checkpoint_head(checkpoint: dict[str, Any]) -> nn.Module:
    """The checkpoint's trained head, rebuilt from its spec, in eval mode."""
    return build_head(checkpoint.get("head_spec"), checkpoint["head"])


class CheckpointError(UserError):
    """A file that is not a readable tlops checkpoint; the message names it and the fix."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: checkpoint not found; run the finetune stage first.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(error).splitlines()[0][:120]}); "
                              f"rerun the finetune stage.") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in READABLE_FORMATS:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path}: not a tlops checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r}); "
                              f"rerun the finetune stage.")
    return checkpoint


def build_model(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the full model (pretrained trunk + trained head) from a checkpoint, in eval mode: image -> logits,
    or for a text encoder's checkpoint (input_ids, attention_mask) -> logits."""
    entry = get_entry(checkpoint["backbone"]["name"])
    if entry.modality == "text":
        from components.models.text_encoders import TextClassifier, build_text_trunk

        text_trunk = build_text_trunk(entry, tuple(checkpoint["taps"]))
        if checkpoint.get("trunk") is not None:
            text_trunk.load_state_dict(checkpoint["trunk"])
        return TextClassifier(text_trunk, checkpoint_head(checkpoint)).eval()
    trunk = build_trunk(entry, tuple(checkpoint["taps"]))
    if checkpoint.get("trunk") is not None:
        trunk.load_state_dict(checkpoint["trunk"])
    return Classifier(trunk, checkpoint_head(checkpoint)).eval()
