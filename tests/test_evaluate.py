"""Evaluate: the shipped ONNX model scored on the test split, with its files in DVC's formats."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from components.evaluation.config import EvaluateConfig
from components.evaluation.evaluate import (
    calibration_table,
    decide,
    expected_calibration_error,
    metrics_document,
    run,
)
from components.models.onnx_io import LabelMismatchError
from components.packaging import export
from tests.tiny_features import make_features
from tests.tiny_model import make_checkpoint, make_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("evaluate")
    dataset = make_dataset(root / "data")
    checkpoint = make_checkpoint(root / "model.pt", dataset)
    result = export.run(export.ExportConfig(), 0.0, checkpoint, dataset, root / "export",
               features_dir=make_features(dataset, root))
    return root, dataset, result.artifacts["fp32"]


def test_evaluate_returns_metrics_and_writes_predictions_and_plots(shipped) -> None:
    root, dataset, model = shipped
    out = root / "evaluate"
    result = run(EvaluateConfig(batch_size=3), model, dataset, out)  # 3 forces a partial last batch

    metrics = result.metrics
    assert {"precision_defective", "recall_functional"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())  # flat, as MLflow needs

    test = dataset.split("test")
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["path", "actual", "predicted", "confidence", "domain"]
    assert len(predictions) == len(test)
    assert list(predictions["actual"]) == list(test["label"])
    assert set(predictions["predicted"]) <= set(dataset.labels)
    assert predictions["confidence"].between(0.5, 1.0).all()  # max softmax of two classes
    assert metrics["accuracy"] == pytest.approx((predictions["actual"] == predictions["predicted"]).mean())
    # Macro-F1 and ECE are what the written predictions give, computed here another way.
    assert metrics["macro_f1"] == pytest.approx(
        f1_score(predictions["actual"], predictions["predicted"], labels=list(dataset.labels), average="macro"))
    correct = (predictions["actual"] == predictions["predicted"]).to_numpy()
    bins = np.minimum((predictions["confidence"].to_numpy() * 10).astype(int), 9)  # EvaluateConfig's 10 bins
    gaps = [abs(correct[bins == b].mean() - predictions["confidence"].to_numpy()[bins == b].mean()) * (bins == b).sum()
            for b in np.unique(bins)]
    assert metrics["ece"] == pytest.approx(sum(gaps) / len(predictions), abs=1e-6)
    assert np.array(result.info["confusion_matrix"]).sum() == len(test)

    for name in ("confusion_matrix.png", "reliability.png", "by_domain.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC

    # Every metric per domain, each computed on that domain's test images alone.
    for domain in ("mono", "poly"):
        rows = np.asarray(test["domain"] == domain)
        block = {k.removeprefix(f"by_domain.{domain}."): v for k, v in metrics.items() if k.startswith(f"by_domain.{domain}.")}
        assert set(block) == {k for k in metrics if not k.startswith("by_domain.")}
        assert block["n_test"] == rows.sum()
        assert block["accuracy"] == pytest.approx((predictions["actual"] == predictions["predicted"])[rows].mean())
    document = metrics_document(metrics)
    assert document["by_domain"]["poly"]["accuracy"] == metrics["by_domain.poly.accuracy"]
    assert not any(k.startswith("by_domain.") for k in document)


def test_evaluate_reports_no_domains_for_a_dataset_without_them(shipped) -> None:
    root, dataset, model = shipped
    plain = replace(dataset, manifest=dataset.manifest.drop(columns="domain"))
    result = run(EvaluateConfig(), model, plain, root / "plain")
    assert not any(k.startswith("by_domain.") for k in result.metrics)
    assert (root / "plain" / "by_domain.png").read_bytes()[:8] == PNG_MAGIC  # DVC declares it: always there


def test_evaluate_refuses_a_dataset_with_other_labels(shipped) -> None:
    root, dataset, model = shipped
    renamed = dataset.manifest.assign(label=dataset.manifest["label"].replace("defective", "cracked"))
    other = replace(dataset, manifest=renamed, labels=("cracked", "functional"))
    with pytest.raises(LabelMismatchError, match=r"model_fp32.onnx: the model's labels \['defective', 'functional'\]"):
        run(EvaluateConfig(), model, other, root / "mismatch")
    assert not (root / "mismatch" / "predictions.csv").exists()


def test_expected_calibration_error_on_known_cases() -> None:
    confidence = np.full(10, 0.75)
    calibrated = np.array([True] * 7 + [False] * 3)  # 70% right at 75% confidence: ECE 0.05
    assert expected_calibration_error(calibration_table(confidence, calibrated, 10)) == pytest.approx(0.05)
    always_wrong = calibration_table(np.ones(4), np.zeros(4, dtype=bool), 10)
    assert always_wrong["count"].tolist() == [0] * 9 + [4]  # confidence 1.0 lands in the last bin
    assert expected_calibration_error(always_wrong) == pytest.approx(1.0)


def test_the_predicted_class_is_the_logits_argmax_even_where_softmax_ties() -> None:
    # Logits one float32 ulp apart (INT8 logits averaged over views): float32 softmax gives 0.5 / 0.5.
    logits = np.array([[0.0, 7.450581e-09], [0.0217996, 0.021799602], [2.0, -1.0]], dtype=np.float32)
    predicted, confidence = decide(logits)
    assert predicted.tolist() == [1, 1, 0]
    assert confidence[:2].tolist() == [0.5, 0.5]
    assert confidence[2] == pytest.approx(1 / (1 + np.exp(-3.0)))
