"""The negative-transfer guard: the pixel reference and the verdict, on real features and real cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from components.data.config import IngestConfig
from components.data.ingest import run as ingest_run
from components.data.manifest import Dataset, read_manifest
from components.features import extract as features
from components.features.cache import split_features
from components.features.config import FeaturesConfig
from components.training.config import ReferenceConfig
from components.training.reference import DEEPER_FINETUNING, ReferenceError, ReferenceResult, fit_reference, judge
from tests.far_dataset import CLASSES, write_far_dataset

BACKBONE = "efficientnet_lite0"


@pytest.fixture(scope="module")
def far(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Path]:
    """The far dataset ingested, and real Lite0 pooled features of it (64 px)."""
    root = tmp_path_factory.mktemp("far")
    write_far_dataset(root / "source", per_class=50, size=64, seed=0, contrast=0.08)
    ingest_run(IngestConfig(source="imagefolder", path=str(root / "source"), test_fraction=0.1, val_fraction=0.4),
               root / "data")
    dataset = read_manifest(root / "data" / "manifest.csv")
    features.run(FeaturesConfig(image_size=64), (BACKBONE,), dataset, root / "cache", root / "features")
    return dataset, root / "features"


def frozen_probe_accuracy(dataset: Dataset, features_dir: Path) -> float:
    """Best val accuracy of a logistic-regression probe on standardised frozen pooled features.

    C is chosen on val itself, which flatters the probe: the guard must fire even so.
    """
    splits = {
        split: (split_features(dataset, features_dir, BACKBONE, "pooled", split),
                np.asarray(dataset.label_index(dataset.split(split))))
        for split in ("train", "val")
    }
    scaler = StandardScaler().fit(splits["train"][0])
    x_train, x_val = scaler.transform(splits["train"][0]), scaler.transform(splits["val"][0])
    accuracies = []
    for c in (0.001, 0.01, 0.1, 1.0):
        probe = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(x_train, splits["train"][1])
        accuracies.append(float((probe.predict(x_val) == splits["val"][1]).mean()))
    return max(accuracies)


def test_on_far_data_the_pixel_reference_beats_frozen_features_and_the_guard_fires(far: tuple[Dataset, Path]) -> None:
    dataset, features_dir = far
    reference = fit_reference(ReferenceConfig(), dataset)
    assert dataset.labels == CLASSES
    assert reference.val_accuracy > 0.8  # the pixels carry the label
    probe = frozen_probe_accuracy(dataset, features_dir)
    assert probe < reference.val_accuracy - 0.15  # the ImageNet features do not
    verdict = judge(probe, reference, margin=0.02, model=f"{BACKBONE}/linear")
    assert verdict.fired
    assert verdict.message.startswith("negative transfer:") and DEEPER_FINETUNING in verdict.message
    assert reference.n_train == len(dataset.split("train")) and reference.n_val == len(dataset.split("val"))


def test_on_real_cells_the_reference_is_fitted_and_a_clearly_better_model_passes(tmp_path: Path) -> None:
    ingest_run(IngestConfig(limit=200, seed=7), tmp_path)
    cells = read_manifest(tmp_path / "manifest.csv")
    cfg = ReferenceConfig(regularization=(0.01, 0.1))
    reference = fit_reference(cfg, cells)
    assert reference.regularization in cfg.regularization and reference.image_size == 32
    assert (reference.n_train, reference.n_val) == (len(cells.split("train")), len(cells.split("val")))
    better = reference.val_accuracy + 0.05
    assert not judge(better, reference, 0.02, "efficientnet_lite0/full").fired
    assert judge(reference.val_accuracy + 0.02, reference, 0.02, "efficientnet_lite0/full").fired  # a tie is no gain


def test_the_reference_is_deterministic(far: tuple[Dataset, Path]) -> None:
    dataset, _ = far
    first, second = (fit_reference(ReferenceConfig(image_size=16), dataset) for _ in range(2))
    assert {**first.metrics(), "reference_seconds": 0} == {**second.metrics(), "reference_seconds": 0}


def test_the_message_names_the_model_both_accuracies_and_the_margin() -> None:
    reference = ReferenceResult(val_accuracy=0.744, val_macro_f1=0.7, val_log_loss=0.5, regularization=0.01,
                                image_size=32, n_train=100, n_val=40, seconds=1.0)
    fired = judge(0.612, reference, 0.02, "efficientnet_lite0/linear")
    assert fired.message == (
        "negative transfer: efficientnet_lite0/linear reaches val accuracy 0.612, not above the pixel reference's "
        "0.744 + margin 0.02; the pretrained features do not help here — try finetune.strategy=partial or full "
        "(auto does this)"
    )
    passed = judge(0.9, reference, 0.05, "efficientnet_lite2/partial")
    assert not passed.fired and "efficientnet_lite2/partial" in passed.message and "0.900" in passed.message
    assert "0.744 + margin 0.05" in passed.message and "\n" not in fired.message + passed.message
    assert judge(float("nan"), reference, 0.02, "m").fired  # a model with no score has not shown it helps
    texts = ReferenceResult(val_accuracy=0.982, val_macro_f1=0.98, val_log_loss=0.1, regularization=100.0, image_size=0,
                            n_train=100, n_val=40, seconds=1.0, kind="tfidf 1-2 grams, 900 terms")
    assert "not above the TF-IDF reference's 0.982" in judge(0.968, texts, 0.02, "all_minilm_l6_v2/linear").message


@pytest.mark.parametrize(
    ("values", "field"),
    [({"regularization": ()}, "regularization"), ({"regularization": (0.1, 0.0)}, "regularization"),
     ({"image_size": 0}, "image_size"), ({"margin": -0.1}, "margin"), ({"pixels": 32}, "pixels")],
)
def test_bad_config_fails_at_load_naming_the_field(values: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        ReferenceConfig.model_validate(values)


def test_a_dataset_without_val_rows_is_refused_by_name(far: tuple[Dataset, Path]) -> None:
    dataset, _ = far
    no_val = dataset.manifest[dataset.manifest["split"] != "val"]
    with pytest.raises(ReferenceError, match="no 'val' rows"):
        fit_reference(ReferenceConfig(), Dataset(no_val, dataset.root, dataset.labels))
