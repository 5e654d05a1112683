"""Liveness and readiness on the standard health service (grpc.health.v1), by service name:

- `liveness`: SERVING from the start until the server stops. A failed dependency never turns it off, so a liveness
  probe restarts a process that stopped answering, not every replica while Redis is down.
- `readiness`, `""` (the whole server, what `grpc_health_probe` asks by default) and the service's own name (e.g.
  `gansteer.v1.OptimizationService`): SERVING while every dependency answered its last check, NOT_SERVING while one
  does not, so balancers and Kubernetes route no calls to a replica that would fail them.

A background thread checks the dependencies every `interval_s` (1 s), each check bounded by its client's timeout
(1 s for Redis); a change is logged once (WARNING when one goes, INFO when all are back) and shows in the
`gansteer_ready` and `gansteer_dependency_up` metrics. A stopping server turns every name NOT_SERVING first
(graceful shutdown), liveness included. The optimization service depends on Redis (job store, and the broker when
that is another Redis); the generation and scoring services depend on nothing outside their process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from grpc_health.v1 import health, health_pb2

from gansteer_server.servers.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

LIVENESS, READINESS = "liveness", "readiness"
#: A dependency check: raises (or returns False) when the dependency is gone.
Check = Callable[[], object]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def report_serving(health_servicer: health.HealthServicer, service: str) -> None:
    """What a freshly started server reports: alive, and ready until a check says otherwise."""
    for name in (LIVENESS, *readiness_names(service)):
        health_servicer.set(name, _SERVING)


def readiness_names(service: str) -> tuple[str, ...]:
    return ("", READINESS, service)


class Readiness:
    """Keeps the readiness names of one server in step with its dependencies' checks."""

    def __init__(
        self,
        name: str,
        health_servicer: health.HealthServicer,
        service: str,
        checks: Mapping[str, Check],
        metrics: ServiceMetrics,
        interval_s: float = 1.0,
    ) -> None:
        self.name, self.health, self.service = name, health_servicer, service
        self.checks, self.metrics, self.interval_s = dict(checks), metrics, interval_s
        self.ready = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"gansteer-readiness-{name}", daemon=True)

    def start(self) -> None:
        """Check once now (a server started without its Redis is not ready), then every `interval_s`."""
        self.check()
        if self.checks:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def check(self) -> bool:
        """Run every check once, update the health names and metrics; returns whether the server is ready."""
        problems: dict[str, str] = {}
        for dependency, probe in self.checks.items():
            try:
                if probe() is False:
                    problems[dependency] = "check failed"
            except Exception as error:  # whatever a check raises means its dependency cannot be used now
                problems[dependency] = f"{type(error).__name__}: {error}"
        ready = not problems
        self.metrics.set_ready(ready, {dependency: dependency not in problems for dependency in self.checks})
        if ready != self.ready:
            self.ready = ready
            status = _SERVING if ready else _NOT_SERVING
            for served in readiness_names(self.service):
                self.health.set(served, status)
            if ready:
                logger.info("%s is ready again", self.name, extra={"service": self.name, "ready": True})
            else:
                shown = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
                logger.warning(
                    "%s is not ready: %s",
                    self.name,
                    shown,
                    extra={"service": self.name, "ready": False, "problems": problems},
                )
        return ready

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()
