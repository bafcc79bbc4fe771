"""Compress: prune, quantize, and ship the smallest model that keeps its validation accuracy.

Candidates are the exported FP32 model, the pruned export (when compress.prune is
`unstructured` or `structured`: see components/pruning.py) and a post-training static INT8
model (of the pruned one if present). When full INT8 loses more than
`max_accuracy_drop`, a budgeted mixed-precision search keeps the nodes whose quantization hurts
most (lowest SQNR, measured with onnxruntime.quantization.qdq_loss_debug) in FP32, a growing
number at a time, up to `max_fp32_nodes`; each step is a candidate. Every candidate is scored on
the val split and timed at batch 1 and 32 in ONNX Runtime in the same run with the same threads;
the most compressed candidate within budget ships as `model.onnx`, otherwise FP32 ships and the
reason is recorded.

Why U8 activations with 7-bit weights (`reduce_range`) by default: on x86 CPUs without VNNI
(AVX2 only) ONNX Runtime runs u8 x s8 products through a 16-bit saturating instruction, and
full 8-bit weights overflow it; on ELPV that alone cost 9 points of val accuracy.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import logging
import os
import re
import shutil
import statistics
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization import qdq_loss_debug
from onnxruntime.quantization.shape_inference import quant_pre_process
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils import prune

from components.config import StageConfig
from components.errors import UserError
from components.manifest import Dataset
from components.onnx_runtime import model_preprocessing, open_session, predict_frame, read_metadata, stamp_metadata
from components.preprocess import Preprocessing, load_batch
from components.result import StageResult, write_json

if TYPE_CHECKING:
    from components.pruning import ChannelPruning

log = logging.getLogger(__name__)

INT8_FILE = "model_int8.onnx"
SHIPPED_FILE = "model.onnx"
REPORT_FILE = "compress.json"
SENSITIVITY_FILE = "sensitivity.csv"
SENSITIVITY_PLOT = "sensitivity.png"
CALIBRATION_BATCH = 16
LATENCY_BATCHES = (1, 32)
MIXED_PREFIX = "int8_fp32x"  # int8_fp32x4: INT8 with its 4 most sensitive nodes kept in FP32

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}


class ExportChangedError(UserError):
    """The export folder's files no longer match what export recorded."""


class CompressConfig(StageConfig):
    # Which pruned candidate export writes as model_pruned.onnx. Unset: "unstructured" when sparsity > 0, else "none".
    prune: Literal["none", "unstructured", "structured"] = "none"
    sparsity: float = Field(0.0, ge=0.0, lt=1.0)  # unstructured: share of conv+linear weights zeroed (smaller zipped only)
    prune_ratio: float = Field(0.3, gt=0.0, lt=1.0)  # structured: share of each layer's channels removed (faster)
    prune_round_to: int = Field(8, ge=1)  # structured: channel counts kept at multiples of this (SIMD widths)
    recovery_epochs: int = Field(3, ge=0)  # structured: fine-tuning epochs after pruning; 0 = none
    recovery_lr: float = Field(1e-4, gt=0)  # structured: peak lr of the recovery fine-tuning (every layer)
    recovery_batch_size: int = Field(32, ge=2)
    recovery_patience: int = Field(2, ge=1)  # structured: epochs without a better val accuracy before stopping
    quantize: bool = True  # post-training static INT8 (onnxruntime.quantization)
    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0)  # absolute val accuracy the shipped model may lose vs FP32
    calibration_images: int = Field(256, ge=1)  # training images (stratified by label) used to calibrate activations
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    per_channel: bool = True  # per-output-channel weight scales (depthwise convs need them)
    activation_type: Literal["uint8", "int8"] = "uint8"  # asymmetric u8 suits ReLU6 outputs and x86 kernels
    reduce_range: bool = True  # 7-bit weights: no 16-bit saturation on CPUs without VNNI
    max_fp32_nodes: int = Field(16, ge=0)  # mixed precision: most nodes kept in FP32; 0 = full INT8 only
    sensitivity_images: int = Field(8, ge=1)  # calibration images compared float vs INT8 to rank nodes
    latency_threads: int = Field(0, ge=0)  # ONNX Runtime threads when timing candidates; 0 = all cores
    latency_runs: int = Field(5, ge=1)  # timed runs per candidate and batch size (median reported)

    @model_validator(mode="before")
    @classmethod
    def _legacy_sparsity(cls, data: Any) -> Any:
        """params written before `prune` existed turned unstructured pruning on with sparsity alone."""
        if isinstance(data, dict) and "prune" not in data and float(data.get("sparsity", 0) or 0) > 0:
            return {**data, "prune": "unstructured"}
        return data

    @model_validator(mode="after")
    def _one_pruning(self) -> CompressConfig:
        if self.prune == "unstructured" and self.sparsity == 0:
            raise ValueError("sparsity: compress.prune=unstructured needs compress.sparsity > 0")
        if self.prune != "unstructured" and self.sparsity > 0:
            raise ValueError(f"sparsity: compress.sparsity > 0 applies to compress.prune=unstructured only, "
                             f"not {self.prune}; set it to 0")
        return self

    def unstructured_sparsity(self) -> float:
        """What export's `sparsity` argument gets: 0 unless unstructured pruning is on."""
        return self.sparsity if self.prune == "unstructured" else 0.0

    def channel_pruning(self, seed: int = 0) -> ChannelPruning | None:
        """What export's `channel_pruning` argument gets: None unless structured pruning is on."""
        from components.pruning import ChannelPruning

        if self.prune != "structured":
            return None
        return ChannelPruning(self.prune_ratio, self.prune_round_to, self.recovery_epochs, self.recovery_lr,
                              self.recovery_batch_size, self.recovery_patience, seed)


