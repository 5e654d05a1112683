"""Prometheus metrics of one service: calls, latency, dynamic batches and queues, served on its own HTTP port.

Each service owns a `CollectorRegistry`, so two services in one process (the embedded mode, the tests) keep apart.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServiceMetrics:
    """The metrics of one service (`generation` or `scoring`)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gansteer_requests",
            "Finished calls by method and status code.",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gansteer_request_seconds",
            "Time from receiving a call to its answer.",
            ["service", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_images = Histogram(
            "gansteer_batch_images",
            "Images in one dynamic batch (one merged run of a model).",
            ["service", "model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "gansteer_batch_requests",
            "Requests merged into one dynamic batch.",
            ["service", "model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "gansteer_batch_seconds",
            "Time to run one dynamic batch.",
            ["service", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_images = Gauge(
            "gansteer_queue_images",
            "Images waiting in a model's batching queue.",
            ["service", "model"],
            registry=self.registry,
        )
        self.dropped = Counter(
            "gansteer_dropped_requests",
            "Queued requests dropped before their batch ran (cancelled or past their deadline).",
            ["service", "model", "reason"],
            registry=self.registry,
        )
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def observe_call(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        short = method.rsplit("/", 1)[-1]
        self.requests.labels(self.service, short, code.name).inc()
        self.latency.labels(self.service, short).observe(seconds)

    def observe_batch(self, model: str, images: int, requests: int, seconds: float) -> None:
        self.batch_images.labels(self.service, model).observe(images)
        self.batch_requests.labels(self.service, model).observe(requests)
        self.batch_seconds.labels(self.service, model).observe(seconds)

    def set_queue(self, model: str, images: int) -> None:
        self.queue_images.labels(self.service, model).set(images)

    def observe_drop(self, model: str, reason: str) -> None:
        self.dropped.labels(self.service, model, reason).inc()

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0 when absent), e.g. `value("gansteer_batch_images_count", model=...)`."""
        found = self.registry.get_sample_value(name, {"service": self.service, **labels})
        return 0.0 if found is None else float(found)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP on `port` (0: off); returns the port, or 0 when off."""
        if port == 0:
            return 0
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        logger.info("metrics of %s on http://%s:%d/metrics", self.service, host, bound, extra={"port": bound})
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
