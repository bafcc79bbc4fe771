"""Distillation: teacher logits computed once and cached by content, the KD loss, the partial-strategy hook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from components.core.lineage import data_version
from components.data.manifest import Dataset
from components.models.classifier import save_checkpoint
from components.models.registry import get_entry
from components.training.config import FinetuneConfig
from components.training.distill import TeacherError, kd_loss, pack_targets, teacher_checkpoint, teacher_logits
from components.training.finetune import run
from tests.tiny_features import make_features

TEACHER_SIZE = 96  # not the student's 64 px: the teacher reads images through its own preprocessing
VIEWS = 2


def make_teacher(path: Path, dataset: Dataset, labels: list[str] | None = None) -> Path:
    """A real pretrained Lite0 with a head, at its own input size (a stand-in for a fine-tuned Lite2 run)."""
    entry = get_entry("efficientnet_lite0")
    labels = list(dataset.labels) if labels is None else labels
    torch.manual_seed(1)
    return save_checkpoint(path, nn.Linear(entry.feature_dim, len(labels)), None, backbone=entry.describe(),
                           taps=["pooled"], labels=labels,
                           preprocessing=entry.preprocessing(TEACHER_SIZE).model_dump(mode="json"),
                           config={"strategy": "linear"}, data={"version": data_version(dataset.root / "manifest.csv")},
                           strategy="linear")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, elpv_small: Dataset) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "model.pt", elpv_small)


def test_teacher_logits_are_computed_once_then_read_from_the_cache(teacher: Path, elpv_small: Dataset,
                                                                    tmp_path: Path) -> None:
    path, checkpoint = teacher_checkpoint(teacher, elpv_small.labels)
    n_train, n_val = len(elpv_small.split("train")), len(elpv_small.split("val"))
    first = teacher_logits(path, checkpoint, elpv_small, VIEWS, tmp_path)
    assert first.train.shape == (n_train, VIEWS, len(elpv_small.labels)) and first.val.shape == (n_val, len(elpv_small.labels))
    assert first.computed == n_train * VIEWS + n_val and first.teacher_runs > 0
    assert len(list((tmp_path / "distill").glob("*/*/*.npy"))) == len(set(elpv_small.split("train")["sha256"])) * VIEWS + n_val
    # A rotated view is another input: its logits differ from view 0's.
    assert not torch.allclose(torch.from_numpy(first.train[:, 0]), torch.from_numpy(first.train[:, 1]))
    second = teacher_logits(path, checkpoint, elpv_small, VIEWS, tmp_path)
    assert second.computed == 0 and second.teacher_runs == 0
    assert (second.train == first.train).all() and (second.val == first.val).all()
    # One more view computes only that view.
    third = teacher_logits(path, checkpoint, elpv_small, VIEWS + 1, tmp_path)
    assert third.computed == n_train and (third.train[:, :VIEWS] == first.train).all()


def test_kd_loss_is_cross_entropy_at_alpha_zero_and_zero_kl_for_a_perfect_student() -> None:
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 4), torch.randn(8, 4), torch.randint(0, 4, (8,))
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0])
    targets = pack_targets(labels, teacher)
    expected = nn.functional.cross_entropy(student, labels, weight=weight, label_smoothing=0.1)
    assert torch.allclose(kd_loss(0.0, 4.0, weight, 0.1)(student, targets), expected)
    # alpha=1 and a student equal to the teacher: the KL term is zero.
    assert kd_loss(1.0, 4.0)(teacher, targets).abs().item() < 1e-6
    soft = kd_loss(1.0, 2.0)(student, targets)
    kl = nn.functional.kl_div(nn.functional.log_softmax(student / 2, 1), nn.functional.softmax(teacher / 2, 1),
                              reduction="batchmean")
    assert torch.allclose(soft, 4 * kl, atol=1e-6)
    mixed = kd_loss(0.5, 2.0)(student, targets)
    assert torch.allclose(mixed, 0.5 * nn.functional.cross_entropy(student, labels) + 0.5 * 4 * kl, atol=1e-6)


def test_a_missing_or_mislabelled_teacher_fails_in_one_line(tmp_path: Path, elpv_small: Dataset) -> None:
    with pytest.raises(TeacherError, match=r"^finetune\.distill\.teacher: .*nope\.pt not found") as error:
        teacher_checkpoint(tmp_path / "nope.pt", elpv_small.labels)
    assert "\n" not in str(error.value)
    other = make_teacher(tmp_path / "other.pt", elpv_small, labels=["a", "b"])
    with pytest.raises(TeacherError, match="finetune.distill.teacher: .* predicts \\['a', 'b'\\]"):
        teacher_checkpoint(other, elpv_small.labels)


def test_partial_strategy_distils_and_reuses_the_cached_logits(teacher: Path, elpv_small: Dataset,
                                                               tmp_path: Path) -> None:
    features_dir = make_features(elpv_small, tmp_path)
    settings = {"strategy": "partial", "partial": {"epochs": 1, "batch_size": 16, "views": VIEWS, "blocks": 1},
                "distill": {"teacher": str(teacher), "alpha": 0.7, "temperature": 3.0}}

    def finetune(out: str, seed: int) -> dict:
        cfg = FinetuneConfig.model_validate({**settings, "seed": seed})
        run(cfg, "efficientnet_lite0", features_dir, elpv_small, elpv_small.root / "manifest.csv",
                     tmp_path / out, tmp_path / "feature_cache", tmp_path / "state")
        return json.loads((tmp_path / out / "finetune.json").read_text())["info"]["distill"]

    n_train, n_val = len(elpv_small.split("train")), len(elpv_small.split("val"))
    first = finetune("a", 0)
    assert first["teacher_pairs_computed"] == n_train * VIEWS + n_val
    assert round(first["teacher_val_accuracy"] * n_val) == pytest.approx(first["teacher_val_accuracy"] * n_val)
    second = finetune("b", 1)  # another seed: the student trains again, the teacher does not run
    assert second["teacher_pairs_computed"] == 0 and second["teacher_onnx_runs"] == 0
    missing = FinetuneConfig.model_validate({**settings, "distill": {"teacher": str(tmp_path / "gone.pt")}})
    with pytest.raises(TeacherError, match="finetune.distill.teacher"):
        run(missing, "efficientnet_lite0", features_dir, elpv_small, elpv_small.root / "manifest.csv",
            tmp_path / "c", tmp_path / "feature_cache", tmp_path / "state")
