"""Compress: pruning reaches its sparsity, INT8 is smaller, and the budget decides what ships."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pydantic
import pytest
import torch
from torch import nn

from components.core.errors import UserError
from components.core.result import sha256_file
from components.features import extract as features
from components.features.config import FeaturesConfig
from components.models.classifier import load_checkpoint
from components.models.onnx_io import predict_frame, read_metadata
from components.models.quantization import shape_arithmetic_nodes
from components.packaging import export
from components.packaging.budget import Budget
from components.packaging.compress import ExportChangedError, choose, compression_order, run
from components.packaging.config import CompressConfig
from components.packaging.int8_search import exclusion_steps
from components.packaging.pruning import prune_model
from tests.tiny_features import make_features
from tests.tiny_model import IMAGE_SIZE, make_checkpoint, make_dataset
from tlops.config import ConfigError, load_params


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("compress")
    dataset = make_dataset(root / "data")
    checkpoint = make_checkpoint(root / "model.pt", dataset)
    export.run(export.ExportConfig(), 0.0, checkpoint, dataset, root / "export",
               features_dir=make_features(dataset, root))
    return root, dataset


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def weight_zeros(model: nn.Module) -> tuple[int, int]:
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_prune_model_reaches_the_requested_sparsity_on_a_copy(sparsity: float) -> None:
    model = small_net()
    before = [p.detach().clone() for p in model.parameters()]
    pruned = prune_model(model, sparsity)
    zeros, total = weight_zeros(pruned)
    assert zeros == round(sparsity * total)
    assert not any(name.endswith(("_orig", "_mask")) for name, _ in pruned.named_parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the input is untouched
    assert weight_zeros(model)[0] == 0


@pytest.mark.parametrize("sparsity", [1.5, 1.0, -0.1])
def test_prune_model_rejects_sparsity_outside_unit_interval(sparsity: float) -> None:
    with pytest.raises(ValueError, match="compress.sparsity must be in"):
        prune_model(small_net(), sparsity)



def choose_by_accuracy(accuracy: dict[str, float], max_drop: float, latency_ratio: dict[str, float] | None = None,
                       max_latency_ratio: float | None = None, agreement: dict[str, float] | None = None,
                       min_agreement: float = 0.0) -> tuple[str, str, dict[str, bool]]:
    """`choose` for a model of one task, `label`."""
    per_task = {name: {"label": value} for name, value in accuracy.items()}
    return choose(per_task, Budget(per_task["fp32"], max_drop, min_agreement), agreement, latency_ratio, max_latency_ratio)


def test_choose_ships_the_most_compressed_candidate_within_budget() -> None:
    shipped, reason, within = choose_by_accuracy({"fp32": 0.90, "pruned": 0.895, "int8": 0.85}, max_drop=0.01)
    assert shipped == "pruned" and within == {"fp32": True, "pruned": True, "int8": False}
    assert "int8 0.8500" in reason
    assert choose_by_accuracy({"fp32": 0.90, "int8": 0.89}, max_drop=0.01)[0] == "int8"  # exactly at the floor
    assert choose_by_accuracy({"fp32": 0.90}, max_drop=0.01)[0] == "fp32"
    # Within the accuracy budget, but changing too many answers: over budget, and the reason says why.
    agreeing = {"fp32": 1.0, "int8": 0.92}
    shipped, reason, within = choose_by_accuracy({"fp32": 0.90, "int8": 0.91}, 0.01, agreement=agreeing, min_agreement=0.95)
    assert shipped == "fp32" and not within["int8"] and reason.endswith("over budget: int8 92.0% agreement")
    assert choose_by_accuracy({"fp32": 0.90, "int8": 0.91}, 0.01, agreement=agreeing, min_agreement=0.92)[0] == "int8"


def test_choose_prefers_fewer_fp32_nodes_and_says_when_nothing_fits() -> None:
    assert compression_order(["fp32", "int8_fp32x4", "pruned", "int8_fp32x1", "int8"]) == [
        "int8", "int8_fp32x1", "int8_fp32x4", "pruned", "fp32"]
    shipped, reason, _ = choose_by_accuracy({"fp32": 0.90, "int8": 0.80, "int8_fp32x1": 0.88, "int8_fp32x2": 0.895}, 0.01)
    assert shipped == "int8_fp32x2" and "int8 0.8000, int8_fp32x1 0.8800" in reason
    shipped, reason, within = choose_by_accuracy({"fp32": 0.90, "int8": 0.80}, 0.0)
    assert shipped == "fp32" and within == {"fp32": True, "int8": False}
    assert reason.startswith("fp32 is the most compressed candidate with val accuracy >= 0.9000")
    assert reason.endswith("more compressed but over budget: int8 0.8000")
    assert exclusion_steps(16) == [1, 2, 4, 8, 16] and exclusion_steps(3) == [1, 2, 3] and exclusion_steps(0) == []


def test_choose_passes_over_a_candidate_slower_than_fp32() -> None:
    accuracy = {"fp32": 0.90, "int8": 0.80, "int8_fp32x32": 0.895}
    # Within the accuracy budget, but 1.14x FP32's latency at its worst batch size: FP32 ships.
    shipped, reason, within = choose_by_accuracy(accuracy, 0.01, {"fp32": 1.0, "int8": 0.6, "int8_fp32x32": 1.14}, 1.05)
    assert shipped == "fp32" and within["int8_fp32x32"]
    assert reason.endswith("over budget: int8 0.8000, int8_fp32x32 1.14x fp32's latency")
    assert "latency <= 1.05x fp32's (compress.max_latency_ratio)" in reason
    # Just as fast is fast enough, and null judges by size alone.
    assert choose_by_accuracy(accuracy, 0.01, {"fp32": 1.0, "int8": 0.6, "int8_fp32x32": 1.05}, 1.05)[0] == "int8_fp32x32"
    assert choose_by_accuracy(accuracy, 0.01, {"fp32": 1.0, "int8": 0.6, "int8_fp32x32": 1.14}, None)[0] == "int8_fp32x32"
    both = choose_by_accuracy({"fp32": 0.90, "int8": 0.80}, 0.01, {"fp32": 1.0, "int8": 1.3}, 1.05)[1]
    assert both.endswith("over budget: int8 0.8000 and 1.30x fp32's latency")


@pytest.mark.parametrize(
    ("key", "value"),
    [("sparsity", 1.0), ("max_accuracy_drop", -1.0), ("max_accuracy_drop", 1.5), ("calibration_images", 0),
     ("calibration_method", "kl"), ("max_fp32_nodes", -1), ("activation_type", "int4"), ("max_latency_ratio", 0)],
)
def test_bad_compress_config_is_refused_when_params_load(key: str, value: object) -> None:
    with pytest.raises(pydantic.ValidationError):
        CompressConfig(**{key: value})
    with pytest.raises(ConfigError, match=f"compress.{key}"):
        load_params(None, [f"compress.{key}={json.dumps(value)}"])


def test_an_export_whose_files_changed_is_refused(exported, tmp_path: Path) -> None:
    root, dataset = exported
    copied = shutil.copytree(root / "export", tmp_path / "export")
    with open(copied / "model_fp32.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ExportChangedError, match="re-run export"):
        run(CompressConfig(calibration_images=4), copied, dataset, tmp_path / "compress")
    assert not (tmp_path / "compress" / "compress.json").exists()


def test_compress_quantizes_to_a_smaller_int8_model_and_ships_it(exported) -> None:
    root, dataset = exported
    # A budget of 1.0 and no agreement floor admit any answers, so the decision cannot depend on a random head; nor
    # on timing (the default objective, size, decides by accuracy and size alone).
    result = run(CompressConfig(max_accuracy_drop=1.0, min_agreement=0.0, calibration_images=4, latency_runs=1),
                 root / "export", dataset, root / "lenient")
    report = json.loads((root / "lenient" / "compress.json").read_text())
    assert set(report["candidates"]) == {"fp32", "int8"}
    assert report["candidates"]["int8"]["size_mb"] < 0.5 * report["candidates"]["fp32"]["size_mb"]
    assert report["shipped"] == result.info["shipped"] == "int8"
    assert result.metrics["size_ratio_int8"] < 0.5
    # Full INT8 met the budget: no node was kept in FP32 and no sensitivity search ran.
    assert report["int8_search"]["fp32_nodes"] == [] and report["int8_search"]["stopped"] == "full int8 within budget"
    assert not (root / "lenient" / "sensitivity.csv").exists()
    for name, entry in report["candidates"].items():
        assert entry["latency_ms_batch1"] > 0 and entry["latency_ms_batch32"] > entry["latency_ms_batch1"]
        assert result.metrics[f"latency_ms_b32_{name}"] == entry["latency_ms_batch32"]
    shipped = read_metadata(result.artifacts["model"])
    assert shipped["compression"] == "int8"
    assert shipped["labels"] == json.dumps(list(dataset.labels))
    assert shipped["input_size"] == "64"
    assert float(shipped["val_accuracy"]) == pytest.approx(result.metrics["val_accuracy_int8"], abs=1e-6)
    assert report["objective"] == "size" and report["max_latency_ratio"] is None
    assert report["latency_cpu"]["model"] and isinstance(report["latency_cpu"]["flags"], list)
    for entry in report["candidates"].values():
        assert entry["latency_ratio_fp32_batch32"] == pytest.approx(
            entry["latency_ms_batch32"] / report["candidates"]["fp32"]["latency_ms_batch32"])


def test_compress_ships_fp32_when_no_candidate_is_fast_enough(exported) -> None:
    root, dataset = exported
    # No INT8 model runs in a millionth of FP32's time: with objective=latency, the speed rule alone decides.
    result = run(CompressConfig(max_accuracy_drop=1.0, min_agreement=0.0, calibration_images=4, latency_runs=1,
                                objective="latency",
                                max_latency_ratio=1e-6), root / "export", dataset, root / "too_slow")
    report = json.loads((root / "too_slow" / "compress.json").read_text())
    assert report["candidates"]["int8"]["within_budget"] is True
    assert report["shipped"] == result.info["shipped"] == "fp32"
    assert "int8 " in report["reason"] and "x fp32's latency" in report["reason"]
    assert read_metadata(result.artifacts["model"])["compression"] == "fp32"


def test_shape_arithmetic_is_left_in_float(exported) -> None:
    """TF-style padding computes pad widths from Shape in float; quantizing that math breaks the pads."""
    root, _ = exported
    prepared = onnx.load(str(root / "export" / "model_fp32.onnx")).graph
    shape_nodes = set(shape_arithmetic_nodes(prepared))
    assert any(name.endswith("/Shape") for name in shape_nodes)
    assert not any(node.op_type == "Conv" for node in prepared.node if node.name in shape_nodes)
    int8 = onnx.load(str(root / "lenient" / "model_int8.onnx")).graph
    dequantized = {o for node in int8.node if node.op_type == "DequantizeLinear" for o in node.output}
    pads = [node for node in int8.node if node.op_type == "Pad"]
    assert pads and all(node.input[1] not in dequantized for node in pads)
    assert any(node.input[0] in dequantized for node in pads)  # the feature maps themselves are quantized


def test_a_head_on_joined_taps_stays_fp32_and_a_head_on_one_tap_is_quantized(exported, tmp_path: Path) -> None:
    """`linear` joins standardised taps; one uint8 scale over them rounded Lite1's probe from 0.86 to 0.41 val."""
    root, dataset = exported
    checkpoint = make_checkpoint(tmp_path / "joined.pt", dataset, taps=("pooled", "stage5", "stage3"))
    features.run(FeaturesConfig(image_size=IMAGE_SIZE, batch_size=16, taps=("pooled", "stage5", "stage3")),
                 ("efficientnet_lite0",), dataset, root / "feature_cache", tmp_path / "features")
    export.run(export.ExportConfig(), 0.0, checkpoint, dataset, tmp_path / "export", features_dir=tmp_path / "features")
    run(CompressConfig(max_accuracy_drop=1.0, calibration_images=4, latency_runs=1), tmp_path / "export", dataset,
        tmp_path / "compress")

    def quantized_inputs(path: Path, op_type: str) -> list[list[bool]]:  # per node: which inputs are dequantized
        graph = onnx.load(str(path)).graph
        dequantized = {o for node in graph.node if node.op_type == "DequantizeLinear" for o in node.output}
        return [[name in dequantized for name in node.input[:3]] for node in graph.node if node.op_type == op_type
                and (op_type != "Concat" or node.output[0] in {n.input[0] for n in graph.node if n.op_type == "Gemm"})]

    joined = tmp_path / "compress" / "model_int8.onnx"
    assert quantized_inputs(joined, "Gemm") == [[False, False, False]]  # the joined taps, the head's weights: FP32
    # No scale spans the joined taps: the pooled tap keeps its own (as a one-tap head's input), the stage means none.
    assert quantized_inputs(joined, "Concat") == [[True, False, False]]
    assert all(inputs[:2] == [True, True] for inputs in quantized_inputs(joined, "Conv"))  # the trunk is INT8
    assert quantized_inputs(root / "lenient" / "model_int8.onnx", "Gemm")[0][:2] == [True, True]  # one tap: quantized


