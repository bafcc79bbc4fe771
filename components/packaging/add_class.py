"""Add a class to a `prototypes` model from a few images, without retraining anything.

A prototypes model's ONNX graph ends in `embedding` (the trunk's features, centred by the train mean
and L2-normalised: its second output) and one MatMul of it with the prototype matrix (features x
classes, a plain float initializer: compress keeps the head in FP32). The new class's prototype is
the normalised mean embedding of its images, computed by that same graph, so with the model's own
trunk, quantization and preprocessing (read from its metadata_props). It becomes one more column of
the matrix; the labels in the metadata get the new name. Every other class's logits are unchanged,
bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from components.core.errors import UserError
from components.core.result import atomic_path, sha256_file
from components.data.ingest import IMAGE_SUFFIXES, UndecodableImage, decoded_image
from components.data.preprocess import load_batch
from components.models.onnx_io import model_labels, model_preprocessing, open_session, read_metadata

log = logging.getLogger(__name__)

EMBEDDING = "embedding"


class AddClassError(UserError):
    """A model or image folder `tlops add-class` cannot work with; the message says why and what to do."""


@dataclass(frozen=True)
class AddedClass:
    path: Path
    name: str
    labels: list[str]
    images: list[Path]
    skipped: list[str]  # files that did not decode, with the reason
    predicted_as_new: float  # share of the given images the new model assigns to the new class


def check_prototypes_model(model_path: Path, metadata: dict[str, str]) -> None:
    strategy, head = metadata.get("strategy", "?"), metadata.get("head", "linear")
    if head != "prototypes":
        raise AddClassError(f"{model_path}: a {strategy} model (head {head!r}); add-class adds a prototype to a "
                            f"finetune.strategy=prototypes model, whose classes are class means. Train one with "
                            f"`tlops run --set finetune.strategy=prototypes`, or retrain this one with the new class.")
    outputs = [o.name for o in onnx.load(str(model_path), load_external_data=False).graph.output]
    if EMBEDDING not in outputs:
        raise AddClassError(f"{model_path}: a prototypes model without an `{EMBEDDING}` output (outputs {outputs}); "
                            f"re-export it with this tlops.")


def readable_images(folder: Path) -> tuple[list[Path], list[str]]:
    """The images in `folder` (searched recursively) that decode, and the others with why."""
    if not folder.is_dir():
        raise AddClassError(f"--images {folder}: not a folder; give a folder of images of the new class.")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise AddClassError(f"--images {folder}: no images (suffixes {sorted(IMAGE_SUFFIXES)}); put at least one "
                            f"image of the new class there.")
    good, bad = [], []
    for path in files:
        try:
            with decoded_image(path):
                good.append(path)
        except UndecodableImage as failure:
            bad.append(f"{path.name}: {failure.facts.error}")
    if not good:
        raise AddClassError(f"--images {folder}: none of its {len(files)} image file(s) decodes ({bad[0]}).")
    return good, bad


def embeddings(model_path: Path, images: list[Path], batch_size: int = 16) -> np.ndarray:
    """The model's own `embedding` output for each image, preprocessed as its metadata says."""
    preprocessing = model_preprocessing(model_path, read_metadata(model_path))
    session = open_session(model_path)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run([EMBEDDING], {name: load_batch(images[i : i + batch_size], preprocessing)})[0]
                           for i in range(0, len(images), batch_size)])


def prototype_matrix(graph: onnx.GraphProto) -> onnx.TensorProto:
    """The initializer the `embedding` is multiplied with."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[0] == EMBEDDING and node.input[1] in initializers:
            return initializers[node.input[1]]
    raise AddClassError("the model's graph has no float prototype matrix after its `embedding` (was it quantized "
                        "by another tool?); add the class to the FP32 export instead.")


def add_class(model_path: Path, name: str, images_dir: Path, out_path: Path) -> AddedClass:
    """Write `out_path`: the model at `model_path` with one more class, `name`, made from the images in `images_dir`."""
    metadata = read_metadata(model_path)
    check_prototypes_model(model_path, metadata)
    labels = list(model_labels(model_path, metadata))
    if not name.strip():
        raise AddClassError("the new class's name is empty; give it a name.")
    if name in labels:
        raise AddClassError(f"class {name!r} already exists in {model_path.name} (labels {labels}); choose another "
                            f"name, or retrain to change an existing class.")
    images, skipped = readable_images(images_dir)
    for line in skipped:
        log.warning("add-class: skipped %s", line)
    mean = embeddings(model_path, images).mean(0)
    prototype = mean / max(float(np.linalg.norm(mean)), 1e-12)

    model = onnx.load(str(model_path))
    tensor = prototype_matrix(model.graph)
    matrix = numpy_helper.to_array(tensor)
    tensor.CopyFrom(numpy_helper.from_array(np.concatenate([matrix, prototype[:, None].astype(matrix.dtype)], 1),
                                            tensor.name))
    # Shapes inferred before (quantization's preparation stores them) name the old class count; the checker and
    # ONNX Runtime infer them again.
    del model.graph.value_info[:]
    for output in model.graph.output:  # the logits' class axis, where the graph states it
        dims = output.type.tensor_type.shape.dim
        if output.name == "logits" and len(dims) == 2 and dims[1].HasField("dim_value"):
            dims[1].dim_value = len(labels) + 1
    added = json.loads(metadata.get("added_classes", "[]")) + [{
        "name": name, "n_images": len(images),
        "images_sha256": hashlib.sha256("".join(sorted(sha256_file(p) for p in images)).encode()).hexdigest()}]
    props = metadata | {"labels": json.dumps(labels + [name]), "added_classes": json.dumps(added),
                        "parent_model_sha256": sha256_file(model_path)}
    del model.metadata_props[:]
    for key, value in sorted(props.items()):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(out_path) as partial:
        onnx.save(model, str(partial))
    logits = _logits(out_path, images)
    share = float((logits.argmax(1) == len(labels)).mean())
    log.info("add-class %r from %d image(s): %s; %.0f%% of them predicted as it", name, len(images), out_path,
             100 * share)
    return AddedClass(out_path, name, labels + [name], images, skipped, share)


def _logits(model_path: Path, images: list[Path]) -> np.ndarray:
    preprocessing = model_preprocessing(model_path, read_metadata(model_path))
    session = open_session(model_path)
    return session.run(["logits"], {session.get_inputs()[0].name: load_batch(images, preprocessing)})[0]
