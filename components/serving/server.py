"""Serving a tlops ONNX model: loading by registry alias or path, admission, decoding, micro-batching.

Everything here is plain typed Python with no HTTP in it, so the FastAPI app
(`components/serving/app.py`) stays a thin translation layer and the logic is testable on its own.
The parts: untrusted bytes are decoded in components/serving/image_decoding.py, the model (its source,
session and metadata-driven preprocessing) is components/serving/served_model.py, and requests are
gathered into batches by components/serving/micro_batcher.py. The `ModelServer` here ties them
together: a request is admitted (room reserved in the queue) before its images are decoded, decoded
on a bounded pool, then batched.

One `ModelServer` holds one ONNX Runtime session at a time. A reload builds and warms the new
session, then swaps a single reference; each queued request carries the model it was
preprocessed for, so batches already in flight finish on the old session.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from components.serving.config import ServeConfig
from components.serving.image_decoding import BadInputError, decode_image
from components.serving.metrics import ServeMetrics
from components.serving.micro_batcher import MicroBatcher, NotReadyError, Ticket
from components.serving.served_model import LoadedModel, Prediction, fastest_batch, load_current
from components.serving.text_input import check_texts

log = logging.getLogger(__name__)

# A batch still running this many request deadlines after it started has stalled: every request
# in it has long been answered 504, and the ones behind it will be too.
STALL_DEADLINES = 2


M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: nothing to tune
        return None


def limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas at two per core for the threads created from now on (default: eight per core).

    Every thread that allocates may get an arena of its own, and what an arena has freed is kept
    in pieces that `malloc_trim` cannot always return. A server whose reloads and requests run on
    ever new threads (ONNX Runtime's pools, anyio's workers) then grows by an arena's worth per
    reload until the cap: measured under load with reloads on fresh threads, RSS climbed from 160
    to 245 MB over 16 reloads with the default and stayed at 190-210 MB with four arenas.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, 2 * (os.cpu_count() or 1))


def release_freed_memory() -> None:
    """Hand the memory the process has freed back to the system (glibc's `malloc_trim`; a no-op elsewhere).

    glibc keeps freed blocks in its heaps for reuse, and raises its mmap threshold to the largest
    block freed, so the tensors of an old session, of the batch-size timing at load, and of a burst
    of decoded images stay resident after they are freed. Measured in-process on the 224 px Lite0
    model, 8 reloads under load (see docs/serving.md): RSS went 277 -> 458 MB without this and stayed
    at 130-166 MB with it. Fixing the mmap threshold instead (MALLOC_MMAP_THRESHOLD_) also kept it
    flat, but made every ONNX Runtime activation an mmap and 224 px inference about 1.6x slower.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _lower_priority(nice: int) -> None:
    """Make the calling thread nicer by `nice` (Linux schedules threads one by one; a no-op elsewhere).

    ONNX Runtime splits a call over its intra-op threads and waits for the slowest: a decoding
    thread that preempts one of them stalls the whole call. Nice decoding threads run when ONNX
    Runtime leaves a core free, so decoding fills the gaps instead of stretching every batch.
    """
    if nice and hasattr(os, "setpriority") and sys.platform.startswith("linux"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


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
        self.batcher = MicroBatcher(cfg.max_batch, cfg.max_wait_ms / 1000, cfg.queue_size, self.metrics,
                                    on_idle=release_freed_memory)
        # Decoding runs here, never in the event loop or an unbounded pool: at most this many
        # full-size images are in memory at once, whatever the number of requests.
        self.decoder = ThreadPoolExecutor(cfg.decode_threads or os.cpu_count() or 1, thread_name_prefix="tlops-decode",
                                          initializer=_lower_priority, initargs=(cfg.decode_nice,))
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
        return self.problem() is None

    def problem(self) -> str | None:
        """Why predictions cannot be served now (no model, batcher dead or stalled), or None when they can."""
        if self._model is None:
            return self.load_error or "the model is still loading"
        return self.batcher.problem(STALL_DEADLINES * self.cfg.request_timeout_s)

    def start(self, raise_on_error: bool = False) -> None:
        """Load and warm the model, start the batcher and (if configured) the alias poller.

        A failed load leaves the server up but not ready (`/readyz` says why, `reload` retries);
        `raise_on_error` makes it fatal instead, for a command line that should stop at once
        (and report the error once, itself).
        """
        self.started = True
        limit_malloc_arenas()  # before the batcher's, the decoders' and ONNX Runtime's threads exist
        self.batcher.start()
        try:
            self.reload()
        except Exception as error:
            self.load_error = str(error)
            if raise_on_error:
                self.stop()
                raise
            log.error("model not loaded: %s", error)
        if self.cfg.poll_seconds > 0 and self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="tlops-alias-poller", daemon=True)
            self._poller.start()

    def stop(self) -> None:
        self._stop_polling.set()
        if self._poller is not None:
            self._poller.join()
            self._poller = None
        self.batcher.stop()
        self.decoder.shutdown(wait=False, cancel_futures=True)

    def reload(self) -> ReloadResult:
        """Load what `model_uri` names now if it is not what is served; swap only once it is warm."""
        with self._reload_lock:
            current = self._model
            previous = current.source.version if current else None
            started = time.perf_counter()
            version, model = load_current(self.cfg.model_uri, previous, self.cfg.num_threads)
            if model is None:
                return ReloadResult(changed=False, previous_version=previous, version=version)
            model = self._batch_for(model)
            self._model = model  # one reference swap; queued requests keep the model they were prepared for
            if current is not None:  # its memory goes back once the last request prepared for it is answered
                weakref.finalize(current, release_freed_memory)
            release_freed_memory()  # what loading and timing the new model freed
            self.load_error = None
            self.metrics.model.info({"uri": self.cfg.model_uri, "version": version, "sha256": model.sha256})
            log.info("serving %s version %s (%s), loaded in %.2f s; batches of at most %d (ms per image by batch "
                     "size: %s)", self.cfg.model_uri, version, model.sha256[:12], time.perf_counter() - started,
                     model.batch_limit, {size: round(1000 * seconds, 3) for size, seconds in model.seconds_per_image.items()}
                     or "not measured")
            return ReloadResult(changed=True, previous_version=previous, version=version)

    def _batch_for(self, model: LoadedModel) -> LoadedModel:
        """`model`, warmed up, with the batch size it is served at: `max_batch`, or (with `measure_batch`)
        the size up to it that is fastest per image on this machine at this model's input size; 1 for a model
        whose answers depend on their batch (dynamic INT8), so an input's answer never depends on its company."""
        if not model.batch_independent:
            model.warm_up([1])
            log.info("%s answers an input differently in other batches (%s): served one input per call",
                     self.cfg.model_uri, model.metadata.get("quantization", "batch_independent: false"))
            return replace(model, batch_limit=1)
        if not self.cfg.measure_batch:
            model.warm_up([1, self.cfg.max_batch])
            return replace(model, batch_limit=self.cfg.max_batch)
        timings = model.time_batches(self.cfg.max_batch)
        return replace(model, batch_limit=fastest_batch(timings), seconds_per_image=timings)

    def _poll(self) -> None:
        while not self._stop_polling.wait(self.cfg.poll_seconds):
            try:
                result = self.reload()
            except Exception as error:  # noqa: BLE001 - a registry hiccup must not stop serving the current model
                log.warning("alias poll failed, still serving the current model: %s", error)
                continue
            if result.changed:
                log.info("%s moved: version %s -> %s", self.cfg.model_uri, result.previous_version, result.version)

    def modality(self) -> str:
        """What the served model takes, `image` or `text`; `NotReadyError` while no model is loaded."""
        model = self._model
        if model is None:
            raise NotReadyError(self.load_error or "the model is still loading")
        return model.modality

    def admit(self, count: int, deadline: float) -> tuple[Ticket, LoadedModel]:
        """Room in the queue for `count` images due by `deadline` (time.monotonic()), before any is decoded."""
        model = self._model
        if model is None:
            raise NotReadyError(self.load_error or "the model is still loading")
        what = f"{model.modality}s"
        if count == 0:
            raise BadInputError(f"no_{what}", f"the request holds no {model.modality}.", 400)
        if count > self.cfg.queue_size:
            raise BadInputError(f"too_many_{what}", f"{count} {what} in one request; the limit is "
                                f"queue_size={self.cfg.queue_size}. Split the request.", 413)
        return self.batcher.admit(count, deadline), model

    def prepare(self, model: LoadedModel, payloads: Sequence[bytes] | Sequence[object]) -> list[np.ndarray] | list[str]:
        """Decode and preprocess every image for `model` (all or none), or check every text; run it on `self.decoder`.

        Texts are tokenized a batch at a time by the batcher (a batch is padded to its longest text)."""
        if model.modality == "text":
            return check_texts(payloads, self.cfg.max_text_chars)
        images = []
        for position, payload in enumerate(payloads):
            try:
                images.append(model.preprocess(decode_image(payload, self.cfg.max_pixels)))
            except BadInputError as error:
                if len(payloads) > 1:
                    error.args = (f"image {position}: {error.args[0]}",)
                raise
        return images

    def predict(self, payloads: Sequence[bytes] | Sequence[str]) -> list[Prediction]:
        """Admit, decode, queue and wait, within the request deadline (the HTTP path without HTTP): image bytes,
        or texts for a text model."""
        ticket, model = self.admit(len(payloads), time.monotonic() + self.cfg.request_timeout_s)
        try:
            images = self.decoder.submit(self.prepare, model, payloads).result()
            predictions = self.batcher.submit(ticket, model, images).result(ticket.deadline - time.monotonic())
        finally:
            self.batcher.discard(ticket)
        self.count(predictions)
        return predictions

    def count(self, predictions: Sequence[Prediction]) -> None:
        for prediction in predictions:
            self.metrics.predictions.labels(prediction.label).inc()
