"""Few-shot: the prototypes strategy, its ONNX graph, and adding a class to it from a few images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from PIL import Image

from components.data.preprocess import load_batch
from components.features.cache import split_features
from components.models.onnx_io import model_labels, open_session, read_metadata
from components.packaging import compress, export, int8_search
from components.packaging.add_class import AddClassError, add_class
from components.packaging.config import CompressConfig
from components.training.config import FinetuneConfig
from components.training.finetune import run
from components.training.strategies.prototypes import support
from tests.tiny_features import make_features
from tests.tiny_model import make_checkpoint, make_dataset

BACKBONE = "efficientnet_lite0"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("prototypes")
    dataset = make_dataset(root / "data")
    features = make_features(dataset, root)
    result = run(FinetuneConfig(strategy="prototypes"), BACKBONE, features, dataset, root / "data" / "manifest.csv",
                 root / "finetune", root / "feature_cache", root / "state")
    exported = export.run(export.ExportConfig(parity_images=4), 0.0, result.artifacts["checkpoint"], dataset,
                          root / "export", features_dir=features)
    return root, dataset, features, result, exported.artifacts["fp32"]


def test_the_exported_graph_computes_simpleshot_as_numpy_does(trained) -> None:
    root, dataset, features, result, model = trained
    train = split_features(dataset, features, BACKBONE, "pooled", "train")
    labels = np.asarray(dataset.label_index(dataset.split("train")))
    # SimpleShot by hand: centre on the train mean, L2-normalise, class means normalised, cosine x scale.
    mean = train.mean(0)
    unit = (train - mean) / np.linalg.norm(train - mean, axis=1, keepdims=True)
    prototypes = np.stack([unit[labels == c].mean(0) / np.linalg.norm(unit[labels == c].mean(0)) for c in (0, 1)], 1)
    test = dataset.split("test")
    x = split_features(dataset, features, BACKBONE, "pooled", "test")
    embedding = (x - mean) / np.linalg.norm(x - mean, axis=1, keepdims=True)
    scale = result.metrics and float(read_scale(root / "finetune" / "finetune.json"))
    expected = embedding @ prototypes * scale

    session = open_session(model)
    images = load_batch([dataset.image_path(p) for p in test["path"]], dataset_preprocessing(model))
    logits, got_embedding = session.run(["logits", "embedding"], {"image": images})
    assert [o.name for o in session.get_outputs()] == ["logits", "embedding"]  # logits first: every consumer reads it
    np.testing.assert_allclose(got_embedding, embedding, atol=1e-4)
    np.testing.assert_allclose(logits, expected, atol=1e-4 * scale)
    assert read_metadata(model)["head"] == "prototypes" and read_metadata(model)["strategy"] == "prototypes"


def read_scale(report: Path) -> float:
    import json

    return json.loads(report.read_text())["info"]["scale"]


def dataset_preprocessing(model: Path):  # noqa: ANN201
    from components.models.onnx_io import model_preprocessing

    return model_preprocessing(model, read_metadata(model))


def test_shots_take_at_most_k_images_per_class_the_same_ones_for_a_seed() -> None:
    frame = pd.DataFrame({"label": ["a"] * 6 + ["b"] * 3, "sha256": [f"{i:064x}" for i in range(9)]})
    chosen = support(frame, 2, seed=0)
    assert frame.iloc[chosen]["label"].value_counts().to_dict() == {"a": 2, "b": 2}
    assert list(chosen) == list(support(frame, 2, seed=0)) and list(support(frame, None, 0)) == list(range(9))
    assert any(list(support(frame, 2, seed=s)) != list(chosen) for s in range(1, 5))


def write_images(folder: Path, level: int, count: int = 3) -> Path:
    rng = np.random.default_rng(level)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.clip(rng.normal(level, 15, (40, 40)), 0, 255).astype(np.uint8), "L").save(folder / f"{i}.png")
    return folder


def test_add_class_makes_a_model_that_predicts_the_new_class_for_its_images(trained, tmp_path: Path) -> None:
    root, dataset, features, result, model = trained
    # A class unlike the two: striped cells.
    folder = tmp_path / "striped"
    folder.mkdir()
    for i in range(3):
        pixels = np.zeros((40, 40), np.uint8)
        pixels[:, (i % 2)::4] = 255
        Image.fromarray(pixels, "L").save(folder / f"s{i}.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    added = add_class(model, "striped", folder, tmp_path / "model.onnx")
    assert added.labels == [*dataset.labels, "striped"] and len(added.images) == 3 and len(added.skipped) == 1
    assert added.predicted_as_new == 1.0
    assert list(model_labels(added.path, read_metadata(added.path))) == added.labels
    # The old classes' logits are unchanged; the graph is a valid model with a third logit.
    images = load_batch([dataset.image_path(p) for p in dataset.split("test")["path"]], dataset_preprocessing(model))
    before = open_session(model).run(["logits"], {"image": images})[0]
    after = open_session(added.path).run(["logits"], {"image": images})[0]
    assert after.shape == (len(images), 3)
    np.testing.assert_array_equal(after[:, :2], before)
    onnx.checker.check_model(str(added.path), full_check=True)


def test_add_class_refuses_what_it_cannot_work_with(trained, tmp_path: Path) -> None:
    root, dataset, features, result, model = trained
    images = write_images(tmp_path / "new", 128)
    with pytest.raises(AddClassError, match="already exists"):
        add_class(model, "defective", images, tmp_path / "x.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AddClassError, match="no images"):
        add_class(model, "new", tmp_path / "empty", tmp_path / "x.onnx")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"")
    with pytest.raises(AddClassError, match="none of its 1 image file"):
        add_class(model, "new", tmp_path / "junk", tmp_path / "x.onnx")
    linear = export.run(export.ExportConfig(parity_images=4), 0.0, make_checkpoint(tmp_path / "linear.pt", dataset),
                        dataset, tmp_path / "linear", features_dir=features).artifacts["fp32"]
    with pytest.raises(AddClassError, match="a linear model .head 'linear'.; add-class adds a prototype"):
        add_class(linear, "new", images, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_compress_keeps_the_prototype_head_in_fp32_so_a_class_can_still_be_added(trained, tmp_path: Path) -> None:
    root, dataset, features, result, model = trained
    export_dir = root / "export"
    cfg = CompressConfig(calibration_images=4, max_accuracy_drop=1.0, latency_runs=1, max_fp32_nodes=0)
    shipped = compress.run(cfg, export_dir, dataset, tmp_path / "compress")
    int8 = tmp_path / "compress" / int8_search.INT8_FILE
    graph = onnx.load(str(int8)).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # the trunk is INT8
    head = [n for n in graph.node if n.op_type == "MatMul" and n.input[0] == "embedding"]
    assert head and head[0].input[1] in {t.name for t in graph.initializer}
    added = add_class(int8, "bright", write_images(tmp_path / "bright", 250), tmp_path / "added.onnx")
    assert added.labels[-1] == "bright" and shipped.info["shipped"] in ("int8", "fp32")
