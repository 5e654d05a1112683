"""Prometheus metrics of the jobs: what workers run (tasks, segments, queue wait, checkpoints, re-deliveries, model
loads), every state change of a job, and what the broker and the job store hold (queue depth, jobs by state).

`WorkerMetrics` are a worker process's, `JobMetrics` (state changes) any process's. A prefork worker runs tasks in
child processes, so its metrics use prometheus_client's multiprocess mode (`multiprocess_registry`): each child
writes its values to memory-mapped files in a directory made fresh for each worker start, and the parent's /metrics
endpoint adds them up at every scrape. Exposing from each child instead would give Prometheus one target per child,
each on its own port, and a child replaced after a crash would take its counts with it. The broker and store figures
are read from Redis by the process that serves /metrics, at most once per `cache_s`, never by the tasks.
"""

from __future__ import annotations

import glob
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from gansteer_server.jobs.records import ClaimOutcome, JobState
from gansteer_server.jobs.store import JobStore, Transition

# Outcomes of a task that ran (part of) a segment: every run_segment result but a claim that was refused.
_REFUSED = frozenset(outcome.value for outcome in ClaimOutcome if outcome is not ClaimOutcome.RUN)
# Outcomes after which the segment's checkpoint is stored (`JobStore.advance`: next segment, or a round opened).
_CHECKPOINTED = frozenset({"segment", JobState.WAITING.value})
_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_JOB_SECONDS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
_LOAD_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class JobMetrics:
    """Job state changes committed by one process, and the durations of the jobs it ended. Every process that
    changes states has them: workers, and the optimization service (a job created, an answer that queues it again,
    a cancel)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.transitions = Counter(
            "gansteer_job_transitions",
            "Job state changes committed by this process (from_state `new`: a job created).",
            ["kind", "from_state", "to_state"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "gansteer_job_seconds",
            "Wall time of a job from its creation to its final state.",
            ["kind", "state"],
            buckets=_JOB_SECONDS,
            registry=r,
        )
        self.job_run_seconds = Histogram(
            "gansteer_job_run_seconds",
            "Compute time of a job, summed over its segments, at its final state.",
            ["kind", "state"],
            buckets=_JOB_SECONDS,
            registry=r,
        )

    def observe_transition(self, transition: Transition) -> None:
        previous = transition.previous.value if transition.previous is not None else "new"
        self.transitions.labels(transition.kind, previous, transition.state.value).inc()
        if transition.state.terminal:
            self.job_seconds.labels(transition.kind, transition.state.value).observe(transition.duration_s)
            self.job_run_seconds.labels(transition.kind, transition.state.value).observe(transition.run_s)

    def value(self, name: str, **labels: str) -> float:
        """One sample of this process's own values (0 when absent); tests of in-thread workers read it."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else float(found)


