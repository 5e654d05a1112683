"""The job store in Redis: job records, their event streams, checkpoints and results.

Key layout (every key starts with `JobSettings.key_prefix`, `gansteer:` by default):

    job:{id}              hash    the record: kind, owner, state, step, lease, deliveries, cancel flag, ...
    job:{id}:spec         hash    `proto` (the JobSpec as submitted) and `state` (the validated spec, torch.save)
    job:{id}:events       stream  one entry per JobEvent (field `e`: the serialized event), MAXLEN ~ capped
    job:{id}:checkpoint   string  the run's state_dict at the last segment boundary (torch.save, tensors only)
    job:{id}:result       string  the serialized JobResult (images as float tensors)
    jobs:all              zset    every job id (score 0, ordered by id = by creation time)
    jobs:owner:{owner}    zset    the ids of one caller's jobs
    idem:{owner}:{hash}   string  idempotency key -> job id

A finished job's keys expire after the result TTL; the indexes forget expired ids when a listing meets them. State
changes that must not race (claiming a segment, advancing it, finishing, cancelling) are WATCH/MULTI transactions
on the record, so the store also runs on an in-memory Redis without Lua (the embedded mode).
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from google.protobuf.timestamp_pb2 import Timestamp

from gansteer_server.proto import optimization_pb2 as opt


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @property
    def proto(self) -> opt.JobState:
        return _PROTO_STATES[self]


_PROTO_STATES = {
    JobState.QUEUED: opt.JOB_STATE_QUEUED,
    JobState.RUNNING: opt.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: opt.JOB_STATE_SUCCEEDED,
    JobState.FAILED: opt.JOB_STATE_FAILED,
    JobState.CANCELLED: opt.JOB_STATE_CANCELLED,
}


def new_job_id() -> str:
    """12 hex digits of milliseconds then 12 random ones: ids sort by creation time, so listings page by id."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


@dataclass(frozen=True)
class JobRecord:
    """One job's record as stored (times are seconds since the epoch; 0 when not reached)."""

    id: str
    kind: str
    owner: str
    state: JobState
    queue: str
    priority: int = 0
    time_limit_s: float = 0.0
    preview_every: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    step: int = 0
    total_steps: int = 0
    generator_calls: int = 0
    criterion: dict[str, float] = field(default_factory=dict)
    run_seconds: float = 0.0
    created: float = 0.0
    started: float = 0.0
    updated: float = 0.0
    finished: float = 0.0
    expires: float = 0.0
    error: str = ""
    error_reason: str = ""
    segment: int = 0
    segment_deliveries: int = 0
    deliveries: int = 0
    lease_owner: str = ""
    lease_expiry: float = 0.0
    cancel_requested: bool = False
    cancel_reason: str = ""
    has_result: bool = False
    idempotency_key: str = ""

    @classmethod
    def from_hash(cls, data: Mapping[bytes, bytes]) -> JobRecord:
        text = {k.decode(): v.decode() for k, v in data.items()}
        values: dict[str, Any] = {}
        for name, kind in _FIELD_TYPES.items():
            if name not in text:
                continue
            raw = text[name]
            if kind is bool:
                values[name] = raw == "1"
            elif kind in (dict, JobState):
                values[name] = json.loads(raw) if kind is dict else JobState(raw)
            else:
                values[name] = kind(raw)
        return cls(**values)

    def to_proto(self, last_event_id: str = "") -> opt.Job:
        job = opt.Job(
            id=self.id,
            kind=self.kind,
            state=self.state.proto,
            owner=self.owner,
            step=self.step,
            total_steps=self.total_steps,
            criterion=self.criterion,
            error=self.error,
            cancel_requested=self.cancel_requested,
            attempts=self.segment_deliveries,
            last_event_id=last_event_id,
            labels=self.labels,
            priority=self.priority,
        )
        for name, seconds in (
            ("created_at", self.created),
            ("started_at", self.started),
            ("finished_at", self.finished),
            ("expires_at", self.expires),
        ):
            if seconds:
                getattr(job, name).CopyFrom(timestamp(seconds))
        if self.error:
            job.error_details.add(reason=self.error_reason, message=self.error)
        return job


