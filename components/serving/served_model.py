"""A tlops ONNX model ready to serve: where it comes from (registry alias, version or file), its session, predictions.

The model explains itself: its modality, labels, tasks and preprocessing (images) or tokenizer
(texts) come from its `metadata_props` (read through the ONNX Runtime session, so serving needs
neither the `onnx` package nor pandas), never from configuration. A model of several tasks answers
every task for each input, the primary task first. Used by the service (components/serving/server.py) and the registered pyfunc model
(components/serving/pyfunc.py). Registry URIs are resolved and downloaded by
components/serving/registry_client.py, the only serving module that needs MLflow.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from components.core.errors import UserError
from components.data.preprocess import Preprocessing, PreprocessingError, preprocess_image
from components.data.tokenization import (
    TOKENIZER_KEY,
    Tokenization,
    TokenizationError,
    encode,
    is_text_metadata,
    tokenizer_from_metadata,
)
from components.models.task_metadata import ModelTask, batch_independent, inputs_per_call, tasks_from_metadata
from components.serving import registry_client
from components.serving.config import check_model_uri, parse_registry_uri
from components.serving.image_decoding import BadInputError


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and which version that is right now."""

    uri: str
    version: str  # the registry version, or `sha256:<12 hex>` of a local file
    name: str | None = None  # registered model name, for registry URIs
    alias: str | None = None


@dataclass(frozen=True)
class TaskPrediction:
    label: str
    probabilities: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "probabilities": self.probabilities}


@dataclass(frozen=True)
class Prediction:
    """One input's answer: the primary task's label and probabilities, and (a model of several tasks) every task's."""

    label: str
    probabilities: dict[str, float]
    model_version: str
    tasks: Mapping[str, TaskPrediction] | None = None  # by task name, the primary first; None for a one-task model

    def to_json(self) -> dict[str, Any]:
        answer = {"label": self.label, "probabilities": self.probabilities, "model_version": self.model_version}
        if self.tasks is not None:
            answer["tasks"] = {name: task.to_json() for name, task in self.tasks.items()}
        return answer


