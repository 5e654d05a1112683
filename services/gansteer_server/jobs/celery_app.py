"""The Celery application of the jobs, configured from the settings (one factory for the service and the workers).

- Broker on Redis (or `memory://`: Celery's in-process transport, for the embedded mode); no result backend is
  needed, since the job store holds every result, so tasks ignore results.
- Late acknowledgement, re-queue when a worker process is lost, prefetch of one: a task is taken off the queue only
  when it has finished, and a worker holds at most one task it is not running.
- One queue per resource (`gpu` for model work, `cpu` for light work); each job kind has its own task
  (`gansteer.job.<kind>`), routed to its kind's queue.
- JSON only: a task message is `[job_id, segment]`; pickle is never accepted.
- Every key Celery writes starts with `<key_prefix>celery:`, so deployments (and tests) sharing a Redis stay apart.
- Each task message carries the time it was sent (header `gansteer_sent`), so a worker measures how long a segment
  waited in its queue apart from how long it computed (`JobMetrics`).
- A task that meets a Redis error (any `redis.RedisError`: a lost connection, OOM, READONLY, ...) or a broker that
  refuses a message (`EnqueueFailed`) gives its lease up and is retried with backoff (`max_retries`). A task that
  cannot be retried (its retries ran out, the retry message could not be sent, or an unexpected error escaped it)
  fails its job, so no job is left RUNNING without a task message.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NoReturn

import redis
import torch
from celery import Celery, Task
from celery.exceptions import Reject, Retry
from celery.utils.time import get_exponential_backoff_interval
from kombu import Exchange, Queue
from kombu.exceptions import OperationalError
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry

from gansteer_server.jobs.backends import Backends
from gansteer_server.jobs.kinds import QUEUES, JobKind, get_kind, kind_names
from gansteer_server.jobs.metrics import WorkerMetrics
from gansteer_server.jobs.records import JobRecord
from gansteer_server.jobs.runner import EnqueueFailed, WorkerContext, run_segment
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.jobs.specs import encode_spec
from gansteer_server.jobs.store import JobStore, TransitionObserver

logger = logging.getLogger(__name__)

TASK_PREFIX = "gansteer.job."
# Errors that end a task but leave its job fine: the same segment runs again later (the lease and the checkpoint make
# that safe). Anything else a task lets out is unexpected: its job fails.
_RETRYABLE = (redis.RedisError, EnqueueFailed)
#: Header of a task message: when it was sent (epoch seconds).
SENT_HEADER = "gansteer_sent"


def task_name(kind: str) -> str:
    return TASK_PREFIX + kind


def open_redis(url: str) -> redis.Redis:
    """A client for the job store. `memory://` (the embedded mode) needs the `fakeredis` package, an in-process
    Redis; everything else is a real Redis URL."""
    if url.startswith("memory://"):
        try:
            import fakeredis
        except ImportError as error:
            raise RuntimeError(
                "GANSTEER_REDIS_URL=memory:// keeps the job store in this process and needs the `fakeredis` package "
                "(pip install fakeredis), or point GANSTEER_REDIS_URL at a Redis server"
            ) from error
        return fakeredis.FakeRedis(server=_memory_server())
    return redis.Redis.from_url(url, health_check_interval=30, socket_keepalive=True)


def probe_redis(url: str, timeout_s: float = 1.0) -> redis.Redis:
    """A client for health checks and metrics: every command answers or fails within `timeout_s`, without retries,
    so a Redis that is gone (or unreachable) is noticed at once instead of after the client's backoff."""
    if url.startswith("memory://"):
        return open_redis(url)
    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=RedisRetry(NoBackoff(), 0)
    )


_MEMORY_SERVER: Any = None


def _memory_server() -> Any:
    """One in-process Redis shared by every client of this process (the service's and the worker thread's)."""
    global _MEMORY_SERVER
    if _MEMORY_SERVER is None:
        import fakeredis

        _MEMORY_SERVER = fakeredis.FakeServer()
    return _MEMORY_SERVER


def create_store(settings: JobSettings, on_transition: TransitionObserver | None = None) -> JobStore:
    return JobStore(
        open_redis(settings.settings.redis_url),
        settings.key_prefix,
        settings.result_ttl_s,
        settings.events_maxlen,
        on_transition,
    )