def near_boundary_checkpoint(root: Path, dataset, source: Path) -> Path:
    """The tiny model's head with its bias moved so that INT8 noise flips a val image FP32 gets right.

    A random head on 4 val images rarely loses accuracy to INT8; this one does, so a zero budget
    forces the mixed-precision search on a real model instead of faking it.
    """
    frame = dataset.split("val")
    truth = np.asarray(dataset.label_index(frame))
    margins = {}
    for name in ("model_fp32.onnx", "model_int8.onnx"):
        folder = root / ("export" if name == "model_fp32.onnx" else "lenient")
        logits = predict_frame(folder / name, dataset, frame)
        margins[name] = logits[:, 0] - logits[:, 1]
    fp32, int8 = margins["model_fp32.onnx"], margins["model_int8.onnx"]

    def accuracy(margin: np.ndarray, shift: float) -> float:
        return float(np.mean(np.where(margin + shift > 0, 0, 1) == truth))

    edges = np.sort(np.concatenate([-fp32, -int8]))
    shifts = (edges[:-1] + edges[1:]) / 2
    # Largest FP32-over-INT8 gap; among those, the shift farthest from any flip point.
    best = max(shifts, key=lambda s: (accuracy(fp32, s) - accuracy(int8, s), np.min(np.abs(edges - s))))
    assert accuracy(fp32, best) > accuracy(int8, best)
    checkpoint = load_checkpoint(source)
    checkpoint["head"]["bias"][0] += float(best)
    torch.save(checkpoint, root / "near_boundary.pt")
    return root / "near_boundary.pt"


