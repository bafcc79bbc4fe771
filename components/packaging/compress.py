"""Compress: prune, quantize, and ship the smallest model that keeps its validation accuracy.

Candidates are the exported FP32 model, the pruned export (when compress.prune is
`unstructured` or `structured`: see components/packaging/pruning.py) and a post-training static INT8
model (of the pruned one if present). When full INT8 loses more than
`max_accuracy_drop`, a budgeted mixed-precision search keeps the nodes whose quantization hurts
most (lowest SQNR, measured with onnxruntime.quantization.qdq_loss_debug) in FP32, a growing
number at a time, up to `max_fp32_nodes`; each step is a candidate. The search is skipped when full
INT8 loses more than `max_search_drop`, where no number of FP32 nodes has ever recovered it. Every
candidate is scored on the val split and timed at batch 1 and 32 in ONNX Runtime in the same run,
with the same threads, each alternating round by round with FP32.

A model of several tasks (one output each) counts every task in the budget: a candidate is within it
only if each task keeps its val accuracy within `max_accuracy_drop` of FP32's.

The budget also bounds how many answers a candidate changes: each task's val answers must agree with
FP32's on at least `min_agreement` of the images. Accuracy alone cannot see flips that cancel out: on
ELPV four-class, INT8 changed 8% of the answers, gained on val (0.738 vs 0.723) and lost 2.2 points on
test; the binary model's INT8 changes 2% (8 of 386 val cells).

What ships depends on `objective`. `size` (the default): the most compressed candidate within the
accuracy budget, decided by val accuracy alone, so the same inputs ship the same model on every
machine; latencies are recorded, not deciding. `latency`: it must also be no slower than FP32 (at most
`max_latency_ratio` times its latency at each batch size) on this machine, which is then recorded as
the serving CPU (and must be `serving_cpu` when that is set). That rule exists because speed is the
CPU's: keeping many nodes in FP32 adds a Quantize/Dequantize pair at every border (Lite2 with 32 FP32
nodes: 1.14x FP32's latency at batch 32), and full INT8 of the ELPV model ran 0.41x FP32's latency on
an AVX-512 VNNI EPYC but 1.08x on an AVX2-only one. Otherwise FP32 ships, and the reason is recorded.

The INT8 recipe and its reasons are in components/models/quantization.py.

A text model (`modality: text` in its metadata) gets dynamic INT8 instead, the norm for transformers:
int8 weights, activations quantized at run time per batch, so no calibration texts are needed and
nothing sensitive to a calibration set's ranges ships (`dynamic_int8`). It is a candidate like any
other: within the same accuracy budget, under the same objective, timed the same way.
"""

from __future__ import annotations

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

import numpy as np
import onnx

from components.core.cpu import describe_cpu
from components.core.errors import UserError
from components.core.result import StageResult, write_json
from components.data.manifest import Dataset
from components.data.tokenization import is_text_metadata
from components.models import quantization as int8
from components.models.onnx_io import (
    model_feeds,
    model_preprocessing,
    open_session,
    predict_tasks,
    read_metadata,
    stamp_metadata,
)
from components.models.task_metadata import BATCH_INDEPENDENT_KEY
from components.packaging.config import SHIPPED_FILE, CompressConfig

log = logging.getLogger(__name__)

INT8_FILE = "model_int8.onnx"
REPORT_FILE = "compress.json"
SENSITIVITY_FILE = "sensitivity.csv"
SENSITIVITY_PLOT = "sensitivity.png"
LATENCY_BATCHES = (1, 32)
MIXED_PREFIX = "int8_fp32x"  # int8_fp32x4: INT8 with its 4 most sensitive nodes kept in FP32

class ExportChangedError(UserError):
    """The export folder's files no longer match what export recorded."""


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