class WorkerMetrics(JobMetrics):
    """A worker process's metrics: its job state changes, and what its tasks did and the models it loaded."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.tasks = Counter(
            "gansteer_worker_tasks", "Job tasks finished, by job kind and outcome.", ["kind", "outcome"], registry=r
        )
        self.tasks_running = Gauge(
            "gansteer_worker_tasks_running",
            "Job tasks running now.",
            ["kind"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.segment_seconds = Histogram(
            "gansteer_job_segment_seconds",
            "Compute time of one segment: from the task's start to its end (claim, steps, checkpoint).",
            ["kind"],
            buckets=_SECONDS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "gansteer_job_queue_wait_seconds",
            "Time a segment's task waited in its queue: from when it was due (sent, or counted down) to its start.",
            ["kind", "queue"],
            buckets=_SECONDS,
            registry=r,
        )
        self.checkpoints = Counter(
            "gansteer_job_checkpoints", "Checkpoints stored at the end of a segment.", ["kind"], registry=r
        )
        self.redeliveries = Counter(
            "gansteer_job_redeliveries",
            "Segments delivered again after their worker was lost (the resumed ones and those over the cap).",
            ["kind"],
            registry=r,
        )
        # The same names as the services' model metrics (servers/metrics.py), with service="worker".
        self.model_load_seconds = Histogram(
            "gansteer_model_load_seconds",
            "Time to load one model into memory.",
            ["service", "model", "runtime"],
            buckets=_LOAD_SECONDS,
            registry=r,
        )
        self.models_loaded = Gauge(
            "gansteer_models_loaded",
            "Models held in memory.",
            ["service", "runtime"],
            registry=r,
            multiprocess_mode="livesum",
        )

    def task_started(self, kind: str) -> None:
        self.tasks_running.labels(kind).inc()

    def task_finished(
        self, kind: str, queue: str, outcome: str, due: float | None, started: float, ended: float
    ) -> None:
        """A task ended with `outcome` (a run_segment result, `retried` or `error`); times are epoch seconds."""
        self.tasks_running.labels(kind).dec()
        self.tasks.labels(kind, outcome).inc()
        if outcome in _REFUSED:
            return
        self.segment_seconds.labels(kind).observe(ended - started)
        if due is not None:
            self.queue_wait_seconds.labels(kind, queue).observe(max(0.0, started - due))
        if outcome in _CHECKPOINTED:
            self.checkpoints.labels(kind).inc()

    def redelivered(self, kind: str) -> None:
        self.redeliveries.labels(kind).inc()

    def observe_model_load(self, model: str, runtime: str, seconds: float) -> None:
        self.model_load_seconds.labels("worker", model, runtime).observe(seconds)
        self.models_loaded.labels("worker", runtime).inc()


class BrokerCollector(Collector):
    """Queue depth per queue and unacknowledged messages (from Celery's keys in the broker) and jobs per unfinished
    state (from the job store's state sets): a handful of O(1) Redis commands in one round trip, at most once per
    `cache_s`. Every process serving it reports the same figures: aggregate them with max, not sum.

    `broker` is None for Celery's in-memory transport (no queue figures then)."""

    def __init__(
        self,
        store: JobStore,
        broker: redis.Redis | None,
        celery_prefix: str,
        queues: Sequence[str],
        cache_s: float = 2.0,
    ) -> None:
        self.store, self.broker, self.celery_prefix, self.queues = store, broker, celery_prefix, tuple(queues)
        self.cache_s = cache_s
        self._cached: tuple[float, list[Metric]] | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.cache_s:
                self._cached = (now, self._read())
            return list(self._cached[1])

    def _read(self) -> list[Metric]:
        up = GaugeMetricFamily("gansteer_redis_up", "Whether the last read of the broker and job store worked.")
        try:
            depths, unacked = self._queue_depths()
            states = self.store.state_counts()
        except redis.RedisError:
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        jobs = GaugeMetricFamily(
            "gansteer_jobs", "Unfinished jobs by state (the job store's state sets).", labels=["state"]
        )
        for state, count in states.items():
            jobs.add_metric([state.value], count)
        found: list[Metric] = [up, jobs]
        if depths is not None:
            queued = GaugeMetricFamily(
                "gansteer_queue_messages", "Task messages waiting in a queue (all priorities).", labels=["queue"]
            )
            for queue, depth in depths.items():
                queued.add_metric([queue], depth)
            found.append(queued)
            found.append(
                GaugeMetricFamily(
                    "gansteer_queue_unacked",
                    "Task messages delivered to workers and not yet acknowledged (running, reserved or counting down).",
                    value=unacked,
                )
            )
        return found

    def _queue_depths(self) -> tuple[dict[str, int] | None, int]:
        """Celery on Redis keeps one list per queue and priority step (`<queue>`, `<queue>:1` ... `<queue>:9`)."""
        if self.broker is None:
            return None, 0
        pipe = self.broker.pipeline(transaction=False)
        keys = {queue: [queue, *(f"{queue}:{step}" for step in range(1, 10))] for queue in self.queues}
        for names in keys.values():
            for name in names:
                pipe.llen(self.celery_prefix + name)
        pipe.hlen(self.celery_prefix + "unacked")
        replies = pipe.execute()
        depths: dict[str, int] = {}
        for queue, names in keys.items():
            depths[queue], replies = sum(int(n) for n in replies[: len(names)]), replies[len(names) :]
        return depths, int(replies[0])


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry of the values every process wrote under `path` (multiprocess mode); live gauges of children that
    are gone (a child killed with SIGKILL never says so) are dropped before each scrape."""
    registry = CollectorRegistry()
    registry.register(_LiveProcesses(MultiProcessCollector(None, path), path))
    return registry


class _LiveProcesses(Collector):
    _FILE = re.compile(r"gauge_live\w+?_(\d+)\.db$")

    def __init__(self, inner: MultiProcessCollector, path: str) -> None:
        self.inner, self.path = inner, path

    def collect(self) -> Iterable[Metric]:
        for name in glob.glob(os.path.join(self.path, "gauge_live*_*.db")):
            match = self._FILE.search(name)
            if match is not None and not _alive(int(match.group(1))):
                mark_process_dead(int(match.group(1)), self.path)
        return self.inner.collect()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
