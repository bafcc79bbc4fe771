"""Promote: champion/challenger on a real MLflow sqlite registry with real ONNX models.

The good model is the real pipeline (features -> finetune -> export) on dark vs bright images,
which it separates perfectly; `one_miss` is the good head with its bias moved just far enough to
get one test image of the first label wrong; the bad one is the same Lite0 trunk with a head that
always says the first label; the foreign one was trained for other labels. All are registered as
MLflow ONNX models, downloaded back and scored by ONNX Runtime inside `promote.run`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import onnx
import pytest
import torch
from mlflow import MlflowClient
from pydantic import ValidationError
from torch import nn

from components.core.result import StageResult
from components.data.config import IngestConfig
from components.data.ingest import run as ingest_run
from components.data.manifest import Dataset, read_manifest
from components.features import extract as features
from components.features.config import FeaturesConfig
from components.models.classifier import load_checkpoint, save_checkpoint
from components.models.onnx_io import predict_frame
from components.models.registry import get_entry
from components.packaging import export
from components.registry.config import PromoteConfig
from components.registry.promote import run
from components.registry.significance import MIN_DISCORDANT_FOR_BOOTSTRAP, paired_test
from components.training import finetune
from components.training.config import FinetuneConfig
from tests.conftest import small_params, venv_env, write_imagefolder

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


def one_miss_checkpoint(path: Path, good: Path, good_onnx: Path, dataset: Dataset) -> Path:
    """The good head with labels[1]'s bias raised past the smallest margin of one labels[0] test image, not two.

    Its other test images keep their class: labels[1]'s only gain margin, and labels[0]'s other margins are larger.
    """
    test = dataset.split("test")
    logits = predict_frame(good_onnx, dataset, test)
    first = np.asarray(dataset.label_index(test)) == 0
    margins = np.sort(logits[first, 0] - logits[first, 1])
    assert margins[0] > 0 and margins[1] > margins[0]  # the good model gets them all right, by distinct margins
    checkpoint = load_checkpoint(good)
    checkpoint["head"]["bias"][1] += float(margins[:2].mean())
    torch.save(checkpoint, path)
    return path


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
    def exported(name: str, checkpoint: Path) -> Path:
        return export.run(export.ExportConfig(parity_images=4), 0.0, checkpoint, foreign if name == "foreign" else dataset,
                          root / f"export_{name}", features_dir=root / "features").artifacts["fp32"]

    onnx_files = {name: exported(name, ckpt) for name, ckpt in checkpoints.items()}
    one_miss = one_miss_checkpoint(root / "one_miss.pt", checkpoints["good"], onnx_files["good"], dataset)
    onnx_files["one_miss"] = exported("one_miss", one_miss)
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
    # Every discordant pair favours the good model: p = (1/2)^pairs exactly. They are fewer than a bootstrap
    # needs, so the exact test decides under either setting, and the tags say which test ran.
    assert wrong_for_bad < MIN_DISCORDANT_FOR_BOOTSTRAP
    assert result.metrics["p_value"] == pytest.approx(0.5**wrong_for_bad)
    assert tags(name, good)["promote.test"] == test and tags(name, good)["promote.test_used"] == "mcnemar"
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


def one_miss_after_bad(name: str, max_recall_drop: float, models, out: Path) -> tuple[StageResult, str, str, dict]:
    """`bad` (always labels[0]) as champion, then `one_miss` as challenger; the result, both versions, the record."""
    dataset, onnx_files = models
    bad = register(name, onnx_files["bad"])
    run(PromoteConfig(**FAST), name, bad, dataset, out / "first")
    one_miss = register(name, onnx_files["one_miss"])
    result = run(PromoteConfig(max_recall_drop=max_recall_drop, **FAST), name, one_miss, dataset, out / "next")
    return result, bad, one_miss, json.loads((out / "next" / "promotion.json").read_text())


def test_a_better_accuracy_bought_with_a_class_s_recall_is_refused(models, tmp_path: Path) -> None:
    dataset, _ = models
    first_label, n_first, n_second = dataset.labels[0], n_test_of(dataset, 0), n_test_of(dataset, 1)
    result, bad, one_miss, decision = one_miss_after_bad("recall-guarded", 0.05, models, tmp_path)
    # Right on all of labels[1] and all but one of labels[0] against always labels[0]: far better accuracy,
    # significantly so ...
    assert decision["candidate"]["recall"] == {first_label: pytest.approx(1 - 1 / n_first), dataset.labels[1]: 1.0}
    assert decision["champion"]["recall"] == {first_label: 1.0, dataset.labels[1]: 0.0}
    assert result.metrics["candidate_accuracy"] > result.metrics["champion_accuracy"]
    assert result.metrics["p_value"] == pytest.approx((n_second + 2) / 2 ** (n_second + 1))
    assert result.metrics["p_value"] < 0.05
    # ... but its one missed image of labels[0] is a recall drop of 1/n_first, more than 0.05 allows.
    assert 1 / n_first > 0.05
    assert result.info["decision"] == "kept" and alias_version("recall-guarded") == bad
    assert f"recall on {first_label!r} falls {1 / n_first:.4f} below the champion's" in result.info["reason"]
    assert "promote.max_recall_drop=0.05" in tags("recall-guarded", one_miss)["promote.reason"]
    assert result.metrics[f"candidate_recall.{first_label}"] == pytest.approx(1 - 1 / n_first)

    # The same pair with the guard off is promoted: the guard alone refused it above.
    result, _, one_miss, _ = one_miss_after_bad("recall-unguarded", 1.0, models, tmp_path / "off")
    assert result.info["decision"] == "promoted" and alias_version("recall-unguarded") == one_miss


@pytest.mark.parametrize("test", ["mcnemar", "bootstrap"])
def test_one_image_better_is_not_significant(models, tmp_path: Path, test: str) -> None:
    dataset, onnx_files = models
    name = f"one-better-{test}"
    one_miss = register(name, onnx_files["one_miss"])
    assert run(PromoteConfig(**FAST), name, one_miss, dataset, tmp_path / "first").info["decision"] == "first"
    good = register(name, onnx_files["good"])
    result = run(PromoteConfig(test=test, **FAST), name, good, dataset, tmp_path / "better")
    # Better by one image and worse on none: the gain clears min_improvement 0, the 1-0 pairs give p = 1/2.
    assert result.metrics["candidate_accuracy"] - result.metrics["champion_accuracy"] == pytest.approx(
        1 / len(dataset.split("test")))
    assert result.info["decision"] == "kept" and alias_version(name) == one_miss
    assert result.metrics["p_value"] == pytest.approx(0.5)
    assert "is not significant (mcnemar" in result.info["reason"] and "p=0.5 >= promote.significance=0.05" in result.info["reason"]
    assert tags(name, good)["promote.decision"] == "kept"


def version_artifacts(name: str, version: str) -> Path:
    """The folder of the local artifact store holding a registered version's files."""
    uri = MlflowClient().get_model_version_download_uri(name, version)
    return Path(unquote(urlparse(uri).path))


