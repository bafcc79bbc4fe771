"""Micro-batching for the service: images (or texts) from concurrent requests, gathered into ONNX Runtime calls.

A request goes through the batcher in three steps, each of which can refuse it cheaply:

1. `admit(count, deadline)` reserves room for its images before any of them is decoded, so a
   full queue answers 503 without spending a CPU second on pixels it would throw away;
2. `submit(ticket, model, images)` queues the decoded images (room was already reserved);
3. the ticket's future resolves with one prediction per image, or with the error that stopped
   its batch; `discard(ticket)` (a timed-out or failed request) drops its queued images at once.

One worker thread runs the batches: ONNX Runtime already spreads one call over the cores. The
worker survives anything a request does: a cancelled future is skipped
(`set_running_or_notify_cancel`), a request past its deadline is failed without running, a batch
that raises hands the error to the requests in it, and any other exception is logged and the loop
goes on. Should the thread end all the same, `problem()` says so, and so does `/readyz`.

Each ticket carries the model its images were preprocessed for, so a reload that swaps the model
mid-queue splits a batch rather than feeding an image to a model it was not prepared for.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from components.serving.metrics import ServeMetrics
    from components.serving.served_model import LoadedModel, Prediction

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The batch queue cannot take the request now; the client should retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the prediction queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class NotReadyError(Exception):
    """Predictions cannot be taken now: no model loaded, the batching thread is not running, or shutting down."""


class DeadlineExceededError(Exception):
    """The request's deadline passed before its images reached ONNX Runtime; they were dropped unrun."""


@dataclass(eq=False)
class Ticket:
    """One request in the batcher: its reserved room, then its images, and one future for all its predictions."""

    count: int
    deadline: float  # time.monotonic() after which running its images is pointless
    future: Future[list[Prediction]] = field(default_factory=Future)
    model: LoadedModel | None = None
    images: Sequence[Any] = ()  # preprocessed images (CHW arrays) or texts, as the ticket's model takes them
    queued_at: float = 0.0
    taken: int = 0  # images already handed to a batch
    state: str = "reserved"  # reserved -> queued -> done (taken or discarded)
    results: list[Prediction | None] = field(default_factory=list)  # filled in as its batches run
    pending: int = 0  # images not answered yet


@dataclass(frozen=True)
class _Slice:
    ticket: Ticket
    start: int
    stop: int


