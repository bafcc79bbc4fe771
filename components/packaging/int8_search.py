"""The INT8 candidates of an image model: static QDQ INT8, then a budgeted mixed-precision search; text models
get dynamic INT8.

Full INT8 first. Over the budget (budget.py), the nodes whose quantization hurts most (lowest SQNR, measured
with onnxruntime.quantization.qdq_loss_debug) are kept in FP32, a growing number at a time (1, 2, 4, ...),
up to `compress.max_fp32_nodes`; each step is a candidate, and the search stops at the first within the
budget. It is skipped when full INT8 loses more than `compress.max_search_drop`, where no number of FP32
nodes has ever recovered it. Some nodes never quantize: shape arithmetic, and the heads' nodes named by
`prototype_head_nodes`, `joined_taps_head` and `after_heads`, each for the reason in its docstring.

The INT8 recipe and its reasons are in components/models/quantization.py; which candidate ships is
compress.py's choice.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from components.data.manifest import Dataset
from components.models import quantization as int8
from components.models.onnx_io import model_preprocessing, read_metadata, stamp_metadata
from components.models.task_metadata import BATCH_INDEPENDENT_KEY
from components.packaging.budget import Budget, accuracies, agreement, task_answers
from components.packaging.config import CompressConfig

log = logging.getLogger(__name__)

INT8_FILE = "model_int8.onnx"
SENSITIVITY_FILE = "sensitivity.csv"
SENSITIVITY_PLOT = "sensitivity.png"
MIXED_PREFIX = "int8_fp32x"  # int8_fp32x4: INT8 with its 4 most sensitive nodes kept in FP32


def after_heads(graph: onnx.GraphProto) -> list[str]:
    """Nodes that compute on what the heads' linear layers (Gemm) output: a task's scores from its head (CORN's
    log probabilities, a regress head's distances into its class intervals) and their mean over views.

    Left in FP32 in a model of several tasks: they are a handful of elementwise ops, and quantized they
    rounded a regress head's class scores into ties (on 120 ELPV cells at 64 px its INT8 model fell from
    0.68 to 0.59 val accuracy, and from 0.41 to 0.14 after `partial`).
    """
    derived: set[str] = set()
    names = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        if any(name in derived for name in node.input if name):
            names.append(node.name)
            derived.update(node.output)
        elif node.op_type == "Gemm":
            derived.update(node.output)
    return names


class Quantizer:
    """Static QDQ INT8 of one prepared model; calibration runs once and is reused per exclusion set."""

    def __init__(self, cfg: CompressConfig, source: Path, dataset: Dataset, scratch: Path):
        self.recipe_ = cfg.recipe()
        self.metadata = read_metadata(source)
        # The model says how its input is prepared; calibration must see exactly that.
        self.images = int8.calibration_images(dataset, cfg.calibration_images, model_preprocessing(source, self.metadata))
        self.prepared = scratch / "prepared.onnx"
        int8.prepare(source, self.prepared, scratch)
        graph = onnx.load(str(self.prepared), load_external_data=False).graph
        self.shape_nodes = int8.shape_arithmetic_nodes(graph)
        # A prototypes head stays FP32 (see `prototype_head_nodes`), so does a head on several joined taps (see
        # `joined_taps_head`); a model of several tasks (or with an ordinal or regress head) keeps what its heads
        # compute after their linear layers in FP32 (see `after_heads`). A head on one tap is quantized.
        tail = after_heads(graph) if "tasks" in self.metadata else []
        self.head_nodes = list(dict.fromkeys([*prototype_head_nodes(graph, self.metadata), *joined_taps_head(graph), *tail]))
        self.cache = scratch / "calibration.json"

    def recipe(self, excluded: Sequence[str]) -> str:
        text = self.recipe_.describe(len(self.images))
        return text + (f", {len(excluded)} nodes kept fp32" if excluded else "")

    def quantize(self, target: Path, excluded: Sequence[str] = ()) -> Path:
        partial = target.with_name(target.stem + ".partial.onnx")  # renamed once checked: no half-written model
        int8.quantize(self.prepared, partial, self.images, self.recipe_, [*self.head_nodes, *excluded], self.cache)
        stamp_metadata(partial, self.metadata | {"quantization": self.recipe(excluded),
                                                 "fp32_nodes": ",".join(excluded)})
        onnx.checker.check_model(str(partial), full_check=True)
        os.replace(partial, target)
        log.info("quantized -> %s (%s)", target.name, self.recipe(excluded))
        return target


def prototype_head_nodes(graph: onnx.GraphProto, metadata: dict[str, str]) -> list[str]:
    """A prototypes head stays FP32: its cosines between unit vectors differ in the third decimal, where INT8 rounds,
    and `tlops add-class` appends a column to its prototype matrix, which must stay a plain float initializer."""
    if metadata.get("head") != "prototypes":
        return []
    return [node.name for node in graph.node if node.name.startswith("/head/") or "/head/" in node.name]


def joined_taps_head(graph: onnx.GraphProto) -> list[str]:
    """A head fed by several taps joined (`linear` on pooled + stage5 + stage3) stays FP32 with the Concat feeding it.

    The probe standardises each feature, and that scaling is folded into the head's weights, so a feature of small
    spread weighs as much as one of large spread; one uint8 scale over the joined taps, set by the largest, rounds
    the small ones away. Lite1's probe (FP32 val 0.860) fell to 0.40 in full INT8, and to 0.80 with these nodes in
    FP32 (docs/compression.md). A head on one tap is quantized as before.
    """
    producers = {output: node for node in graph.node for output in node.output}
    names = []
    for node in graph.node:
        feeding = producers.get(node.input[0]) if node.op_type == "Gemm" else None
        if feeding is not None and feeding.op_type == "Concat":
            names += [feeding.name, node.name]
    return names


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


def search_int8(
    cfg: CompressConfig, source: Path, dataset: Dataset, fp32_answers: dict[str, np.ndarray], budget: Budget,
    out_dir: Path,
) -> tuple[dict[str, Path], dict[str, dict[str, np.ndarray]], dict[str, object]]:
    """Full INT8, then (over `budget`) ever more of the most sensitive nodes in FP32 until within it or capped.

    `fp32_answers`: the FP32 model's val answers per task (the primary first), which a candidate's must agree
    with. Returns the candidate files, their val answers per task and what the search did.
    """

    def judged(name: str, given: dict[str, np.ndarray]) -> tuple[dict[str, float], list[str]]:
        """The candidate's val accuracy per task and why it is over the budget (empty: within), logged."""
        scores, agrees = accuracies(given, dataset, "val"), agreement(given, fp32_answers)
        log.info("%s: val accuracy %s; agrees with fp32 on %.1f%% (min %.1f%%)", name,
                 ", ".join(f"{task} {value:.4f} (floor {budget.floor(task):.4f})" for task, value in scores.items()),
                 100 * agrees, 100 * budget.min_agreement)
        return scores, budget.shortfalls(scores, agrees)

    models, answers = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        quantizer = Quantizer(cfg, source, dataset, Path(scratch))
        models["int8"] = quantizer.quantize(out_dir / INT8_FILE)
        answers["int8"] = task_answers(models["int8"], dataset, "val")
        int8_accuracy, over_budget = judged("int8", answers["int8"])
        search: dict[str, object] = {"recipe": quantizer.recipe(()), "calibration_images": len(quantizer.images),
                                     "shape_nodes_not_quantized": len(quantizer.shape_nodes), "fp32_nodes": [],
                                     **({"head_nodes_not_quantized": len(quantizer.head_nodes)} if quantizer.head_nodes else {})}
        if not over_budget:
            search["stopped"] = "full int8 within budget"
            return models, answers, search
        lost = max(budget.fp32[task] - int8_accuracy[task] for task in budget.fp32)
        if cfg.max_fp32_nodes == 0 or lost > cfg.max_search_drop:
            search["stopped"] = ("compress.max_fp32_nodes is 0" if cfg.max_fp32_nodes == 0 else
                                 f"full int8 lost {lost:.4f}, more than "
                                 f"compress.max_search_drop={cfg.max_search_drop:g}: no mixed-precision search")
            log.info("int8: %s", search["stopped"])
            return models, answers, search
        rows = int8.node_sensitivity(quantizer.prepared, models["int8"], quantizer.images[: cfg.sensitivity_images],
                                Path(scratch), [*quantizer.shape_nodes, *quantizer.head_nodes])
        search["stopped"] = f"compress.max_fp32_nodes {cfg.max_fp32_nodes} reached over budget"
        excluded: list[str] = []
        for count in exclusion_steps(min(cfg.max_fp32_nodes, len(rows))):
            excluded = [name for row in rows[:count] for name in str(row["exclude"]).split()]
            name = f"{MIXED_PREFIX}{count}"
            models[name] = quantizer.quantize(out_dir / f"model_{name}.onnx", excluded)
            answers[name] = task_answers(models[name], dataset, "val")
            _, over_budget = judged(name, answers[name])
            if not over_budget:
                search["stopped"] = f"{name} within budget"
                break
        kept = set(excluded)
        for row in rows:
            row["kept_fp32"] = row["node"] in kept
        search["fp32_nodes"] = excluded
        search["ranked_nodes_kept"] = [row["node"] for row in rows if row["kept_fp32"]]
        csv_path, plot_path = write_sensitivity(rows, out_dir)
        search["sensitivity"] = {"csv": csv_path.name, "plot": plot_path.name}
    return models, answers, search


