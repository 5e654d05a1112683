"""Segmented execution: one Celery task runs one bounded segment of a job, checkpoints, and enqueues the next.

Why segments (ARCHITECTURE decision 6): on Redis, a task not acknowledged within the broker's visibility timeout is
delivered again even while it still runs (celery #5935). A segment of at most `segment_steps` steps or
`segment_seconds` seconds stays far below that timeout, and a job of any length is a chain of short tasks.

How a job survives failure:

- **Lease.** A task first claims the job's lease in its record (`JobStore.claim`) and renews it while it runs. A
  second copy of the task (a re-delivery) finds the lease held by a live worker and re-enqueues itself for when the
  lease would lapse; once the first copy has moved the job to the next segment, the copy is stale and stands down.
  A worker that loses its lease (it stalled past the lease and another took over) stops at its next step, writing
  nothing.
- **Killed worker.** Tasks are acknowledged late and rejected (re-queued) when their worker process dies. The next
  delivery takes over a lease whose owner is a dead process on the same host at once, else when it lapses, and
  resumes from the checkpoint of the segment's start: the step counter never restarts from zero.
- **Delivery cap.** Deliveries are counted per segment in the record; past `max_deliveries` the job fails, so a task
  that kills its worker every time is not re-queued forever (celery #9082).
- **Transient errors.** A model service briefly unavailable: the segment gives its lease up and is queued again
  later, at most `MAX_SEGMENT_RETRIES` times, then the job fails. Redis errors and a broker that refuses a task
  message (`EnqueueFailed`) end the task, which Celery retries (see `celery_app`); a task that gives up fails the
  job. Neither kind of retry counts as a delivery or reads as a lost worker.
- **Cancel** is a flag in the record, checked before every step (`revoke(terminate=True)` does nothing on the solo
  and thread pools, celery #5929). **Time limit**: the job's running seconds, summed over segments, checked before
  every step; a job past it fails with its best result so far kept.

The next segment's message is sent before the record moves on, so a worker dying in between leaves either a
re-delivered current segment (which is then stale) or an early next one (which waits for the lease), never a job
without a message.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import grpc
import redis
import torch
from kombu.exceptions import OperationalError

from gansteer.tensors import from_tensor_proto
from gansteer_server.jobs.backends import Backends
from gansteer_server.jobs.kinds import JobKind, JobRun, StepProgress, get_kind
from gansteer_server.jobs.kinds.base import BoundRun, PublishingRun, RoundRun
from gansteer_server.jobs.metrics import WorkerMetrics
from gansteer_server.jobs.records import ClaimOutcome, JobRecord, JobState, LeaseLost, state_event
from gansteer_server.jobs.round_store import RoundStore
from gansteer_server.jobs.rounds import Round, answer_of, round_message
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.jobs.specs import decode_spec
from gansteer_server.jobs.store import JobStore
from gansteer_server.proto import optimization_pb2 as opt
from gansteer_server.wire.convert import image_batch

logger = logging.getLogger(__name__)

#: (record, segment, countdown seconds): sends the job's next task message.
Enqueue = Callable[[JobRecord, int, float], None]
# Errors of a model service that a later try may not meet; the segment is queued again, after 2, 4, ... 60 s.
_TRANSIENT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
#: Transient retries of one segment before the job fails (about six minutes of backoff in all).
MAX_SEGMENT_RETRIES = 10


class EnqueueFailed(Exception):
    """A task message could not be sent (the broker failed for a moment). The task is retried: the lease and the
    checkpoint make running its segment again safe."""


@dataclass
class WorkerContext:
    """What a worker process needs to run segments; built once per process, after any fork."""

    settings: JobSettings
    store: JobStore
    backends: Backends
    enqueue: Enqueue
    owner: str = ""
    metrics: WorkerMetrics | None = None
    rounds: RoundStore = field(init=False)

    def __post_init__(self) -> None:
        # host:pid identifies the process (a dead pid on this host frees its leases at once); the token tells apart
        # two workers in one process (in-thread workers of tests and the embedded mode).
        self.owner = self.owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.rounds = RoundStore(self.store)

    @property
    def lease_owner(self) -> str:
        """The owner this thread writes into leases: threads of one process (the threads pool) are told apart."""
        return f"{self.owner}:{threading.get_native_id()}"


def owner_is_dead(owner: str) -> bool:
    """Whether a lease owner is a process of this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _send(context: WorkerContext, record: JobRecord, segment: int, countdown: float) -> None:
    try:
        context.enqueue(record, segment, countdown)
    except (OperationalError, OSError, redis.RedisError) as error:
        raise EnqueueFailed(f"segment {segment} of job {record.id} could not be queued: {error}") from error