# What a text model is warmed up and timed on: a text that fills any max_length, so the batch size the
# server picks holds for the longest texts it will see.
WARM_UP_TEXT = " ".join(["tlops"] * 8192)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One ONNX Runtime session and what its metadata says about its input and outputs.

    An image model has `preprocessing` and takes decoded images (`preprocess` makes each a CHW array); a text
    model has `tokenization` and its `tokenizer`, and takes strings, tokenized a batch at a time (padded to the
    batch's longest) exactly as the pipeline tokenized them. `predictions` takes a list of either.
    """

    source: ModelSource
    session: ort.InferenceSession
    labels: tuple[str, ...]
    preprocessing: Preprocessing | Tokenization  # as read from the metadata
    metadata: dict[str, str]
    sha256: str
    input_name: str
    tasks: tuple[ModelTask, ...] = ()  # one per output, the primary first
    tokenizer: Any = None  # a tokenizers.Tokenizer, for a text model
    batch_limit: int = 1  # the most inputs the batcher puts in one call to this model
    seconds_per_image: Mapping[int, float] = field(default_factory=dict)  # by batch size, as timed at load

    @property
    def modality(self) -> str:
        return "text" if isinstance(self.preprocessing, Tokenization) else "image"

    @property
    def batch_independent(self) -> bool:
        """Whether an input's answer is the same in any batch (not so for a dynamically quantized model)."""
        return batch_independent(self.metadata)

    @property
    def input_size(self) -> int:
        if not isinstance(self.preprocessing, Preprocessing):
            raise TypeError(f"{self.source.uri} is a text model; it has no input size")
        return self.preprocessing.input_size

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """A decoded image -> the CHW float32 array this model takes."""
        assert isinstance(self.preprocessing, Preprocessing), "preprocess is for image models"
        try:
            return preprocess_image(image, self.preprocessing)
        except Exception as error:  # noqa: BLE001 - e.g. a pixel mode that has no RGB conversion
            raise BadInputError("unsupported_image", f"a {image.mode} image cannot be converted to RGB: {error}") from None

    def feeds(self, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
        """One ONNX Runtime call's inputs: preprocessed images stacked (NCHW), or texts tokenized."""
        if self.tokenizer is not None:
            return encode(self.tokenizer, inputs)
        return {self.input_name: inputs if isinstance(inputs, np.ndarray) else np.stack(inputs)}

    def task_probabilities(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """Each task's class probabilities, one row per input (outputs after the tasks', such as a prototype
        head's `embedding`, are not run)."""
        names = [output.name for output in self.session.get_outputs()][: len(self.tasks)]
        return [softmax(logits.astype(np.float64)) for logits in self.session.run(names, self.feeds(inputs))]

    def probabilities(self, inputs: Sequence[Any]) -> np.ndarray:
        """The primary task's class probabilities, one row per input."""
        return self.task_probabilities(inputs)[0]

    def predictions(self, inputs: Sequence[Any]) -> list[Prediction]:
        per_task = self.task_probabilities(inputs)
        answers = []
        for row in range(len(inputs)):
            tasks = {task.name: TaskPrediction(task.labels[int(scores[row].argmax())],
                                               {label: float(p) for label, p in zip(task.labels, scores[row], strict=True)})
                     for task, scores in zip(self.tasks, per_task, strict=True)}
            primary = tasks[self.tasks[0].name]
            answers.append(Prediction(label=primary.label, probabilities=primary.probabilities,
                                      model_version=self.source.version, tasks=tasks if len(self.tasks) > 1 else None))
        return answers

    def dummy_inputs(self, size: int) -> Sequence[Any]:
        """`size` inputs of the largest shape this model takes: blank images (one array, so timing does not
        allocate a batch per call), or texts of max_length tokens."""
        if self.tokenizer is not None:
            return [WARM_UP_TEXT] * size
        return np.zeros((size, 3, self.input_size, self.input_size), dtype=np.float32)

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run the shapes the batcher will send first, so the first client does not pay for them."""
        for size in sorted(set(batch_sizes)):
            self.probabilities(self.dummy_inputs(size))

    def time_batches(self, max_batch: int, repeats: int = 5) -> dict[int, float]:
        """Seconds per input at batch sizes 1, 2, 4, ... and `max_batch`, the best of `repeats` calls each.

        The sizes take turns (one call each per round, after a round that warms every shape up), so
        a burst of other work on a shared machine slows all sizes alike instead of one of them.
        """
        sizes = sorted({*(2**i for i in range(max_batch.bit_length())), max_batch})
        batches = {size: self.dummy_inputs(size) for size in sizes}
        best = dict.fromkeys(sizes, float("inf"))
        for round_ in range(repeats + 1):
            for size, batch in batches.items():
                started = time.perf_counter()
                self.probabilities(batch)
                if round_:
                    best[size] = min(best[size], (time.perf_counter() - started) / size)
        return best

    def describe(self) -> dict[str, Any]:
        return {
            "uri": self.source.uri,
            "name": self.source.name,
            "alias": self.source.alias,
            "version": self.source.version,
            "sha256": self.sha256,
            "modality": self.modality,
            "batch_limit": self.batch_limit,
            # Unrounded: batch_limit was chosen on these values, and a rounded one can cross the tolerance's edge.
            "ms_per_image_by_batch": {str(size): 1000 * seconds for size, seconds in self.seconds_per_image.items()},
            "labels": list(self.labels),
            "tasks": [task.describe() for task in self.tasks],
            "preprocessing": self.preprocessing.model_dump(mode="json"),
            "metadata": {key: value for key, value in self.metadata.items() if key != TOKENIZER_KEY},  # not 466 KB of JSON
        }


def fastest_batch(seconds_per_image: Mapping[int, float], tolerance: float = 0.1) -> int:
    """The smallest batch size within `tolerance` of the fastest per image.

    On a CPU a bigger batch is not always faster per image: at 224 px EfficientNet-Lite0's
    activations for 16 images outgrow the caches, and a batch of 16 costs more per image than a
    batch of 1 (benchmarks/serving.py). Beyond the fastest size a batch only adds waiting, and
    within `tolerance` of it the smaller size wins: requests wait less for company.
    """
    best = min(seconds_per_image.values())
    return min(size for size, seconds in seconds_per_image.items() if seconds <= best * (1 + tolerance))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def classify(model: LoadedModel, inputs: Sequence[Image.Image] | Sequence[str], batch_size: int = 32) -> list[Prediction]:
    """Predictions for decoded images or for texts without the batcher (the pyfunc model's path)."""
    out: list[Prediction] = []
    batch_size = inputs_per_call(model.metadata, batch_size)
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        out += model.predictions(chunk if model.modality == "text" else [model.preprocess(image) for image in chunk])
    return out


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def session_options(num_threads: int) -> ort.SessionOptions:
    """CPU session settings for a long-running server that shares its cores with HTTP and decoding.

    `num_threads` 0 lets ONNX Runtime use every core. Its intra-op threads do not spin between
    calls: a spinning pool burns the cores the request threads need to decode the next images
    (measured in benchmarks/serving.py). The memory arena is off: an arena per session grows to
    the largest batch it ever ran and is returned to the system only with the session, so every
    reload would leave one more arena's worth of fragmentation behind.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise here
    return options


def open_model_session(path: Path, uri: str, num_threads: int) -> ort.InferenceSession:
    """An ONNX Runtime session on `path`; a file it cannot read is the user's to fix, in one line."""
    try:
        return ort.InferenceSession(str(path), session_options(num_threads), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - ONNX Runtime's own exception types: a file that is not a model
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"model_uri {uri!r}: {path.name} is not an ONNX model ONNX Runtime can load ({reason}); "
                        f"pass an ONNX file exported by tlops or a models:/ URI.") from None


def load_onnx(path: Path, source: ModelSource, num_threads: int = 0) -> LoadedModel:
    """An ONNX file exported by tlops -> a ready session with its labels, tasks and preprocessing or tokenizer."""
    session = open_model_session(path, source.uri, num_threads)
    # The one place that reads how inputs are prepared: the model's metadata_props decide, nothing else.
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    tokenizer = None
    try:
        labels = tuple(json.loads(metadata["labels"]))
        tasks = tasks_from_metadata(metadata)
        if is_text_metadata(metadata):
            preprocessing: Preprocessing | Tokenization
            preprocessing, tokenizer = tokenizer_from_metadata(metadata)
        else:
            preprocessing = Preprocessing.from_metadata(metadata)
    except KeyError:
        raise UserError(f"model_uri {source.uri!r}: its metadata_props lack `labels`; it was not exported by tlops. "
                        f"Re-export it with the export stage.") from None
    except (PreprocessingError, TokenizationError) as error:
        raise UserError(f"model_uri {source.uri!r}: {error}; it was not exported by tlops (or was stripped). "
                        f"Re-export it with the export stage.") from None
    outputs = len(session.get_outputs())
    if outputs < len(tasks):
        raise UserError(f"model_uri {source.uri!r}: its metadata_props name {len(tasks)} tasks, the graph has "
                        f"{outputs} outputs; re-export it with the export stage.")
    return LoadedModel(
        source=source,
        session=session,
        labels=labels,
        preprocessing=preprocessing,
        metadata=metadata,
        sha256=sha256_of(path),
        input_name=session.get_inputs()[0].name,
        tasks=tasks,
        tokenizer=tokenizer,
    )


def load_current(uri: str, current_version: str | None, num_threads: int = 0) -> tuple[str, LoadedModel | None]:
    """(the version `uri` names now, that version loaded, or None when it is `current_version` already).

    A registry URI is resolved and its exact version downloaded in one step, so an alias that
    moves meanwhile cannot pair one version's number with another's file.
    """
    if not uri.startswith("models:/"):
        check_model_uri(uri)
        path = Path(uri)
        version = f"sha256:{sha256_of(path)[:12]}"
        return version, None if version == current_version else load_onnx(path, ModelSource(uri, version), num_threads)
    name, alias, _ = parse_registry_uri(uri)
    with tempfile.TemporaryDirectory(prefix="tlops-serve-") as folder:
        version, path = registry_client.fetch(uri, current_version, Path(folder))
        if path is None:
            return version, None
        # The session holds the graph in memory (no external data), so the download can go.
        return version, load_onnx(path, ModelSource(uri, version, name=name, alias=alias), num_threads)
