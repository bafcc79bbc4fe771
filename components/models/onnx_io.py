"""ONNX models that explain themselves: metadata_props in and out, and batched ONNX Runtime inference.

A model exported by tlops carries its labels and preprocessing in `metadata_props`; every
consumer (compress, evaluate, serving) reads them from the file rather than from arguments,
so a model can never be fed images prepared for another one. A text model says `modality: text`
and carries its tokenizer file and settings instead (`components/data/tokenization.py`): it takes
`input_ids` and `attention_mask`, which `model_feeds` makes from raw texts the same way for everyone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd

from components.core.errors import UserError
from components.data.manifest import Dataset
from components.data.preprocess import Preprocessing, PreprocessingError, load_batch
from components.data.tokenization import (
    TokenizationError,
    encode,
    is_text_metadata,
    read_texts,
    tokenizer_from_metadata,
)
from components.models.task_metadata import ModelTask, inputs_per_call, tasks_from_metadata

log = logging.getLogger(__name__)


class LabelMismatchError(UserError):
    """A model asked to score a dataset whose label set is not the one it was trained on."""


def read_metadata(model_path: Path) -> dict[str, str]:
    model = onnx.load(str(model_path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def stamp_metadata(model_path: Path, props: Mapping[str, str]) -> Path:
    """Set (or overwrite) `props` in the file's metadata_props, keeping every other key."""
    model = onnx.load(str(model_path))
    merged = {prop.key: prop.value for prop in model.metadata_props} | {k: str(v) for k, v in props.items()}
    del model.metadata_props[:]
    for key, value in sorted(merged.items()):
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(model_path))
    return model_path


def model_preprocessing(model_path: Path, metadata: Mapping[str, str]) -> Preprocessing:
    """The preprocessing a model declares in its metadata_props; the error names the file."""
    try:
        return Preprocessing.from_metadata(metadata)
    except PreprocessingError as error:
        raise PreprocessingError(
            f"{model_path}: {error}; it was not exported by tlops (or was stripped). Re-export it with the export stage."
        ) from None


def model_tokenizer(model_path: Path, metadata: Mapping[str, str]):  # noqa: ANN201 - a tokenizers.Tokenizer
    """The tokenizer a text model carries in its metadata_props, set as it was trained; the error names the file."""
    try:
        return tokenizer_from_metadata(metadata)[1]
    except TokenizationError as error:
        raise TokenizationError(f"{model_path}: {error}; it was not exported by tlops (or was stripped). "
                                f"Re-export it with the export stage.") from None


def model_feeds(model_path: Path, metadata: Mapping[str, str], paths: list[Path]) -> dict[str, np.ndarray]:
    """The inputs of one ONNX Runtime call for the files at `paths`, prepared as the model's metadata says:
    images decoded and preprocessed (input `image`), or texts tokenized (`input_ids`, `attention_mask`)."""
    if is_text_metadata(metadata):
        return encode(model_tokenizer(model_path, metadata), read_texts(paths))
    return {"image": load_batch(paths, model_preprocessing(model_path, metadata))}


def model_labels(model_path: Path, metadata: Mapping[str, str]) -> tuple[str, ...]:
    if "labels" not in metadata:
        raise KeyError(f"{model_path}: metadata_props lack `labels`; re-export it with the export stage.")
    return tuple(json.loads(metadata["labels"]))


def model_tasks(model_path: Path, metadata: Mapping[str, str]) -> tuple[ModelTask, ...]:
    """The tasks a model answers, the primary first (`components/models/task_metadata.py`); the error names the file."""
    if "tasks" not in metadata:
        model_labels(model_path, metadata)  # a model that says neither is refused, naming the file
    return tasks_from_metadata(metadata)


def open_session(model_path: Path, num_threads: int = 0) -> ort.InferenceSession:
    """A CPU session; `num_threads` 0 lets ONNX Runtime use every core."""
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"{model_path}: ONNX model not found; run the stage that writes it first.")
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise here
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def predict_logits(
    session: ort.InferenceSession, paths: list[Path], preprocessing: Preprocessing, batch_size: int
) -> np.ndarray:
    """Logits for each image, decoded and preprocessed `batch_size` at a time."""
    input_name = session.get_inputs()[0].name
    batches = [
        session.run(None, {input_name: load_batch(paths[start : start + batch_size], preprocessing)})[0]
        for start in range(0, len(paths), batch_size)
    ]
    return np.concatenate(batches).astype(np.float32)