def run_segment(context: WorkerContext, job_id: str, segment: int) -> str:
    """Run one segment of a job; returns what happened (for logs and tests): a ClaimOutcome value, `segment` (the
    next one is queued), a final state, or `lease_lost`."""
    settings, store = context.settings, context.store
    claim = store.claim(job_id, segment, context.lease_owner, settings.lease_s, settings.max_deliveries, owner_is_dead)
    redelivered = claim.resumed or claim.outcome is ClaimOutcome.OVER_CAP  # its last worker was lost
    if redelivered and context.metrics is not None and claim.record is not None:
        context.metrics.redelivered(claim.record.kind)
    if claim.outcome is ClaimOutcome.HELD:
        assert claim.record is not None
        _send(context, claim.record, segment, claim.retry_after_s + 0.05)
        return claim.outcome.value
    if claim.outcome is not ClaimOutcome.RUN:
        if claim.outcome is ClaimOutcome.OVER_CAP:
            logger.error("job %s failed: segment %d over the delivery cap", job_id, segment)
        return claim.outcome.value
    assert claim.record is not None
    try:
        return _Segment(context, claim.record, segment, claim.resumed).run()
    except LeaseLost:
        logger.warning("job %s: lost the lease during segment %d; standing down", job_id, segment)
        return "lease_lost"