def prune_model(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy of `model` with the smallest `sparsity` share of all conv and linear weights set to zero.

    Global (not per-layer) L1 magnitude pruning; the masks are folded into the weights, so the
    copy is a plain module that exports like the original.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"compress.sparsity must be in [0, 1), got {sparsity}; 0 turns pruning off.")
    pruned = copy.deepcopy(model)
    if sparsity == 0:
        return pruned
    targets = [(module, "weight") for module in pruned.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in targets:
        prune.remove(module, name)
    return pruned


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds preprocessed images (already decoded once) to the calibrator a batch at a time."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int):
        self.input_name = input_name
        self.batches = iter([images[i : i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def calibration_images(dataset: Dataset, count: int, preprocessing: Preprocessing) -> np.ndarray:
    """`count` training images, each label in its share of the split (deterministic by sha256)."""
    train = dataset.split("train")
    if train.empty:
        raise ValueError("INT8 calibration needs training images: the dataset's `train` split is empty.")
    count = min(count, len(train))
    shares = train.groupby("label")["path"].count() / len(train)
    chosen = []
    for label, group in train.groupby("label"):
        chosen.extend(group.sort_values("sha256")["path"].head(max(1, round(count * shares[label]))))
    paths = [dataset.image_path(p) for p in chosen]
    return np.concatenate([load_batch(paths[i : i + 64], preprocessing) for i in range(0, len(paths), 64)])


class Quantizer:
    """Static QDQ INT8 of one prepared model; calibration runs once and is reused per exclusion set."""

    def __init__(self, cfg: CompressConfig, source: Path, dataset: Dataset, scratch: Path):
        self.cfg = cfg
        self.metadata = read_metadata(source)
        # The model says how its input is prepared; calibration must see exactly that.
        self.images = calibration_images(dataset, cfg.calibration_images, model_preprocessing(source, self.metadata))
        self.prepared = scratch / "prepared.onnx"
        # Shape inference and graph optimisation first, as onnxruntime's quantization guide advises.
        # When its symbolic pass gives up, onnxruntime dumps `sym_shape_infer_temp.onnx` (+ external data)
        # into the working directory: run it from the scratch folder so nothing lands in the user's.
        source_path, prepared = str(Path(source).resolve()), str(self.prepared.resolve())
        with contextlib.chdir(scratch):
            try:
                quant_pre_process(source_path, prepared)
            except Exception as error:  # onnxruntime raises a bare Exception when its symbolic pass gives up
                if "symbolic shape inference" not in str(error):
                    raise
                # Several pooled taps concatenated defeat the symbolic pass; ONNX's own shape inference still runs.
                log.info("%s: symbolic shape inference incomplete; preparing with ONNX shape inference only",
                         source.name)
                quant_pre_process(source_path, prepared, skip_symbolic_shape=True)
        graph = onnx.load(str(self.prepared), load_external_data=False).graph
        self.input_name = graph.input[0].name
        self.shape_nodes = shape_arithmetic_nodes(graph)
        self.cache = scratch / "calibration.json"

    def recipe(self, excluded: Sequence[str]) -> str:
        cfg = self.cfg
        text = (f"static QDQ, {cfg.activation_type} activations, int8 weights"
                f"{' (7-bit range)' if cfg.reduce_range else ''}, {'per-channel' if cfg.per_channel else 'per-tensor'}, "
                f"{cfg.calibration_method} calibration on {len(self.images)} images")
        return text + (f", {len(excluded)} nodes kept fp32" if excluded else "")

    def quantize(self, target: Path, excluded: Sequence[str] = ()) -> Path:
        cfg = self.cfg
        partial = target.with_name(target.stem + ".partial.onnx")  # renamed once checked: no half-written model
        quantize_static(
            str(self.prepared),
            str(partial),
            ArrayCalibrationReader(self.input_name, self.images, CALIBRATION_BATCH),
            quant_format=QuantFormat.QDQ,
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range,
            activation_type=QUANT_TYPES[cfg.activation_type],
            weight_type=QuantType.QInt8,
            calibrate_method=CALIBRATION_METHODS[cfg.calibration_method],
            nodes_to_exclude=self.shape_nodes + list(excluded),
            calibration_cache_path=self.cache,
        )
        stamp_metadata(partial, self.metadata | {"quantization": self.recipe(excluded),
                                                 "fp32_nodes": ",".join(excluded)})
        onnx.checker.check_model(str(partial), full_check=True)
        os.replace(partial, target)
        log.info("quantized -> %s (%s)", target.name, self.recipe(excluded))
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


def write_sensitivity(rows: list[dict[str, object]], out_dir: Path) -> tuple[Path, Path]:
    """sensitivity.csv (every quantized node, worst first) and a bar chart of the worst 40."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = out_dir / SENSITIVITY_FILE
    fields = ["rank", "node", "exclude", "op_type", "sqnr_lost_db", "input_sqnr_db", "output_sqnr_db", "weight_sqnr_db", "kept_fp32"]
    temporary = csv_path.with_suffix(".csv.tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, csv_path)

    shown = rows[:40]
    figure, axis = plt.subplots(figsize=(8, max(3.0, 0.22 * len(shown))))
    colours = ["tab:red" if row.get("kept_fp32") else "tab:blue" for row in shown]
    axis.barh([f"{row['node']} ({row['op_type']})" for row in shown], [row["sqnr_lost_db"] for row in shown], color=colours)
    axis.invert_yaxis()
    axis.set_xlabel("SQNR lost at the node, float vs INT8 activations (dB, higher = more sensitive)")
    axis.set_title("INT8 sensitivity per node (red: kept in FP32)")
    axis.tick_params(axis="y", labelsize=6)
    figure.tight_layout()
    plot_path = out_dir / SENSITIVITY_PLOT
    temporary_plot = plot_path.with_name(plot_path.stem + ".tmp.png")
    figure.savefig(temporary_plot, dpi=120)
    plt.close(figure)
    os.replace(temporary_plot, plot_path)
    return csv_path, plot_path


def exclusion_steps(max_nodes: int) -> list[int]:
    """How many nodes to keep in FP32 at each step: 1, 2, 4, ... then the cap itself."""
    steps, count = [], 1
    while count < max_nodes:
        steps.append(count)
        count *= 2
    return steps + ([max_nodes] if max_nodes else [])


def onnx_accuracy(model_path: Path, dataset: Dataset, split: str, batch_size: int = 32) -> float:
    frame = dataset.split(split)
    if frame.empty:
        raise ValueError(f"the dataset has no `{split}` rows to measure {model_path.name}'s accuracy on.")
    logits = predict_frame(model_path, dataset, frame, batch_size)
    return float(np.mean(logits.argmax(axis=1) == np.asarray(dataset.label_index(frame))))


def latency_ms(model_path: Path, images: np.ndarray, threads: int, runs: int) -> dict[int, float]:
    """Median wall time (ms) of one session.run at each batch size in LATENCY_BATCHES, after a warm-up."""
    session = open_session(model_path, threads)
    input_name = session.get_inputs()[0].name
    timings = {}
    for batch_size in LATENCY_BATCHES:
        batch = np.ascontiguousarray(np.resize(images, (batch_size, *images.shape[1:])))
        session.run(None, {input_name: batch})
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, {input_name: batch})
            samples.append((time.perf_counter() - start) * 1e3)
        timings[batch_size] = statistics.median(samples)
    return timings


def zipped_mb(path: Path) -> float:
    """Size after deflate: the only size in which unstructured sparsity shows (ONNX stores dense tensors)."""
    return len(zlib.compress(path.read_bytes(), 6)) / 1e6


def compression_order(names: Sequence[str]) -> list[str]:
    """Most compressed first: full INT8, INT8 with the fewest FP32 nodes, pruned, FP32."""

    def key(name: str) -> tuple[int, int]:
        if name == "int8":
            return (0, 0)
        mixed = re.fullmatch(MIXED_PREFIX + r"(\d+)", name)
        if mixed:
            return (1, int(mixed.group(1)))
        return {"pruned": (2, 0), "fp32": (3, 0)}[name]

    return sorted(names, key=key)


def choose(accuracy: dict[str, float], max_drop: float) -> tuple[str, str, dict[str, bool]]:
    """(shipped candidate, reason, within-budget flags) under the FP32-relative accuracy budget."""
    baseline = accuracy["fp32"]
    floor = baseline - max_drop
    # The tolerance keeps k/n accuracies that meet the floor exactly from failing on rounding.
    within = {name: value >= floor - 1e-9 for name, value in accuracy.items()}
    budget = f"val accuracy >= {floor:.4f} (fp32 {baseline:.4f} - compress.max_accuracy_drop {max_drop:g})"
    ranked = compression_order(list(accuracy))
    passing = [name for name in ranked if within[name]]
    if not passing:
        failed = ", ".join(f"{name} {accuracy[name]:.4f}" for name in ranked)
        return "fp32", f"no candidate met {budget} ({failed}); shipping fp32 unchanged", within
    shipped = passing[0]
    rejected = [f"{name} {accuracy[name]:.4f}" for name in ranked[: ranked.index(shipped)]]
    reason = f"{shipped} is the most compressed candidate with {budget}: {accuracy[shipped]:.4f}"
    if rejected:
        reason += f"; more compressed but over budget: {', '.join(rejected)}"
    if len(ranked) == 1:
        reason += " (the only candidate: compress.quantize is off and export wrote no pruned model)"
    return shipped, reason, within


def search_int8(
    cfg: CompressConfig, source: Path, dataset: Dataset, fp32_accuracy: float, out_dir: Path
) -> tuple[dict[str, Path], dict[str, float], dict[str, object]]:
    """Full INT8, then (over budget) ever more of the most sensitive nodes in FP32 until within budget or capped.

    Returns the candidate files, their val accuracies and what the search did.
    """
    floor = fp32_accuracy - cfg.max_accuracy_drop
    models, accuracy = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        quantizer = Quantizer(cfg, source, dataset, Path(scratch))
        models["int8"] = quantizer.quantize(out_dir / INT8_FILE)
        accuracy["int8"] = onnx_accuracy(models["int8"], dataset, "val")
        log.info("int8: val accuracy %.4f (floor %.4f)", accuracy["int8"], floor)
        search: dict[str, object] = {"recipe": quantizer.recipe(()), "calibration_images": len(quantizer.images),
                                     "shape_nodes_not_quantized": len(quantizer.shape_nodes), "fp32_nodes": []}
        if accuracy["int8"] >= floor - 1e-9 or cfg.max_fp32_nodes == 0:
            search["stopped"] = "full int8 within budget" if accuracy["int8"] >= floor - 1e-9 else "compress.max_fp32_nodes is 0"
            return models, accuracy, search
        rows = node_sensitivity(quantizer.prepared, models["int8"], quantizer.images[: cfg.sensitivity_images],
                                Path(scratch), quantizer.shape_nodes)
        search["stopped"] = f"compress.max_fp32_nodes {cfg.max_fp32_nodes} reached over budget"
        excluded: list[str] = []
        for count in exclusion_steps(min(cfg.max_fp32_nodes, len(rows))):
            excluded = [name for row in rows[:count] for name in str(row["exclude"]).split()]
            name = f"{MIXED_PREFIX}{count}"
            models[name] = quantizer.quantize(out_dir / f"model_{name}.onnx", excluded)
            accuracy[name] = onnx_accuracy(models[name], dataset, "val")
            log.info("%s: val accuracy %.4f (floor %.4f)", name, accuracy[name], floor)
            if accuracy[name] >= floor - 1e-9:
                search["stopped"] = f"{name} within budget"
                break
        kept = set(excluded)
        for row in rows:
            row["kept_fp32"] = row["node"] in kept
        search["fp32_nodes"] = excluded
        search["ranked_nodes_kept"] = [row["node"] for row in rows if row["kept_fp32"]]
        csv_path, plot_path = write_sensitivity(rows, out_dir)
        search["sensitivity"] = {"csv": csv_path.name, "plot": plot_path.name}
    return models, accuracy, search


def run(cfg: CompressConfig, export_dir: Path, dataset: Dataset, out_dir: Path) -> StageResult:
    exported = StageResult.load(export_dir)
    if not exported.is_intact():
        raise ExportChangedError(f"{export_dir}: the exported files changed since export wrote them; re-run export.")
    candidates = {name: path for name, path in exported.artifacts.items() if name in ("fp32", "pruned")}
    if "fp32" not in candidates:
        raise KeyError(f"{export_dir}: the export result lists no `fp32` model; re-run export.")
    out_dir.mkdir(parents=True, exist_ok=True)
    accuracy = {name: onnx_accuracy(path, dataset, "val") for name, path in candidates.items()}
    search: dict[str, object] = {}
    if cfg.quantize:
        source = candidates.get("pruned", candidates["fp32"])
        int8_models, int8_accuracy, search = search_int8(cfg, source, dataset, accuracy["fp32"], out_dir)
        candidates |= int8_models
        accuracy |= int8_accuracy

    shipped, reason, within = choose(accuracy, cfg.max_accuracy_drop)
    log.info("shipping %s: %s", shipped, reason)

    # Timed together, one after another, with the same threads and inputs, so ratios compare.
    timing_images = load_batch([dataset.image_path(p) for p in dataset.split("val")["path"].head(8)],
                               model_preprocessing(candidates["fp32"], read_metadata(candidates["fp32"])))
    latency = {name: latency_ms(path, timing_images, cfg.latency_threads, cfg.latency_runs)
               for name, path in candidates.items()}

    model_path = out_dir / SHIPPED_FILE
    temporary = out_dir / (SHIPPED_FILE + ".tmp")
    shutil.copyfile(candidates[shipped], temporary)
    stamp_metadata(
        temporary,
        {
            "compression": shipped,
            "val_accuracy": f"{accuracy[shipped]:.6f}",
            "val_accuracy_fp32": f"{accuracy['fp32']:.6f}",
            "max_accuracy_drop": f"{cfg.max_accuracy_drop:g}",
        },
    )
    os.replace(temporary, model_path)

    sizes = {name: path.stat().st_size / 1e6 for name, path in candidates.items()}
    report = {
        "candidates": {
            name: {
                "file": path.name,
                "size_mb": sizes[name],
                "zipped_mb": zipped_mb(path),
                "val_accuracy": accuracy[name],
                "val_accuracy_drop": accuracy["fp32"] - accuracy[name],
                "within_budget": within[name],
                "latency_ms_batch1": latency[name][1],
                "latency_ms_batch32": latency[name][32],
            }
            for name, path in candidates.items()
        },
        "val_images": len(dataset.split("val")),
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "latency_threads": cfg.latency_threads,
        "int8_search": search,
        "pruning": exported.info.get("pruning") or ({"method": "unstructured magnitude", "sparsity": exported.info["sparsity"]}
                                                    if "pruned" in candidates else None),
        "shipped": shipped,
        "reason": reason,
    }
    report_path = write_json(out_dir / REPORT_FILE, report)

    metrics = {f"val_accuracy_{name}": value for name, value in accuracy.items()}
    metrics |= {f"size_mb_{name}": value for name, value in sizes.items()}
    metrics |= {f"zipped_mb_{name}": entry["zipped_mb"] for name, entry in report["candidates"].items()}
    for name in candidates:
        metrics |= {f"latency_ms_b{batch}_{name}": latency[name][batch] for batch in LATENCY_BATCHES}
    if "int8" in sizes:
        metrics["size_ratio_int8"] = sizes["int8"] / sizes["fp32"]
    metrics["fp32_nodes_shipped"] = float(len(search.get("fp32_nodes", [])) if shipped.startswith(MIXED_PREFIX) else 0)
    artifacts = {"model": model_path, "report": report_path}
    artifacts |= {name: path for name, path in candidates.items() if path.parent == out_dir}
    if "sensitivity" in search:
        artifacts["sensitivity"] = out_dir / SENSITIVITY_FILE
        artifacts["sensitivity_plot"] = out_dir / SENSITIVITY_PLOT
    result = StageResult(
        stage="compress", out_dir=out_dir, metrics=metrics, artifacts=artifacts,
        info={"shipped": shipped, "reason": reason},
    )
    result.save()
    return result