def test_a_tight_budget_keeps_the_most_sensitive_nodes_in_fp32(exported) -> None:
    root, dataset = exported
    checkpoint = near_boundary_checkpoint(root, dataset, root / "model.pt")
    export.run(export.ExportConfig(), 0.0, checkpoint, dataset, root / "export_tight",
               features_dir=root / "features")
    # Speed is left out of the decision (the speed rule has its own test): at 64 px one timing run can put the
    # mixed model 1.07x behind FP32 at batch 1 and 0.4x at batch 32, which would make the outcome a coin toss.
    cfg = CompressConfig(max_accuracy_drop=0.0, calibration_images=4, max_fp32_nodes=2, sensitivity_images=2,
                         latency_runs=1, max_search_drop=1.0)
    # A loss beyond max_search_drop is taken as hopeless: no search, no mixed-precision candidate.
    hopeless = run(cfg.model_copy(update={"max_search_drop": 0.0}), root / "export_tight", dataset, root / "hopeless")
    stopped = json.loads((root / "hopeless" / "compress.json").read_text())["int8_search"]["stopped"]
    assert "compress.max_search_drop=0: no mixed-precision search" in stopped
    assert hopeless.info["shipped"] == "fp32" and not (root / "hopeless" / "sensitivity.csv").exists()
    assert not [name for name in json.loads((root / "hopeless" / "compress.json").read_text())["candidates"]
                if name.startswith("int8_fp32x")]
    result = run(cfg, root / "export_tight", dataset, root / "tight")
    report = json.loads((root / "tight" / "compress.json").read_text())
    search = report["int8_search"]
    assert report["candidates"]["int8"]["within_budget"] is False
    assert 1 <= len(search["ranked_nodes_kept"]) <= 2
    assert set(search["ranked_nodes_kept"]) <= set(search["fp32_nodes"])
    assert "int8_fp32x1" in report["candidates"]
    with open(root / "tight" / "sensitivity.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    graph_nodes = {node.name for node in onnx.load(str(root / "export_tight" / "model_fp32.onnx")).graph.node}
    assert rows and {row["node"] for row in rows} <= graph_nodes
    kept = search["ranked_nodes_kept"]
    assert [row["node"] for row in rows[: len(kept)]] == kept
    assert [row["kept_fp32"] for row in rows].count("True") == len(kept)
    assert {name for row in rows[: len(kept)] for name in row["exclude"].split()} == set(search["fp32_nodes"])
    lost = [float(row["sqnr_lost_db"]) for row in rows]
    assert lost == sorted(lost, reverse=True)
    assert (root / "tight" / "sensitivity.png").stat().st_size > 1000
    assert result.artifacts["sensitivity"] == root / "tight" / "sensitivity.csv"
    for name, entry in report["candidates"].items():
        assert entry["latency_ms_batch1"] > 0 and entry["latency_ms_batch32"] > 0, name
    # The search stopped at the first mixed model back within budget, and that model ships.
    mixed = f"int8_fp32x{len(kept)}"
    assert search["stopped"] == f"{mixed} within budget" and report["candidates"][mixed]["within_budget"]
    assert report["shipped"] == result.info["shipped"] == mixed
    assert read_metadata(result.artifacts["model"])["compression"] == mixed
    assert "more compressed but over budget: int8 " in report["reason"]


def test_a_candidate_that_changes_too_many_answers_is_over_budget_whatever_its_accuracy(exported) -> None:
    root, dataset = exported
    checkpoint = near_boundary_checkpoint(root, dataset, root / "model.pt")
    export.run(export.ExportConfig(), 0.0, checkpoint, dataset, root / "export_flips", features_dir=root / "features")
    # Accuracy admits anything and no mixed-precision search runs: agreement with FP32 alone decides.
    cfg = CompressConfig(max_accuracy_drop=1.0, calibration_images=4, max_fp32_nodes=0, latency_runs=1)
    strict = run(cfg.model_copy(update={"min_agreement": 1.0}), root / "export_flips", dataset, root / "flips_strict")
    frame = dataset.split("val")
    fp32, int8 = (predict_frame(path, dataset, frame).argmax(axis=1) for path in
                  (root / "export_flips" / "model_fp32.onnx", root / "flips_strict" / "model_int8.onnx"))
    agreement = float(np.mean(fp32 == int8))
    assert agreement < 1.0  # the moved bias puts a val image where INT8 noise flips it
    report = json.loads((root / "flips_strict" / "compress.json").read_text())
    assert report["candidates"]["int8"]["val_agreement_fp32"] == pytest.approx(agreement)
    assert report["candidates"]["fp32"]["val_agreement_fp32"] == 1.0 and report["min_agreement"] == 1.0
    assert strict.info["shipped"] == "fp32" and not report["candidates"]["int8"]["within_budget"]
    assert report["reason"].endswith(f"over budget: int8 {agreement:.1%} agreement")
    assert strict.metrics["val_agreement_fp32_int8"] == pytest.approx(agreement)
    lenient = run(cfg.model_copy(update={"min_agreement": agreement}), root / "export_flips", dataset, root / "flips_ok")
    assert lenient.info["shipped"] == "int8"


def test_compress_ships_the_same_model_twice_from_the_same_inputs(exported) -> None:
    # What ships is a function of the data and params: two runs on the same export ship the same bytes, whatever
    # the two runs' timings (which are recorded, and differ).
    root, dataset = exported
    config = CompressConfig(max_accuracy_drop=0.02, calibration_images=8, latency_runs=2, max_fp32_nodes=2)
    first, second = (run(config, root / "export", dataset, root / name) for name in ("once", "twice"))
    assert first.info["shipped"] == second.info["shipped"] and first.info["reason"] == second.info["reason"]
    assert sha256_file(first.artifacts["model"]) == sha256_file(second.artifacts["model"])


def test_latency_on_another_cpu_than_the_serving_one_is_refused_before_any_work(exported, tmp_path: Path) -> None:
    root, dataset = exported
    with pytest.raises(UserError, match="compress.serving_cpu is 'Imaginary CPU 9000'"):
        run(CompressConfig(objective="latency", serving_cpu="Imaginary CPU 9000"), root / "export", dataset,
            tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()
    # Params written before `objective` existed said "size alone" with max_latency_ratio: null; they still load.
    legacy = CompressConfig.model_validate({"max_latency_ratio": None})
    assert legacy.objective == "size" and legacy.max_latency_ratio == 1.05