def dynamic_int8(cfg: CompressConfig, source: Path, dataset: Dataset,
                 out_dir: Path) -> tuple[dict[str, Path], dict[str, dict[str, np.ndarray]]]:
    """A text model as dynamic INT8 (onnxruntime.quantization.quantize_dynamic: MatMul and embedding weights in
    int8, activations quantized per batch at run time), checked and scored on val."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    metadata = read_metadata(source)
    target = out_dir / INT8_FILE
    partial = target.with_name(target.stem + ".partial.onnx")
    with tempfile.TemporaryDirectory(prefix="tlops-int8-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        int8.prepare(source, prepared, Path(scratch))
        quantize_dynamic(str(prepared), str(partial), weight_type=QuantType.QInt8, per_channel=cfg.per_channel,
                         reduce_range=cfg.reduce_range)
    recipe = (f"dynamic INT8: int8 weights{' (7-bit range)' if cfg.reduce_range else ''}, "
              f"{'per-channel' if cfg.per_channel else 'per-tensor'}, activations quantized per batch at run time")
    # Its activations are scaled over the whole call: scored and served one text per call (task_metadata.py).
    stamp_metadata(partial, metadata | {"quantization": recipe, "fp32_nodes": "", BATCH_INDEPENDENT_KEY: "false"})
    onnx.checker.check_model(str(partial), full_check=True)
    os.replace(partial, target)
    log.info("quantized -> %s (%s)", target.name, recipe)
    return {"int8": target}, {"int8": task_answers(target, dataset, "val")}
