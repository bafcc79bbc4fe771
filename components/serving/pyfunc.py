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
from components.models.onnx_io import model_labels, model_preprocessing, read_metadata
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
    try:
        labels = model_labels(onnx_path, metadata)
        model_preprocessing(onnx_path, metadata)
    except KeyError as error:
        raise UserError(str(error.args[0])) from None
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=OnnxImageClassifier(),
        artifacts={ARTIFACT_KEY: str(onnx_path)},
        registered_model_name=registered_model_name,
        signature=SIGNATURE,
        input_example=input_example(),
        pip_requirements=pip_requirements(),
        metadata={"labels": list(labels), "onnx_sha256": sha256_of(onnx_path), "onnx_file": onnx_path.name},
    )
    log.info("logged %s as pyfunc model %s", onnx_path, info.model_uri)
    return info
