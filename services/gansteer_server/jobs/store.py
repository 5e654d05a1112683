"""The job store in Redis: job records, their event streams, checkpoints and results.

Key layout (every key starts with `JobSettings.key_prefix`, `gansteer:` by default):

    job:{id}              hash    the record: kind, owner, state, step, lease, deliveries, cancel flag, ...
                                  (plus `retry_pending` and `segment_retries`, the store's own, see `release`)
    job:{id}:spec         hash    `proto` (the JobSpec as submitted) and `state` (the validated spec, torch.save)
    job:{id}:events       stream  one entry per JobEvent (field `e`: the serialized event), MAXLEN ~ capped
    job:{id}:checkpoint   string  the run's state_dict at the last segment boundary (torch.save, tensors only)
    job:{id}:result       string  the serialized JobResult (images as float tensors)
    jobs:all              zset    every job id (score 0, ordered by id = by creation time)
    jobs:owner:{owner}    zset    the ids of one caller's jobs
    jobs:state:{state}    set     the ids of the jobs in one unfinished state (queued, running, waiting_for_feedback)
    idem:{owner}:{hash}   string  idempotency key -> job id

A finished job's keys expire after the result TTL; the indexes forget expired ids when a listing meets them. State
changes that must not race (claiming a segment, advancing it, finishing, cancelling) are WATCH/MULTI transactions
on the record, so the store also runs on an in-memory Redis without Lua (the embedded mode).

Every state change commits through `JobStore.transaction`, which reports what it committed (`Transition`): one log
line each, and the `on_transition` observer (the metrics). The same transaction moves the job between the
`jobs:state:*` sets, so the number of jobs in each state is one SCARD away (`state_counts`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from gansteer_server.jobs.records import (
    Claim,
    ClaimOutcome,
    JobRecord,
    JobState,
    LeaseLost,
    encode_field,
    new_job_id,
    state_event,
)
from gansteer_server.proto import optimization_pb2 as opt

logger = logging.getLogger(__name__)

#: Seconds before a segment's message that met its predecessor still holding the lease is tried again.
HANDOVER_RETRY_S = 0.25
#: Suffixes of the keys `RoundStore` keeps per job (round, interaction log, answer keys, raters).
ROUND_KEYS = ("round", "interactions", "answer_keys", "raters")
_STATES = {state.proto: state for state in JobState}
UNFINISHED = tuple(state for state in JobState if not state.terminal)


@dataclass(frozen=True)
class Transition:
    """A committed change of a job's state (`previous` None: the job was created)."""

    job_id: str
    kind: str
    previous: JobState | None
    state: JobState
    duration_s: float  # since the job was created: for a final state, the job's whole duration
    run_s: float  # compute time so far, summed over its segments


TransitionObserver = Callable[[Transition], None]