class Jobs:
    """The Celery app plus what sends job tasks: the optimization service's and the workers' handle on the queue.
    `metrics` counts what this process's tasks do; the state changes it commits go to `on_transition` (default: to
    `metrics` too)."""

    def __init__(self, settings: JobSettings, on_transition: TransitionObserver | None = None) -> None:
        self.settings = settings
        self.metrics = WorkerMetrics()
        self.on_transition = on_transition or self.metrics.observe_transition
        self.celery = create_celery(settings, self)
        self._store: JobStore | None = None
        self._context: WorkerContext | None = None
        self._context_pid = 0
        self._lock = threading.Lock()

    @property
    def store(self) -> JobStore:
        """The job store of the submitting side (the service); workers use their context's."""
        with self._lock:
            if self._store is None:
                self._store = create_store(self.settings, self.on_transition)
            return self._store

    def submit(
        self,
        kind: JobKind,
        spec: Any,
        *,
        owner: str,
        spec_proto: bytes = b"",
        priority: int = 0,
        time_limit_s: float = 0.0,
        preview_every: int = 0,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str = "",
    ) -> tuple[JobRecord, bool]:
        """Record a validated spec as a queued job and send its first task; returns (record, existing), existing
        being True when the owner's idempotency key named an earlier job (then nothing is sent)."""
        record, existing = self.store.create(
            kind=kind.name,
            owner=owner,
            queue=kind.queue,
            spec_proto=spec_proto,
            spec_state=encode_spec(spec),
            total_steps=kind.total_steps(spec),
            priority=priority,
            time_limit_s=time_limit_s,
            preview_every=preview_every,
            labels=labels,
            idempotency_key=idempotency_key,
        )
        if not existing:
            try:
                self.enqueue(record, 0)
            except (OperationalError, OSError, redis.RedisError) as error:
                self.store.abort(record.id, f"the job could not be queued: {error}", "QUEUE_UNAVAILABLE")
                raise
        return record, existing

    def enqueue(self, record: JobRecord, segment: int, countdown: float = 0.0) -> None:
        """Send the task that runs `segment` of the job, to its kind's queue, with the job's priority."""
        self.celery.send_task(
            task_name(record.kind),
            args=[record.id, segment],
            queue=record.queue,
            # The Redis transport serves lower numbers first; JobSpec.priority is "higher runs first", 0 to 9.
            priority=9 - record.priority,
            countdown=countdown or None,
            headers={SENT_HEADER: time.time()},
        )

    def worker_context(self) -> WorkerContext:
        """This process's context, built on first use, so a prefork child builds its own after the fork."""
        with self._lock:
            if self._context is None or self._context_pid != os.getpid():
                if self.settings.settings.torch_threads:
                    torch.set_num_threads(self.settings.settings.torch_threads)
                self._context = WorkerContext(
                    settings=self.settings,
                    store=create_store(self.settings, self.on_transition),
                    backends=Backends(self.settings.settings, on_load=self.metrics.observe_model_load),
                    enqueue=self.enqueue,
                    metrics=self.metrics,
                )
                self._context_pid = os.getpid()
            return self._context


