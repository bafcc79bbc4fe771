"""Micro-batching for the service: images from concurrent requests, gathered into ONNX Runtime calls.

Each queued image carries the model it was preprocessed for, so a reload that swaps the model
mid-queue splits a batch rather than feeding an image to a model it was not prepared for.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from components.serving.served_model import LoadedModel, Prediction

if TYPE_CHECKING:
    from components.serving.metrics import ServeMetrics

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The batch queue cannot take the request now; the client should retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the prediction queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class NotReadyError(Exception):
    """Predictions cannot be taken now: no model loaded yet (still loading, or the last load failed), or shutting down."""


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