class JobStore:
    """Reads and writes job records, events, checkpoints and results in one Redis database."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        result_ttl_s: int,
        events_maxlen: int = 10_000,
        on_transition: TransitionObserver | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.result_ttl_s = result_ttl_s
        self.events_maxlen = events_maxlen
        self.on_transition = on_transition
        self._pending = threading.local()  # the state changes queued by this thread's transaction in progress

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

    def state_key(self, state: JobState) -> str:
        return f"{self.prefix}jobs:state:{state.value}"

    def idempotency_key(self, owner: str, key: str) -> str:
        return f"{self.prefix}idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"

    def _job_keys(self, job_id: str) -> list[str]:
        """Every key a job leaves behind (they expire with its result); rounds' keys are `round_store`'s."""
        keys = [self.job_key(job_id), self.spec_key(job_id), self.events_key(job_id), self.result_key(job_id)]
        return keys + [f"{self.job_key(job_id)}:{name}" for name in ROUND_KEYS]

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
        caller already used, nothing is stored and the earlier job is returned with existing=True.

        The idempotency key and the job it names are written in one transaction (watching the key), so a key is
        never seen without its job: two submissions racing on one key create one job, and a key whose job is gone
        names an expired job and is taken over."""
        job_id = new_job_id()
        idem_key = self.idempotency_key(owner, idempotency_key) if idempotency_key else ""

        def write(pipe: redis.client.Pipeline) -> tuple[JobRecord, bool]:
            if idem_key:
                earlier = pipe.get(idem_key)
                data = pipe.hgetall(self.job_key(earlier.decode())) if earlier is not None else None
                if data:
                    return JobRecord.from_hash(data), True
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
            pipe.multi()
            if idem_key:
                pipe.set(idem_key, job_id)
            pipe.hset(self.job_key(job_id), mapping={k: encode_field(v) for k, v in record.__dict__.items()})
            pipe.hset(self.spec_key(job_id), mapping={"proto": spec_proto, "state": spec_state})
            pipe.zadd(self.index_key(None), {job_id: 0})
            pipe.zadd(self.index_key(owner), {job_id: 0})
            self.xadd(pipe, job_id, state_event(JobState.QUEUED, None))
            return record, False

        watches = [idem_key] if idem_key else []
        return self.transaction(write, *watches, value_from_callable=True)

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
        """Set the cancel flag; returns the record after (None for an unknown job).

        A job waiting for feedback goes back to the queue (the caller sends its next segment), whose worker ends it
        with its best result so far. A running job is cancelled by its worker before its next step, keeping the best
        result so far. A queued job, or one whose worker's lease lapsed (the worker died), is cancelled here at once
        and has **no result**: no worker holds its state, the checkpoint is only a run's internal state (the service
        runs no model to turn it into a result), and it is deleted like every ended job's. A finished job is left
        as is."""

        def cancel(pipe: redis.client.Pipeline) -> JobRecord | None:
            data = pipe.hgetall(self.job_key(job_id))
            if not data:
                return None
            record = JobRecord.from_hash(data)
            if record.state.terminal:
                return record
            now = redis_time(pipe)
            pipe.multi()
            pipe.hset(self.job_key(job_id), mapping={"cancel_requested": "1", "cancel_reason": reason})
            if record.state is JobState.WAITING:  # back to the queue: the caller sends the segment that ends it
                pipe.hset(self.job_key(job_id), mapping={"state": encode_field(JobState.QUEUED), "round_id": ""})
                self.xadd(pipe, job_id, state_event(JobState.QUEUED, JobState.WAITING, "cancel requested"))
                return record
            # No worker will see the flag: never claimed, or claimed by a worker whose lease lapsed (it died). Between
            # segments (no lease owner) the next segment's task is queued and its worker cancels with the result.
            if (record.state is JobState.QUEUED and record.started == 0) or (
                record.lease_owner and record.lease_expiry < now
            ):
                message = reason or "cancelled by request"
                self._queue_finish(pipe, record, JobState.CANCELLED, now, message=message)
            return record

        self.transaction(cancel, self.job_key(job_id), value_from_callable=True)
        return self.get(job_id)

    def abort(self, job_id: str, message: str, reason: str, *, segment: int | None = None, owner: str = "") -> bool:
        """Fail a job that no worker holds: its first task could not be sent, or (with `segment`) the task of that
        segment, run by `owner`, ended in an error it could not retry. With `segment` the job is left alone when
        another task still carries it: the job moved past the segment (this task was a stale copy), or another
        worker holds a live lease. Returns whether the job was failed."""

        def fail(pipe: redis.client.Pipeline) -> bool:
            data = pipe.hgetall(self.job_key(job_id))
            if not data:
                return False
            record = JobRecord.from_hash(data)
            if record.state.terminal:
                return False
            now = redis_time(pipe)
            if segment is not None:
                held = record.lease_owner not in ("", owner) and record.lease_expiry > now
                if held or record.segment > segment:
                    return False
            pipe.multi()
            self._queue_finish(pipe, record, JobState.FAILED, now, message=message, reason=reason)
            return True

        return self.transaction(fail, self.job_key(job_id), value_from_callable=True)

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

        A transient retry of the segment (its lease given up by `release`, or still held by this same `owner`,
        whose previous task of the segment ended in an error it retries) is not counted as a delivery and is not
        `resumed`: the delivery cap and the "lost worker" event are for workers that died.
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
            if record.state is JobState.WAITING:
                return Claim(ClaimOutcome.WAITING, record)
            now = redis_time(pipe)
            held = record.lease_owner and record.lease_owner != owner and record.lease_expiry > now
            if held and not is_dead(record.lease_owner):
                # The next segment's message is sent just before its predecessor releases the lease (`advance`):
                # a worker that takes it in between tries again in a moment, not when the lease would lapse.
                handover = segment == record.segment + 1
                retry = HANDOVER_RETRY_S if handover else min(record.lease_expiry - now, lease_s / 3)
                return Claim(ClaimOutcome.HELD, record, retry_after_s=retry)
            same_segment = segment == record.segment
            retried = same_segment and (data.get(b"retry_pending") == b"1" or record.lease_owner == owner)
            if retried:
                deliveries = max(1, record.segment_deliveries)
            else:
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
                updates |= {"state": JobState.RUNNING, "started": record.started or now}
                self.xadd(pipe, job_id, state_event(JobState.RUNNING, JobState.QUEUED))
            pipe.hset(self.job_key(job_id), mapping={k: encode_field(v) for k, v in updates.items()})
            pipe.hdel(self.job_key(job_id), "retry_pending")
            claimed = JobRecord(**(record.__dict__ | updates))
            return Claim(ClaimOutcome.RUN, claimed, resumed=same_segment and deliveries > 1 and not retried)

        return self.transaction(attempt, self.job_key(job_id), value_from_callable=True)

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
            now = redis_time(pipe)
            pipe.multi()
            pipe.hset(self.job_key(job_id), "lease_expiry", encode_field(now + lease_s))
            return cancel == b"1"

        return self.client.transaction(renew, self.job_key(job_id), value_from_callable=True)

    def progress(self, job_id: str, event: opt.JobEvent, updates: Mapping[str, Any]) -> None:
        """Append a progress or preview event and update the record's progress fields, in one round trip."""
        with self._collecting() as changes:
            pipe = self.client.pipeline(transaction=False)
            self.xadd(pipe, job_id, event)
            if updates:
                pipe.hset(self.job_key(job_id), mapping={k: encode_field(v) for k, v in updates.items()})
            pipe.execute()
        self._report(changes)

    def append_event(self, job_id: str, event: opt.JobEvent) -> None:
        self.progress(job_id, event, {})

    def load_checkpoint(self, job_id: str) -> bytes | None:
        data = self.client.get(self.checkpoint_key(job_id))
        return bytes(data) if data is not None else None

    def advance(
        self,
        job_id: str,
        owner: str,
        segment: int,
        checkpoint: bytes,
        run_seconds: float,
        then: Callable[[redis.client.Pipeline, JobRecord, float], Mapping[str, Any]] | None = None,
    ) -> None:
        """Store the checkpoint, move the record to `segment + 1` and release the lease, atomically and only while
        the lease is ours (raises LeaseLost otherwise, and writes nothing). `then(pipe, record, now)` may queue more
        writes in the same transaction and returns further record fields (a round opening: `RoundStore`)."""

        def write(pipe: redis.client.Pipeline) -> None:
            record = self.require_lease(pipe, job_id, owner)
            now = redis_time(pipe)
            pipe.multi()
            pipe.set(self.checkpoint_key(job_id), checkpoint)
            updates: dict[str, Any] = {
                "segment": segment + 1,
                "segment_deliveries": 0,
                "lease_owner": "",
                "lease_expiry": 0,
                "run_seconds": run_seconds,
                "updated": now,
                "deliver_round": "",  # this checkpoint holds the round's answers
            }
            if then is not None:
                updates |= then(pipe, record, now)
            pipe.hset(self.job_key(job_id), mapping={k: encode_field(v) for k, v in updates.items()})
            pipe.hdel(self.job_key(job_id), "retry_pending", "segment_retries")

        self.transaction(write, self.job_key(job_id))

    def release(self, job_id: str, owner: str) -> None:
        """Give the lease up for a transient retry of the segment (a model service or Redis failed for a moment);
        nothing when it is no longer ours. The next claim of the segment is then no new delivery (`claim`), and
        `segment_retries` counts the retry (until the segment completes)."""

        def write(pipe: redis.client.Pipeline) -> None:
            try:
                self.require_lease(pipe, job_id, owner)
            except LeaseLost:
                return
            pipe.multi()
            pipe.hset(self.job_key(job_id), mapping={"lease_owner": "", "lease_expiry": "0", "retry_pending": "1"})
            pipe.hincrby(self.job_key(job_id), "segment_retries", 1)

        self.client.transaction(write, self.job_key(job_id))

    def segment_retries(self, job_id: str) -> int:
        """How many times the job's current segment was released for a transient retry."""
        return int(self.client.hget(self.job_key(job_id), "segment_retries") or 0)

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
            record = self.require_lease(pipe, job_id, owner)
            now = redis_time(pipe)
            pipe.multi()
            if result is not None:
                pipe.set(self.result_key(job_id), result)
            if result_event is not None:
                self.xadd(pipe, job_id, result_event)
            extra = {"run_seconds": run_seconds} if run_seconds is not None else {}
            self._queue_finish(
                pipe, record, state, now, message=message, reason=reason, has_result=result is not None, extra=extra
            )

        self.transaction(write, self.job_key(job_id))

    # --- state changes: reported once committed --------------------------------------------------------------

    def transaction(
        self, func: Callable[[redis.client.Pipeline], Any], *watches: str, value_from_callable: bool = False
    ) -> Any:
        """`client.transaction`, then each state change it committed is logged and told to `on_transition`."""
        with self._collecting() as changes:

            def attempt(pipe: redis.client.Pipeline) -> Any:
                changes.clear()  # a WATCH conflict runs `func` again: only the last run's changes commit
                return func(pipe)

            value = self.client.transaction(attempt, *watches, value_from_callable=value_from_callable)
        self._report(changes)
        return value

    def state_counts(self) -> dict[JobState, int]:
        """How many jobs are in each unfinished state (jobs recorded before the state sets existed are missing)."""
        pipe = self.client.pipeline(transaction=False)
        for state in UNFINISHED:
            pipe.scard(self.state_key(state))
        return dict(zip(UNFINISHED, (int(n) for n in pipe.execute()), strict=True))

    @contextmanager
    def _collecting(self) -> Iterator[list[tuple[str, JobState | None, JobState]]]:
        changes: list[tuple[str, JobState | None, JobState]] = []
        self._pending.changes = changes
        try:
            yield changes
        finally:
            self._pending.changes = None

    def _note_state_change(self, pipe: redis.client.Pipeline, job_id: str, change: opt.StateChange) -> None:
        """Queue (in the event's pipeline) the move between the state sets; remember the change for `_report`."""
        state, previous = _STATES[change.state], _STATES.get(change.previous)
        if state is previous:
            return  # an event about the job (resumed, queued again by the sweeper), not a change of state
        if previous is not None and not previous.terminal:
            pipe.srem(self.state_key(previous), job_id)
        if not state.terminal:
            pipe.sadd(self.state_key(state), job_id)
        pending = getattr(self._pending, "changes", None)
        if pending is not None:
            pending.append((job_id, previous, state))

    def _report(self, changes: list[tuple[str, JobState | None, JobState]]) -> None:
        """One INFO line per committed change, and the observer. The kind and times are read back in one round
        trip; a Redis failure then costs the kind, never the line."""
        if not changes:
            return
        now = time.time()
        try:
            pipe = self.client.pipeline(transaction=False)
            for job_id, _, _ in changes:
                pipe.hmget(self.job_key(job_id), ["kind", "created", "run_seconds"])
            replies = pipe.execute()
        except redis.RedisError:
            replies = [[None, None, None]] * len(changes)
        for (job_id, previous, state), (kind, created, run_s) in zip(changes, replies, strict=True):
            started = float(created) if created else int(job_id[:12], 16) / 1000  # ids begin with the creation ms
            transition = Transition(
                job_id, kind.decode() if kind else "", previous, state, now - started, float(run_s or 0.0)
            )
            shown = previous.value if previous is not None else "new"
            logger.info(
                "job %s (%s): %s -> %s after %.3f s",
                job_id,
                transition.kind,
                shown,
                state.value,
                transition.duration_s,
                extra={
                    "job_id": job_id,
                    "kind": transition.kind,
                    "from_state": shown,
                    "to_state": state.value,
                    "duration_s": round(transition.duration_s, 3),
                    "run_s": round(transition.run_s, 3),
                },
            )
            if self.on_transition is not None:
                self.on_transition(transition)

    # --- helpers ----------------------------------------------------------------------------------------------

    def require_lease(self, pipe: redis.client.Pipeline, job_id: str, owner: str) -> JobRecord:
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
        pipe.hset(self.job_key(record.id), mapping={k: encode_field(v) for k, v in updates.items()})
        self.xadd(pipe, record.id, state_event(state, record.state, message))
        pipe.delete(self.checkpoint_key(record.id))
        for key in self._job_keys(record.id):
            pipe.expire(key, self.result_ttl_s)
        if record.idempotency_key:
            pipe.expire(record.idempotency_key, self.result_ttl_s)

    def xadd(self, pipe: redis.client.Pipeline, job_id: str, event: opt.JobEvent) -> None:
        if not event.HasField("time"):
            event.time.GetCurrentTime()
        key = self.events_key(job_id)
        pipe.xadd(key, {"e": event.SerializeToString()}, maxlen=self.events_maxlen, approximate=True)
        if event.HasField("state_change"):
            self._note_state_change(pipe, job_id, event.state_change)

    def scan_keys(self) -> Iterator[bytes]:
        """Every key under this store's prefix (tests clean up with it)."""
        yield from self.client.scan_iter(match=f"{self.prefix}*", count=1000)


def redis_time(pipe: redis.client.Pipeline) -> float:
    """Redis's clock, so that every worker judges lease expiry by the same clock."""
    seconds, micros = pipe.time()
    return seconds + micros / 1e6
