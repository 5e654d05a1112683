"""The sweeper queues again a job that no task carries (its message lost, no live lease), leaves alone a job that
a message or a lease still carries, and runs one process at a time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from job_fixtures import SLEEP, JobStack, SleepSpec, final_state, watch_all

from gansteer.v1 import optimization_pb2 as S
from gansteer_server.jobs.celery_app import Jobs
from gansteer_server.jobs.records import JobRecord
from gansteer_server.jobs.specs import encode_spec
from gansteer_server.jobs.sweeper import Sweeper, sweep

pytestmark = [pytest.mark.job]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[JobStack]:
    stack = JobStack(tmp_path)
    try:
        yield stack
    finally:
        stack.close()


def orphan(stack: JobStack, jobs: Jobs, idle_s: float = 3600.0) -> str:
    """A queued job whose task message never reached the broker, last touched `idle_s` ago."""
    record, _ = jobs.store.create(
        kind=SLEEP.name,
        owner="",
        queue=SLEEP.queue,
        spec_proto=b"",
        spec_state=encode_spec(SleepSpec(steps=3, sleep_s=0.0)),
        total_steps=3,
    )
    jobs.store.client.hset(jobs.store.job_key(record.id), "updated", str(time.time() - idle_s))
    return record.id


def test_a_job_no_task_carries_is_queued_again_and_the_others_are_left_alone(stack: JobStack) -> None:
    jobs = Jobs(stack.settings)
    lost = orphan(stack, jobs)
    recent = orphan(stack, jobs, idle_s=0.0)  # its message may still be in flight
    queued = orphan(stack, jobs)
    jobs.enqueue(jobs.store.get(queued), 0)  # a real message in the broker (no worker takes it)
    leased = orphan(stack, jobs)
    jobs.store.claim(leased, 0, "elsewhere:4242:abc", 3600.0, 3, lambda owner: False)
    jobs.store.client.hset(jobs.store.job_key(leased), "updated", str(time.time() - 3600))

    sent: list[tuple[str, int]] = []

    def enqueue(record: JobRecord, segment: int) -> None:
        sent.append((record.id, segment))

    done = sweep(jobs.store, stack.settings, enqueue)
    assert sent == [(lost, 0)] and [item.job_id for item in done] == [lost] and done[0].idle_s > 3000
    messages = [e.state_change.message for _, e in jobs.store.read_events(lost) if e.HasField("state_change")]
    assert any("queued again by the sweeper" in message for message in messages)
    assert not {recent, queued, leased} & {job_id for job_id, _ in sent}


def test_a_swept_job_runs_to_its_end_and_one_sweeper_runs_at_a_time(stack: JobStack) -> None:
    server, stub = stack.start_server()
    stack.start_worker()
    jobs = server.jobs
    lost = orphan(stack, jobs)
    first = Sweeper(jobs.store, stack.settings, jobs.enqueue, interval_s=60)
    second = Sweeper(jobs.store, stack.settings, jobs.enqueue, interval_s=60)
    assert [item.job_id for item in first.run_once()] == [lost]
    assert second.run_once() == []  # the lock is held for the interval
    assert final_state(watch_all(stub, lost)) == S.JOB_STATE_SUCCEEDED