def create_celery(settings: JobSettings, jobs: Jobs) -> Celery:
    app = Celery("gansteer", set_as_current=False)
    broker = "memory://localhost/" if settings.broker == "memory://" else settings.broker
    # The in-process transport polls its queues; the default second would add up to a second per segment.
    transport_options: dict[str, Any] = {"polling_interval": 0.05}
    if not broker.startswith("memory://"):
        transport_options = {
            "global_keyprefix": settings.celery_key_prefix,
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            # A worker killed during a restore sweep holds the sweep's mutex until it expires (default 5 min);
            # overlapping sweeps can only duplicate messages, which the leases absorb.
            "unacked_mutex_expire": max(5, round(5 * settings.restore_interval_s)),
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),
            "sep": ":",
        }
    app.conf.update(
        broker_url=broker,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A pool child that died is reported (and its task re-queued) after this wait for a result it might have
        # sent; tasks here send none (the job store holds results), so waiting Celery's default 10 s is pointless.
        worker_lost_wait=1.0,
        # Each queue on its own direct exchange: a bare Queue(name) would bind to the default queue's exchange and
        # routing key, and a message for one queue would land in both.
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue=QUEUES[-1],
        task_routes={task_name(name): {"queue": get_kind(name).queue} for name in kind_names()},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    for name in kind_names():
        _register_task(app, jobs, get_kind(name))
    return app


def _register_task(app: Celery, jobs: Jobs, kind: JobKind) -> None:
    @app.task(
        name=task_name(kind.name),
        bind=True,
        shared=False,  # each app (service, workers, tests' in-thread workers) runs its own Jobs' settings
        max_retries=20,  # with backoff up to 60 s: about a quarter of an hour of Redis or broker trouble
    )
    def run(task: Task, job_id: str, segment: int) -> str:
        context, segment = jobs.worker_context(), int(segment)
        started, outcome = time.time(), "error"
        jobs.metrics.task_started(kind.name)
        try:
            outcome = run_segment(context, job_id, segment)
        except _RETRYABLE as error:
            outcome = "retried"
            _retry(task, context, job_id, segment, error)
        except Exception as error:
            _give_up(context, job_id, segment, error)
            raise
        finally:
            jobs.metrics.task_finished(kind.name, kind.queue, outcome, _due(task), started, time.time())
        logger.info("job %s segment %d: %s", job_id, segment, outcome)
        return outcome


def _due(task: Task) -> float | None:
    """When the task's message was due: sent, or its countdown over (a retry keeps its first message's header)."""
    sent = getattr(task.request, SENT_HEADER, None)
    eta = task.request.eta
    due = datetime.fromisoformat(eta).timestamp() if isinstance(eta, str) else None
    if sent is None:
        return due
    return max(float(sent), due) if due is not None else float(sent)


def _retry(task: Task, context: WorkerContext, job_id: str, segment: int, error: Exception) -> NoReturn:
    """Retry the task after a Redis or broker error; fail the job when its retries ran out.

    Redis is both the broker and the job store, so while it is down neither a retry message nor a failed job can be
    written. The task then waits for Redis (a bounded while, well inside the visibility timeout) and tries again;
    a message is never dropped: if Redis stays down, the task is rejected with requeue, and a reject that cannot
    reach Redis leaves the message unacknowledged, for the broker to deliver again once Redis is back.
    """
    try:
        # So the retry (or a re-delivery) claims at once and counts no delivery; when Redis still fails, the
        # lease lapses, or this worker's next try takes it back.
        context.store.release(job_id, context.lease_owner)
    except Exception:
        logger.debug("job %s: could not release the lease before a retry", job_id, exc_info=True)
    countdown = get_exponential_backoff_interval(factor=1, retries=task.request.retries, maximum=60, full_jitter=True)
    logger.warning(
        "job %s segment %d: %s: %s; retried in %d s", job_id, segment, type(error).__name__, error, countdown
    )
    if task.request.retries >= (task.max_retries or 0):
        _give_up(context, job_id, segment, error)
        raise error
    deadline = time.monotonic() + context.settings.visibility_timeout_s / 3
    while True:
        try:
            raise task.retry(exc=error, countdown=countdown)
        except Retry:
            raise
        except Exception as sending:  # celery's Reject(requeue=False): the retry message could not be sent
            if not _wait_for_redis(context, deadline):
                logger.warning(
                    "job %s segment %d: Redis still down; the message goes back to the queue", job_id, segment
                )
                raise Reject(sending, requeue=True) from sending


def _wait_for_redis(context: WorkerContext, deadline: float) -> bool:
    """Ping the job store's Redis with backoff until it answers (True) or `deadline` passes (False)."""
    delay = 0.2
    while time.monotonic() < deadline:
        try:
            if context.store.client.ping():
                return True
        except redis.RedisError:
            pass
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 5.0)
    return False


def _give_up(context: WorkerContext, job_id: str, segment: int, error: BaseException) -> None:
    """Fail the job of a task that ends without retrying, unless another task still carries it (JobStore.abort).
    While Redis is down the job cannot be marked failed: the task waits for it a while, and is then rejected with
    requeue rather than leaving a job RUNNING with no message."""
    message = f"the task of segment {segment} failed and is not retried: {type(error).__name__}: {error}"
    deadline = time.monotonic() + context.settings.visibility_timeout_s / 3
    while True:
        try:
            failed = context.store.abort(job_id, message, "TASK_ERROR", segment=segment, owner=context.lease_owner)
            break
        except redis.RedisError as store_error:
            if not _wait_for_redis(context, deadline):
                logger.error("job %s: its task gave up and Redis is down; the message goes back to the queue", job_id)
                raise Reject(store_error, requeue=True) from store_error
    if failed:
        logger.error("job %s failed: %s", job_id, message, exc_info=error)
