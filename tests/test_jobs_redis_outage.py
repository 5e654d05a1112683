"""Jobs ride out a Redis outage: Redis (broker and job store in one) stops mid-job and comes back from its
append-only file; the job finishes, with no step lost or run twice in its result. The outage uses a private
redis-server on a free port, so the shared Redis is never touched."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from job_fixtures import SLEEP, JobStack, PrivateRedis, SleepSpec, private_redis_server, wait_for

import gansteer
from gansteer.v1 import optimization_pb2 as S

pytestmark = [pytest.mark.job, pytest.mark.slow]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    with private_redis_server(tmp_path / "redis", append_only=True) as server:
        yield server


def _wait(job: gansteer.Job) -> object:
    try:
        return job.wait(progress=False, timeout=120)
    except Exception as error:  # handed to the test's thread, which reports it
        return error


def test_a_running_job_survives_a_redis_outage(tmp_path: Path, private_redis: PrivateRedis) -> None:
    # A visibility timeout far longer than the outage: the job must not wait for the broker to re-deliver a message
    # it dropped or left unacknowledged.
    overrides = {"visibility_timeout_s": 300.0}
    stack = JobStack(tmp_path / "stack", env={"GANSTEER_REDIS_URL": private_redis.url}, overrides=overrides)
    stack.redis = redis.Redis.from_url(private_redis.url)
    try:
        stub = stack.start_server()[1]
        stack.start_worker()
        stack.start_worker()  # two workers: the segment's hand-over after the outage must not run it twice
        record, _ = stack.servers[0].jobs.submit(SLEEP, SleepSpec(steps=80, sleep_s=0.05), owner="")
        store = stack.servers[0].jobs.store
        wait_for(lambda: (store.get(record.id) or record).step >= 10, 60, "the job to be running")
        waited: list[object] = []
        client = gansteer.Client(stack.servers[0].address, timeout=10)
        job_handle = client.job(record.id)
        waiter = threading.Thread(target=lambda: waited.append(_wait(job_handle)), daemon=True)
        waiter.start()  # a user's `job.wait()` through the outage
        private_redis.stop()
        with pytest.raises(grpc.RpcError) as outage:  # a retryable status, not INTERNAL
            stub.GetJob(S.GetJobRequest(job_id=record.id), timeout=10)
        assert outage.value.code() == grpc.StatusCode.UNAVAILABLE and "Redis" in outage.value.details()
        time.sleep(10.0)  # the outage's length (issue 19: 10 s in the middle of a running segment)
        private_redis.start()

        def ended() -> S.Job | None:
            try:
                job = stub.GetJob(S.GetJobRequest(job_id=record.id), timeout=10).job
            except Exception:
                return None
            return job if job.state in (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED) else None

        job = wait_for(ended, 150, "the job to end after the outage", interval=0.5)  # loaded machines: slow reconnects
        assert job.state == S.JOB_STATE_SUCCEEDED, (job.error, [w.output()[-4000:] for w in stack.workers])
        result = stub.GetResult(S.GetResultRequest(job_id=record.id), timeout=10).result
        assert result.metrics["steps"] == 80
        waiter.join(60)
        client.close()
        assert len(waited) == 1 and isinstance(waited[0], gansteer.JobStatus), waited
        assert waited[0].state == gansteer.JobState.SUCCEEDED
    finally:
        stack.close()
