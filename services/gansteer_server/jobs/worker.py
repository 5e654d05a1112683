"""`gansteer-worker`: a Celery worker that runs job segments; and an in-thread worker for tests and the embedded mode.

    gansteer-worker                        # every queue, one prefork child
    gansteer-worker --queues gpu -c 2      # model work only, two children

The prefork pool is the default: a child that dies mid-task is replaced and its task re-queued at once
(`task_reject_on_worker_lost`), and the parent never loads a model (children load them after the fork). `--pool solo`
runs tasks in the main process (debugging); the in-thread worker uses it too.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from celery.contrib.testing.worker import start_worker
from celery.worker import WorkController

from gansteer_server.config import Settings
from gansteer_server.jobs.celery_app import Jobs
from gansteer_server.jobs.kinds import QUEUES
from gansteer_server.jobs.settings import JobSettings


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
    jobs = Jobs(settings)
    hostname = args.hostname or "gansteer@%h"
    jobs.celery.worker_main(worker_argv(queues, args.pool, args.concurrency, settings.settings.log_level, hostname))


def main(argv: Sequence[str] | None = None) -> None:
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_worker(JobSettings.create(settings), argv)


@contextmanager
def start_worker_thread(
    settings: JobSettings, queues: Sequence[str] = QUEUES, loglevel: str = "WARNING"
) -> Iterator[WorkController]:
    """A solo-pool worker in a daemon thread of this process, consuming `queues` until the block exits.

    With `settings.broker` = `memory://` this is the embedded mode: the service and the worker share Celery's
    in-process transport, and run the same code as separate processes on Redis. Celery keeps a worker's state in
    module globals, so run one in-thread worker per process at a time.
    """
    jobs = Jobs(settings)
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