def task_answers(model_path: Path, dataset: Dataset, split: str, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Each of the model's tasks' answer (a class index) per `split` image, the primary first, from one pass."""
    frame = dataset.split(split)
    if frame.empty:
        raise ValueError(f"the dataset has no `{split}` rows to measure {model_path.name}'s accuracy on.")
    return {task.name: scores.argmax(axis=1) for task, scores in predict_tasks(model_path, dataset, frame, batch_size).items()}


def accuracies(answers: dict[str, np.ndarray], dataset: Dataset, split: str) -> dict[str, float]:
    """Each task's accuracy of `answers` (task_answers) on `split`."""
    views = {task: dataset.for_task(task) for task in answers}
    return {task: float(np.mean(given == np.asarray(views[task].label_index(views[task].split(split)))))
            for task, given in answers.items()}


def agreement(answers: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """The share of images on which `answers` match `reference`'s, in the task where they match least."""
    return min(float(np.mean(answers[task] == reference[task])) for task in reference)


def task_accuracies(model_path: Path, dataset: Dataset, split: str, batch_size: int = 32) -> dict[str, float]:
    """Accuracy of each of the model's tasks (the primary first) on `split`, from one pass of the model."""
    return accuracies(task_answers(model_path, dataset, split, batch_size), dataset, split)


def onnx_accuracy(model_path: Path, dataset: Dataset, split: str, batch_size: int = 32) -> float:
    """The primary task's accuracy on `split`."""
    return next(iter(task_accuracies(model_path, dataset, split, batch_size).values()))


def secondary(accuracies: dict[str, float]) -> dict[str, float]:
    """The tasks after the primary one."""
    return dict(list(accuracies.items())[1:])


def latencies_ms(models: dict[str, Path], inputs: dict[str, np.ndarray], threads: int, runs: int,
                 baseline: str = "fp32") -> dict[str, dict[int, float]]:
    """Median wall time (ms) of one session.run of each model at each batch size in LATENCY_BATCHES.

    Like for like: each model is timed against `baseline` with the same inputs and threads, both sessions warmed
    up and alternating round by round, so a burst of load on a shared machine falls on both rather than on one.
    Only that pair is open at a time: a session holds its largest run's memory (2.1 GB for a four-view Lite0 at
    batch 32), and seven candidates' sessions open together were killed for memory on a 24 GB machine. The
    baseline's figure is the median of its samples over every pair.
    """
    samples: dict[str, dict[int, list[float]]] = {name: {batch: [] for batch in LATENCY_BATCHES} for name in models}
    others = [name for name in models if name != baseline] or [baseline]
    for other in others:
        pair = {name: open_session(models[name], threads) for name in dict.fromkeys([baseline, other])}
        for batch_size in LATENCY_BATCHES:
            batch = {key: np.ascontiguousarray(np.resize(value, (batch_size, *value.shape[1:]))) for key, value in inputs.items()}
            for session in pair.values():
                session.run(None, batch)
            for _ in range(runs):
                for name, session in pair.items():
                    start = time.perf_counter()
                    session.run(None, batch)
                    samples[name][batch_size].append((time.perf_counter() - start) * 1e3)
        del pair  # released before the next pair opens: rebinding would hold both pairs while the new one loads
    return {name: {batch: statistics.median(values) for batch, values in by_batch.items()} for name, by_batch in samples.items()}


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


def choose(
    accuracy: dict[str, float], max_drop: float, latency_ratio: dict[str, float] | None = None,
    max_latency_ratio: float | None = None, others: dict[str, dict[str, float]] | None = None,
    agreement: dict[str, float] | None = None, min_agreement: float = 0.0,
) -> tuple[str, str, dict[str, bool]]:
    """(shipped candidate, reason, within-budget flags) under the FP32-relative accuracy budget.

    `latency_ratio` is each candidate's worst latency over FP32's across the timed batch sizes; with
    `max_latency_ratio` set, a candidate slower than that is passed over whatever its accuracy.
    `others`: a model of several tasks, each candidate's accuracy on the tasks after the primary one; every
    task must keep within `max_drop` of FP32's accuracy on it.
    `agreement`: each candidate's share of val answers that match FP32's (in its worst task); a candidate below
    `min_agreement` is over budget whatever its accuracy.
    """
    baseline = accuracy["fp32"]
    floor = baseline - max_drop
    others = others or {name: {} for name in accuracy}
    # The tolerance keeps k/n accuracies that meet the floor exactly from failing on rounding.
    lost = {name: [task for task, value in others[name].items() if value < others["fp32"][task] - max_drop - 1e-9]
            for name in accuracy}
    agreement = agreement or {}
    disagrees = {name: agreement.get(name, 1.0) < min_agreement - 1e-9 for name in accuracy}
    within = {name: value >= floor - 1e-9 and not lost[name] and not disagrees[name] for name, value in accuracy.items()}
    fast = {name: name == "fp32" or max_latency_ratio is None or latency_ratio is None
            or latency_ratio[name] <= max_latency_ratio for name in accuracy}
    budget = f"val accuracy >= {floor:.4f} (fp32 {baseline:.4f} - compress.max_accuracy_drop {max_drop:g})"
    if others["fp32"]:
        budget += f" on every task ({', '.join(f'{task} >= {value - max_drop:.4f}' for task, value in others['fp32'].items())})"
    if min_agreement > 0:
        budget += f", agreeing with fp32 on >= {min_agreement:.1%} of val answers (compress.min_agreement)"
    if max_latency_ratio is not None and latency_ratio is not None:
        budget += f" and latency <= {max_latency_ratio:g}x fp32's (compress.max_latency_ratio)"
    ranked = compression_order(list(accuracy))
    passing = [name for name in ranked if within[name] and fast[name]]
    shipped = passing[0]  # fp32 always passes
    passed_over = []
    for name in ranked[: ranked.index(shipped)]:
        why = [f"{accuracy[name]:.4f}"] if accuracy[name] < floor - 1e-9 else []
        why += [f"{task} {others[name][task]:.4f}" for task in lost[name]]
        why += [f"{agreement[name]:.1%} agreement"] if disagrees[name] else []
        why += [] if fast[name] else [f"{latency_ratio[name]:.2f}x fp32's latency"]
        passed_over.append(f"{name} {' and '.join(why)}")
    reason = f"{shipped} is the most compressed candidate with {budget}: {accuracy[shipped]:.4f}"
    if passed_over:
        reason += f"; more compressed but over budget: {', '.join(passed_over)}"
    if len(ranked) == 1:
        reason += " (the only candidate: compress.quantize is off and export wrote no pruned model)"
    return shipped, reason, within


def search_int8(
    cfg: CompressConfig, source: Path, dataset: Dataset, fp32_answers: dict[str, np.ndarray], out_dir: Path
) -> tuple[dict[str, Path], dict[str, dict[str, np.ndarray]], dict[str, object]]:
    """Full INT8, then (over budget) ever more of the most sensitive nodes in FP32 until within budget or capped.

    `fp32_answers`: the FP32 model's val answers per task (the primary first); every task counts in the
    budget, by accuracy and by agreement with these. Returns the candidate files, their val answers per task
    and what the search did.
    """
    fp32_accuracy = accuracies(fp32_answers, dataset, "val")
    floor = {task: value - cfg.max_accuracy_drop for task, value in fp32_accuracy.items()}

    def within(answers: dict[str, np.ndarray]) -> bool:
        scores = accuracies(answers, dataset, "val")
        return (all(scores[task] >= floor[task] - 1e-9 for task in floor)
                and agreement(answers, fp32_answers) >= cfg.min_agreement - 1e-9)

    def describe(answers: dict[str, np.ndarray]) -> str:
        scores = accuracies(answers, dataset, "val")
        return (", ".join(f"{task} {value:.4f} (floor {floor[task]:.4f})" for task, value in scores.items())
                + f"; agrees with fp32 on {agreement(answers, fp32_answers):.1%} (min {cfg.min_agreement:.1%})")

    models, answers = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        quantizer = Quantizer(cfg, source, dataset, Path(scratch))
        models["int8"] = quantizer.quantize(out_dir / INT8_FILE)
        answers["int8"] = task_answers(models["int8"], dataset, "val")
        log.info("int8: val accuracy %s", describe(answers["int8"]))
        search: dict[str, object] = {"recipe": quantizer.recipe(()), "calibration_images": len(quantizer.images),
                                     "shape_nodes_not_quantized": len(quantizer.shape_nodes), "fp32_nodes": [],
                                     **({"head_nodes_not_quantized": len(quantizer.head_nodes)} if quantizer.head_nodes else {})}
        if within(answers["int8"]):
            search["stopped"] = "full int8 within budget"
            return models, answers, search
        int8_accuracy = accuracies(answers["int8"], dataset, "val")
        lost = max(fp32_accuracy[task] - int8_accuracy[task] for task in fp32_accuracy)
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
            log.info("%s: val accuracy %s", name, describe(answers[name]))
            if within(answers[name]):
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


def check_serving_cpu(cfg: CompressConfig) -> dict[str, object]:
    """This machine's CPU; refused before any work when objective=latency names another serving CPU."""
    here = describe_cpu()
    if cfg.objective == "latency" and cfg.serving_cpu and cfg.serving_cpu.lower() not in str(here["model"]).lower():
        raise UserError(f"compress.objective=latency times candidates on this machine ({here['model']}, "
                        f"{', '.join(here['flags'])}), but compress.serving_cpu is {cfg.serving_cpu!r}: run compress on "
                        f"the serving CPU, or set compress.objective=size to ship by accuracy and size alone.")
    return here


def run(cfg: CompressConfig, export_dir: Path, dataset: Dataset, out_dir: Path) -> StageResult:
    serving_cpu = check_serving_cpu(cfg)
    exported = StageResult.load(export_dir)
    if not exported.is_intact():
        raise ExportChangedError(f"{export_dir}: the exported files changed since export wrote them; re-run export.")
    candidates = {name: path for name, path in exported.artifacts.items() if name in ("fp32", "pruned")}
    if "fp32" not in candidates:
        raise KeyError(f"{export_dir}: the export result lists no `fp32` model; re-run export.")
    out_dir.mkdir(parents=True, exist_ok=True)
    answers = {name: task_answers(path, dataset, "val") for name, path in candidates.items()}
    search: dict[str, object] = {}
    texts = is_text_metadata(read_metadata(candidates["fp32"]))
    if cfg.quantize and texts:
        int8_models, int8_answers = dynamic_int8(cfg, candidates["fp32"], dataset, out_dir)
        candidates |= int8_models
        answers |= int8_answers
        search = {"method": "dynamic", "stopped": "text models are quantized dynamically: no mixed-precision search"}
    elif cfg.quantize:
        source = candidates.get("pruned", candidates["fp32"])
        int8_models, int8_answers, search = search_int8(cfg, source, dataset, answers["fp32"], out_dir)
        candidates |= int8_models
        answers |= int8_answers
    per_task = {name: accuracies(given, dataset, "val") for name, given in answers.items()}
    agrees = {name: agreement(given, answers["fp32"]) for name, given in answers.items()}
    accuracy = {name: next(iter(scores.values())) for name, scores in per_task.items()}  # the primary task's
    others = {name: secondary(scores) for name, scores in per_task.items()}

    timing_inputs = model_feeds(candidates["fp32"], read_metadata(candidates["fp32"]),
                                [dataset.image_path(p) for p in dataset.split("val")["path"].head(8)])
    latency = latencies_ms(candidates, timing_inputs, cfg.latency_threads, cfg.latency_runs)
    ratio = {name: {batch: latency[name][batch] / latency["fp32"][batch] for batch in LATENCY_BATCHES}
             for name in candidates}
    speed_rule = cfg.max_latency_ratio if cfg.objective == "latency" else None
    shipped, reason, within = choose(accuracy, cfg.max_accuracy_drop, {n: max(r.values()) for n, r in ratio.items()},
                                     speed_rule, others, agrees, cfg.min_agreement)
    log.info("shipping %s: %s", shipped, reason)

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
                **({"val_accuracy_tasks": per_task[name]} if others[name] else {}),
                "val_agreement_fp32": agrees[name],
                "within_budget": within[name],
                "latency_ms_batch1": latency[name][1],
                "latency_ms_batch32": latency[name][32],
                "latency_ratio_fp32_batch1": ratio[name][1],
                "latency_ratio_fp32_batch32": ratio[name][32],
            }
            for name, path in candidates.items()
        },
        "val_images": len(dataset.split("val")),
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "min_agreement": cfg.min_agreement,
        "latency_threads": cfg.latency_threads,
        "objective": cfg.objective,
        "max_latency_ratio": cfg.max_latency_ratio if cfg.objective == "latency" else None,
        # The CPU the latencies were measured on; with objective=latency, the CPU the choice holds for.
        "latency_cpu": serving_cpu,
        "int8_search": search,
        "pruning": exported.info.get("pruning") or ({"method": "unstructured magnitude", "sparsity": exported.info["sparsity"]}
                                                    if "pruned" in candidates else None),
        "shipped": shipped,
        "reason": reason,
    }
    report_path = write_json(out_dir / REPORT_FILE, report)

    metrics = {f"val_accuracy_{name}": value for name, value in accuracy.items()}
    metrics |= {f"val_accuracy_{name}.{task}": value for name, scores in others.items() for task, value in scores.items()}
    metrics |= {f"val_agreement_fp32_{name}": value for name, value in agrees.items()}
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
