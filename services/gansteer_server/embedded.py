"""The whole stack in one process: the three services on loopback and an in-thread Celery worker.

Used by `gansteer.embedded()` (the SDK's context manager), `gansteer up` and `make demo`. It composes the services'
own start helpers, so an embedded job runs the code a deployment runs; only the placement differs. Where jobs
travel is chosen once, in `choose_transport`, and said out loud: a Redis the user named, a `redis-server` found on
the PATH and started on a free port, or Celery's in-memory transport when neither exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

from gansteer_server.config import ANY_PORT, Settings
from gansteer_server.jobs.celery_app import Jobs
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.jobs.worker import serve_worker_metrics, start_worker_thread
from gansteer_server.servers.app import RunningService, start_generation_server, start_scoring_server
from gansteer_server.servers.optimization import RunningOptimizationService, start_optimization_server

logger = logging.getLogger(__name__)

Transport = Literal["auto", "redis-server", "memory"]
MEMORY_URL = "memory://"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@dataclass
class RedisServer:
    """A `redis-server` this process started (no persistence, loopback only); `stop()` ends it."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_redis_server(executable: str | None = None, *, timeout: float = 10.0) -> RedisServer:
    """Starts `redis-server` (from the PATH unless given) on a free loopback port and waits until it answers."""
    path = executable or shutil.which("redis-server")
    if path is None:
        raise FileNotFoundError("no redis-server on the PATH")
    port = free_port()
    args = [path, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    # Its own session: a Ctrl-C at the terminal reaches `gansteer up`, which stops the worker before this Redis,
    # instead of killing Redis under a running worker.
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    server = RedisServer(process, port)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RuntimeError(f"redis-server exited with {process.returncode}: {stderr.strip()}")
        try:
            client.ping()
            return server
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"redis-server on port {port} did not answer within {timeout} s") from None
            time.sleep(0.05)
        finally:
            client.close()


def choose_transport(redis_url: str | None, transport: Transport = "auto") -> tuple[str, RedisServer | None, str]:
    """(URL, the redis-server started for it or None, a sentence saying which) for the jobs' broker and store.

    `auto`: `redis_url` when given, else a `redis-server` on the PATH, else the in-memory transport.
    """
    if transport == "memory" or (transport == "auto" and redis_url == MEMORY_URL):
        return MEMORY_URL, None, "jobs on Celery's in-memory transport, in this process"
    if redis_url and transport == "auto":
        _reachable(redis_url)
        return redis_url, None, f"jobs on the Redis at {_without_password(redis_url)}"
    if transport == "redis-server" or shutil.which("redis-server"):
        server = start_redis_server()
        return server.url, server, f"jobs on a redis-server started on 127.0.0.1:{server.port}"
    return MEMORY_URL, None, "jobs on Celery's in-memory transport (no Redis given and no redis-server on the PATH)"


def _reachable(redis_url: str) -> None:
    """Refuses a Redis that does not answer with one sentence, before any service starts (instead of the worker's
    connection retries ending in a long traceback)."""
    try:
        with redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5) as client:
            client.ping()
    except (redis.RedisError, ValueError) as error:
        raise RuntimeError(f"cannot reach Redis at {_without_password(redis_url)}: {error}") from None


def _without_password(url: str) -> str:
    return url.split("@")[-1] if "@" in url else url


@dataclass
class Stack:
    """The running services and worker. `stop()` stops everything this stack started, in reverse order."""

    generation: RunningService
    scoring: RunningService
    optimization: RunningOptimizationService
    job_settings: JobSettings
    transport: str
    api_key: str | None
    redis_server: RedisServer | None = None
    #: The Prometheus ports of generation, scoring, optimization and worker (empty: metrics off).
    metrics_ports: dict[str, int] = field(default_factory=dict)
    _exit: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    @property
    def generation_address(self) -> str:
        return self.generation.address

    @property
    def scoring_address(self) -> str:
        return self.scoring.address

    @property
    def optimization_address(self) -> str:
        return self.optimization.address

    def stop(self) -> None:
        self._exit.close()


