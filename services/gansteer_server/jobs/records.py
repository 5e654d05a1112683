"""A job's record and the values the store and the runner exchange: states, claims, events of state changes."""

from __future__ import annotations

import enum
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from gansteer_server.proto import optimization_pb2 as opt


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting_for_feedback"  # a round is open; no worker holds the job
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
    JobState.WAITING: opt.JOB_STATE_WAITING_FOR_FEEDBACK,
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
    # Rounds: the open round (while WAITING), when it expires, answers it has and needs; `deliver_round` names the
    # round whose answers the next segment hands to the run (cleared once a checkpoint holds them).
    round_id: str = ""
    round_expires: float = 0.0
    round_answers: int = 0
    round_required: int = 0
    deliver_round: str = ""
    rounds: int = 0

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
    "round_id": str,
    "round_expires": float,
    "round_answers": int,
    "round_required": int,
    "deliver_round": str,
    "rounds": int,
}


def encode_field(value: Any) -> str:
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
    WAITING = "waiting"  # the job waits for feedback; this copy is a duplicate (the answer queues the next one)
    OVER_CAP = "over_cap"  # delivered more than the cap without finishing the segment: the job is failed


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    record: JobRecord | None = None
    retry_after_s: float = 0.0
    resumed: bool = False  # a previous delivery of this segment started and did not finish it


class LeaseLost(Exception):
    """The worker no longer holds the job's lease (it expired and another worker took the job, or it ended)."""
