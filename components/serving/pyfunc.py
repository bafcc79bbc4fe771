"""The registered model as an MLflow pyfunc: the ONNX file as an artifact, base64 images (or texts) in, labels out.

`mlflow models serve -m models:/<name>@champion --env-manager local` then answers
`/invocations` with the same predictions as `tlops serve`: both decode with
`components.serving.image_decoding.decode_image` (or check texts with `components.serving.text_input`)
and run the file's own preprocessing or tokenizer in ONNX Runtime, through the same `LoadedModel`.
A model of several tasks gives the primary task as `label` and `probabilities`, and every other task
`<task>` as columns `<task>` and `<task>_probabilities`. The
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
from components.data.tokenization import is_text_metadata
from components.models.onnx_io import model_labels, model_preprocessing, model_tasks, model_tokenizer, read_metadata
from components.models.task_metadata import ModelTask
from components.serving.image_decoding import BadInputError, decode_base64, decode_image
from components.serving.served_model import LoadedModel, ModelSource, Prediction, classify, load_onnx, sha256_of
from components.serving.text_input import check_texts

log = logging.getLogger(__name__)

ARTIFACT_KEY = "onnx_model"
IMAGE_COLUMN = "image"
MAX_PIXELS = 16_000_000  # the same default as ServeConfig.max_image_megapixels
MAX_TEXT_CHARS = 100_000  # the same default as ServeConfig.max_text_chars
# What the pyfunc imports at load time, pinned to the versions it was logged with.
REQUIREMENTS = ("mlflow", "onnx", "onnxruntime", "numpy", "pandas", "pillow", "pydantic")

def signature(input_column: str, tasks: tuple[ModelTask, ...]) -> ModelSignature:
    """One string column in; the primary task's `label` and `probabilities` out, then `<task>` and
    `<task>_probabilities` for each other task."""
    outputs = [ColSpec(DataType.string, "label"), ColSpec(Map(DataType.double), "probabilities")]
    for task in tasks[1:]:
        outputs += [ColSpec(DataType.string, task.name), ColSpec(Map(DataType.double), f"{task.name}_probabilities")]
    return ModelSignature(inputs=Schema([ColSpec(DataType.string, input_column)]), outputs=Schema(outputs))


def prediction_frame(predictions: list[Prediction]) -> pd.DataFrame:
    columns: dict[str, list[Any]] = {"label": [p.label for p in predictions],
                                     "probabilities": [p.probabilities for p in predictions]}
    for index, prediction in enumerate(predictions):
        for name, task in list((prediction.tasks or {}).items())[1:]:
            columns.setdefault(name, [None] * len(predictions))[index] = task.label
            columns.setdefault(f"{name}_probabilities", [None] * len(predictions))[index] = task.probabilities
    return pd.DataFrame(columns)


class OnnxClassifier(PythonModel):
    """The ONNX file behind `LoadedModel`, as `tlops serve` runs it."""

    def load_context(self, context: PythonModelContext) -> None:
        path = Path(context.artifacts[ARTIFACT_KEY])
        self._model: LoadedModel = load_onnx(path, ModelSource(uri=str(path), version=f"sha256:{sha256_of(path)[:12]}"))


class OnnxImageClassifier(OnnxClassifier):
    """A DataFrame with a base64 `image` column -> one row per image: `label`, `probabilities` (and other tasks')."""

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"the input has columns {list(model_input.columns)}; send one column `{IMAGE_COLUMN}` of base64 images."
            )
        try:
            images = [decode_image(decode_base64(text, i), MAX_PIXELS) for i, text in enumerate(model_input[IMAGE_COLUMN])]
            return prediction_frame(classify(self._model, images))
        except BadInputError as error:
            raise MlflowException.invalid_parameter_value(f"{error.kind}: {error}") from None


TEXT_COLUMN = "text"


class OnnxTextClassifier(OnnxClassifier):
    """A DataFrame with a `text` column -> one row per text: `label`, `probabilities` (and other tasks').

    Tokenized by the `tokenizers` library with the tokenizer file and settings the model carries in its
    metadata_props (no torch), as `tlops serve` and every pipeline stage tokenize it."""

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        if TEXT_COLUMN not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"the input has columns {list(model_input.columns)}; send one column `{TEXT_COLUMN}` of texts.")
        try:
            return prediction_frame(classify(self._model, check_texts(list(model_input[TEXT_COLUMN]), MAX_TEXT_CHARS)))
        except BadInputError as error:
            raise MlflowException.invalid_parameter_value(f"{error.kind}: {error}") from None


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
        tasks = model_tasks(onnx_path, metadata)
        model_tokenizer(onnx_path, metadata) if texts else model_preprocessing(onnx_path, metadata)
    except KeyError as error:
        raise UserError(str(error.args[0])) from None
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=OnnxTextClassifier() if texts else OnnxImageClassifier(),
        artifacts={ARTIFACT_KEY: str(onnx_path)},
        registered_model_name=registered_model_name,
        signature=signature(TEXT_COLUMN if texts else IMAGE_COLUMN, tasks),
        input_example=pd.DataFrame({TEXT_COLUMN: ["Shares rose after the bank's results."]}) if texts else input_example(),
        pip_requirements=pip_requirements() + ([f"tokenizers=={importlib.metadata.version('tokenizers')}"] if texts else []),
        metadata={"labels": list(labels), "onnx_sha256": sha256_of(onnx_path), "onnx_file": onnx_path.name},
    )
    log.info("logged %s as pyfunc model %s", onnx_path, info.model_uri)
    return info
