"""A tlops ONNX model ready to serve: where it comes from (registry alias, version or file), its session, predictions.

The model explains itself: labels and preprocessing come from its `metadata_props`, never from
configuration. Used by the service (components/serving/server.py) and the registered pyfunc model
(components/serving/pyfunc.py).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnxruntime as ort
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from components.core.errors import UserError
from components.data.preprocess import Preprocessing, preprocess_image
from components.models.onnx_io import model_labels, model_preprocessing, open_session, read_metadata, softmax
from components.serving.config import parse_registry_uri
from components.serving.image_decoding import BadInputError


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and which version that is right now."""

    uri: str
    version: str  # the registry version, or `sha256:<12 hex>` of a local file
    name: str | None = None  # registered model name, for registry URIs
    alias: str | None = None


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]
    model_version: str

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "probabilities": self.probabilities, "model_version": self.model_version}


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One ONNX Runtime session and what its metadata says about its input and output."""

    source: ModelSource
    session: ort.InferenceSession
    labels: tuple[str, ...]
    preprocessing: Preprocessing  # as read from the metadata
    metadata: dict[str, str]
    sha256: str

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """A decoded image -> the CHW float32 array this model takes."""
        try:
            return preprocess_image(image, self.preprocessing)
        except Exception as error:  # noqa: BLE001 - e.g. a pixel mode that has no RGB conversion
            raise BadInputError("unsupported_image", f"a {image.mode} image cannot be converted to RGB: {error}") from None

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """NCHW float32 -> class probabilities, one row per image."""
        logits = self.session.run(None, {self.session.get_inputs()[0].name: batch})[0]
        return softmax(logits.astype(np.float64))

    def predictions(self, batch: np.ndarray) -> list[Prediction]:
        rows = self.probabilities(batch)
        return [
            Prediction(
                label=self.labels[int(row.argmax())],
                probabilities={label: float(p) for label, p in zip(self.labels, row, strict=True)},
                model_version=self.source.version,
            )
            for row in rows
        ]

    def warm_up(self, max_batch: int) -> None:
        """Run the shapes the batcher will send first, so the first client does not pay for them."""
        for size in sorted({1, max_batch}):
            self.probabilities(np.zeros((size, 3, self.input_size, self.input_size), dtype=np.float32))

    def describe(self) -> dict[str, Any]:
        return {
            "uri": self.source.uri,
            "name": self.source.name,
            "alias": self.source.alias,
            "version": self.source.version,
            "sha256": self.sha256,
            "labels": list(self.labels),
            "preprocessing": self.preprocessing.model_dump(mode="json"),
            "metadata": self.metadata,
        }


def classify(model: LoadedModel, images: Sequence[Image.Image], batch_size: int = 32) -> list[Prediction]:
    """Predictions for decoded images without the batcher (the pyfunc model's path)."""
    out: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        out += model.predictions(np.stack([model.preprocess(image) for image in images[start : start + batch_size]]))
    return out


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_onnx(path: Path, source: ModelSource, num_threads: int = 0) -> LoadedModel:
    """An ONNX file exported by tlops -> a ready session with its labels and preprocessing."""
    # The one place that reads preprocessing: the model's metadata_props decide, nothing else.
    metadata = read_metadata(path)
    try:
        labels = model_labels(path, metadata)
        preprocessing = model_preprocessing(path, metadata)
    except (KeyError, UserError) as error:
        raise UserError(f"{source.uri}: {error.args[0]}") from None
    return LoadedModel(
        source=source,
        session=open_session(path, num_threads),
        labels=labels,
        preprocessing=preprocessing,
        metadata=metadata,
        sha256=sha256_of(path),
    )


def resolve_source(uri: str) -> ModelSource:
    """Which version `uri` names now: a registry lookup for `models:/`, a file hash for a path (no download)."""
    if uri.startswith("models:/"):
        name, alias, version = parse_registry_uri(uri)
        try:
            found = MlflowClient().get_model_version_by_alias(name, alias) if alias else MlflowClient().get_model_version(name, version)
        except MlflowException as error:
            raise UserError(
                f"model_uri {uri!r}: the registry at {mlflow.get_tracking_uri()} does not resolve it "
                f"({error.message.splitlines()[0]}); check MLFLOW_TRACKING_URI and the model's aliases."
            ) from None
        return ModelSource(uri=uri, version=str(found.version), name=name, alias=alias)
    path = Path(uri)
    if not path.is_file():
        raise UserError(f"model_uri {uri!r}: no such file; pass an ONNX file exported by tlops or a models:/ URI.")
    return ModelSource(uri=uri, version=f"sha256:{sha256_of(path)[:12]}")


def load_source(source: ModelSource, num_threads: int = 0) -> LoadedModel:
    """Fetch the ONNX file `source` names (the exact registry version, not the alias) and open it."""
    if source.name is None:
        return load_onnx(Path(source.uri), source, num_threads)
    with tempfile.TemporaryDirectory(prefix="tlops-serve-") as folder:
        # Download by version: the alias may move while we download.
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{source.name}/{source.version}",
                                                         dst_path=folder))
        files = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
        if len(files) != 1:
            raise UserError(
                f"model_uri {source.uri!r}: version {source.version} holds {len(files)} ONNX files "
                f"({[f.name for f in files]}); register exactly one (components.pyfunc_model.log_model)."
            )
        # The session holds the graph in memory (no external data), so the download can go.
        return load_onnx(files[0], source, num_threads)
