"""Promote: champion/challenger on a real MLflow sqlite registry with real ONNX models.

The good model is the real pipeline (features -> finetune -> export) on dark vs bright images,
which it separates perfectly; the bad one is the same Lite0 trunk with a head that always says
`bright`; the foreign one was trained for other labels. All three are registered as MLflow
ONNX models, downloaded back and scored by ONNX Runtime inside `promote.run`.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import torch
from mlflow import MlflowClient
from pydantic import ValidationError
from torch import nn

from components.data.config import IngestConfig
from components.data.ingest import run as ingest_run
from components.data.manifest import Dataset, read_manifest
from components.features import extract as features
from components.features.config import FeaturesConfig
from components.models.classifier import save_checkpoint
from components.models.registry import get_entry
from components.packaging import export
from components.registry.config import PromoteConfig
from components.registry.promote import paired_test, run
from components.training import finetune
from components.training.config import FinetuneConfig
from tests.conftest import write_imagefolder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Few timed images; a budget no real run misses, since p95 on a shared, busy CPU swings by 10x.
# The latency gate has its own test with a budget no model can meet.
FAST = {"latency_images": 8, "max_p95_latency_ms": 10_000.0}


def constant_checkpoint(path: Path, dataset: Dataset, labels: list[str], favoured: int) -> Path:
    """Lite0 at 64 px with a head that ignores the image and always predicts `labels[favoured]`."""
    entry = get_entry("efficientnet_lite0")
    head = nn.Linear(entry.feature_dim, len(labels))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([3.0 if i == favoured else 0.0 for i in range(len(labels))]))
    return save_checkpoint(path, head, None, backbone=entry.describe(), taps=["pooled"], labels=labels,
                           preprocessing=entry.preprocessing(64).model_dump(mode="json"), config={"strategy": "linear"},
                           data={"version": "none"}, strategy="linear")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, dict[str, Path]]:
    root = tmp_path_factory.mktemp("promote")
    source = write_imagefolder(root / "source", per_class=24)
    ingest_run(IngestConfig(source="imagefolder", path=str(source), test_fraction=0.4, val_fraction=0.3), root / "data")
    dataset = read_manifest(root / "data" / "manifest.csv")
    features.run(FeaturesConfig(image_size=64), ("efficientnet_lite0",), dataset, root / "cache", root / "features")
    trained = finetune.run(FinetuneConfig(strategy="linear"), "efficientnet_lite0", root / "features",
                           dataset, root / "data" / "manifest.csv", root / "finetune", root / "cache", root / "state")
    checkpoints = {
        "good": trained.artifacts["checkpoint"],
        "bad": constant_checkpoint(root / "bad.pt", dataset, list(dataset.labels), favoured=0),
        "foreign": constant_checkpoint(root / "foreign.pt", dataset, ["cracked", "intact"], favoured=0),
    }
    # The foreign model was trained for other labels: it exports against the same images under those labels.
    renamed = dict(zip(dataset.labels, ("cracked", "intact")))
    foreign = Dataset(dataset.manifest.assign(label=dataset.manifest["label"].map(renamed)), dataset.root,
                      ("cracked", "intact"))
    onnx_files = {name: export.run(export.ExportConfig(parity_images=4), 0.0, ckpt,
                                   foreign if name == "foreign" else dataset, root / f"export_{name}",
                                   features_dir=root / "features").artifacts["fp32"]
                  for name, ckpt in checkpoints.items()}
    return dataset, onnx_files


def register(name: str, model_path: Path) -> str:
    """A new registry version holding the ONNX file, logged as register_model does.

    Explicit pip requirements skip MLflow's requirement inference (a 15 s subprocess per model).
    """
    with mlflow.start_run():
        info = mlflow.onnx.log_model(onnx.load(str(model_path)), name="model", registered_model_name=name,
                                     pip_requirements=["onnx", "onnxruntime"])
    return str(info.registered_model_version)


def alias_version(name: str, alias: str = "champion") -> str:
    return str(MlflowClient().get_model_version_by_alias(name, alias).version)


def tags(name: str, version: str) -> dict[str, str]:
    return MlflowClient().get_model_version(name, version).tags


def n_test_of(dataset: Dataset, label_index: int) -> int:
    return int((dataset.split("test")["label"] == dataset.labels[label_index]).sum())


def test_first_becomes_champion_and_a_worse_challenger_is_never_promoted(models, tmp_path: Path) -> None:
    dataset, onnx_files = models
    good = register("first-then-worse", onnx_files["good"])
    first = run(PromoteConfig(**FAST), "first-then-worse", good, dataset, tmp_path / "first")
    assert first.info["decision"] == "first"
    assert alias_version("first-then-worse") == good
    assert first.metrics["candidate_accuracy"] == pytest.approx(1.0)  # dark vs bright is separable
    assert tags("first-then-worse", good)["promote.decision"] == "first"
    assert tags("first-then-worse", good)["promote.champion_version"] == "none"

    bad = register("first-then-worse", onnx_files["bad"])
    kept = run(PromoteConfig(**FAST), "first-then-worse", bad, dataset, tmp_path / "worse")
    assert kept.info["decision"] == "kept"
    assert alias_version("first-then-worse") == good  # the alias did not move
    recorded = tags("first-then-worse", bad)
    assert recorded["promote.decision"] == "kept"
    assert recorded["promote.champion_version"] == good
    assert "accuracy gain -0." in recorded["promote.reason"]
    # The bad head always says labels[0], so it is right exactly on those test images.
    share = n_test_of(dataset, 0) / len(dataset.split("test"))
    assert float(recorded["promote.candidate_accuracy"]) == pytest.approx(share, abs=1e-5)
    assert float(recorded["promote.champion_accuracy"]) == pytest.approx(1.0)
    assert float(recorded["promote.discordant_champion_only"]) == n_test_of(dataset, 1)
    assert float(recorded["promote.discordant_candidate_only"]) == 0
    assert float(recorded["promote.p95_latency_ms"]) > 0
    # Both decisions scored exactly the same images.
    assert recorded["promote.test_split_sha256"] == tags("first-then-worse", good)["promote.test_split_sha256"]
    assert len(recorded["promote.test_split_sha256"]) == 64

    decision = json.loads((tmp_path / "worse" / "promotion.json").read_text())
    assert decision["decision"] == "kept" and decision["champion"]["version"] == good
    assert decision["candidate"]["accuracy_ci"][0] < share < decision["candidate"]["accuracy_ci"][1]
    assert (tmp_path / "worse" / "promotion.png").read_bytes()[:8] == PNG_MAGIC
    assert kept.info["summary"].startswith(f"first-then-worse v{bad} not promoted; @champion stays v{good}")


@pytest.mark.parametrize("test", ["mcnemar", "bootstrap"])
def test_a_clearly_better_challenger_is_promoted(models, tmp_path: Path, test: str) -> None:
    dataset, onnx_files = models
    name = f"better-{test}"
    bad = register(name, onnx_files["bad"])
    first = run(PromoteConfig(**FAST), name, bad, dataset, tmp_path / "first")
    assert first.info["decision"] == "first", first.info["reason"]
    good = register(name, onnx_files["good"])
    result = run(PromoteConfig(test=test, **FAST), name, good, dataset, tmp_path / "better")

    assert result.info["decision"] == "promoted", result.info["reason"]
    assert alias_version(name) == good
    assert tags(name, bad)["promote.superseded_by"] == good
    wrong_for_bad = n_test_of(dataset, 1)
    if test == "mcnemar":  # every discordant pair favours the good model: p = (1/2)^pairs exactly
        assert result.metrics["p_value"] == pytest.approx(0.5**wrong_for_bad)
    else:
        assert result.metrics["p_value"] < 0.01
    assert tags(name, good)["promote.test"] == test
    assert result.info["summary"].startswith(f"{name} v{good} promoted to @champion")


def test_a_latency_budget_too_small_refuses_even_a_better_model(models, tmp_path: Path) -> None:
    dataset, onnx_files = models
    bad = register("slow-budget", onnx_files["bad"])
    run(PromoteConfig(**FAST), "slow-budget", bad, dataset, tmp_path / "first")
    good = register("slow-budget", onnx_files["good"])
    result = run(PromoteConfig(**{**FAST, "max_p95_latency_ms": 0.001}), "slow-budget", good, dataset, tmp_path / "tight")
    assert result.info["decision"] == "kept"
    assert alias_version("slow-budget") == bad
    assert "p95 latency" in tags("slow-budget", good)["promote.reason"]
    assert "max_p95_latency_ms=0.001" in result.info["reason"]


def test_improvement_must_clear_min_improvement(models, tmp_path: Path) -> None:
    dataset, onnx_files = models
    bad = register("min-gain", onnx_files["bad"])
    run(PromoteConfig(**FAST), "min-gain", bad, dataset, tmp_path / "first")
    good = register("min-gain", onnx_files["good"])
    result = run(PromoteConfig(min_improvement=0.9, **FAST), "min-gain", good, dataset, tmp_path / "gain")
    assert result.info["decision"] == "kept"
    assert "min_improvement=0.9" in result.info["reason"]
    assert alias_version("min-gain") == bad


def test_a_champion_with_other_labels_loses_to_a_candidate_that_passes_its_gates(models, tmp_path: Path) -> None:
    dataset, onnx_files = models
    foreign = register("relabelled", onnx_files["foreign"])
    MlflowClient().set_registered_model_alias("relabelled", "champion", foreign)
    good = register("relabelled", onnx_files["good"])
    result = run(PromoteConfig(**FAST), "relabelled", good, dataset, tmp_path / "relabelled")
    assert result.info["decision"] == "promoted"
    assert "['cracked', 'intact'] differ from the dataset's" in result.info["reason"]
    assert alias_version("relabelled") == good
    assert "champion_accuracy" not in result.metrics  # it was not scored on data it cannot read


def test_a_candidate_with_other_labels_is_refused_and_a_rerun_changes_nothing(models, tmp_path: Path) -> None:
    dataset, onnx_files = models
    foreign = register("refused", onnx_files["foreign"])
    result = run(PromoteConfig(**FAST), "refused", foreign, dataset, tmp_path / "refused")
    assert result.info["decision"] == "kept"
    assert "no champion yet" in result.info["reason"] and "differ from the dataset's" in result.info["reason"]
    with pytest.raises(Exception, match="alias"):
        MlflowClient().get_model_version_by_alias("refused", "champion")

    good = register("refused", onnx_files["good"])
    assert run(PromoteConfig(**FAST), "refused", good, dataset, tmp_path / "good").info["decision"] == "first"
    again = run(PromoteConfig(**FAST), "refused", good, dataset, tmp_path / "again")
    assert again.info["decision"] == "kept" and "already holds @champion" in again.info["reason"]
    assert again.info["summary"] == f"refused v{good} not promoted; @champion stays v{good}: v{good} already holds @champion"
    assert tags("refused", good)["promote.decision"] == "first"  # the rerun did not overwrite the record


def test_exact_mcnemar_and_bootstrap_on_known_pairs() -> None:
    candidate = np.array([True] * 8 + [False] * 2 + [True] * 10)
    champion = np.array([False] * 8 + [True] * 2 + [True] * 10)  # 8 pairs for the candidate, 2 against
    exact = paired_test(PromoteConfig(), candidate, champion)
    assert (exact["candidate_only"], exact["champion_only"]) == (8, 2)
    assert exact["p_value"] == pytest.approx(56 / 1024)  # P(X >= 8), X ~ Binomial(10, 1/2)
    assert paired_test(PromoteConfig(), champion, candidate)["p_value"] > 0.9  # the other way round
    tied = paired_test(PromoteConfig(test="bootstrap"), champion, champion)
    assert tied["p_value"] == pytest.approx(1.0) and tied["statistic"] == 0.0


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValidationError, match="test"):
        PromoteConfig(test="ttest")
    with pytest.raises(ValidationError, match="significance"):
        PromoteConfig(significance=1.5)
    with pytest.raises(ValidationError, match="extra"):
        PromoteConfig(min_improvment=0.01)