_FIELD_TYPES: dict[str, Any] = {
    "id": str,
    "kind": str,
    "owner": str,
    "state": JobState,
    "queue": str,
    "priority": int,
    "time_limit_s": float,
    "preview_every": int,
    "labels": dict,
    "step": int,
    "total_steps": int,
    "generator_calls": int,
    "criterion": dict,
    "run_seconds": float,
    "created": float,
    "started": float,
    "updated": float,
    "finished": float,
    "expires": float,
    "error": str,
    "error_reason": str,
    "segment": int,
    "segment_deliveries": int,
    "deliveries": int,
    "lease_owner": str,
    "lease_expiry": float,
    "cancel_requested": bool,
    "cancel_reason": str,
    "has_result": bool,
    "idempotency_key": str,
}


def _encode(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, JobState):
        return value.value
    return str(value)


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def state_event(state: JobState, previous: JobState | None, message: str = "") -> opt.JobEvent:
    return opt.JobEvent(
        state_change=opt.StateChange(
            state=state.proto,
            previous=previous.proto if previous is not None else opt.JOB_STATE_UNSPECIFIED,
            message=message,
        )
    )


class ClaimOutcome(enum.Enum):
    """What a delivered task may do with its job."""

    RUN = "run"  # the lease is ours: run the segment
    GONE = "gone"  # no such job (expired or never stored)
    FINISHED = "finished"  # the job ended; this copy is late
    STALE = "stale"  # the job moved past this segment; this copy is a duplicate
    HELD = "held"  # another live worker holds the lease; try again after `retry_after_s`
    OVER_CAP = "over_cap"  # delivered more than the cap without finishing the segment: the job is failed


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    record: JobRecord | None = None
    retry_after_s: float = 0.0
    resumed: bool = False  # a previous delivery of this segment started and did not finish it


class LeaseLost(Exception):
    """The worker no longer holds the job's lease (it expired and another worker took the job, or it ended)."""


