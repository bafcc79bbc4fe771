"""Static INT8 with onnxruntime.quantization: one recipe, its calibration set, and per-node sensitivity.

Compress quantizes whole models with it; the `partial` strategy quantizes its frozen part with the
same recipe and calibration images, so the trained tail also sees the activations the INT8 model
will feed it (see components/training/partial.py).

Why U8 activations with 7-bit weights (`reduce_range`) by default: on x86 CPUs without VNNI
(AVX2 only) ONNX Runtime runs u8 x s8 products through a 16-bit saturating instruction, and
full 8-bit weights overflow it; on ELPV that alone cost 9 points of val accuracy. U8 weights
(u8 x u8) do not saturate, but ONNX Runtime has no fused per-channel kernel for them: the
convolutions ran in float between Q/DQ pairs, 4.6x slower than FP32 at batch 1 on ELPV.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    qdq_loss_debug,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from components.data.manifest import Dataset
from components.data.preprocess import Preprocessing, load_batch
from components.data.views import dihedral
from components.models.int8_recipe import Recipe

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 16
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds preprocessed images (already decoded once) to the calibrator a batch at a time."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int):
        self.input_name = input_name
        self.batches = iter([images[i : i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def calibration_frame(dataset: Dataset, count: int) -> pd.DataFrame:
    """`count` training rows, each label in its share of the split (deterministic by sha256)."""
    train = dataset.split("train")
    if train.empty:
        raise ValueError("INT8 calibration needs training images: the dataset's `train` split is empty.")
    count = min(count, len(train))
    shares = train.groupby("label")["path"].count() / len(train)
    chosen = [group.sort_values("sha256").head(max(1, round(count * shares[label])))
              for label, group in train.groupby("label")]
    return pd.concat(chosen, ignore_index=True)


def calibration_images(dataset: Dataset, count: int, preprocessing: Preprocessing, views: int = 1) -> np.ndarray:
    """The calibration images preprocessed; with `views` > 1 followed by their other dihedral views, as the
    test-time averaging of an exported model feeds them to its trunk."""
    paths = [dataset.image_path(p) for p in calibration_frame(dataset, count)["path"]]
    images = np.concatenate([load_batch(paths[i : i + 64], preprocessing) for i in range(0, len(paths), 64)])
    return np.concatenate([dihedral(images, view) for view in range(views)])


def prepare(source: Path, prepared: Path, scratch: Path) -> None:
    """Shape inference and graph optimisation first, as onnxruntime's quantization guide advises.

    When its symbolic pass gives up, onnxruntime dumps `sym_shape_infer_temp.onnx` (+ external data)
    into the working directory: it runs from `scratch` so nothing lands in the user's.
    """
    source_path, prepared_path = str(Path(source).resolve()), str(Path(prepared).resolve())
    with contextlib.chdir(scratch):
        try:
            quant_pre_process(source_path, prepared_path)
        except Exception as error:  # onnxruntime raises a bare Exception when its symbolic pass gives up
            if "symbolic shape inference" not in str(error):
                raise
            # Several pooled taps concatenated defeat the symbolic pass; ONNX's own shape inference still runs.
            log.info("%s: symbolic shape inference incomplete; preparing with ONNX shape inference only", source.name)
            quant_pre_process(source_path, prepared_path, skip_symbolic_shape=True)


def quantize(prepared: Path, target: Path, images: np.ndarray, recipe: Recipe, excluded: Sequence[str] = (),
             calibration_cache: Path | None = None) -> Path:
    """`prepared` as static QDQ INT8 at `target` (its shape arithmetic and `excluded` nodes left in FP32).

    Not checked or renamed here: callers stamp metadata, check, then move the file into place.
    """
    graph = onnx.load(str(prepared), load_external_data=False).graph
    quantize_static(
        str(prepared),
        str(target),
        ArrayCalibrationReader(graph.input[0].name, images, CALIBRATION_BATCH),
        quant_format=QuantFormat.QDQ,
        per_channel=recipe.per_channel,
        reduce_range=recipe.reduce_range,
        activation_type=QUANT_TYPES[recipe.activation_type],
        weight_type=QuantType.QInt8,
        calibrate_method=CALIBRATION_METHODS[recipe.calibration_method],
        nodes_to_exclude=shape_arithmetic_nodes(graph) + list(excluded),
        calibration_cache_path=calibration_cache,
    )
    return target


def shape_arithmetic_nodes(graph: onnx.GraphProto) -> list[str]:
    """Nodes that compute tensor shapes (TF-style "same" padding: Shape -> Cast -> Div/Ceil/Sub -> Pad).

    The exported trunks keep a dynamic batch, so these stay in the graph; the quantizer sees
    float Add/Mul/Clip on shape values and quantizes them, which turns pad widths wrong (a 28 px
    feature map came out 24 px on ELPV). They are never quantized.
    """
    constants = {initializer.name for initializer in graph.initializer}
    shape_tensors: set[str] = set()
    names = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        inputs = [name for name in node.input if name]
        derived = inputs and any(name in shape_tensors for name in inputs) and all(
            name in shape_tensors or name in constants for name in inputs)
        if node.op_type == "Shape" or derived:
            shape_tensors.update(node.output)
            names.append(node.name)
    return names


def node_sensitivity(
    prepared: Path, quantized: Path, images: np.ndarray, scratch: Path, skipped: Sequence[str] = ()
) -> list[dict[str, object]]:
    """Per-node quantization sensitivity, most sensitive first.

    With onnxruntime.quantization.qdq_loss_debug, the float and the QDQ model run on `images`
    and each activation of the QDQ model is compared with the float model's (SQNR in dB).
    A node's sensitivity is the SQNR it loses: that of its activation inputs minus that of its
    output (through a following ReLU6, which QDQ folds into the quantization range). Keeping a
    node in FP32 removes the quantization of its inputs and weight, so the nodes that lose most
    are the ones worth keeping.
    """
    graph = onnx.load(str(prepared), load_external_data=False).graph
    input_name = graph.input[0].name
    augmented = {}
    for name, path in (("float", prepared), ("qdq", quantized)):
        augmented[name] = scratch / f"augmented_{name}.onnx"
        qdq_loss_debug.modify_model_output_intermediate_tensors(str(path), str(augmented[name]))
    float_acts = qdq_loss_debug.collect_activations(str(augmented["float"]), ArrayCalibrationReader(input_name, images, 4))
    qdq_acts = qdq_loss_debug.collect_activations(str(augmented["qdq"]), ArrayCalibrationReader(input_name, images, 4))
    matching = qdq_loss_debug.create_activation_matching(qdq_acts, float_acts)
    del float_acts, qdq_acts
    sqnr = qdq_loss_debug.compute_signal_to_quantization_noice_ratio
    accumulated = {
        name: sqnr(pair["float"], pair["post_qdq"])
        for name, pair in matching.items()
        if pair.get("float") and sum(a.size for a in pair["float"]) == sum(a.size for a in pair["post_qdq"])
    }
    weights = qdq_loss_debug.create_weight_matching(str(prepared), str(quantized))
    weight_db = {name: sqnr(np.ravel(pair["float"]), np.ravel(pair["dequantized"])) for name, pair in weights.items()}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producers = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    skipped_set = set(skipped)
    rows = []
    for node in graph.node:
        inputs = [accumulated[name] for name in node.input if name in accumulated]
        if node.name in skipped_set or not inputs or node.op_type == "Clip":
            continue
        output = node.output[0]
        after = consumers.get(output, [])
        if output not in accumulated and len(after) == 1 and after[0].op_type in ("Clip", "Relu"):
            output = after[0].output[0]
        if output not in accumulated:
            continue
        node_weights = [weight_db[name] for name in node.input if name in weight_db]
        # The ReLU6 feeding the node quantizes the same tensor (QDQ folds it into the range): keeping
        # the tensor in FP32 means keeping both. On ELPV, the node alone changed nothing.
        feeding = [producers[name] for name in node.input
                   if name in producers and producers[name].op_type in ("Clip", "Relu")
                   and producers[name].name not in skipped_set]
        rows.append({
            "node": node.name,
            "exclude": " ".join([node.name] + [producer.name for producer in feeding]),
            "op_type": node.op_type,
            "sqnr_lost_db": min(inputs) - accumulated[output],
            "input_sqnr_db": min(inputs),
            "output_sqnr_db": accumulated[output],
            "weight_sqnr_db": min(node_weights) if node_weights else None,
        })
    rows.sort(key=lambda row: -row["sqnr_lost_db"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows
