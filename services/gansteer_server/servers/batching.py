"""Dynamic batching (decision 4): concurrent requests for one model are merged into one forward pass.

Each model gets a `DynamicBatcher` with its own worker thread, so inference runs off the gRPC threads. A request
is a tuple of tensors whose first dimension counts its images. The worker takes the oldest request and the later
ones with the same merge key, concatenates them, runs the model once (in slices of `max_batch` images when one
request is larger) and splits the outputs back. It closes a batch as soon as one of these holds:

- the batch has `max_batch` images;
- it has as many requests as the previous batch of this model had: concurrent clients come back together, so
  waiting for that many gathers them, while a lone client (previous batch: one request) never waits;
- `max_delay` has passed since its oldest request arrived.

Requests that arrive while a batch runs queue up and form the next one, so batches grow with the load. Requests that
were cancelled or passed their deadline while queued are dropped before their batch runs. The queue is bounded in
images: a request that does not fit is refused with RESOURCE_EXHAUSTED at once. Closing the batcher refuses new
requests, runs every queued one without waiting, then stops the thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field

import grpc
import torch
from torch import Tensor

from gansteer_server.servers.metrics import ServiceMetrics
from gansteer_server.wire.errors import ServiceError

logger = logging.getLogger(__name__)

# run(merge key, inputs) -> outputs; every input and output has one row per image along dimension 0.
RunBatch = Callable[[Hashable, Sequence[Tensor]], Sequence[Tensor]]


@dataclass(eq=False)
class _Request:
    key: Hashable
    inputs: tuple[Tensor, ...]
    images: int
    grad: bool
    deadline: float  # time.monotonic() seconds; inf when the call has none
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[list[Tensor]] = field(default_factory=Future)


class DynamicBatcher:
    """Merges the requests of one model; `run` is called on the batcher's own thread, one batch at a time."""

    def __init__(
        self,
        name: str,
        run: RunBatch,
        *,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError("max_batch and max_queue must be positive and max_delay_s not negative")
        self.name = name
        self._run = run
        self.max_batch, self.max_delay_s, self.max_queue = max_batch, max_delay_s, max_queue
        self._metrics = metrics
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_images = 0
        self._last_batch_requests = 1
        self._closing = False
        self._condition = threading.Condition()
        self._worker = threading.Thread(target=self._serve, name=f"batcher-{name}", daemon=True)
        self._worker.start()

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def call(
        self,
        key: Hashable,
        inputs: Sequence[Tensor],
        context: grpc.ServicerContext | None = None,
        *,
        grad: bool = False,
    ) -> list[Tensor]:
        """Queue a request, wait for its batch and return its rows of the outputs.

        With a gRPC `context`, the request leaves the queue as soon as the call is cancelled or its deadline passes,
        and the work is never run. `grad=True` runs without `torch.inference_mode()` (the run computes gradients
        itself) and merges only with other `grad=True` requests.
        """
        deadline = time.monotonic() + context.time_remaining() if context is not None else float("inf")
        request = self._submit(key, tuple(inputs), grad, deadline)
        if context is not None and not context.add_callback(lambda: self._cancel(request)):
            self._cancel(request)  # the call ended before the callback could be registered
        try:
            return request.future.result()
        except CancelledError:
            raise ServiceError(grpc.StatusCode.CANCELLED, "the call was cancelled before its batch ran") from None

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, run the queued ones without waiting for batches to fill, stop the worker."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._worker.join(timeout)

    def _submit(self, key: Hashable, inputs: tuple[Tensor, ...], grad: bool, deadline: float) -> _Request:
        images = int(inputs[0].shape[0]) if inputs else 0
        request = _Request(key, inputs, images, grad, deadline)
        with self._condition:
            if self._closing:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down", reason="SHUTTING_DOWN")
            if self._queued_images + images > self.max_queue:
                raise ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the queue of {self.name} holds {self._queued_images} images and takes at most "
                    f"{self.max_queue}; retry later",
                    reason="QUEUE_FULL",
                )
            self._queue.append(request)
            self._queued_images += images
            self._report_queue()
            self._condition.notify_all()
        return request

    def _cancel(self, request: _Request) -> None:
        with self._condition:
            if request not in self._queue:
                return  # already taken into a batch (dropped there if still cancelled) or finished
            self._queue.remove(request)
            self._queued_images -= request.images
            self._report_queue()
        if request.future.cancel() and self._metrics is not None:
            self._metrics.observe_drop(self.name, "cancelled")

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                live = [r for r in batch if self._still_wanted(r)]
                if live:
                    self._run_batch(live)
            except Exception as error:  # a bug here must not end the thread: later calls would hang
                logger.exception("batcher %s failed a batch of %d requests", self.name, len(batch))
                self._fail(batch, error)

    def _next_batch(self) -> list[_Request] | None:
        """Wait for a batch: the oldest request plus later ones with its merge key, up to `max_batch` images."""
        with self._condition:
            while True:
                while not self._queue:
                    if self._closing:
                        return None
                    self._condition.wait()
                head = self._queue[0]
                if not self._closing and not self._ready(head):
                    self._condition.wait(head.enqueued + self.max_delay_s - time.monotonic())
                    continue  # the head may have been cancelled meanwhile: look again
                batch = self._take(head)
                self._last_batch_requests = len(batch)
                self._report_queue()
                return batch

    def _ready(self, head: _Request) -> bool:
        """Whether the batch of `head` should close now (the rules in the module docstring)."""
        if time.monotonic() >= head.enqueued + self.max_delay_s:
            return True
        mergeable = [r.images for r in self._queue if self._merges(head, r)]
        return sum(mergeable) >= self.max_batch or len(mergeable) >= self._last_batch_requests

    def _take(self, head: _Request) -> list[_Request]:
        batch, total = [head], head.images
        for request in list(self._queue)[1:]:
            if self._merges(head, request) and total + request.images <= self.max_batch:
                batch.append(request)
                total += request.images
        for request in batch:
            self._queue.remove(request)
        self._queued_images -= total
        return batch

    @staticmethod
    def _merges(head: _Request, request: _Request) -> bool:
        return request.grad == head.grad and request.key == head.key

    def _still_wanted(self, request: _Request) -> bool:
        if time.monotonic() >= request.deadline:
            request.future.set_exception(
                ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the batch ran")
            )
            reason = "deadline"
        elif not request.future.set_running_or_notify_cancel():
            reason = "cancelled"
        else:
            return True
        if self._metrics is not None:
            self._metrics.observe_drop(self.name, reason)
        return False

    def _run_batch(self, batch: list[_Request]) -> None:
        start = time.perf_counter()
        rows = [r.images for r in batch]
        try:
            outputs = self._forward(batch)
            if len(batch) == 1:
                batch[0].future.set_result(list(outputs))
            else:
                pieces = [torch.split(output, rows) for output in outputs]
                for index, request in enumerate(batch):
                    request.future.set_result([piece[index] for piece in pieces])
        except BaseException as error:  # handed to every waiting call; the error interceptor reports it
            self._fail(batch, error)
            if not isinstance(error, Exception):
                raise
            return
        if self._metrics is not None:
            self._metrics.observe_batch(self.name, sum(rows), len(batch), time.perf_counter() - start)

    @staticmethod
    def _fail(batch: list[_Request], error: BaseException) -> None:
        for request in batch:
            if not request.future.done():  # dropped, cancelled or already answered ones keep their outcome
                request.future.set_exception(error)

    def _forward(self, batch: list[_Request]) -> list[Tensor]:
        head = batch[0]
        inputs = [
            torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*(r.inputs for r in batch), strict=True)
        ]
        total = sum(r.images for r in batch)
        with torch.inference_mode(not head.grad):
            if total <= self.max_batch:
                return self._run_checked(head.key, inputs, total)
            slices = [
                self._run_checked(head.key, [x[i : i + self.max_batch] for x in inputs], min(self.max_batch, total - i))
                for i in range(0, total, self.max_batch)
            ]
            return [torch.cat(parts) for parts in zip(*slices, strict=True)]

    def _run_checked(self, key: Hashable, inputs: list[Tensor], images: int) -> list[Tensor]:
        """`run` on `images` merged images; refuses outputs without one row per image (they cannot be split back).

        FAILED_PRECONDITION, not INTERNAL: the request is fine and the server code is not at fault; the model as
        installed (a user's ONNX or TorchScript export, say one with a fixed batch size) cannot serve it, which the
        operator fixes, as with the other BROKEN_MODEL errors.
        """
        outputs = list(self._run(key, inputs))
        for index, output in enumerate(outputs):
            if output.dim() == 0 or output.shape[0] != images:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{self.name} returned output {index} of shape {tuple(output.shape)} for a batch of {images} "
                    "images; every output needs one row per image along its first dimension",
                    "model",
                    "BROKEN_MODEL",
                )
        return outputs

    def _report_queue(self) -> None:
        if self._metrics is not None:
            self._metrics.set_queue(self.name, self._queued_images)


class BatcherPool:
    """One batcher per model, created on first use with the service's batching settings."""

    def __init__(self, *, max_batch: int, max_delay_s: float, max_queue: int, metrics: ServiceMetrics | None) -> None:
        self.max_batch, self.max_delay_s, self.max_queue = max_batch, max_delay_s, max_queue
        self._metrics = metrics
        self._batchers: dict[str, DynamicBatcher] = {}
        self._loading: dict[str, threading.Lock] = {}  # one per model being loaded
        self._lock = threading.Lock()
        self._closed = False

    def get(self, name: str, run: Callable[[], RunBatch]) -> DynamicBatcher:
        """The batcher of model `name`; `run()` builds its run function (loading the model) the first time only."""
        batcher = self._batchers.get(name)
        if batcher is not None:
            return batcher  # the common case takes no lock, so one model loading does not hold up the others
        with self._lock:
            self._refuse_if_closed()
            loading = self._loading.setdefault(name, threading.Lock())
        # The model loads under its own lock: its other callers wait for it, the callers of other models do not.
        with loading:
            batcher = self._batchers.get(name)
            if batcher is not None:
                return batcher  # another caller loaded it meanwhile
            built = run()
            with self._lock:
                self._refuse_if_closed()  # close() must see every batcher it has to stop
                batcher = self._batchers[name] = DynamicBatcher(
                    name,
                    built,
                    max_batch=self.max_batch,
                    max_delay_s=self.max_delay_s,
                    max_queue=self.max_queue,
                    metrics=self._metrics,
                )
                del self._loading[name]
            return batcher

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down", reason="SHUTTING_DOWN")

    def close(self, timeout: float | None = None) -> None:
        """Drain every batcher (each runs what is queued) and stop its thread."""
        with self._lock:
            self._closed = True
            batchers = list(self._batchers.values())
        for batcher in batchers:
            batcher.close(timeout)
