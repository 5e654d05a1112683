"""The sweeper: finds jobs that no task carries any more and queues their segment again.

A job is carried by a task message (queued, or delivered and unacknowledged, which the broker re-delivers after its
visibility timeout) or by a worker's live lease. If a message is lost all the same (a broker restarted without
its data, a message deleted by hand), the job would stay QUEUED or RUNNING for ever. The sweeper looks at jobs that
are neither finished nor waiting for feedback, hold no live lease and have not moved for longer than any message
could be in flight (the visibility timeout plus the broker's restore sweep plus a lease); if the broker holds no
message naming the job, it sends one for the job's current segment and says so in the job's events.

It is idempotent (a second message for a segment stands down on its lease) and runs one at a time across the fleet
(a Redis lock), from the optimization service.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from gansteer_server.jobs.records import JobRecord, JobState, state_event
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.jobs.store import JobStore

logger = logging.getLogger(__name__)

#: Newest jobs looked at per sweep (older unfinished jobs are rarer than the cost of scanning every record).
SWEEP_LIMIT = 2000


@dataclass(frozen=True)
class Requeued:
    job_id: str
    segment: int
    idle_s: float


def broker_messages(client: redis.Redis, settings: JobSettings) -> list[bytes]:
    """Every task message the broker holds under this deployment's prefix: queued or delivered and unacknowledged.
    Celery's messages carry their arguments in `argsrepr`, so a message names its job id in plain text."""
    messages: list[bytes] = []
    for key in client.scan_iter(match=f"{settings.celery_key_prefix}*", count=1000):
        kind = client.type(key)
        if kind == b"list":
            messages.extend(client.lrange(key, 0, -1))
        elif kind == b"hash" and key.endswith(b"unacked"):
            messages.extend(client.hvals(key))
    return messages


def sweep(store: JobStore, settings: JobSettings, enqueue: Callable[[JobRecord, int], None]) -> list[Requeued]:
    """One pass: queue again the segment of every job no task carries. Returns what it did."""
    now = time.time()
    idle_limit = settings.visibility_timeout_s + 2 * settings.restore_interval_s + settings.lease_s
    ids = store.list_ids(None, limit=SWEEP_LIMIT)
    stale = [
        found[0]
        for found in store.get_with_last_event(ids)
        if found is not None and _unattended(found[0], now, idle_limit)
    ]
    if not stale:
        return []
    carried = broker_messages(store.client, settings)
    done: list[Requeued] = []
    for record in stale:
        if any(record.id.encode() in message for message in carried):
            continue
        idle = now - record.updated
        enqueue(record, record.segment)
        message = f"queued again by the sweeper: no task carried the job for {idle:.0f} s"
        store.append_event(record.id, state_event(record.state, record.state, message))
        logger.warning("job %s: %s (segment %d)", record.id, message, record.segment)
        done.append(Requeued(record.id, record.segment, idle))
    return done


def _unattended(record: JobRecord, now: float, idle_limit: float) -> bool:
    if record.state not in (JobState.QUEUED, JobState.RUNNING):
        return False
    lease_live = bool(record.lease_owner) and record.lease_expiry > now
    return not lease_live and now - record.updated > idle_limit


class Sweeper:
    """Runs `sweep` every `interval_s` in a daemon thread, one process of the fleet at a time (a Redis lock)."""

    def __init__(
        self, store: JobStore, settings: JobSettings, enqueue: Callable[[JobRecord, int], None], interval_s: float
    ) -> None:
        self.store, self.settings, self.enqueue, self.interval_s = store, settings, enqueue, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gansteer-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def run_once(self) -> list[Requeued]:
        """A sweep if no other process holds the lock; [] otherwise."""
        lock = f"{self.settings.key_prefix}sweeper"
        if not self.store.client.set(lock, "1", nx=True, ex=max(1, int(self.interval_s))):
            return []
        return sweep(self.store, self.settings, self.enqueue)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except redis.RedisError as error:  # Redis is down: the next sweep tries again
                logger.warning("sweeper: %s", error)
