"""Rounds and the interaction log in Redis, beside the job records of `JobStore` (same prefix, same transactions).

Keys (under the store's prefix):

    job:{id}:round         string  the open (or last) FeedbackRound, serialized
    job:{id}:interactions  list    the interaction log: one serialized Interaction per answer, append-only
    job:{id}:answer_keys   hash    idempotency key -> round id of every recorded answer
    job:{id}:raters        hash    `{round id}:{rater pseudonym}` -> 1: one answer per rater and round
    rater_key              string  the deployment's key of rater pseudonyms (made once, at random)

Why answers are never lost nor doubled: an answer is appended and the round closed in one WATCH/MULTI transaction
on the job's record, only while that round is open; a resent answer (same idempotency key) is recognised and
recorded nothing; the next segment reads the answers back from the log (`deliver_round`), so a worker killed while
running it re-reads them from the same place.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import redis

from gansteer_server.jobs.records import JobRecord, JobState, encode_field, state_event
from gansteer_server.jobs.store import JobStore, redis_time
from gansteer_server.proto import optimization_pb2 as opt


class AnswerOutcome(enum.Enum):
    RECORDED = "recorded"  # appended to the log (the round may still want more raters)
    DUPLICATE = "duplicate"  # this idempotency key was recorded before; nothing written
    NOT_OPEN = "not_open"  # the job is not waiting on that round (answered, expired, another round, or ended)
    EXPIRED = "expired"  # the round is open but past its expiry
    ALREADY_ANSWERED = "already_answered"  # this rater answered this round already
    GONE = "gone"  # no such job


@dataclass(frozen=True)
class AnswerReceipt:
    outcome: AnswerOutcome
    record: JobRecord | None = None

    @property
    def queued(self) -> bool:
        """Whether the round closed with this answer (the caller sends the job's next segment)."""
        return self.outcome is AnswerOutcome.RECORDED and self.record is not None and not self.record.round_id


class RoundStore:
    """Opens rounds for workers, records answers for the service, and reads the interaction log back."""

    def __init__(self, store: JobStore) -> None:
        self.store, self.client = store, store.client
        self._rater_key: bytes | None = None

    def round_key(self, job_id: str) -> str:
        return f"{self.store.job_key(job_id)}:round"

    def log_key(self, job_id: str) -> str:
        return f"{self.store.job_key(job_id)}:interactions"

    def answer_keys_key(self, job_id: str) -> str:
        return f"{self.store.job_key(job_id)}:answer_keys"

    def raters_key(self, job_id: str) -> str:
        return f"{self.store.job_key(job_id)}:raters"

    def keys(self, job_id: str) -> list[str]:
        return [self.round_key(job_id), self.log_key(job_id), self.answer_keys_key(job_id), self.raters_key(job_id)]

    # --- the worker's side ----------------------------------------------------------------------------------------

    def open_round(
        self,
        job_id: str,
        owner: str,
        segment: int,
        checkpoint: bytes,
        round_: opt.FeedbackRound,
        run_seconds: float,
    ) -> None:
        """Advance the job past `segment` (`JobStore.advance`: checkpoint, lease released) and, in the same
        transaction, store the round and move the job to WAITING (LeaseLost when the lease is not ours). No task is
        queued: an answer does that."""

        def opening(pipe: redis.client.Pipeline, record: JobRecord, now: float) -> dict[str, object]:
            pipe.set(self.round_key(job_id), round_.SerializeToString())
            self.store.xadd(pipe, job_id, opt.JobEvent(feedback_round=round_))
            self.store.xadd(pipe, job_id, state_event(JobState.WAITING, record.state, f"round {round_.round} open"))
            return {
                "state": JobState.WAITING,
                "round_id": round_.round_id,
                "round_expires": round_.expires_at.ToNanoseconds() / 1e9,
                "round_answers": 0,
                "round_required": round_.answers_required,
                "rounds": record.rounds + 1,
            }

        self.store.advance(job_id, owner, segment, checkpoint, run_seconds, then=opening)

    def answers(self, job_id: str, round_id: str) -> list[opt.Interaction]:
        """The logged answers of one round, in the order they were recorded."""
        return [entry for entry in self.interactions(job_id) if entry.round_id == round_id]

    # --- the service's side ---------------------------------------------------------------------------------------

    def pending_round(self, job_id: str) -> opt.FeedbackRound | None:
        data = self.client.get(self.round_key(job_id))
        return opt.FeedbackRound.FromString(data) if data is not None else None

    def record_answer(
        self,
        job_id: str,
        round_id: str,
        rater: str,
        idempotency_key: str,
        entry: Callable[[opt.FeedbackRound, float], opt.Interaction],
    ) -> AnswerReceipt:
        """Append one checked answer to the log while `round_id` is open; the round closes (the job goes back to
        QUEUED with `deliver_round` set) when it has the answers it requires. `entry(round, now)` builds the log
        entry inside the transaction, with Redis's clock."""

        def attempt(pipe: redis.client.Pipeline) -> AnswerReceipt:
            data = pipe.hgetall(self.store.job_key(job_id))
            if not data:
                return AnswerReceipt(AnswerOutcome.GONE)
            record = JobRecord.from_hash(data)
            if idempotency_key and pipe.hexists(self.answer_keys_key(job_id), idempotency_key):
                return AnswerReceipt(AnswerOutcome.DUPLICATE, record)
            if record.state is not JobState.WAITING or record.round_id != round_id:
                return AnswerReceipt(AnswerOutcome.NOT_OPEN, record)
            now = redis_time(pipe)
            if now > record.round_expires:
                return AnswerReceipt(AnswerOutcome.EXPIRED, record)
            if pipe.hexists(self.raters_key(job_id), f"{round_id}:{rater}"):
                return AnswerReceipt(AnswerOutcome.ALREADY_ANSWERED, record)
            stored = pipe.get(self.round_key(job_id))
            assert stored is not None, "a waiting job has its round"
            log_entry = entry(opt.FeedbackRound.FromString(stored), now)
            answers = record.round_answers + 1
            updates: dict[str, object] = {"round_answers": answers, "updated": now}
            pipe.multi()
            pipe.rpush(self.log_key(job_id), log_entry.SerializeToString())
            if idempotency_key:
                pipe.hset(self.answer_keys_key(job_id), idempotency_key, round_id)
            pipe.hset(self.raters_key(job_id), f"{round_id}:{rater}", "1")
            if answers >= record.round_required:
                updates |= {"state": JobState.QUEUED, "round_id": "", "deliver_round": round_id}
                message = f"round {log_entry.round} answered"
                self.store.xadd(pipe, job_id, state_event(JobState.QUEUED, JobState.WAITING, message))
            pipe.hset(self.store.job_key(job_id), mapping={k: encode_field(v) for k, v in updates.items()})
            return AnswerReceipt(AnswerOutcome.RECORDED, JobRecord(**(record.__dict__ | updates)))

        return self.store.transaction(attempt, self.store.job_key(job_id), value_from_callable=True)

    def close_expired(self, job_id: str) -> JobRecord | None:
        """End the wait of a job whose round has expired: the job goes back to QUEUED with its cancel flag set, so
        the next segment ends it with its best result so far. Returns the record when it did (send the segment)."""

        def attempt(pipe: redis.client.Pipeline) -> JobRecord | None:
            data = pipe.hgetall(self.store.job_key(job_id))
            record = JobRecord.from_hash(data) if data else None
            if record is None or record.state is not JobState.WAITING:
                return None
            now = redis_time(pipe)
            if now <= record.round_expires:
                return None
            reason = f"round {record.rounds} expired without the answers it needs"
            updates = {
                "state": JobState.QUEUED,
                "round_id": "",
                "cancel_requested": True,
                "cancel_reason": reason,
                "updated": now,
            }
            pipe.multi()
            pipe.hset(self.store.job_key(job_id), mapping={k: encode_field(v) for k, v in updates.items()})
            self.store.xadd(pipe, job_id, state_event(JobState.QUEUED, JobState.WAITING, reason))
            return JobRecord(**(record.__dict__ | updates))

        return self.store.transaction(attempt, self.store.job_key(job_id), value_from_callable=True)

    def interactions(self, job_id: str) -> list[opt.Interaction]:
        return [opt.Interaction.FromString(data) for data in self.client.lrange(self.log_key(job_id), 0, -1)]

    def rater_key(self) -> bytes:
        """The deployment's pseudonym key: made at random on first use, the same for every process after (read
        once per process)."""
        if self._rater_key is not None:
            return self._rater_key
        key = f"{self.store.prefix}rater_key"
        self.client.set(key, secrets.token_bytes(32), nx=True)
        value = self.client.get(key)
        if value is None:
            raise RuntimeError(f"{key} vanished right after it was set")
        self._rater_key = bytes(value)
        return self._rater_key
