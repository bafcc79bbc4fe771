"""The registered model as an MLflow pyfunc: the ONNX file as an artifact, base64 images in, labels out.

`mlflow models serve -m models:/<name>@champion --env-manager local` then answers
`/invocations` with the same predictions as `tlops serve`: both decode with
`components.serving.image_decoding.decode_image` and run the file's own preprocessing in ONNX Runtime. The
ONNX file is stored byte-for-byte (no re-serialisation, no external data), so its sha256 in
the registry is the sha256 of what was exported.

The python model is pickled by reference, so loading it needs `components` importable (tlops
installed, or the repository on the path), which `--env-manager local` in the tlops venv gives.
"""

from __future__ import annotations

import base64
import importlib.metadata
import io
import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types.schema import ColSpec, DataType, Map, Schema
from PIL import Image

from components.core.errors import UserError
from components.data.tokenization import encode, is_text_metadata
from components.models.onnx_io import (
    model_labels,
    model_preprocessing,
    model_tokenizer,
    open_session,
    read_metadata,
    softmax,
)
from components.serving.image_decoding import BadInputError, decode_base64, decode_image
from components.serving.served_model import LoadedModel, ModelSource, classify, load_onnx, sha256_of

log = logging.getLogger(__name__)

ARTIFACT_KEY = "onnx_model"
IMAGE_COLUMN = "image"
MAX_PIXELS = 16_000_000  # the same default as ServeConfig.max_image_megapixels
# What the pyfunc imports at load time, pinned to the versions it was logged with.
REQUIREMENTS = ("mlflow", "onnx", "onnxruntime", "numpy", "pandas", "pillow", "pydantic")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
    outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(Map(DataType.double), "probabilities")]),
)


class OnnxImageClassifier(PythonModel):
    """A DataFrame with a base64 `image` column -> one row per image: `label`, `probabilities`."""

    def load_context(self, context: PythonModelContext) -> None:
        path = Path(context.artifacts[ARTIFACT_KEY])
        self._model: LoadedModel = load_onnx(path, ModelSource(uri=str(path), version=f"sha256:{sha256_of(path)[:12]}"))

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"the input has columns {list(model_input.columns)}; send one column `{IMAGE_COLUMN}` of base64 images."
            )
        try:
            images = [decode_image(decode_base64(text, i), MAX_PIXELS) for i, text in enumerate(model_input[IMAGE_COLUMN])]
            predictions = classify(self._model, images)
        except BadInputError as error:
            raise MlflowException.invalid_parameter_value(f"{error.kind}: {error}") from None
        return pd.DataFrame({"label": [p.label for p in predictions],
                             "probabilities": [p.probabilities for p in predictions]})


TEXT_COLUMN = "text"
TEXT_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, TEXT_COLUMN)]),
    outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(Map(DataType.double), "probabilities")]),
)


class OnnxTextClassifier(PythonModel):
    """A DataFrame with a `text` column -> one row per text: `label`, `probabilities`.

    Tokenized by the `tokenizers` library with the tokenizer file and settings the model carries in its
    metadata_props (no torch), as `tlops serve` and every pipeline stage tokenize it."""

    def load_context(self, context: PythonModelContext) -> None:
        path = Path(context.artifacts[ARTIFACT_KEY])
        metadata = read_metadata(path)
        self._session = open_session(path)
        self._tokenizer = model_tokenizer(path, metadata)
        self._labels = model_labels(path, metadata)

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        if TEXT_COLUMN not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"the input has columns {list(model_input.columns)}; send one column `{TEXT_COLUMN}` of texts.")
        texts = list(model_input[TEXT_COLUMN])
        for position, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise MlflowException.invalid_parameter_value(f"empty_text: text[{position}] is empty or not a string.")
        rows = []
        for start in range(0, len(texts), 32):
            rows.append(softmax(self._session.run(None, encode(self._tokenizer, texts[start : start + 32]))[0]
                                .astype(np.float64)))
        probabilities = np.concatenate(rows) if rows else np.zeros((0, len(self._labels)))
        return pd.DataFrame({"label": [self._labels[int(r.argmax())] for r in probabilities],
                             "probabilities": [dict(zip(self._labels, map(float, r))) for r in probabilities]})


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer)


def input_example() -> pd.DataFrame:
    """One small grey PNG: MLflow stores it as the serving example and predicts on it before logging."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 128, dtype=np.uint8)).save(buffer, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(buffer.getvalue()).decode()]})


def pip_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def log_model(onnx_path: Path, registered_model_name: str) -> ModelInfo:
    """Log `onnx_path` as a pyfunc model named `model` in the active run and register a new version.

    The file must be a tlops export (labels and preprocessing in its metadata_props) stored in
    one piece; both are checked before anything is logged.
    """
    if mlflow.active_run() is None:
        raise RuntimeError("pyfunc_model.log_model needs an active MLflow run (call it inside mlflow.start_run()).")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path}: ONNX model not found; run the stage that writes it first.")
    if uses_external_data(onnx.load(str(onnx_path), load_external_data=False)):
        raise UserError(f"{onnx_path}: its weights live in external data files; save it as one file to register it.")
    metadata = read_metadata(onnx_path)
    texts = is_text_metadata(metadata)
    try:
        labels = model_labels(onnx_path, metadata)
        model_tokenizer(onnx_path, metadata) if texts else model_preprocessing(onnx_path, metadata)
    except KeyError as error:
        raise UserError(str(error.args[0])) from None
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=OnnxTextClassifier() if texts else OnnxImageClassifier(),
        artifacts={ARTIFACT_KEY: str(onnx_path)},
        registered_model_name=registered_model_name,
        signature=TEXT_SIGNATURE if texts else SIGNATURE,
        input_example=pd.DataFrame({TEXT_COLUMN: ["Shares rose after the bank's results."]}) if texts else input_example(),
        pip_requirements=pip_requirements() + ([f"tokenizers=={importlib.metadata.version('tokenizers')}"] if texts else []),
        metadata={"labels": list(labels), "onnx_sha256": sha256_of(onnx_path), "onnx_file": onnx_path.name},
    )
    log.info("logged %s as pyfunc model %s", onnx_path, info.model_uri)
    return info