def test_a_rerun_with_the_champion_as_candidate_downloads_and_scores_nothing(models, tmp_path: Path) -> None:
    dataset, onnx_files = models
    name = "unchanged"
    good = register(name, onnx_files["good"])
    assert run(PromoteConfig(**FAST), name, good, dataset, tmp_path / "first").info["decision"] == "first"
    first_tags = tags(name, good)
    # Its files are gone from the store: a download would fail, so the rerun below downloads nothing.
    shutil.rmtree(version_artifacts(name, good))
    again = run(PromoteConfig(**FAST), name, good, dataset, tmp_path / "again")
    assert again.info["decision"] == "kept" and again.info["reason"] == f"v{good} already holds @champion"
    assert "candidate_accuracy" not in again.metrics  # nothing was scored
    assert tags(name, good) == first_tags

    # What `dvc repro` runs: `tlops stage promote` gets there without loading the data or ONNX Runtime.
    params = small_params(tmp_path, register={"model_name": name})
    outputs = tmp_path / "outputs"
    StageResult(stage="register", out_dir=outputs / "register", info={"model_name": name, "version": good}).save()
    heavy = ("onnxruntime", "torch", "matplotlib", "scipy.stats", "components.models.onnx_io")
    code = ("import json, sys\nfrom tlops.cli import main\ncode = main(['stage', 'promote', '--params', sys.argv[1]])\n"
            f"print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, str(params)], cwd=tmp_path, env=venv_env(), capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert json.loads((outputs / "promote" / "promotion.json").read_text())["reason"] == f"v{good} already holds @champion"
    assert not (outputs / "validate").exists()  # there is no dataset: it was never read


def test_three_to_nothing_on_ten_images_is_p_one_eighth_under_either_setting() -> None:
    candidate = np.array([True] * 3 + [True] * 5 + [False] * 2)
    champion = np.array([False] * 3 + [True] * 5 + [False] * 2)  # 3 pairs for the candidate, none against
    for test in ("mcnemar", "bootstrap"):
        result = paired_test(PromoteConfig(test=test), candidate, champion)
        assert result["p_value"] == pytest.approx(0.125) and result["method"] == "mcnemar"  # (1/2)^3
        assert (result["candidate_only"], result["champion_only"]) == (3, 0) and result["statistic"] == pytest.approx(0.3)


def test_exact_mcnemar_on_known_pairs() -> None:
    candidate = np.array([True] * 8 + [False] * 2 + [True] * 10)
    champion = np.array([False] * 8 + [True] * 2 + [True] * 10)  # 8 pairs for the candidate, 2 against
    exact = paired_test(PromoteConfig(), candidate, champion)
    assert (exact["candidate_only"], exact["champion_only"]) == (8, 2)
    assert exact["p_value"] == pytest.approx(56 / 1024)  # P(X >= 8), X ~ Binomial(10, 1/2)
    assert paired_test(PromoteConfig(), champion, candidate)["p_value"] > 0.9  # the other way round
    tied = paired_test(PromoteConfig(test="bootstrap"), champion, champion)
    assert tied["p_value"] == pytest.approx(1.0) and tied["statistic"] == 0.0


def pairs(candidate_only: int, champion_only: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    candidate = np.zeros(n, bool)
    champion = np.zeros(n, bool)
    candidate[:candidate_only] = True
    champion[candidate_only:candidate_only + champion_only] = True
    candidate[n // 2:] = champion[n // 2:] = True  # half the images both get right
    return candidate, champion


@pytest.mark.parametrize(("candidate_only", "champion_only"), [(60, 40), (50, 50), (40, 60), (30, 0)])
def test_the_bootstrap_agrees_with_the_exact_test_once_pairs_are_many(candidate_only: int, champion_only: int) -> None:
    # 10,000 images: resampling the three pair counts, not an index per image, keeps this small.
    candidate, champion = pairs(candidate_only, champion_only, 10_000)
    boot = paired_test(PromoteConfig(test="bootstrap", bootstrap_samples=20_000), candidate, champion)
    exact = paired_test(PromoteConfig(test="mcnemar"), candidate, champion)
    assert boot["method"] == "bootstrap" and exact["method"] == "mcnemar"
    assert boot["statistic"] == exact["statistic"] == pytest.approx((candidate_only - champion_only) / 10_000)
    # A valid p: close to the exact one (60-40: 0.025 against 0.028 exact; 50-50: 0.51 against 0.54, the exact
    # one-sided p counting the tie's probability, which a bootstrap of counts spreads over its neighbours).
    assert boot["p_value"] == pytest.approx(exact["p_value"], abs=0.03)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValidationError, match="test"):
        PromoteConfig(test="ttest")
    with pytest.raises(ValidationError, match="significance"):
        PromoteConfig(significance=1.5)
    with pytest.raises(ValidationError, match="extra"):
        PromoteConfig(min_improvment=0.01)
    with pytest.raises(ValidationError, match="max_recall_drop"):
        PromoteConfig(max_recall_drop=1.5)