class JobStore:
    """Reads and writes job records, events, checkpoints and results in one Redis database."""

    def __init__(self, client: redis.Redis, prefix: str, result_ttl_s: int, events_maxlen: int = 10_000) -> None:
        self.client = client
        self.prefix = prefix
        self.result_ttl_s = result_ttl_s
        self.events_maxlen = events_maxlen

    # --- keys ----------------------------------------------------------------------------------------------

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def spec_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:spec"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:events"

    def checkpoint_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:checkpoint"

    def result_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:result"

    def index_key(self, owner: str | None) -> str:
        return f"{self.prefix}jobs:all" if owner is None else f"{self.prefix}jobs:owner:{owner}"

    def idempotency_key(self, owner: str, key: str) -> str:
        return f"{self.prefix}idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"

    def _job_keys(self, job_id: str) -> list[str]:
        return [self.job_key(job_id), self.spec_key(job_id), self.events_key(job_id), self.result_key(job_id)]

    # --- the service's side ----------------------------------------------------------------------------------

    def create(
        self,
        *,
        kind: str,
        owner: str,
        queue: str,
        spec_proto: bytes,
        spec_state: bytes,
        total_steps: int,
        priority: int = 0,
        time_limit_s: float = 0.0,
        preview_every: int = 0,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str = "",
    ) -> tuple[JobRecord, bool]:
        """Store a new queued job and its first event; returns (record, existing). With an idempotency key the
        caller already used, nothing is stored and the earlier job is returned with existing=True."""
        job_id = new_job_id()
        idem_key = self.idempotency_key(owner, idempotency_key) if idempotency_key else ""
        if idem_key and not self.client.set(idem_key, job_id, nx=True):
            earlier = self.client.get(idem_key)
            record = self.get(earlier.decode()) if earlier is not None else None
            if record is not None:
                return record, True
            self.client.set(idem_key, job_id)  # the earlier job expired: the key is free again
        now = time.time()
        record = JobRecord(
            id=job_id,
            kind=kind,
            owner=owner,
            state=JobState.QUEUED,
            queue=queue,
            priority=priority,
            time_limit_s=time_limit_s,
            preview_every=preview_every,
            labels=dict(labels or {}),
            total_steps=total_steps,
            created=now,
            updated=now,
            idempotency_key=idem_key,
        )
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.job_key(job_id), mapping={k: _encode(v) for k, v in record.__dict__.items()})
        pipe.hset(self.spec_key(job_id), mapping={"proto": spec_proto, "state": spec_state})
        pipe.zadd(self.index_key(None), {job_id: 0})
        pipe.zadd(self.index_key(owner), {job_id: 0})
        self._xadd(pipe, job_id, state_event(JobState.QUEUED, None))
        pipe.execute()
        return record, False

    def get(self, job_id: str) -> JobRecord | None:
        data = self.client.hgetall(self.job_key(job_id))
        return JobRecord.from_hash(data) if data else None

    def get_with_last_event(self, job_ids: list[str]) -> list[tuple[JobRecord, str] | None]:
        """Records and the ids of their newest events, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.job_key(job_id))
            pipe.xrevrange(self.events_key(job_id), count=1)
        replies = pipe.execute()
        found: list[tuple[JobRecord, str] | None] = []
        for data, last in zip(replies[::2], replies[1::2], strict=True):
            found.append((JobRecord.from_hash(data), last[0][0].decode() if last else "") if data else None)
        return found

    def spec(self, job_id: str) -> tuple[bytes, bytes] | None:
        """(JobSpec as submitted, validated spec state), or None once the job has expired."""
        proto, state = self.client.hmget(self.spec_key(job_id), ["proto", "state"])
        return None if proto is None or state is None else (proto, state)

    def list_ids(self, owner: str | None, before: str = "", limit: int = 50) -> list[str]:
        """Job ids newest first, strictly older than `before` (an id) when given."""
        high = f"({before}" if before else "+"
        return [i.decode() for i in self.client.zrevrangebylex(self.index_key(owner), high, "-", start=0, num=limit)]

    def forget(self, owner: str, job_ids: list[str]) -> None:
        """Drop expired ids from the indexes."""
        if job_ids:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(self.index_key(None), *job_ids)
            pipe.zrem(self.index_key(owner), *job_ids)
            pipe.execute()

    def request_cancel(self, job_id: str, reason: str) -> JobRecord | None:
        """Set the cancel flag. A job no worker holds (queued, or its worker's lease lapsed) is cancelled at once;
        a running one is cancelled by its worker at its next step. A finished job is left as it is."""

        def cancel(pipe: redis.client.Pipeline) -> JobRecord | None:
            data = pipe.hgetall(self.job_key(job_id))
            if not data:
                return None
            record = JobRecord.from_hash(data)
            if record.state.terminal:
                return record
            now = _redis_time(pipe)
            pipe.multi()
            pipe.hset(self.job_key(job_id), mapping={"cancel_requested": "1", "cancel_reason": reason})
            if record.state is JobState.QUEUED or record.lease_expiry < now:
                message = reason or "cancelled by request"
                self._queue_finish(pipe, record, JobState.CANCELLED, now, message=message)
            return record

        self.client.transaction(cancel, self.job_key(job_id), value_from_callable=True)
        return self.get(job_id)

    def abort(self, job_id: str, message: str, reason: str) -> None:
        """Fail a job that no worker holds (its first task could not be sent)."""

        def fail(pipe: redis.client.Pipeline) -> None:
            data = pipe.hgetall(self.job_key(job_id))
            if not data or JobRecord.from_hash(data).state.terminal:
                return
            now = _redis_time(pipe)
            pipe.multi()
            self._queue_finish(pipe, JobRecord.from_hash(data), JobState.FAILED, now, message=message, reason=reason)

        self.client.transaction(fail, self.job_key(job_id))

    def find_idempotent(self, owner: str, key: str) -> JobRecord | None:
        """The job an earlier submission with this idempotency key created, while it is kept."""
        earlier = self.client.get(self.idempotency_key(owner, key))
        return self.get(earlier.decode()) if earlier is not None else None

    def result(self, job_id: str) -> bytes | None:
        data = self.client.get(self.result_key(job_id))
        return bytes(data) if data is not None else None

    def read_events(
        self, job_id: str, after: str = "0", block_ms: int | None = None, count: int = 100
    ) -> list[tuple[str, opt.JobEvent]]:
        """Events after the stream id `after` ("0": from the first), waiting up to `block_ms` for new ones."""
        key = self.events_key(job_id)
        if block_ms is None:
            replies = self.client.xrange(key, min=f"({after}" if after != "0" else "-", count=count)
        else:
            streams = self.client.xread({key: after}, count=count, block=block_ms)
            replies = streams[0][1] if streams else []
        events = []
        for entry_id, fields in replies:
            event = opt.JobEvent.FromString(fields[b"e"])
            event.event_id = entry_id.decode()
            event.job_id = job_id
            events.append((event.event_id, event))
        return events

    # --- the worker's side ------------------------------------------------------------------------------------

    def claim(
        self, job_id: str, segment: int, owner: str, lease_s: float, max_deliveries: int, is_dead: Callable[[str], bool]
    ) -> Claim:
        """Take the job's lease for `segment` and count the delivery; see ClaimOutcome for the other answers.

        A lease held by a worker that `is_dead` (same host, pid gone) is taken over at once instead of waiting for
        it to expire. A message for a later segment than the record's is accepted: its predecessor enqueued it and
        died before advancing the record, and the checkpoint is the state to continue from either way.
        """

        def attempt(pipe: redis.client.Pipeline) -> Claim:
            data = pipe.hgetall(self.job_key(job_id))
            if not data:
                return Claim(ClaimOutcome.GONE)
            record = JobRecord.from_hash(data)
            if record.state.terminal:
                return Claim(ClaimOutcome.FINISHED, record)
            if segment < record.segment:
                return Claim(ClaimOutcome.STALE, record)
            now = _redis_time(pipe)
            held = record.lease_owner and record.lease_owner != owner and record.lease_expiry > now
            if held and not is_dead(record.lease_owner):
                return Claim(ClaimOutcome.HELD, record, retry_after_s=min(record.lease_expiry - now, lease_s / 3))
            same_segment = segment == record.segment
            deliveries = record.segment_deliveries + 1 if same_segment else 1
            pipe.multi()
            if deliveries > max_deliveries:
                message = (
                    f"segment {segment} was delivered {deliveries} times without finishing: its task keeps losing "
                    "its worker (killed, out of memory, or crashing the process)"
                )
                self._queue_finish(pipe, record, JobState.FAILED, now, message=message, reason="DELIVERY_CAP")
                return Claim(ClaimOutcome.OVER_CAP, record)
            updates: dict[str, Any] = {
                "segment": segment,
                "segment_deliveries": deliveries,
                "deliveries": record.deliveries + 1,
                "lease_owner": owner,
                "lease_expiry": now + lease_s,
                "updated": now,
            }
            if record.state is JobState.QUEUED:
                updates |= {"state": JobState.RUNNING, "started": now}
                self._xadd(pipe, job_id, state_event(JobState.RUNNING, JobState.QUEUED))
            pipe.hset(self.job_key(job_id), mapping={k: _encode(v) for k, v in updates.items()})
            claimed = JobRecord(**(record.__dict__ | updates))
            return Claim(ClaimOutcome.RUN, claimed, resumed=same_segment and deliveries > 1)

        return self.client.transaction(attempt, self.job_key(job_id), value_from_callable=True)

    def check(self, job_id: str, owner: str, lease_s: float | None = None) -> bool:
        """Between steps: False when the lease is no longer ours (the worker must stop at once), else whether a
        cancel was requested. With `lease_s` the lease is also renewed."""
        if lease_s is None:
            state, lease_owner, cancel = self.client.hmget(
                self.job_key(job_id), ["state", "lease_owner", "cancel_requested"]
            )
            if state is None or JobState(state.decode()).terminal or (lease_owner or b"").decode() != owner:
                raise LeaseLost(job_id)
            return cancel == b"1"

        def renew(pipe: redis.client.Pipeline) -> bool:
            state, lease_owner, cancel = pipe.hmget(self.job_key(job_id), ["state", "lease_owner", "cancel_requested"])
            if state is None or JobState(state.decode()).terminal or (lease_owner or b"").decode() != owner:
                raise LeaseLost(job_id)
            now = _redis_time(pipe)
            pipe.multi()
            pipe.hset(self.job_key(job_id), "lease_expiry", _encode(now + lease_s))
            return cancel == b"1"

        return self.client.transaction(renew, self.job_key(job_id), value_from_callable=True)

    def progress(self, job_id: str, event: opt.JobEvent, updates: Mapping[str, Any]) -> None:
        """Append a progress or preview event and update the record's progress fields, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        self._xadd(pipe, job_id, event)
        if updates:
            pipe.hset(self.job_key(job_id), mapping={k: _encode(v) for k, v in updates.items()})
        pipe.execute()

    def append_event(self, job_id: str, event: opt.JobEvent) -> None:
        self.progress(job_id, event, {})

    def load_checkpoint(self, job_id: str) -> bytes | None:
        data = self.client.get(self.checkpoint_key(job_id))
        return bytes(data) if data is not None else None

    def advance(self, job_id: str, owner: str, segment: int, checkpoint: bytes, run_seconds: float) -> None:
        """Store the checkpoint, move the record to `segment + 1` and release the lease, atomically and only while
        the lease is ours (raises LeaseLost otherwise, and writes nothing)."""

        def write(pipe: redis.client.Pipeline) -> None:
            self._require_lease(pipe, job_id, owner)
            pipe.multi()
            pipe.set(self.checkpoint_key(job_id), checkpoint)
            updates = {
                "segment": segment + 1,
                "segment_deliveries": 0,
                "lease_owner": "",
                "lease_expiry": 0,
                "run_seconds": run_seconds,
                "updated": time.time(),
            }
            pipe.hset(self.job_key(job_id), mapping={k: _encode(v) for k, v in updates.items()})

        self.client.transaction(write, self.job_key(job_id))

    def release(self, job_id: str, owner: str) -> None:
        """Give the lease up (a segment to be retried later); nothing when it is no longer ours."""

        def write(pipe: redis.client.Pipeline) -> None:
            try:
                self._require_lease(pipe, job_id, owner)
            except LeaseLost:
                return
            pipe.multi()
            pipe.hset(self.job_key(job_id), mapping={"lease_owner": "", "lease_expiry": "0"})

        self.client.transaction(write, self.job_key(job_id))

    def finish(
        self,
        job_id: str,
        owner: str,
        state: JobState,
        *,
        message: str = "",
        reason: str = "",
        result: bytes | None = None,
        result_event: opt.JobEvent | None = None,
        run_seconds: float | None = None,
    ) -> None:
        """End the job (only while the lease is ours; raises LeaseLost otherwise): store the result, append the
        result event and the final state change, and start the TTL of everything the job left."""

        def write(pipe: redis.client.Pipeline) -> None:
            record = self._require_lease(pipe, job_id, owner)
            now = _redis_time(pipe)
            pipe.multi()
            if result is not None:
                pipe.set(self.result_key(job_id), result)
            if result_event is not None:
                self._xadd(pipe, job_id, result_event)
            extra = {"run_seconds": run_seconds} if run_seconds is not None else {}
            self._queue_finish(
                pipe, record, state, now, message=message, reason=reason, has_result=result is not None, extra=extra
            )

        self.client.transaction(write, self.job_key(job_id))

    # --- helpers ----------------------------------------------------------------------------------------------

    def _require_lease(self, pipe: redis.client.Pipeline, job_id: str, owner: str) -> JobRecord:
        data = pipe.hgetall(self.job_key(job_id))
        record = JobRecord.from_hash(data) if data else None
        if record is None or record.state.terminal or record.lease_owner != owner:
            raise LeaseLost(job_id)
        return record

    def _queue_finish(
        self,
        pipe: redis.client.Pipeline,
        record: JobRecord,
        state: JobState,
        now: float,
        *,
        message: str = "",
        reason: str = "",
        has_result: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue (inside MULTI) the writes that end a job: final fields, final event, TTLs, checkpoint removal."""
        updates: dict[str, Any] = {
            "state": state,
            "finished": now,
            "updated": now,
            "expires": now + self.result_ttl_s,
            "lease_owner": "",
            "lease_expiry": 0,
            "has_result": has_result,
            **(extra or {}),
        }
        if state is JobState.FAILED:
            updates |= {"error": message, "error_reason": reason or "JOB_FAILED"}
        pipe.hset(self.job_key(record.id), mapping={k: _encode(v) for k, v in updates.items()})
        self._xadd(pipe, record.id, state_event(state, record.state, message))
        pipe.delete(self.checkpoint_key(record.id))
        for key in self._job_keys(record.id):
            pipe.expire(key, self.result_ttl_s)
        if record.idempotency_key:
            pipe.expire(record.idempotency_key, self.result_ttl_s)

    def _xadd(self, pipe: redis.client.Pipeline, job_id: str, event: opt.JobEvent) -> None:
        if not event.HasField("time"):
            event.time.GetCurrentTime()
        pipe.xadd(self.events_key(job_id), {"e": event.SerializeToString()}, maxlen=self.events_maxlen, approximate=True)

    def scan_keys(self) -> Iterator[bytes]:
        """Every key under this store's prefix (tests clean up with it)."""
        yield from self.client.scan_iter(match=f"{self.prefix}*", count=1000)


def _redis_time(pipe: redis.client.Pipeline) -> float:
    """Redis's clock, so that every worker judges lease expiry by the same clock."""
    seconds, micros = pipe.time()
    return seconds + micros / 1e6
