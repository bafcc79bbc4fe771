"""Serving a tlops ONNX model: loading by registry alias or path, micro-batching, predictions.

Everything here is plain typed Python with no HTTP in it, so the FastAPI app
(`tlops/serve_app.py`) stays a thin translation layer and the logic is testable on its own.
The model explains itself: labels and preprocessing come from its `metadata_props`, never
from configuration. Untrusted bytes are decoded here, and every way they can be wrong ends in
a `BadInputError` that names the problem (the app turns it into a 4xx JSON answer).

One `ModelServer` holds one ONNX Runtime session at a time. A reload builds and warms the new
session, then swaps a single reference; each queued image carries the model it was
preprocessed for, so batches already in flight finish on the old session.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import math
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnxruntime as ort
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image, UnidentifiedImageError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from pydantic import Field, field_validator, model_validator

from components.config import StageConfig
from components.errors import UserError
from components.onnx_runtime import model_labels, model_preprocessing, open_session, read_metadata, softmax
from components.preprocess import build_transform

log = logging.getLogger(__name__)

DEFAULT_MODEL_URI = "models:/tlops-elpv@champion"
# Formats a camera or a dataset produces. Pillow can open more (EPS shells out to Ghostscript),
# and nothing else should be reachable from untrusted bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "PPM")


class ServeConfig(StageConfig):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model_uri: str = Field(DEFAULT_MODEL_URI, min_length=1)  # models:/<name>@<alias>, models:/<name>/<version> or a path
    max_batch: int = Field(16, ge=1, le=512)  # images per ONNX Runtime call
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)  # how long the first queued image waits for company
    queue_size: int = Field(256, ge=1, le=100_000)  # images waiting; beyond it requests get 503 + Retry-After
    max_body_mb: float = Field(10.0, gt=0, le=1024)
    max_image_megapixels: float = Field(16.0, gt=0, le=1000)  # decoded size; above it is a decompression bomb
    poll_seconds: float = Field(0.0, ge=0, le=86_400)  # 0 = reload only on POST /admin/reload
    num_threads: int = Field(0, ge=0, le=256)  # ONNX Runtime intra-op threads, 0 = all cores

    @field_validator("model_uri")
    @classmethod
    def _registry_uri_is_well_formed(cls, uri: str) -> str:
        if uri.startswith("models:/"):
            try:
                parse_registry_uri(uri)
            except UserError as error:
                raise ValueError(str(error)) from None
        return uri

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> ServeConfig:
        if self.queue_size < self.max_batch:
            raise ValueError(
                f"queue_size ({self.queue_size}) is smaller than max_batch ({self.max_batch}); a batch could "
                f"never fill. Raise queue_size or lower max_batch."
            )
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_pixels(self) -> int:
        return int(self.max_image_megapixels * 1e6)


class BadInputError(UserError):
    """A request the client must fix; `kind` names the problem, `status` is the HTTP answer."""

    def __init__(self, kind: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


class QueueFullError(Exception):
    """The batch queue cannot take the request now; the client should retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the prediction queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class NotReadyError(Exception):
    """No model is loaded yet (still loading, or the last load failed)."""