class _Segment:
    """One claimed segment of one job."""

    def __init__(self, context: WorkerContext, record: JobRecord, segment: int, resumed: bool) -> None:
        self.context, self.record, self.segment, self.resumed = context, record, segment, resumed
        self.settings, self.store, self.owner = context.settings, context.store, context.lease_owner
        self.job_id = record.id

    def run(self) -> str:
        kind = get_kind(self.record.kind)
        stored = self.store.spec(self.job_id)
        if stored is None:
            return ClaimOutcome.GONE.value
        try:
            job_run = self._start(kind, decode_spec(kind.spec_type, stored[1]))
            if self.resumed:
                deliveries = self.record.segment_deliveries
                message = f"resumed at step {job_run.steps} after a lost worker (delivery {deliveries})"
                self.store.append_event(self.job_id, state_event(JobState.RUNNING, JobState.RUNNING, message))
            return self._loop(job_run)
        except (LeaseLost, redis.RedisError, EnqueueFailed):
            raise  # stand down / let Celery retry the task: the job itself is fine
        except grpc.RpcError as error:
            if error.code() in _TRANSIENT_CODES:  # type: ignore[attr-defined]
                return self._retry_later(error)
            return self._fail(error)
        except Exception as error:  # the job's error boundary: anything else fails this job (logged), not the worker
            return self._fail(error)

    def _start(self, kind: JobKind, spec: object) -> JobRun:
        backend = self.context.backends.get(kind.backend_name(spec, self.settings))
        job_run = kind.start(spec, backend, self.settings)
        if hasattr(job_run, "bind"):  # a run that writes under its job's name (simulated interactions' provenance)
            cast(BoundRun, job_run).bind(self.job_id)
        checkpoint = self.store.load_checkpoint(self.job_id)
        if checkpoint is not None:
            job_run.load_state_dict(torch.load(io.BytesIO(checkpoint), map_location="cpu", weights_only=True))
        if self.record.deliver_round:  # the checkpoint is the round's: hand the run its answers from the log
            entries = self.context.rounds.answers(self.job_id, self.record.deliver_round)
            cast(RoundRun, job_run).receive([answer_of(entry) for entry in entries])
        return job_run

    def _loop(self, job_run: JobRun) -> str:
        settings, store = self.settings, self.store
        started = last_renewal = time.monotonic()
        last_progress = float("-inf")
        time_limit = self.record.time_limit_s or settings.max_time_limit_s
        steps_here = 0
        while True:
            now = time.monotonic()
            renew = now - last_renewal >= settings.lease_s / 3
            cancel = store.check(self.job_id, self.owner, settings.lease_s if renew else None)
            last_renewal = now if renew else last_renewal
            run_seconds = self.record.run_seconds + (now - started)
            if cancel:
                reason = store.get(self.job_id)
                message = (reason.cancel_reason if reason else "") or "cancelled by request"
                return self._finish(job_run, JobState.CANCELLED, message, run_seconds)
            if run_seconds > time_limit:
                message = f"time limit of {time_limit:g} s reached; the best result so far is kept"
                return self._finish(job_run, JobState.FAILED, message, run_seconds, reason="TIME_LIMIT")
            if job_run.done:
                return self._finish(job_run, JobState.SUCCEEDED, "", run_seconds)
            if steps_here >= settings.segment_steps or now - started >= settings.segment_seconds:
                return self._next_segment(job_run, run_seconds)
            progress = job_run.step()
            steps_here += 1
            now = time.monotonic()
            segment_ends = steps_here >= settings.segment_steps or job_run.done or progress.round is not None
            if segment_ends or now - last_progress >= settings.progress_interval_s:
                last_progress = now
                self._progress(progress, self.record.run_seconds + (now - started))
            every = self.record.preview_every
            if every and progress.step % every == 0:
                self._preview(job_run, progress.step)
            if progress.round is not None:
                return self._open_round(job_run, progress.round, self.record.run_seconds + (now - started))

    def _progress(self, progress: StepProgress, run_seconds: float) -> None:
        step, calls, criterion = progress.step, progress.generator_calls, dict(progress.criterion)
        event = opt.JobEvent(
            progress=opt.Progress(
                step=step,
                total_steps=self.record.total_steps,
                criterion=criterion,
                generator_calls=calls,
                elapsed_s=run_seconds,
            )
        )
        updates = {"step": step, "generator_calls": calls, "criterion": criterion, "updated": time.time()}
        self.store.progress(self.job_id, event, updates)

    def _preview(self, job_run: JobRun, step: int) -> None:
        images = image_batch(job_run.preview(), as_png=True)
        self.store.append_event(self.job_id, opt.JobEvent(preview=opt.Preview(step=step, images=images)))

    def _next_segment(self, job_run: JobRun, run_seconds: float) -> str:
        checkpoint = _checkpoint(job_run)
        _send(self.context, self.record, self.segment + 1, 0.0)
        self.store.advance(self.job_id, self.owner, self.segment, checkpoint, run_seconds)
        return "segment"

    def _open_round(self, job_run: JobRun, round_: Round, run_seconds: float) -> str:
        """Checkpoint, store the round and release the worker: the job waits, and an answer queues what follows."""
        expires = time.time() + (round_.expires_in_s or self.settings.round_expiry_s)
        message = round_message(round_, secrets.token_hex(8), expires)
        checkpoint = _checkpoint(job_run)
        self.context.rounds.open_round(self.job_id, self.owner, self.segment, checkpoint, message, run_seconds)
        return JobState.WAITING.value

    def _finish(self, job_run: JobRun, state: JobState, message: str, run_seconds: float, reason: str = "") -> str:
        """End the job; its result (the best so far when cancelled or out of time) is kept once a step has run."""
        result = event = None
        if job_run.steps > 0:
            result = job_run.result()
            result.job_id = self.job_id
            if state is JobState.SUCCEEDED and hasattr(job_run, "publish"):
                result.models.extend(cast(PublishingRun, job_run).publish(self.job_id))
            event = opt.JobEvent()
            event.result.CopyFrom(result)
            images = torch.from_numpy(from_tensor_proto(result.images.tensor, copy=True))
            event.result.images.CopyFrom(image_batch(images, as_png=True))
        self.store.finish(
            self.job_id,
            self.owner,
            state,
            message=message,
            reason=reason,
            result=result.SerializeToString() if result is not None else None,
            result_event=event,
            run_seconds=run_seconds,
        )
        logger.info("job %s %s at segment %d", self.job_id, state.value, self.segment)
        return state.value

    def _fail(self, error: BaseException, reason: str = "JOB_ERROR", context: str = "") -> str:
        logger.error("job %s failed", self.job_id, exc_info=error)
        message = f"{context}{type(error).__name__}: {error}"
        self.store.finish(self.job_id, self.owner, JobState.FAILED, message=message, reason=reason)
        return JobState.FAILED.value

    def _retry_later(self, error: BaseException) -> str:
        """Queue the segment again later, releasing the lease: a retry, not a delivery (see JobStore.claim)."""
        retries = self.store.segment_retries(self.job_id)
        if retries >= MAX_SEGMENT_RETRIES:
            context = f"segment {self.segment} still failing after {retries} retries: "
            return self._fail(error, reason="SERVICE_UNAVAILABLE", context=context)
        delay = min(60.0, 2.0 ** (retries + 1))
        logger.warning("job %s: %s; segment %d again in %.0f s", self.job_id, error, self.segment, delay)
        self.store.release(self.job_id, self.owner)
        _send(self.context, self.record, self.segment, delay)
        return "retry"


def _checkpoint(job_run: JobRun) -> bytes:
    """The run's state as `torch.save` bytes (tensors and plain values: read back with weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(job_run.state_dict(), buffer)
    return buffer.getvalue()
