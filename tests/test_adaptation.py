"""Domain adaptation: the gradient reversal, the losses, the labelled view, and target labels never used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.data.domains import UNLABELLED, UNLABELLED_VAL, DomainError, labelled_view
from components.data.manifest import read_manifest, write_manifest
from components.models.classifier import build_model, load_checkpoint
from components.training.adaptation import (
    Aligner,
    GradientReverse,
    WarmStartGradientReverse,
    coral_loss,
    domain_separability,
    warm_start_coefficient,
)
from tests.conftest import small_params
from tests.tiny_model import make_dataset


def test_gradient_reversal_is_the_identity_forward_and_reverses_and_scales_gradients_backward() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    weights = torch.randn(5, 3)
    y = GradientReverse.apply(x, 0.3)
    assert torch.equal(y, x)
    (y * weights).sum().backward()
    assert torch.allclose(x.grad, -0.3 * weights)


def test_the_reversal_coefficient_warms_up_from_zero_to_one_with_each_training_step() -> None:
    layer = WarmStartGradientReverse(warmup_steps=100)
    x = torch.ones(2, 4, requires_grad=True)
    seen = []
    for _ in range(3):
        x.grad = None
        layer(x).sum().backward()
        seen.append(float(-x.grad[0, 0]))
    assert seen[0] == 0.0  # a random discriminator's gradients are not passed on at first
    assert seen[1] == pytest.approx(warm_start_coefficient(1, 100)) and 0 < seen[1] < seen[2]
    assert warm_start_coefficient(100, 100) == pytest.approx(2 / (1 + np.exp(-1)) - 1)
    assert warm_start_coefficient(100_000, 100) == pytest.approx(1.0)
    layer.eval()
    before = int(layer.step)
    layer(x)
    assert int(layer.step) == before  # evaluation does not advance the schedule


def test_coral_is_zero_for_equal_covariances_and_grows_with_their_difference() -> None:
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(64, 8, generator=generator)
    assert coral_loss(source, source + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # a shift is not a covariance
    assert 0 < coral_loss(source, source * 2).item() < coral_loss(source, source * 4).item()


def test_dann_trains_its_discriminator_and_pushes_the_features_the_other_way() -> None:
    torch.manual_seed(0)
    aligner = Aligner("dann", 4, width=8, warmup_steps=1)
    aligner.reverse.step.fill_(10_000)  # coefficient ~1
    source, target = torch.randn(16, 4, requires_grad=True), torch.randn(16, 4) + 2
    aligner(source, target).backward()
    feature_grad = source.grad.clone()
    # The same loss without the reversal: the features' gradient is exactly the opposite.
    source.grad = None
    logits = aligner.discriminator(torch.cat([source, target]))
    labels = torch.cat([torch.ones(16), torch.zeros(16)])
    loss = torch.nn.functional.binary_cross_entropy_with_logits
    (0.5 * (loss(logits[:16], labels[:16]) + loss(logits[16:], labels[16:]))).backward()
    assert torch.allclose(feature_grad, -source.grad, atol=1e-6)


def test_domain_separability_tells_shifted_domains_apart_and_not_equal_ones() -> None:
    rng = np.random.default_rng(0)
    same = domain_separability(*(rng.normal(size=(200, 5)) for _ in range(4)))
    shifted = domain_separability(rng.normal(size=(200, 5)), rng.normal(2, 1, (200, 5)), rng.normal(size=(200, 5)),
                                  rng.normal(2, 1, (200, 5)))
    assert abs(same["domain_accuracy"] - 0.5) < 0.1 and shifted["domain_accuracy"] > 0.9
    assert shifted["proxy_a_distance"] == pytest.approx(2 * (1 - 2 * (1 - shifted["domain_accuracy"])))


def test_the_labelled_view_hides_the_target_domains_train_and_val_labels_only(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path)
    view = labelled_view(dataset, "poly")
    assert labelled_view(dataset, None) is dataset
    poly = view.manifest["domain"] == "poly"
    assert set(view.manifest.loc[poly, "split"]) == {UNLABELLED, UNLABELLED_VAL, "test"}
    assert view.manifest.loc[poly & (view.manifest["split"] != "test"), "label"].isna().all()
    # Source rows, and the target's test rows, are as they were; the class names stay the dataset's.
    kept = ~poly | (view.manifest["split"] == "test")
    pd.testing.assert_frame_equal(view.manifest[kept], dataset.manifest[kept])
    assert view.labels == dataset.labels
    assert set(view.split("train")["domain"]) == {"mono"} and set(view.split("val")["domain"]) == {"mono"}
    assert not dataset.manifest["label"].isna().any()  # the dataset itself is not touched


def test_a_target_domain_the_dataset_cannot_provide_is_one_clear_line(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path)
    with pytest.raises(DomainError, match=r"finetune.adapt.target_domain='mnoo' is not a domain of this dataset; "
                                          r"its domains are \['mono', 'poly'\]"):
        labelled_view(dataset, "mnoo")
    plain = dataset.__class__(dataset.manifest.drop(columns="domain"), dataset.root, dataset.labels)
    with pytest.raises(DomainError, match="the dataset has no domains"):
        labelled_view(plain, "poly")
    no_train = dataset.manifest[~((dataset.manifest["domain"] == "poly") & (dataset.manifest["split"] == "train"))]
    with pytest.raises(DomainError, match="'poly': the domain has no images in the train split"):
        labelled_view(dataset.__class__(no_train, dataset.root, dataset.labels), "poly")
    one = dataset.manifest.assign(domain="mono")
    with pytest.raises(DomainError, match="the dataset's only domain"):
        labelled_view(dataset.__class__(one, dataset.root, dataset.labels), "mono")


def test_params_refuse_adaptation_where_it_cannot_work() -> None:
    from tlops.config import ConfigError, load_params

    with pytest.raises(ConfigError, match="finetune.strategy=full does not adapt"):
        load_params(None, ["finetune.strategy=full", "finetune.adapt.target_domain=poly"])
    with pytest.raises(ConfigError, match="finetune.adapt.method"):
        load_params(None, ["finetune.adapt.method=mmd"])


def scramble_target_labels(manifest_path: Path, target: str) -> int:
    """Flip every target-domain train/val label in the validated manifest; returns how many changed."""
    dataset = read_manifest(manifest_path)
    frame = dataset.manifest.copy()
    rows = (frame["domain"] == target) & frame["split"].isin(["train", "val"])
    flip = {dataset.labels[0]: dataset.labels[1], dataset.labels[1]: dataset.labels[0]}
    frame.loc[rows, "label"] = frame.loc[rows, "label"].map(flip)
    write_manifest(frame, manifest_path)
    return int(rows.sum())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dann", "coral"])
def test_target_labels_are_never_used_scrambling_them_gives_the_same_model(tmp_path: Path, method: str) -> None:
    """Through the stage wiring: select, finetune (training, early stopping, the reference), export and
    compress (its accuracy budget and calibration) give the same results when the target's labels are flipped."""
    from tlops.config import load_params
    from tlops.stages import execute, get_stage

    overrides = ["finetune.adapt.target_domain=poly", f"finetune.adapt.method={method}", "finetune.adapt.epochs=4",
                 "finetune.adapt.bottleneck=32"]
    params = load_params(small_params(tmp_path, ingest={"limit": 120}), overrides)
    for name in ("ingest", "validate", "features"):
        execute(get_stage(name), params)

    def downstream() -> dict[str, object]:
        results = {name: execute(get_stage(name), params) for name in ("select", "finetune", "export", "compress")}
        checkpoint = load_checkpoint(results["finetune"].artifacts["checkpoint"])
        report = json.loads(results["finetune"].artifacts["report"].read_text())
        compressed = json.loads(results["compress"].artifacts["report"].read_text())
        return {"ranking": json.loads((params.path("select") / "ranking.json").read_text()),
                "head": checkpoint["head"], "history": report["info"] and json.loads(
                    (params.path("finetune") / "history.json").read_text()),
                "reference": report["reference"]["val_accuracy"], "adaptation": report["info"]["adaptation"],
                "export": results["export"].metrics["parity_max_diff_fp32"],
                "compress": {k: v["val_accuracy"] for k, v in compressed["candidates"].items()},
                "shipped": compressed["shipped"]}

    first = downstream()
    assert checkpoint_kind(params) == "bottleneck"
    shutil.copytree(params.path("finetune"), tmp_path / "first-finetune")
    assert scramble_target_labels(params.path("validate") / "manifest.csv", "poly") > 10
    second = downstream()
    assert first["head"].keys() == second["head"].keys()
    for key in first["head"]:
        assert torch.equal(first["head"][key], second["head"][key]), key
    for key in ("ranking", "history", "reference", "adaptation", "compress", "shipped"):
        assert first[key] == second[key], key
    # The check can fail: flipping the source domain's labels does change the model.
    scramble_target_labels(params.path("validate") / "manifest.csv", "mono")
    third = downstream()
    assert any(not torch.equal(first["head"][k], third["head"][k]) for k in first["head"])


