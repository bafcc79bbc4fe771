"""Channel pruning: fewer params, MACs and conv channels in the exported file, parity kept, recovery reported."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

from components.data.manifest import Dataset
from components.models.backbones import build_trunk
from components.models.classifier import Classifier
from components.models.onnx_io import read_metadata
from components.models.registry import get_entry
from components.packaging import compress, export
from components.packaging.config import ChannelPruning
from components.packaging.pruning import macs_and_params, prune_channels
from tests.tiny_features import make_features
from tests.tiny_model import IMAGE_SIZE, make_checkpoint
from tlops.config import ConfigError, load_params

REPO = Path(__file__).resolve().parents[1]
RATIO = 0.3
SPEC = ChannelPruning(RATIO, round_to=8, recovery_epochs=2, recovery_lr=1e-4, recovery_batch_size=16,
                      recovery_patience=2)


@pytest.fixture(scope="module")
def pruned_export(tmp_path_factory: pytest.TempPathFactory, elpv_small: Dataset):
    root = tmp_path_factory.mktemp("pruning")
    features_dir = make_features(elpv_small, root)
    checkpoint = make_checkpoint(root / "model.pt", elpv_small)
    result = export.run(export.ExportConfig(parity_images=8), 0.0, checkpoint, elpv_small, root / "export",
                        features_dir=features_dir, channel_pruning=SPEC)
    return root, result


def conv_channels(path: Path) -> dict[str, int]:
    """Output channels of every Conv in an ONNX file, by weight name."""
    model = onnx.load(str(path))
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    return {node.input[1]: int(numpy_helper.to_array(weights[node.input[1]]).shape[0])
            for node in model.graph.node if node.op_type == "Conv" and node.input[1] in weights}


def test_channel_pruning_shrinks_params_macs_and_the_exported_convs(pruned_export) -> None:
    _, result = pruned_export
    assert set(result.artifacts) == {"fp32", "pruned"}
    info = result.info["pruning"]
    assert info["params_after"] < 0.8 * info["params_before"]
    assert info["macs_after"] < 0.8 * info["macs_before"]
    fp32, pruned = conv_channels(result.artifacts["fp32"]), conv_channels(result.artifacts["pruned"])
    assert sum(pruned.values()) < 0.8 * sum(fp32.values())
    assert result.metrics["size_mb_pruned"] < 0.8 * result.metrics["size_mb_fp32"]
    # Pointwise convs that were pruned keep SIMD-friendly widths.
    assert all(channels % 8 == 0 for channels in pruned.values() if channels not in fp32.values())
    # Export checked the pruned file against the pruned torch module (it raises otherwise).
    assert 0 < result.metrics["parity_max_diff_pruned"] <= 1e-3
    onnx.checker.check_model(str(result.artifacts["pruned"]), full_check=True)
    metadata = read_metadata(result.artifacts["pruned"])
    assert metadata["pruning"] == "structured" and metadata["prune_ratio"] == f"{RATIO:g}"
    assert int(metadata["params_after"]) == info["params_after"] and int(metadata["macs_before"]) == info["macs_before"]
    assert "pruning" not in read_metadata(result.artifacts["fp32"])


def test_recovery_fine_tuning_runs_and_reports_val_accuracy(pruned_export, elpv_small: Dataset) -> None:
    _, result = pruned_export
    info = result.info["pruning"]
    assert 1 <= len(info["recovery_history"]) <= SPEC.recovery_epochs
    n_val = len(elpv_small.split("val"))
    for key in ("val_accuracy_before", "val_accuracy_pruned", "val_accuracy_recovered"):
        assert round(info[key] * n_val) == pytest.approx(info[key] * n_val)  # a share of the val images
    best = max(h["val_accuracy"] for h in info["recovery_history"])
    assert info["val_accuracy_recovered"] == best
    assert result.metrics["val_accuracy_pruned_recovered"] == best
    # Recovery that made things worse is undone: the shipped weights are never worse on val than the pruned ones.
    assert info["recovery_kept"] == (best >= info["val_accuracy_pruned"])
    assert read_metadata(result.artifacts["pruned"])["recovery_kept"] == str(info["recovery_kept"]).lower()


def test_compress_lists_the_channel_pruned_candidate(pruned_export, elpv_small: Dataset) -> None:
    root, _ = pruned_export
    cfg = compress.CompressConfig(prune="structured", quantize=False, latency_runs=2, latency_threads=1)
    result = compress.run(cfg, root / "export", elpv_small, root / "compress")
    report = json.loads((root / "compress" / compress.REPORT_FILE).read_text())
    assert set(report["candidates"]) == {"fp32", "pruned"}
    pruned = report["candidates"]["pruned"]
    assert pruned["size_mb"] < report["candidates"]["fp32"]["size_mb"]
    assert pruned["latency_ms_batch1"] > 0 and pruned["latency_ms_batch32"] > pruned["latency_ms_batch1"]
    assert pruned["val_accuracy"] == result.metrics["val_accuracy_pruned"]
    assert report["pruning"]["method"].startswith("structured") and report["pruning"]["ratio"] == RATIO
    assert report["shipped"] in report["reason"]


def test_the_head_keeps_one_output_per_label() -> None:
    entry = get_entry("efficientnet_lite0")
    model = Classifier(build_trunk(entry), torch.nn.Linear(entry.feature_dim, 4)).eval()
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    pruned = prune_channels(model, 0.5, example, ignored=[model.head])
    assert pruned.head.out_features == 4 and pruned.head.in_features < entry.feature_dim
    assert pruned(example).shape == (1, 4)
    assert macs_and_params(pruned, example)[1] < macs_and_params(model, example)[1]
    assert model.head.in_features == entry.feature_dim  # the input model is untouched
    with pytest.raises(ValueError, match="compress.prune_ratio"):
        prune_channels(model, 1.0, example, ignored=[model.head])


@pytest.mark.parametrize(("override", "named"), [
    ("compress.prune_ratio=1.2", "compress.prune_ratio"),
    ("compress.prune_ratio=0", "compress.prune_ratio"),
    ("compress.prune=channels", "compress.prune"),
])
def test_bad_pruning_config_fails_at_load_naming_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_params(REPO / "params.yaml", [override])


def test_sparsity_alone_still_means_unstructured_and_conflicts_are_refused() -> None:
    assert compress.CompressConfig(sparsity=0.5).prune == "unstructured"
    assert compress.CompressConfig(sparsity=0.5).channel_pruning() is None
    assert compress.CompressConfig(prune="structured").channel_pruning().ratio == 0.3
    with pytest.raises(ValueError, match="sparsity"):
        compress.CompressConfig(prune="structured", sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity > 0"):
        compress.CompressConfig(prune="unstructured")
