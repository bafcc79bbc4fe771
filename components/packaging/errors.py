"""What export raises when an exported file does not compute what was trained (image and text exports alike)."""

from __future__ import annotations

from components.core.errors import UserError


class ExportParityError(UserError):
    """An exported model whose outputs differ from the PyTorch model's beyond the tolerance."""


class TrainServeSkewError(UserError):
    """The model as served does not compute what was trained: the message says which input drifted."""