def checkpoint_kind(params) -> str:  # noqa: ANN001
    return load_checkpoint(params.path("finetune") / "model.pt")["head_spec"]["kind"]


def test_the_adapted_linear_head_exports_and_reports_alignment(tmp_path: Path) -> None:
    """Fast path through finetune.run directly on a handful of real cells: the bottleneck head, its report, its picture."""
    from components.data.config import IngestConfig
    from components.data.ingest import run as ingest_run
    from components.features import extract as features
    from components.features.config import FeaturesConfig
    from components.packaging import export
    from components.training.config import FinetuneConfig
    from components.training.finetune import run

    ingest_run(IngestConfig(limit=80, seed=7), tmp_path / "data")
    dataset = read_manifest(tmp_path / "data" / "manifest.csv")
    assert set(dataset.manifest["domain"]) == {"mono", "poly"}  # ELPV's cell type
    features.run(FeaturesConfig(image_size=64, taps=("pooled",)), ("efficientnet_lite0",), dataset, tmp_path / "cache",
                 tmp_path / "features")
    view = labelled_view(dataset, "poly")
    cfg = FinetuneConfig.model_validate({"strategy": "linear", "linear": {"taps": ["pooled"]},
                                         "adapt": {"target_domain": "poly", "method": "dann", "epochs": 3,
                                                   "bottleneck": 16}})
    result = run(cfg, "efficientnet_lite0", tmp_path / "features", view, tmp_path / "data" / "manifest.csv",
                 tmp_path / "finetune", tmp_path / "cache", tmp_path / "state")
    # Mono and poly cells are told apart before adaptation (0.96 here) and DANN brings that to chance (0.50 here).
    before, after = result.metrics["adapt.domain_accuracy_before"], result.metrics["adapt.domain_accuracy_after"]
    assert before >= 0.8 and after <= before - 0.2
    assert 0.0 < result.metrics["adapt.source_val_accuracy"] <= 1.0
    assert result.artifacts["adaptation"].read_bytes()[:4] == b"\x89PNG"
    checkpoint = load_checkpoint(result.artifacts["checkpoint"])
    assert checkpoint["head_spec"]["kind"] == "bottleneck"
    assert build_model(checkpoint).head.classifier.out_features == 2
    exported = export.run(export.ExportConfig(parity_images=4), 0.0, result.artifacts["checkpoint"], view,
                          tmp_path / "export", features_dir=tmp_path / "features")
    assert exported.metrics["parity_max_diff_fp32"] < 1e-4 and exported.metrics["train_serve_max_diff"] < 1e-3


