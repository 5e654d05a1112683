"""`gansteer-worker`: a Celery worker that runs job segments; and an in-thread worker for tests and the embedded mode.

    gansteer-worker                        # every queue, one prefork child
    gansteer-worker --queues gpu -c 2      # model work only, two children

The prefork pool is the default: a child that dies mid-task is replaced and its task re-queued at once
(`task_reject_on_worker_lost`), and the parent never loads a model (children load them after the fork). `--pool solo`
runs tasks in the main process (debugging); the in-thread worker uses it too.

Metrics (`GANSTEER_WORKER_METRICS_PORT`, 0: off) are served by the worker's main process. With the prefork pool the
tasks run in children, so their metrics use prometheus_client's multiprocess mode in a directory made fresh for each
start (see `jobs/metrics.py` for why); the process metrics (`process_*`) are the main process's.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from celery.contrib.testing.worker import start_worker
from celery.worker import WorkController
from prometheus_client import ProcessCollector, start_http_server, values

from gansteer_server.config import ANY_PORT, Settings
from gansteer_server.jobs.celery_app import Jobs, probe_redis
from gansteer_server.jobs.kinds import QUEUES
from gansteer_server.jobs.metrics import BrokerCollector, multiprocess_registry
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.jobs.store import JobStore
from gansteer_server.logs import configure_logging

logger = logging.getLogger(__name__)


def worker_argv(queues: Sequence[str], pool: str, concurrency: int, loglevel: str, hostname: str = "") -> list[str]:
    argv = [
        "worker",
        f"--queues={','.join(queues)}",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    return [*argv, f"--hostname={hostname}"] if hostname else argv


def run_worker(settings: JobSettings, argv: Sequence[str] | None = None) -> None:
    """Run a worker in this process until it is stopped (SIGTERM: finish the current segment, then exit)."""
    parser = argparse.ArgumentParser(
        prog="gansteer-worker", description="Run a gansteer worker: a Celery worker that runs job segments."
    )
    parser.add_argument("--queues", default=",".join(QUEUES), help="comma-separated queues (default: all)")
    parser.add_argument("--pool", default="prefork", choices=("prefork", "solo", "threads"))
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("--hostname", default="", help="Celery node name (default: gansteer@<host>)")
    args = parser.parse_args(argv)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(QUEUES))
    if unknown:
        parser.error(f"unknown queues {unknown}; expected some of {list(QUEUES)}")
    port = settings.settings.worker_metrics_port
    shared = _multiprocess_metrics() if port and args.pool == "prefork" else None
    jobs = Jobs(settings)  # its metrics are made after the switch to multiprocess mode
    if port:
        bound, _ = serve_worker_metrics(jobs, port, settings.settings.host, shared)
        logger.info("worker metrics on http://%s:%d/metrics", settings.settings.host, bound, extra={"port": bound})
    hostname = args.hostname or "gansteer@%h"
    jobs.celery.worker_main(worker_argv(queues, args.pool, args.concurrency, settings.settings.log_level, hostname))


def _multiprocess_metrics() -> str:
    """Switch this process (and the children it forks) to prometheus_client's multiprocess mode, in a fresh
    directory removed at exit. prometheus_client picks its value class when first imported, which happened already
    (this module imports it), so it is picked again here, before any metric of the worker exists."""
    path = tempfile.mkdtemp(prefix="gansteer-worker-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = values.get_value_class()
    creator = os.getpid()

    def remove() -> None:
        if os.getpid() == creator:  # not in a child that happens to run exit handlers
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    return path


def serve_worker_metrics(
    jobs: Jobs, port: int, host: str, multiprocess_dir: str | None = None
) -> tuple[int, Callable[[], None]]:
    """Serve /metrics of a worker on `port` (ANY_PORT: a free one): its job metrics (every child's, given the
    multiprocess directory), the broker and job store figures, and this process's CPU and memory. Returns the bound
    port and what stops the server."""
    registry = multiprocess_registry(multiprocess_dir) if multiprocess_dir else jobs.metrics.registry
    ProcessCollector(registry=registry)
    job_settings = jobs.settings
    store = JobStore(probe_redis(job_settings.settings.redis_url), job_settings.key_prefix, job_settings.result_ttl_s)
    broker = None if job_settings.broker.startswith("memory://") else probe_redis(job_settings.broker)
    registry.register(BrokerCollector(store, broker, job_settings.celery_key_prefix, QUEUES))
    try:
        server, _ = start_http_server(0 if port == ANY_PORT else port, addr=host, registry=registry)
    except OSError as error:
        raise OSError(
            f"the worker metrics port {host}:{port} is taken ({error}); set GANSTEER_WORKER_METRICS_PORT"
        ) from error

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return int(server.server_port), stop


def main(argv: Sequence[str] | None = None) -> None:
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    run_worker(JobSettings.create(settings), argv)


@contextmanager
def start_worker_thread(
    settings: JobSettings, queues: Sequence[str] = QUEUES, loglevel: str = "WARNING", *, jobs: Jobs | None = None
) -> Iterator[WorkController]:
    """A solo-pool worker in a daemon thread of this process, consuming `queues` until the block exits; `jobs`: the
    worker's app (default: a new one), whose metrics `serve_worker_metrics` can serve.

    With `settings.broker` = `memory://` this is the embedded mode: the service and the worker share Celery's
    in-process transport, and run the same code as separate processes on Redis. Celery keeps a worker's state in
    module globals, so run one in-thread worker per process at a time.
    """
    jobs = jobs if jobs is not None else Jobs(settings)
    with start_worker(
        jobs.celery,
        pool="solo",
        concurrency=1,
        loglevel=loglevel,
        perform_ping_check=False,
        queues=list(queues),
        shutdown_timeout=settings.segment_seconds + 30,
    ) as worker:
        yield worker


if __name__ == "__main__":
    main()
