"""Prometheus metrics of one service: calls (finished and in flight), latency, dynamic batches and queues, model
loads, readiness and the process's CPU and memory, served on its own HTTP port.

Each service owns a `CollectorRegistry`, so two services in one process (the embedded mode, the tests) keep apart.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

from gansteer_server.config import ANY_PORT

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServiceMetrics:
    """The metrics of one service (`generation`, `scoring` or `optimization`)."""

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
        self.in_flight = Gauge(
            "gansteer_requests_in_flight",
            "Calls being handled now (a WatchJob stream counts while it is open).",
            ["service", "method"],
            registry=self.registry,
        )
        # The same names as a worker's model metrics (jobs/metrics.py).
        self.model_load_seconds = Histogram(
            "gansteer_model_load_seconds",
            "Time to load one model into memory.",
            ["service", "model", "runtime"],
            buckets=_LOAD_BUCKETS,
            registry=self.registry,
        )
        self.models_loaded = Gauge(
            "gansteer_models_loaded", "Models held in memory.", ["service", "runtime"], registry=self.registry
        )
        self.ready = Gauge(
            "gansteer_ready",
            "1 while the service reports SERVING to readiness probes, else 0.",
            ["service"],
            registry=self.registry,
        )
        self.dependency_up = Gauge(
            "gansteer_dependency_up",
            "1 while a dependency answered its last check, else 0.",
            ["service", "dependency"],
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def call_started(self, method: str) -> None:
        """A call of `method` (its short name, e.g. `Generate`) began."""
        self.in_flight.labels(self.service, method).inc()

    def call_finished(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.in_flight.labels(self.service, method).dec()
        self.requests.labels(self.service, method, code.name).inc()
        self.latency.labels(self.service, method).observe(seconds)

    def observe_model_load(self, model: str, runtime: str, seconds: float) -> None:
        self.model_load_seconds.labels(self.service, model, runtime).observe(seconds)
        self.models_loaded.labels(self.service, runtime).inc()

    def set_ready(self, ready: bool, dependencies: dict[str, bool]) -> None:
        self.ready.labels(self.service).set(1 if ready else 0)
        for name, up in dependencies.items():
            self.dependency_up.labels(self.service, name).set(1 if up else 0)

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
        """Expose /metrics over HTTP on `port` (0: off; ANY_PORT: a free one); returns the port, or 0 when off."""
        if port == 0:
            return 0
        bind = 0 if port == ANY_PORT else port
        try:
            self._http, self._http_thread = start_http_server(bind, addr=host, registry=self.registry)
        except OSError as error:
            variable = f"GANSTEER_{self.service.upper()}_METRICS_PORT"
            raise OSError(
                f"the {self.service} metrics port {host}:{port} is taken ({error}); set {variable}"
            ) from error
        bound = int(self._http.server_port)
        logger.info("metrics of %s on http://%s:%d/metrics", self.service, host, bound, extra={"port": bound})
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
