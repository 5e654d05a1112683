"""Assemble a service: gRPC server, interceptors, health (liveness and readiness), reflection, batching and metrics.

`start_generation_server(settings)` and `start_scoring_server(settings)` start a service in this process and return
a `RunningService` (the tests, the embedded mode and the console scripts all use them). Models load on first use,
in the serving process, never before a fork (decision 10).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gansteer_server.config import Settings
from gansteer_server.models import ModelRegistry
from gansteer_server.models.store import ModelStore
from gansteer_server.proto import generation_pb2, generation_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from gansteer_server.servers.auth import ApiKeyInterceptor
from gansteer_server.servers.batching import BatcherPool
from gansteer_server.servers.calls import CallInterceptor
from gansteer_server.servers.errors import ErrorInterceptor
from gansteer_server.servers.generation import GenerationServicer
from gansteer_server.servers.metrics import ServiceMetrics
from gansteer_server.servers.readiness import Readiness, report_serving
from gansteer_server.servers.reflection import enable_reflection
from gansteer_server.servers.scoring import ScoringServicer
from gansteer_server.wire.validation import Limits

logger = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
SCORING_SERVICE = scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name
#: gRPC handler threads per server. A call waiting for its batch holds one, so this bounds how many requests can
#: merge; every WatchJob stream holds one while it waits for events.
GRPC_THREADS = 128
#: Seconds a stopping server gives in-flight calls (and their batches) to finish.
DEFAULT_GRACE_S = 30.0


@dataclass
class RunningService:
    """A started service. `stop()` finishes in-flight calls and batches, then releases the port."""

    name: str
    server: grpc.Server
    port: int
    host: str
    metrics: ServiceMetrics
    metrics_port: int
    batchers: BatcherPool
    health: health.HealthServicer
    store: ModelStore
    readiness: Readiness

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def stop(self, grace: float | None = DEFAULT_GRACE_S) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish within `grace`, drain the batchers."""
        logger.info("stopping %s (grace %s s)", self.name, grace, extra={"service": self.name})
        self.readiness.stop()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.batchers.close()
        self.metrics.close()
        logger.info("%s stopped", self.name, extra={"service": self.name})


def start_generation_server(
    settings: Settings,
    port: int | None = None,
    *,
    registry: ModelRegistry | None = None,
    metrics_port: int | None = None,
) -> RunningService:
    """The generation service on `port` (default: settings.generation_port; 0: any free port)."""
    return _start(
        "generation",
        GENERATION_SERVICE,
        settings,
        settings.generation_port if port is None else port,
        settings.generation_metrics_port if metrics_port is None else metrics_port,
        registry,
        lambda server, store, batchers, limits: generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(store, batchers, limits, settings.max_batch), server
        ),
    )


def start_scoring_server(
    settings: Settings,
    port: int | None = None,
    *,
    registry: ModelRegistry | None = None,
    metrics_port: int | None = None,
) -> RunningService:
    """The scoring service on `port` (default: settings.scoring_port; 0: any free port)."""
    return _start(
        "scoring",
        SCORING_SERVICE,
        settings,
        settings.scoring_port if port is None else port,
        settings.scoring_metrics_port if metrics_port is None else metrics_port,
        registry,
        lambda server, store, batchers, limits: scoring_pb2_grpc.add_ScoringServiceServicer_to_server(
            ScoringServicer(store, batchers, limits), server
        ),
    )


def new_grpc_server(name: str, settings: Settings, metrics: ServiceMetrics) -> grpc.Server:
    """A gRPC server with the shared interceptors (metrics and the log line of each call, errors, then API keys when
    auth is on) and message limits: every gansteer service is built by this one function."""
    interceptors: list[grpc.ServerInterceptor] = [CallInterceptor(metrics), ErrorInterceptor()]
    if settings.auth_enabled:
        interceptors.append(ApiKeyInterceptor(settings.api_keys))
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=GRPC_THREADS, thread_name_prefix=f"grpc-{name}"),
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a taken port fails instead of sharing it
        ],
    )


def serve_grpc(server: grpc.Server, name: str, service: str, host: str, port: int) -> tuple[int, health.HealthServicer]:
    """Add health checking and reflection, bind `host:port` (0: any free port), start, report SERVING; returns the
    bound port and the health servicer (graceful shutdown flips it to NOT_SERVING; `Readiness` keeps it in step with
    the service's dependencies)."""
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, (service, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if bound == 0:
        raise OSError(f"the {name} service could not bind {host}:{port}")
    server.start()
    report_serving(health_servicer, service)
    return bound, health_servicer


def _start(
    name: str,
    service: str,
    settings: Settings,
    port: int,
    metrics_port: int,
    registry: ModelRegistry | None,
    add_servicer: Callable[[grpc.Server, ModelStore, BatcherPool, Limits], None],
) -> RunningService:
    metrics = ServiceMetrics(name)
    server = new_grpc_server(name, settings, metrics)
    store = ModelStore(
        registry or ModelRegistry(settings.registry_paths),
        settings.onnx_models,
        onnx_threads=settings.torch_threads or None,
        on_load=metrics.observe_model_load,
    )
    batchers = BatcherPool(
        max_batch=settings.max_batch,
        max_delay_s=settings.max_delay_ms / 1000,
        max_queue=settings.max_queue,
        metrics=metrics,
    )
    add_servicer(server, store, batchers, Limits(settings.max_images_per_request, settings.max_image_pixels))
    host = settings.host
    bound, health_servicer = serve_grpc(server, name, service, host, port)
    readiness = Readiness(name, health_servicer, service, {}, metrics)  # no dependency outside the process
    readiness.start()
    bound_metrics = metrics.serve(metrics_port, host)
    logger.info(
        "%s service on %s:%d (auth %s, max batch %d, max delay %g ms)",
        name,
        host,
        bound,
        "on" if settings.auth_enabled else "off",
        settings.max_batch,
        settings.max_delay_ms,
        extra={"service": name, "port": bound, "metrics_port": bound_metrics},
    )
    return RunningService(
        name, server, bound, host, metrics, bound_metrics, batchers, health_servicer, store, readiness
    )
