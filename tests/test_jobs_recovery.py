"""Jobs survive failure: a worker killed with SIGKILL mid-job is replaced and the job finishes from its last
checkpoint; a second copy of a task stands down while the lease is held; the lease of a dead process is taken over.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from job_fixtures import SLEEP, JobStack, SleepSpec, final_state, inversion_spec, wait_for, watch_all

from gansteer.v1 import optimization_pb2
from gansteer_server.jobs.backends import Backends
from gansteer_server.jobs.celery_app import create_store
from gansteer_server.jobs.records import ClaimOutcome, JobRecord, JobState
from gansteer_server.jobs.runner import WorkerContext, owner_is_dead, run_segment
from gansteer_server.jobs.specs import encode_spec
from gansteer_server.jobs.store import JobStore

pytestmark = [pytest.mark.job]
S = optimization_pb2


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[JobStack]:
    """A private Redis prefix for the in-process tests (no worker, no service)."""
    stack = JobStack(tmp_path)
    try:
        yield stack
    finally:
        stack.close()


def test_a_worker_killed_mid_job_is_replaced_and_the_job_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    stack = JobStack(tmp_path, overrides={"segment_steps": 40, "visibility_timeout_s": 4.0})
    try:
        stub = stack.start_server()[1]
        first = stack.start_worker("first")
        spec = inversion_spec(budget=160, seed=5)
        job_id = stub.SubmitJob(S.SubmitJobRequest(spec=spec), timeout=30).job_id
        store = stack.servers[0].jobs.store

        def mid_segment() -> bool:
            record = store.get(job_id)
            return record is not None and record.segment >= 1 and 10 <= record.step % 40 <= 30

        wait_for(mid_segment, 60, "the middle of a segment after the first checkpoint", interval=0.005)
        first.kill()  # SIGKILL to the worker and its pool child: no warm shutdown, the task stays unacknowledged
        stack.start_worker("second")  # gets the task back once the broker's visibility timeout has passed
        killed = stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=10).job
        assert killed.state == S.JOB_STATE_RUNNING and 40 <= killed.step < 160

        events = watch_all(stub, job_id, timeout=120)
        assert final_state(events) == S.JOB_STATE_SUCCEEDED, stack.workers[-1].output()[-3000:]
        later = [e for e in events if e.event_id > killed.last_event_id]
        steps = [e.progress.step for e in later if e.HasField("progress")]
        checkpoint = steps[0] - 1
        # A segment boundary, not step zero. A segment ends after 40 steps or 1 s, whichever comes first (under load,
        # the second), so the boundary need not be a multiple of 40.
        assert 0 < checkpoint <= killed.step
        assert steps == list(range(checkpoint + 1, 161))
        resumed = [e.state_change.message for e in later if e.HasField("state_change")]
        assert resumed[0] == f"resumed at step {checkpoint} after a lost worker (delivery 2)"
        assert sum(e.HasField("result") for e in events) == 1
        result = stub.GetResult(S.GetResultRequest(job_id=job_id), timeout=10).result
        assert result.metrics["steps"] == 160
        assert list(result.curve.steps) == list(range(1, 161))  # each step once, though some ran twice
    finally:
        stack.close()


def _inline_context(stack: JobStack, owner: str = "") -> tuple[WorkerContext, list[tuple[str, int, float]]]:
    """A worker context that records the messages it would send instead of sending them."""
    sent: list[tuple[str, int, float]] = []

    def enqueue(record: JobRecord, segment: int, countdown: float) -> None:
        sent.append((record.id, segment, countdown))

    store = create_store(stack.settings)
    return WorkerContext(stack.settings, store, Backends(stack.settings.settings), enqueue, owner=owner), sent


def _sleep_job(store: JobStore, steps: int = 12, sleep_s: float = 0.0, time_limit_s: float = 0.0) -> str:
    record, _ = store.create(
        kind=SLEEP.name,
        owner="",
        queue=SLEEP.queue,
        spec_proto=b"",
        spec_state=encode_spec(SleepSpec(steps=steps, sleep_s=sleep_s)),
        total_steps=steps,
        time_limit_s=time_limit_s,
    )
    return record.id


def test_a_second_copy_of_a_task_stands_down_while_the_lease_is_held(stack: JobStack) -> None:
    context, sent = _inline_context(stack)
    store = context.store
    job_id = _sleep_job(store)
    # Another worker, alive on another host, holds the lease of segment 0.
    other = "elsewhere:4242:abc"
    claim = store.claim(job_id, 0, other, 30.0, 3, owner_is_dead)
    assert claim.outcome is ClaimOutcome.RUN

    assert run_segment(context, job_id, 0) == "held"
    record = store.get(job_id)
    assert (record.step, record.lease_owner, record.segment_deliveries) == (0, other, 1)  # nothing ran, not counted
    assert sent and sent[0][:2] == (job_id, 0) and 0 < sent[0][2] <= 10.05  # tried again near the lease's end

    # The holder finishes the segment: a late copy of segment 0 is stale; segment 1 runs.
    store.advance(job_id, other, 0, checkpoint=_state(steps=5), run_seconds=0.1)
    assert run_segment(context, job_id, 0) == "stale"
    assert run_segment(context, job_id, 1) == "segment"
    assert store.get(job_id).step == 10  # resumed at the checkpoint's step 5, five more steps
    assert run_segment(context, job_id, 2) == "succeeded"
    assert run_segment(context, job_id, 2) == "finished"
    events = store.read_events(job_id)
    assert sum(e.HasField("result") for _, e in events) == 1


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(stack: JobStack) -> None:
    context, _ = _inline_context(stack)
    store = context.store
    job_id = _sleep_job(store, steps=3)
    dead = f"{context.owner.split(':')[0]}:999999999:abc"  # no such pid
    assert owner_is_dead(dead)
    store.claim(job_id, 0, dead, 30.0, 3, owner_is_dead)
    assert run_segment(context, job_id, 0) == "succeeded"
    record = store.get(job_id)
    assert record.segment_deliveries == 2  # the dead worker's delivery and this one
    events = [e for _, e in store.read_events(job_id)]
    assert any(e.state_change.message.startswith("resumed at step 0") for e in events)


def _state(steps: int) -> bytes:
    buffer = io.BytesIO()
    torch.save({"steps": steps}, buffer)
    return buffer.getvalue()


def test_a_job_past_its_time_limit_fails_keeping_its_best_result(stack: JobStack) -> None:
    context, _ = _inline_context(stack)
    store = context.store
    job_id = _sleep_job(store, steps=1000, sleep_s=0.05, time_limit_s=0.3)
    segment = 0
    while (outcome := run_segment(context, job_id, segment)) == "segment":
        segment += 1
    assert outcome == "failed"
    final = store.get(job_id)
    assert final.state == JobState.FAILED and final.error_reason == "TIME_LIMIT" and final.has_result
    # Every step sleeps at least 0.05 s, so the 0.3 s limit stops the job by step 7 however loaded the machine is
    # (a slow machine only takes fewer): far short of the 1000 steps it asked for.
    assert 1 <= final.step <= 7


def test_the_next_segment_met_during_the_hand_over_is_tried_again_at_once(stack: JobStack) -> None:
    """The runner sends segment 1 just before it releases segment 0's lease; a second worker that takes segment 1 in
    between retries in a quarter second, not when the lease would lapse (which stalled jobs by up to 20 s)."""
    context, sent = _inline_context(stack)
    store = context.store
    job_id = _sleep_job(store)
    other = "elsewhere:4242:abc"
    store.claim(job_id, 0, other, 60.0, 3, owner_is_dead)
    assert run_segment(context, job_id, 1) == "held"
    assert sent[-1][:2] == (job_id, 1) and sent[-1][2] < 1.0
    store.advance(job_id, other, 0, checkpoint=_state(steps=5), run_seconds=0.1)
    assert run_segment(context, job_id, 1) == "segment"
