"""Jobs end, whatever fails under them: Redis errors other than a lost connection, a broker that refuses a message, a
model service that is briefly (or for good) unavailable, two submissions racing on one idempotency key, and a
cancel that meets a dead worker's lease.

Each test runs a real Celery worker (in a thread of this process, so that a failure can be injected into it) on the
real Redis, as broker and job store, under a private key prefix; the failure is one patched call, the rest is real.
"""

from __future__ import annotations

import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from job_fixtures import SLEEP, JobStack, SleepRun, SleepSpec, wait_for
from kombu.exceptions import OperationalError

from gansteer_server.jobs import runner
from gansteer_server.jobs import store as store_module
from gansteer_server.jobs.celery_app import Jobs, create_store, task_name
from gansteer_server.jobs.records import JobRecord, JobState
from gansteer_server.jobs.runner import owner_is_dead
from gansteer_server.jobs.specs import encode_spec
from gansteer_server.jobs.store import JobStore
from gansteer_server.jobs.worker import start_worker_thread

pytestmark = [pytest.mark.job]


@pytest.fixture
def stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[JobStack]:
    """A private Redis prefix; `@pytest.mark.parametrize("stack", [{...}], indirect=True)` overrides job settings."""
    stack = JobStack(tmp_path, overrides=getattr(request, "param", {}))
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture
def jobs(stack: JobStack) -> Iterator[Jobs]:
    """The submitting side, sending to the real broker; a real worker consumes in a thread while the test runs."""
    with start_worker_thread(stack.settings) as worker:
        jobs = Jobs(stack.settings)
        jobs.worker = worker  # type: ignore[attr-defined]
        yield jobs


def submit(jobs: Jobs, steps: int = 12, sleep_s: float = 0.01) -> str:
    record, _ = jobs.submit(SLEEP, SleepSpec(steps=steps, sleep_s=sleep_s), owner="")
    return record.id


def finished(store: JobStore, job_id: str, timeout: float = 30) -> JobRecord:
    """The job's record once it has ended (the test fails if it never does: the job was orphaned)."""
    return wait_for(lambda: _terminal(store.get(job_id)), timeout, f"job {job_id} to end")


def _terminal(record: JobRecord | None) -> JobRecord | None:
    return record if record is not None and record.state.terminal else None


def messages(store: JobStore, job_id: str) -> list[str]:
    return [e.state_change.message for _, e in store.read_events(job_id) if e.HasField("state_change")]


def fail_once(error: BaseException, original: Any, when: Any = lambda *a, **k: True) -> Any:
    """A stand-in for `original` that raises `error` the first time `when(*args)` holds, then behaves."""
    state = {"raised": False}

    def patched(*args: Any, **kwargs: Any) -> Any:
        if not state["raised"] and when(*args, **kwargs):
            state["raised"] = True
            raise error
        return original(*args, **kwargs)

    return patched