def predict_outputs(
    session: ort.InferenceSession, model_path: Path, metadata: Mapping[str, str], paths: list[Path], batch_size: int,
    count: int | None = None,
) -> list[np.ndarray]:
    """The model's first `count` outputs (default all; one per task) for each input, prepared as the model's metadata
    says (images or texts, `model_feeds`) `batch_size` at a time. Outputs after the tasks' (a prototype head's
    `embedding`) are not task scores."""
    names = [output.name for output in session.get_outputs()][:count]
    batch_size = inputs_per_call(metadata, batch_size)
    if is_text_metadata(metadata):
        tokenizer = model_tokenizer(model_path, metadata)
        texts = read_texts(paths)
        feeds = (encode(tokenizer, texts[start : start + batch_size]) for start in range(0, len(texts), batch_size))
    else:
        preprocessing, input_name = model_preprocessing(model_path, metadata), session.get_inputs()[0].name
        feeds = ({input_name: load_batch(paths[start : start + batch_size], preprocessing)}
                 for start in range(0, len(paths), batch_size))
    batches = [session.run(names, feed) for feed in feeds]
    return [np.concatenate([batch[i] for batch in batches]).astype(np.float32) for i in range(len(names))]


def predict_tasks(model_path: Path, dataset: Dataset, frame: pd.DataFrame, batch_size: int = 32) -> dict[ModelTask, np.ndarray]:
    """Each task's scores for the rows of `frame` (columns in its labels' order), from one pass of the model.

    As `predict_frame`, but for every task: a task whose labels differ from its manifest column's is refused.
    """
    metadata = read_metadata(model_path)
    tasks = model_tasks(model_path, metadata)
    for task in tasks:
        labels = dataset.for_task(task.name).labels if task.name in dataset.manifest.columns else None
        if labels != task.labels:
            which = "" if "tasks" not in metadata else f" for task {task.name!r}"
            found = f"differ from the dataset's {list(labels)}" if labels is not None else "have no column in the dataset"
            raise LabelMismatchError(
                f"{model_path}: the model's labels {list(task.labels)}{which} {found} (dataset root "
                f"{dataset.root.name}); score it on the dataset it was trained for, or retrain."
            )
    if frame.empty:
        return {task: np.zeros((0, len(task.labels)), dtype=np.float32) for task in tasks}
    session = open_session(model_path)
    outputs = predict_outputs(session, model_path, metadata, [dataset.image_path(p) for p in frame["path"]], batch_size,
                              count=len(tasks))
    return dict(zip(tasks, outputs, strict=True))


def predict_frame(model_path: Path, dataset: Dataset, frame: pd.DataFrame, batch_size: int = 32,
                  superset: bool = False) -> np.ndarray:
    """Logits of the model at `model_path` for the rows of `frame`, columns in the dataset's label order.

    Labels and preprocessing come from the model's own metadata; a model whose labels differ
    from the dataset's is refused, since its class indices would mean something else. With
    `superset`, a model whose labels are the dataset's followed by more (`tlops add-class`) is scored too:
    its columns are then the model's labels, in its order.
    """
    metadata = read_metadata(model_path)
    labels = model_labels(model_path, metadata)
    if labels != dataset.labels and not (superset and labels[: len(dataset.labels)] == dataset.labels):
        raise LabelMismatchError(
            f"{model_path}: the model's labels {list(labels)} differ from the dataset's {list(dataset.labels)} "
            f"(dataset root {dataset.root.name}); score it on the dataset it was trained for, or retrain."
        )
    if frame.empty:
        return np.zeros((0, len(labels)), dtype=np.float32)
    session = open_session(model_path)
    paths = [dataset.image_path(p) for p in frame["path"]]
    batch_size = inputs_per_call(metadata, batch_size)
    log.debug("scoring %d inputs with %s", len(paths), model_path)
    if is_text_metadata(metadata):
        tokenizer = model_tokenizer(model_path, metadata)
        texts = read_texts(paths)
        return np.concatenate([session.run(None, encode(tokenizer, texts[start : start + batch_size]))[0]
                               for start in range(0, len(texts), batch_size)]).astype(np.float32)
    return predict_logits(session, paths, model_preprocessing(model_path, metadata), batch_size)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
