"""The dihedral views of a square image: its four 90° rotations, then the same four mirrored.

A solar cell turned or mirrored is still a solar cell, so `partial` trains on these views of each
image (cached once, `dihedral`) and export can average a model's logits over them inside the ONNX
graph (`components.models.classifier.dihedral_view`, its torch twin). Both number the views the
same way; a test holds them equal.
"""

from __future__ import annotations

import numpy as np

MAX_VIEWS = 8  # the dihedral group of a square: 4 rotations, each also mirrored


def dihedral(images: np.ndarray, view: int) -> np.ndarray:
    """View 0-3: rotation by view x 90°; 4-7: the same, mirrored left-right. NCHW in, NCHW out."""
    rotated = np.rot90(images, view % 4, axes=(2, 3))
    return np.ascontiguousarray(rotated[..., ::-1] if view >= 4 else rotated)