class Unavailable(grpc.RpcError):
    """What a model service's stub raises while the service is down."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused"


# --- 1. Redis errors: retried, and a job whose task gives up is failed, never left running -------------------------


@pytest.mark.parametrize("stack", [{"max_deliveries": 1}], indirect=True)
def test_a_redis_response_error_mid_segment_is_retried_and_is_no_lost_worker(
    stack: JobStack, jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}

    def on_third_check(*args: Any, **kwargs: Any) -> bool:
        calls["n"] += 1
        return calls["n"] == 3

    error = redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
    monkeypatch.setattr(JobStore, "check", fail_once(error, JobStore.check, on_third_check))
    job_id = submit(jobs)
    final = finished(jobs.store, job_id)
    assert final.state is JobState.SUCCEEDED, final.error
    assert final.step == 12
    assert not [m for m in messages(jobs.store, job_id) if "lost worker" in m]


def test_a_task_whose_redis_error_persists_fails_the_job_when_its_retries_run_out(
    stack: JobStack, jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs.worker.app.tasks[task_name(SLEEP.name)].max_retries = 1  # type: ignore[attr-defined]
    original = JobStore.claim

    def readonly(self: JobStore, job_id: str, *args: Any, **kwargs: Any) -> Any:
        if job_id == target["id"]:
            raise redis.ReadOnlyError("You can't write against a read only replica.")
        return original(self, job_id, *args, **kwargs)

    target = {"id": ""}
    monkeypatch.setattr(JobStore, "claim", readonly)
    record, _ = jobs.store.create(
        kind=SLEEP.name,
        owner="",
        queue=SLEEP.queue,
        spec_proto=b"",
        spec_state=encode_spec(SleepSpec(steps=3, sleep_s=0.0)),
        total_steps=3,
    )
    target["id"] = record.id
    jobs.enqueue(record, 0)
    final = finished(jobs.store, record.id)
    assert final.state is JobState.FAILED
    assert final.error_reason == "TASK_ERROR"
    assert "ReadOnlyError" in final.error


def test_an_unexpected_error_escaping_the_task_fails_the_job(
    stack: JobStack, jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(JobStore, "claim", fail_once(RuntimeError("corrupt record"), JobStore.claim))
    job_id = submit(jobs)
    final = finished(jobs.store, job_id)
    assert final.state is JobState.FAILED
    assert final.error_reason == "TASK_ERROR" and "corrupt record" in final.error


# --- 2. A broker that refuses a message for a moment costs a retry, not the job --------------------------------------


def test_a_broker_error_sending_the_next_segment_is_retried(
    stack: JobStack, jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = OperationalError("Error 111 connecting to the broker. Connection refused.")
    next_segment = fail_once(error, Jobs.enqueue, lambda self, record, segment, countdown=0.0: segment == 1)
    monkeypatch.setattr(Jobs, "enqueue", next_segment)
    job_id = submit(jobs)
    final = finished(jobs.store, job_id)
    assert final.state is JobState.SUCCEEDED, final.error
    assert final.step == 12 and final.segment == 2


def test_a_broker_error_while_another_worker_holds_the_lease_is_retried(
    stack: JobStack, jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = jobs.store
    record, _ = store.create(
        kind=SLEEP.name,
        owner="",
        queue=SLEEP.queue,
        spec_proto=b"",
        spec_state=encode_spec(SleepSpec(steps=3, sleep_s=0.0)),
        total_steps=3,
    )
    # A worker on another host claimed segment 0 and then vanished; its lease lapses in a second.
    assert store.claim(record.id, 0, "elsewhere:4242:abc:1", 1.0, 3, owner_is_dead).record is not None
    error = OperationalError("Error 111 connecting to the broker. Connection refused.")
    held_retry = fail_once(error, Jobs.enqueue, lambda self, record, segment, countdown=0.0: countdown > 0)
    monkeypatch.setattr(Jobs, "enqueue", held_retry)
    jobs.enqueue(record, 0)
    final = finished(store, record.id)
    assert final.state is JobState.SUCCEEDED, final.error


# --- 3. A model service that is briefly unavailable: retried, not a lost worker; down for good: failed -------------


@pytest.mark.parametrize("stack", [{"max_deliveries": 1}], indirect=True)
def test_a_briefly_unavailable_service_is_retried_outside_the_delivery_cap(
    stack: JobStack, jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(SleepRun, "step", fail_once(Unavailable(), SleepRun.step, lambda run: run.steps == 7))
    job_id = submit(jobs)
    final = finished(jobs.store, job_id)
    assert final.state is JobState.SUCCEEDED, final.error
    assert final.step == 12 and final.segment_deliveries == 1
    assert not [m for m in messages(jobs.store, job_id) if "lost worker" in m]


@pytest.mark.parametrize("stack", [{"max_deliveries": 5}], indirect=True)
def test_a_service_that_stays_unavailable_fails_the_job_after_its_retries(
    stack: JobStack, jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(run: SleepRun) -> Any:
        raise Unavailable()

    monkeypatch.setattr(runner, "MAX_SEGMENT_RETRIES", 1)
    monkeypatch.setattr(SleepRun, "step", down)
    job_id = submit(jobs)
    final = finished(jobs.store, job_id, timeout=20)
    assert final.state is JobState.FAILED
    assert final.error_reason == "SERVICE_UNAVAILABLE" and "Unavailable" in final.error


# --- 4. Two submissions racing on one idempotency key create one job -------------------------------------------------


def test_two_submissions_racing_on_one_idempotency_key_create_one_job(
    stack: JobStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = create_store(stack.settings), create_store(stack.settings)
    answers: list[tuple[JobRecord, bool]] = []

    def create(store: JobStore) -> tuple[JobRecord, bool]:
        return store.create(
            kind=SLEEP.name,
            owner="alice",
            queue=SLEEP.queue,
            spec_proto=b"",
            spec_state=encode_spec(SleepSpec(steps=1, sleep_s=0.0)),
            total_steps=1,
            idempotency_key="once",
        )

    # The second submission runs in the middle of the first: after it looked at the key, before its job is written.
    hook = {"run": lambda: answers.append(create(second))}

    def clock() -> float:
        if "run" in hook:
            hook.pop("run")()
        return time.time()

    monkeypatch.setattr(store_module, "time", types.SimpleNamespace(time=clock))
    answers.insert(0, create(first))
    assert "run" not in hook
    ids = {record.id for record, _ in answers}
    assert len(ids) == 1, answers
    assert sorted(existing for _, existing in answers) == [False, True]
    assert first.list_ids(None) == list(ids)
    assert first.find_idempotent("alice", "once").id in ids  # type: ignore[union-attr]


# --- 5. A cancel that meets a dead worker's lease ends the job at once, without a result ------------------------------


def test_a_job_cancelled_while_no_live_worker_holds_it_ends_without_a_result(stack: JobStack) -> None:
    """Documented in JobStore.request_cancel: the best result so far is kept only when a worker cancels the job."""
    store = create_store(stack.settings)
    record, _ = store.create(
        kind=SLEEP.name,
        owner="",
        queue=SLEEP.queue,
        spec_proto=b"",
        spec_state=encode_spec(SleepSpec(steps=20, sleep_s=0.0)),
        total_steps=20,
    )
    dead = "elsewhere:4242:abc:1"
    store.claim(record.id, 0, dead, 30.0, 3, owner_is_dead)
    store.advance(record.id, dead, 0, checkpoint=b"steps 1 to 5", run_seconds=0.1)
    store.claim(record.id, 1, dead, 0.2, 3, owner_is_dead)
    time.sleep(0.3)  # the worker died in segment 1: its lease lapses
    cancelled = store.request_cancel(record.id, "enough")
    assert cancelled is not None and cancelled.state is JobState.CANCELLED
    assert not cancelled.has_result and store.result(record.id) is None
    assert store.load_checkpoint(record.id) is None