# --- Decoding untrusted input --------------------------------------------------------------


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> a fully decoded PIL image, or a `BadInputError` naming what is wrong with them.

    The pixel count is checked from the header, before any pixel is decoded, so a small file
    that expands to gigabytes (a decompression bomb) costs nothing.
    """
    if not data:
        raise BadInputError("empty_image", "the image is empty (0 bytes).")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        raise BadInputError("too_many_pixels", f"the image is a decompression bomb: {error}") from None
    except UnidentifiedImageError:
        raise BadInputError(
            "not_an_image", f"the data ({len(data)} bytes) is not an image in a supported format {list(IMAGE_FORMATS)}."
        ) from None
    except Exception as error:  # noqa: BLE001 - any parser failure on untrusted bytes is the input's fault
        raise BadInputError("corrupt_image", f"the image header cannot be read: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadInputError(
            "too_many_pixels",
            f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the limit of "
            f"{max_pixels / 1e6:g} (max_image_megapixels); send a smaller image.",
        )
    try:
        image.load()
    except Exception as error:  # noqa: BLE001 - truncated or corrupt pixel data, whatever the decoder raises
        raise BadInputError("corrupt_image", f"the {image.format} image is truncated or corrupt: {error}") from None
    return image


def decode_base64(text: object, position: int) -> bytes:
    """One base64 string (optionally a `data:image/...;base64,` URL) -> bytes."""
    if not isinstance(text, str):
        raise BadInputError("bad_base64", f"images[{position}] is a {type(text).__name__}, not a base64 string.", 400)
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        # Whitespace is dropped first: `base64` and most mail-era encoders wrap lines at 76 characters.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise BadInputError("bad_base64", f"images[{position}] is not valid base64: {error}", 400) from None


def images_from_json(body: bytes) -> list[bytes]:
    """`{"images": ["<base64>", ...]}` or `{"image": "<base64>"}` -> the decoded image bytes."""
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadInputError("bad_json", f"the body is not valid JSON: {error}", 400) from None
    if isinstance(document, dict) and isinstance(document.get("images"), list):
        items = document["images"]
    elif isinstance(document, dict) and "image" in document:
        items = [document["image"]]
    else:
        raise BadInputError(
            "bad_json", 'the JSON body must be {"images": ["<base64>", ...]} or {"image": "<base64>"}.', 400
        )
    if not items:
        raise BadInputError("no_images", 'the JSON body has an empty "images" list.', 400)
    return [decode_base64(item, i) for i, item in enumerate(items)]


# --- The model -----------------------------------------------------------------------------


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
    input_size: int
    preprocessing: dict[str, Any]  # as read from the metadata, for /model
    transform: Callable[[Image.Image], Any]
    metadata: dict[str, str]
    sha256: str

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """A decoded image -> the CHW float32 array this model takes."""
        try:
            with single_threaded_torch():
                return self.transform(image).numpy()
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
            "preprocessing": self.preprocessing,
            "metadata": self.metadata,
        }


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """One image's tensor ops on the calling thread only.

    Requests are already preprocessed in parallel threads; letting each tiny op also fan out to
    torch's intra-op pool made preprocessing 12x slower on a busy 2-core machine (135 ms vs 11 ms
    per ELPV cell), every op waiting for a second core. With OpenMP (the wheels we pin) the
    setting is per thread, and it is restored for the caller.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
        input_size=preprocessing.input_size,
        preprocessing=preprocessing.model_dump(mode="json"),
        transform=build_transform(preprocessing),
        metadata=metadata,
        sha256=sha256_of(path),
    )


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/<name>@<alias>` -> (name, alias, None); `models:/<name>/<version>` -> (name, None, version)."""
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise UserError(f"model_uri {uri!r}: expected models:/<name>@<alias>, models:/<name>/<version> or a file path.")


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


# --- Metrics -------------------------------------------------------------------------------


class ServeMetrics:
    """The service's Prometheus metrics, in a registry of their own (one per server, no globals)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tlops_serve_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("tlops_serve_request_latency_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("tlops_serve_batch_size", "Images per ONNX Runtime call",
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.predictions = Counter("tlops_serve_predictions", "Predicted images by class",
                                   ["label"], registry=self.registry)
        self.errors = Counter("tlops_serve_errors", "Failed requests by kind of error", ["kind"], registry=self.registry)
        self.queue_depth = Gauge("tlops_serve_queue_depth", "Images waiting for a batch", registry=self.registry)
        self.model = Info("tlops_serve_model", "The model being served", registry=self.registry)


# --- Micro-batching ------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    model: LoadedModel
    image: np.ndarray
    future: Future[Prediction] = field(default_factory=Future)


class MicroBatcher:
    """Collects images from concurrent requests into batches of at most `max_batch`.

    A batch runs as soon as it is full; otherwise it waits for company, at most `max_wait_s`
    after its first image arrived, and only while other requests are known to be on their way
    (`arriving`: reading their body or decoding). A lone client therefore never pays the wait,
    and under load batches fill with what queued while the previous one ran. The queue is
    bounded in images; a request that does not fit as a whole is refused at once rather than
    left to time out. One worker thread runs the batches: ONNX Runtime already spreads one call
    over the cores.
    """

    def __init__(self, max_batch: int, max_wait_s: float, queue_size: int, metrics: ServeMetrics) -> None:
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.metrics = metrics
        self._queue: deque[tuple[float, _Job]] = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._arriving = 0
        self._batch_seconds = 0.0  # moving average, for Retry-After
        self._worker: threading.Thread | None = None

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def arriving_requests(self) -> int:
        return self._arriving

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Marks a request that will submit soon, so a batch that is not full waits for it."""
        with self._ready:
            self._arriving += 1
        try:
            yield
        finally:
            with self._ready:
                self._arriving -= 1
                self._ready.notify()

    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._loop, name="tlops-batcher", daemon=True)
            self._worker.start()

    def stop(self) -> None:
        """Finish what is queued, then stop the worker."""
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
        if self._worker is not None:
            self._worker.join()
            self._worker = None

    def submit(self, model: LoadedModel, images: Sequence[np.ndarray]) -> list[Future[Prediction]]:
        jobs = [_Job(model, image) for image in images]
        with self._ready:
            if self._stopping:
                raise NotReadyError("the service is shutting down")
            if len(self._queue) + len(jobs) > self.queue_size:
                raise QueueFullError(self.retry_after_s())
            now = time.monotonic()
            self._queue.extend((now, job) for job in jobs)
            self.metrics.queue_depth.set(len(self._queue))
            self._ready.notify()
        return [job.future for job in jobs]

    def retry_after_s(self) -> int:
        """Seconds until the queue has drained at the recent pace (at least 1)."""
        batches_ahead = math.ceil(len(self._queue) / self.max_batch)
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    def _take_batch(self) -> list[_Job] | None:
        with self._ready:
            while not self._queue:
                if self._stopping:
                    return None
                self._ready.wait()
            deadline = self._queue[0][0] + self.max_wait_s
            while len(self._queue) < self.max_batch and self._arriving > 0 and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            batch = [self._queue.popleft()[1] for _ in range(min(self.max_batch, len(self._queue)))]
            self.metrics.queue_depth.set(len(self._queue))
            return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            started = time.perf_counter()
            for group in _by_model(batch):
                self._run(group)
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - started)

    def _run(self, jobs: list[_Job]) -> None:
        self.metrics.batch_size.observe(len(jobs))
        try:
            predictions = jobs[0].model.predictions(np.stack([job.image for job in jobs]))
        except Exception as error:  # noqa: BLE001 - handed to every waiting request instead of killing the worker
            log.exception("a batch of %d images failed", len(jobs))
            for job in jobs:
                job.future.set_exception(error)
            return
        for job, prediction in zip(jobs, predictions, strict=True):
            job.future.set_result(prediction)


def _by_model(batch: list[_Job]) -> Iterator[list[_Job]]:
    """Consecutive runs of jobs preprocessed for the same model (a reload can split a batch)."""
    group: list[_Job] = []
    for job in batch:
        if group and job.model is not group[0].model:
            yield group
            group = []
        group.append(job)
    if group:
        yield group


# --- The server ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReloadResult:
    changed: bool
    previous_version: str | None
    version: str


class ModelServer:
    """One model behind a micro-batcher, reloadable without dropping requests in flight."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.metrics = ServeMetrics()
        self.batcher = MicroBatcher(cfg.max_batch, cfg.max_wait_ms / 1000, cfg.queue_size, self.metrics)
        self._model: LoadedModel | None = None
        self.load_error: str | None = None
        self.started = False
        self._reload_lock = threading.Lock()
        self._stop_polling = threading.Event()
        self._poller: threading.Thread | None = None

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    @property
    def ready(self) -> bool:
        return self._model is not None

    def start(self, raise_on_error: bool = False) -> None:
        """Load and warm the model, start the batcher and (if configured) the alias poller.

        A failed load leaves the server up but not ready (`/readyz` says why, `reload` retries);
        `raise_on_error` makes it fatal instead, for a command line that should stop at once.
        """
        self.started = True
        self.batcher.start()
        try:
            self.reload()
        except Exception as error:
            self.load_error = str(error)
            log.error("model not loaded: %s", error)
            if raise_on_error:
                self.stop()
                raise
        if self.cfg.poll_seconds > 0 and self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="tlops-alias-poller", daemon=True)
            self._poller.start()

    def stop(self) -> None:
        self._stop_polling.set()
        if self._poller is not None:
            self._poller.join()
            self._poller = None
        self.batcher.stop()

    def reload(self) -> ReloadResult:
        """Load what `model_uri` names now if it is not what is served; swap only once it is warm."""
        with self._reload_lock:
            current = self._model
            source = resolve_source(self.cfg.model_uri)
            if current is not None and source.version == current.source.version:
                return ReloadResult(changed=False, previous_version=current.source.version, version=source.version)
            started = time.perf_counter()
            model = load_source(source, self.cfg.num_threads)
            model.warm_up(self.cfg.max_batch)
            self._model = model  # one reference swap; queued jobs keep the model they were prepared for
            self.load_error = None
            self.metrics.model.info({"uri": source.uri, "version": source.version, "sha256": model.sha256})
            log.info("serving %s version %s (%s), loaded in %.2f s", source.uri, source.version, model.sha256[:12],
                     time.perf_counter() - started)
            return ReloadResult(changed=True, previous_version=current.source.version if current else None,
                                version=source.version)

    def _poll(self) -> None:
        while not self._stop_polling.wait(self.cfg.poll_seconds):
            try:
                result = self.reload()
            except Exception as error:  # noqa: BLE001 - a registry hiccup must not stop serving the current model
                log.warning("alias poll failed, still serving the current model: %s", error)
                continue
            if result.changed:
                log.info("%s moved: version %s -> %s", self.cfg.model_uri, result.previous_version, result.version)

    def submit(self, payloads: Sequence[bytes]) -> list[Future[Prediction]]:
        """Decode and preprocess every image (all or none), then queue them; blocking, call from a thread."""
        model = self._model
        if model is None:
            raise NotReadyError(self.load_error or "the model is still loading")
        if not payloads:
            raise BadInputError("no_images", "the request holds no image.", 400)
        if len(payloads) > self.cfg.queue_size:
            raise BadInputError("too_many_images", f"{len(payloads)} images in one request; the limit is "
                                f"queue_size={self.cfg.queue_size}. Split the request.", 413)
        images = []
        for position, payload in enumerate(payloads):
            try:
                images.append(model.preprocess(decode_image(payload, self.cfg.max_pixels)))
            except BadInputError as error:
                if len(payloads) > 1:
                    error.args = (f"image {position}: {error.args[0]}",)
                raise
        return self.batcher.submit(model, images)

    def predict(self, payloads: Sequence[bytes], timeout_s: float | None = None) -> list[Prediction]:
        """`submit`, then wait for the answers (the same path as HTTP, without HTTP)."""
        predictions = [future.result(timeout_s) for future in self.submit(payloads)]
        self.count(predictions)
        return predictions

    def count(self, predictions: Sequence[Prediction]) -> None:
        for prediction in predictions:
            self.metrics.predictions.labels(prediction.label).inc()
