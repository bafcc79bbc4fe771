"""`tlops fewshot` and `tlops add-class` on a real small pipeline: MLflow runs, the registry, the promotion gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from components.data.preprocess import load_batch
from components.models.onnx_io import model_preprocessing, open_session, read_metadata
from tests.conftest import small_params
from tlops.cli import main
from tlops.config import load_params
from tlops.stages import ORDER

pytestmark = pytest.mark.slow


def striped(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.zeros((48, 48), np.uint8)
        pixels[:, i % 2::4] = 255
        Image.fromarray(pixels, "L").save(folder / f"striped{i}.png")
    return folder


def test_fewshot_and_add_class_through_the_cli(tmp_path: Path, capsys) -> None:
    params_file = small_params(tmp_path, finetune={"strategy": "prototypes"}, register={"model_name": "tlops-proto"},
                               ingest={"limit": 120})
    params = load_params(params_file)
    for name in ORDER:  # the whole pipeline with the prototypes strategy (what dvc repro runs): the champion
        assert main(["stage", name, "--params", str(params_file)]) == 0
    assert json.loads((params.path("promote") / "promotion.json").read_text())["decision"] == "first"

    assert main(["fewshot", "--params", str(params_file), "--shots", "1,2", "--episodes", "4"]) == 0
    report = json.loads((params.path("fewshot") / "fewshot.json").read_text())
    assert set(report) == {"1", "2"}
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("tlops").experiment_id],
                                     "tags.`tlops.kind` = 'fewshot'")[0]
    assert run.data.metrics["fewshot.2.prototypes.mean"] == report["2"]["prototypes"]["mean"]

    images = striped(tmp_path / "striped")
    assert main(["add-class", "striped", "--images", str(images), "--params", str(params_file)]) == 0
    out = capsys.readouterr().out
    model = params.path("add_class") / "model.onnx"
    metadata = read_metadata(model)
    assert json.loads(metadata["labels"])[-1] == "striped"
    session = open_session(model)
    batch = load_batch(sorted(images.iterdir()), model_preprocessing(model, metadata))
    assert (session.run(["logits"], {"image": batch})[0].argmax(1) == 2).all()  # its images are the new class
    client = MlflowClient()
    version = client.get_model_version_by_alias("tlops-proto", "challenger")
    assert str(version.version) == "2" and version.tags["added_class"] == "striped"
    promotion = json.loads((params.path("add_class") / "promote" / "promotion.json").read_text())
    # The new class has no test images: the gate judged non-inferiority on the old ones, and said so.
    assert promotion["candidate"]["untested_labels"] == ["striped"]
    assert "no test images" in promotion["reason"] or "loses" in promotion["reason"]
    assert client.get_model_version("tlops-proto", "2").tags["promote.untested_classes"] == '["striped"]'
    assert "registered" in out and "promotion" in out

    # Bad input: one line each, nothing registered.
    assert main(["add-class", "striped", "--images", str(images), "--params", str(params_file),
                 "--model", str(model)]) == 1
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["add-class", "cracked", "--images", str(tmp_path / "empty"), "--params", str(params_file)]) == 1
    assert "no images" in capsys.readouterr().err
    linear = params.path("compress") / "model.onnx"
    assert main(["add-class", "cracked", "--images", str(images), "--params", str(params_file),
                 "--set", "finetune.strategy=linear", "--model", str(tmp_path / "missing.onnx")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert linear.exists()
    assert len(client.search_model_versions("name='tlops-proto'")) == 2