class MicroBatcher:
    """Collects images from concurrent requests into batches of at most `max_batch` (and at most the
    `batch_limit` of the model they were prepared for).

    A batch runs as soon as it is full; otherwise it waits for company, at most `max_wait_s`
    after its first image arrived, and only while other requests are known to be on their way
    (`arriving`: reading their body or decoding). A lone client therefore never pays the wait,
    and under load batches fill with what queued while the previous one ran. The queue is
    bounded in images, counting those reserved by requests still decoding; a request that does
    not fit as a whole is refused at once rather than left to time out.
    """

    def __init__(self, max_batch: int, max_wait_s: float, queue_size: int, metrics: ServeMetrics,
                 on_idle: Callable[[], None] | None = None, idle_s: float = 1.0) -> None:
        self.max_batch = max_batch
        self.on_idle = on_idle  # run by the worker once the queue has been empty `idle_s` after some batches
        self.idle_s = idle_s
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.metrics = metrics
        self._queue: deque[Ticket] = deque()
        self._queued = 0  # images in the queue not yet taken
        self._reserved = 0  # images admitted and still being decoded
        self._ready = threading.Condition()
        self._stopping = False
        self._arriving = 0
        self._image_seconds = 0.0  # moving average of batch time per image, for Retry-After
        self._running_since: float | None = None  # when the batch in ONNX Runtime started
        self._worker: threading.Thread | None = None
        self._worker_error: str | None = None
        self._busy_since_idle = False

    @property
    def depth(self) -> int:
        """Images queued for a batch (not those reserved by requests still decoding)."""
        return self._queued

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
            self._stopping = False
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

    def problem(self, stall_after_s: float) -> str | None:
        """Why the batcher cannot serve now (its thread is gone, or one batch has run past `stall_after_s`), or None."""
        worker = self._worker
        if worker is None or not worker.is_alive():
            return f"the batching thread is not running ({self._worker_error or 'stopped'})"
        since = self._running_since
        if since is not None and (running := time.monotonic() - since) > stall_after_s:
            return f"one ONNX Runtime batch has been running for {running:.0f} s (more than {stall_after_s:g} s)"
        return None

    def admit(self, count: int, deadline: float) -> Ticket:
        """Reserve room for `count` images before they are decoded; `QueueFullError` if they do not all fit."""
        with self._ready:
            if self._stopping or self._worker is None or not self._worker.is_alive():
                raise NotReadyError("the service is shutting down" if self._stopping else
                                    f"the batching thread is not running ({self._worker_error or 'stopped'})")
            if self._queued + self._reserved + count > self.queue_size:
                raise QueueFullError(self.retry_after_s())
            self._reserved += count
        return Ticket(count=count, deadline=deadline)

    def submit(self, ticket: Ticket, model: LoadedModel, images: Sequence[Any]) -> Future[list[Prediction]]:
        """Queue the ticket's decoded images (one per reserved place); its future gives their predictions in order."""
        if len(images) != ticket.count:
            raise ValueError(f"the ticket reserved {ticket.count} images, {len(images)} were submitted")
        with self._ready:
            if ticket.state != "reserved":
                raise ValueError(f"ticket already {ticket.state}")
            self._reserved -= ticket.count
            ticket.model, ticket.images, ticket.queued_at, ticket.state = model, images, time.monotonic(), "queued"
            ticket.results = [None] * ticket.count
            ticket.pending = ticket.count
            self._queue.append(ticket)
            self._queued += ticket.count
            self.metrics.queue_depth.set(self._queued)
            self._ready.notify()
        return ticket.future

    def discard(self, ticket: Ticket) -> None:
        """Give back the ticket's reserved or queued places (a request that failed or timed out); idempotent."""
        ticket.future.cancel()  # a future not yet running is cancelled; a running one finishes unread
        with self._ready:
            if ticket.state == "reserved":
                self._reserved -= ticket.count
            elif ticket.state == "queued":
                with contextlib.suppress(ValueError):
                    self._queue.remove(ticket)
                self._queued -= ticket.count - ticket.taken
                self.metrics.queue_depth.set(self._queued)
            ticket.state = "done"

    def retry_after_s(self) -> int:
        """Seconds until the queue has drained at the recent pace (at least 1)."""
        return max(1, math.ceil((self._queued + self._reserved) * self._image_seconds))

    def _take_batch(self) -> list[_Slice] | None:
        """The next batch; [] when the queue has been empty `idle_s` after some work; None once stopped and drained."""
        with self._ready:
            while True:
                while not self._queue:
                    if self._stopping:
                        return None
                    if not self._ready.wait(self.idle_s if self._busy_since_idle else None):
                        self._busy_since_idle = False
                        return []  # idle for a while after some work: the loop does housekeeping, unlocked
                head = self._queue[0]
                limit = min(self.max_batch, head.model.batch_limit if head.model is not None else 1)
                deadline = head.queued_at + self.max_wait_s
                while self._queued < limit and self._arriving > 0 and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._ready.wait(remaining)
                batch = self._pop(limit)
                self.metrics.queue_depth.set(self._queued)
                if batch:
                    self._running_since = time.monotonic()
                    self._busy_since_idle = True
                    return batch

    def _pop(self, limit: int) -> list[_Slice]:
        """Up to `limit` images from the head of the queue, skipping cancelled and expired requests (lock held)."""
        batch: list[_Slice] = []
        taken = 0
        now = time.monotonic()
        while self._queue and taken < limit:
            ticket = self._queue[0]
            if ticket.taken == 0 and not ticket.future.set_running_or_notify_cancel():
                self._drop_head(ticket)  # cancelled while queued: nobody is waiting for it
                continue
            if now > ticket.deadline:
                _fail(ticket, DeadlineExceededError("the request's deadline passed while its images were queued"))
                self._drop_head(ticket)
                continue
            stop = min(ticket.count, ticket.taken + limit - taken)
            batch.append(_Slice(ticket, ticket.taken, stop))
            taken += stop - ticket.taken
            self._queued -= stop - ticket.taken
            ticket.taken = stop
            if stop == ticket.count:
                self._queue.popleft()
                ticket.state = "done"
        return batch

    def _drop_head(self, ticket: Ticket) -> None:
        self._queue.popleft()
        self._queued -= ticket.count - ticket.taken
        ticket.state = "done"

    def _loop(self) -> None:
        try:
            while (batch := self._take_batch()) is not None:
                if not batch:
                    self._idle()
                    continue
                started = time.perf_counter()
                try:
                    for group in _by_model(batch):
                        self._run(group)
                except Exception as error:  # noqa: BLE001 - a bug in delivery fails this batch, not the service
                    log.exception("delivering a batch failed")
                    for part in batch:
                        _fail(part.ticket, error)
                finally:
                    self._running_since = None
                images = sum(part.stop - part.start for part in batch)
                self._image_seconds = 0.8 * self._image_seconds + 0.2 * (time.perf_counter() - started) / images
        except BaseException as error:
            self._worker_error = f"{type(error).__name__}: {error}"
            log.critical("the batching thread died: %s; /readyz now answers 503", self._worker_error)
            raise

    def _idle(self) -> None:
        if self.on_idle is not None:
            try:
                self.on_idle()
            except Exception:  # noqa: BLE001 - housekeeping never stops the worker
                log.exception("the batcher's idle task failed")

    def _run(self, parts: list[_Slice]) -> None:
        """One ONNX Runtime call for `parts`; if it fails, each request again on its own, so one bad input
        fails only its own request, and the error goes to the request that caused it."""
        model = parts[0].ticket.model
        assert model is not None  # a queued ticket always has its model
        images = [image for part in parts for image in part.ticket.images[part.start : part.stop]]
        self.metrics.batch_size.observe(len(images))
        try:
            predictions = model.predictions(images)
        except Exception as error:  # noqa: BLE001 - handed to the waiting requests instead of killing the worker
            if len({id(part.ticket) for part in parts}) > 1:
                log.warning("a batch of %d images failed (%s); running its requests one by one", len(images), error)
                for part in parts:
                    self._run([part])
                return
            log.exception("a batch of %d images failed", len(images))
            _fail(parts[0].ticket, error)
            return
        offset = 0
        for part in parts:
            ticket, count = part.ticket, part.stop - part.start
            ticket.results[part.start : part.stop] = predictions[offset : offset + count]
            offset += count
            ticket.pending -= count
            if ticket.pending == 0 and not ticket.future.done():
                ticket.future.set_result(ticket.results)  # type: ignore[arg-type] - every slot is filled now


def _fail(ticket: Ticket, error: BaseException) -> None:
    """Hand `error` to whoever waits for `ticket` (its future is running: only the worker completes it)."""
    with contextlib.suppress(InvalidStateError):  # already answered: an earlier batch of the same request failed
        ticket.future.set_exception(error)


def _by_model(batch: list[_Slice]) -> Iterator[list[_Slice]]:
    """Consecutive runs of requests preprocessed for the same model (a reload can split a batch)."""
    group: list[_Slice] = []
    for part in batch:
        if group and part.ticket.model is not group[0].ticket.model:
            yield group
            group = []
        group.append(part)
    if group:
        yield group
