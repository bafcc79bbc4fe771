"""Serving a tlops ONNX model: loading by registry alias or path, micro-batching, predictions.

Everything here is plain typed Python with no HTTP in it, so the FastAPI app
(`components/serving/app.py`) stays a thin translation layer and the logic is testable on its own.
The parts: untrusted bytes are decoded in components/serving/image_decoding.py, the model (its source,
session and metadata-driven preprocessing) is components/serving/served_model.py, and requests are
gathered into batches by components/serving/micro_batcher.py. This module holds the configuration, the
metrics and the `ModelServer` that ties them together.

One `ModelServer` holds one ONNX Runtime session at a time. A reload builds and warms the new
session, then swaps a single reference; each queued image carries the model it was
preprocessed for, so batches already in flight finish on the old session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from components.serving.config import ServeConfig
from components.serving.image_decoding import BadInputError, decode_image
from components.serving.metrics import ServeMetrics
from components.serving.micro_batcher import MicroBatcher, NotReadyError
from components.serving.served_model import LoadedModel, Prediction, load_source, resolve_source

log = logging.getLogger(__name__)


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
