"""A torch module written as a self-describing ONNX file: dynamic batch, metadata_props, full check.

The writing side of ONNX (it needs torch); reading and running a file is
`components/models/onnx_io.py`, which a server imports without torch.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from components.models.onnx_io import stamp_metadata


def export_onnx(model: nn.Module, path: Path, metadata: dict[str, str], input_size: int, opset: int,
                outputs: tuple[str, ...] = ("logits",)) -> Path:
    """Write `model` (image NCHW -> logits; or one output per name in `outputs`: one per task, or logits then
    a prototype head's embedding) to `path` with a dynamic batch axis, stamp and check it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, input_size, input_size)
    with torch.no_grad():
        # The dynamo exporter needs onnxscript, which this environment does not carry.
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=list(outputs),
            dynamic_axes={"image": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            opset_version=opset,
        )
    stamp_metadata(path, metadata)
    onnx.checker.check_model(str(path), full_check=True)
    return path