_METRICS_PORTS = ("generation_metrics_port", "scoring_metrics_port", "optimization_metrics_port", "worker_metrics_port")


def _metrics_ports(metrics: bool, free_ports: bool) -> dict[str, int]:
    """The Settings fields of the metrics ports: 0 (off) without metrics, ANY_PORT with free ports, else none (the
    settings' own ports)."""
    if metrics and not free_ports:
        return {}
    return dict.fromkeys(_METRICS_PORTS, ANY_PORT if metrics else 0)


def start_stack(
    *,
    redis_url: str | None = None,
    transport: Transport = "auto",
    free_ports: bool = True,
    settings: Settings | None = None,
    key_prefix: str | None = None,
    worker: bool = True,
    job_options: dict[str, Any] | None = None,
    metrics: bool = False,
    **overrides: Any,
) -> Stack:
    """Starts generation, scoring and optimization services on loopback, and a worker thread.

    `redis_url` / `transport`: see `choose_transport` (`gansteer.embedded()` asks for `memory` unless given a
    URL; `gansteer up` for `auto`). `free_ports`: bind
    any free ports (else the settings' 50051-50053). `key_prefix`: the Redis key prefix (default: the settings';
    a fresh one per stack on the in-memory transport). `overrides` replace `Settings` fields, `job_options`
    `JobSettings` fields. `metrics`: serve each service's and the worker's Prometheus metrics, on free ports with
    `free_ports`, else on the settings' ports; off by default, so a second stack on one machine does not fight over
    them.
    """
    exits = contextlib.ExitStack()
    try:
        url, redis_server, description = choose_transport(redis_url, transport)
        if redis_server is not None:
            exits.callback(redis_server.stop)
        base = dataclasses.replace(
            settings or Settings.from_env(),
            host="127.0.0.1",
            redis_url=url,
            **_metrics_ports(metrics, free_ports),
            **({"generation_port": 0, "scoring_port": 0, "optimization_port": 0} if free_ports else {}),
            **overrides,
        )
        generation = start_generation_server(base)
        exits.callback(generation.stop, 5.0)
        scoring = start_scoring_server(base)
        exits.callback(scoring.stop, 5.0)
        # The worker reaches the services where they really listen (the remote backend), not at port 0.
        base = dataclasses.replace(base, generation_address=generation.address, scoring_address=scoring.address)
        options = dict(job_options or {})
        if key_prefix is not None:
            options["key_prefix"] = key_prefix
        elif url == MEMORY_URL:
            options.setdefault("key_prefix", f"gansteer-embedded-{uuid.uuid4().hex[:8]}:")
        job_settings = JobSettings.create(base, **options)
        optimization = start_optimization_server(job_settings)
        exits.callback(optimization.stop, 5.0)
        worker_metrics_port = 0
        if worker:
            jobs = Jobs(job_settings)
            # Celery sets the root logger's level from its own: keep the process's (`gansteer up` logs every call).
            level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
            exits.enter_context(start_worker_thread(job_settings, jobs=jobs, loglevel=level))
            if base.worker_metrics_port:
                worker_metrics_port, stop_metrics = serve_worker_metrics(jobs, base.worker_metrics_port, base.host)
                exits.callback(stop_metrics)
        logger.info("gansteer stack up: %s", description)
        bound = {
            "generation": generation.metrics_port,
            "scoring": scoring.metrics_port,
            "optimization": optimization.metrics_port,
            "worker": worker_metrics_port,
        }
        return Stack(
            generation,
            scoring,
            optimization,
            job_settings,
            description,
            base.api_keys[0] if base.auth_enabled else None,
            redis_server,
            bound if metrics else {},
            exits,
        )
    except BaseException:
        exits.close()
        raise