def test_partial_adapts_on_cached_target_activations(tmp_path: Path) -> None:
    from components.data.config import IngestConfig
    from components.data.ingest import run as ingest_run
    from components.features import extract as features
    from components.features.config import FeaturesConfig
    from components.training.config import FinetuneConfig
    from components.training.finetune import run

    ingest_run(IngestConfig(limit=60, seed=7), tmp_path / "data")
    dataset = read_manifest(tmp_path / "data" / "manifest.csv")
    features.run(FeaturesConfig(image_size=64, taps=("pooled",)), ("efficientnet_lite0",), dataset, tmp_path / "cache",
                 tmp_path / "features")
    view = labelled_view(dataset, "mono")
    cfg = FinetuneConfig.model_validate({"strategy": "partial",
                                         "partial": {"epochs": 2, "batch_size": 8, "views": 2, "blocks": 1},
                                         "adapt": {"target_domain": "mono", "method": "dann"}})
    result = run(cfg, "efficientnet_lite0", tmp_path / "features", view, tmp_path / "data" / "manifest.csv",
                 tmp_path / "finetune", tmp_path / "cache", tmp_path / "state")
    report = json.loads(result.artifacts["report"].read_text())
    assert result.info["adapt"] == "dann to mono"
    assert {"domain_accuracy_before", "domain_accuracy_after"} <= set(report["info"]["adaptation"])
    assert all("val_coral_distance" in h for h in json.loads(result.artifacts["history"].read_text()))
    assert result.artifacts["adaptation"].exists()
    # The target's unlabelled images were cached with their views, like the train split's.
    store = next((tmp_path / "cache" / "efficientnet_lite0").glob("partial-*"))
    assert all((store / s[:2] / f"{s}.1.npy").exists() for s in view.split(UNLABELLED)["sha256"])
    # The trained tail exports like any partial model.
    from components.packaging import export

    exported = export.run(export.ExportConfig(parity_images=4, tta_views=2), 0.0, result.artifacts["checkpoint"], view,
                          tmp_path / "export", features_dir=tmp_path / "features")
    assert exported.metrics["parity_max_diff_fp32"] < 1e-4
