"""Jobs ride out a Redis outage: Redis (broker and job store in one) stops mid-job and comes back from its
append-only file; the job finishes, with no step lost or run twice in its result. The outage uses a private
redis-server on a free port, so the shared Redis is never touched."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from job_fixtures import SLEEP, JobStack, SleepSpec, wait_for

import gansteer
from gansteer.v1 import optimization_pb2 as S

pytestmark = [pytest.mark.job, pytest.mark.slow]


class PrivateRedis:
    """A redis-server with an append-only file in a temporary folder, stopped and restarted on demand."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        command += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url)
        wait_for(lambda: _pings(client), 10, "the private redis-server to answer")

    def stop(self) -> None:
        """SHUTDOWN as an operator would (the AOF is flushed), then wait for the process to end."""
        with contextlib.suppress(redis.ConnectionError):  # the reply is the connection closing
            redis.Redis.from_url(self.url).shutdown(nosave=False)
        assert self.process is not None
        self.process.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server on the PATH")
    server = PrivateRedis(tmp_path / "redis")
    server.folder.mkdir()
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


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
        time.sleep(3.0)
        private_redis.start()

        def ended() -> S.Job | None:
            try:
                job = stub.GetJob(S.GetJobRequest(job_id=record.id), timeout=10).job
            except Exception:
                return None
            return job if job.state in (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED) else None

        job = wait_for(ended, 60, "the job to end after the outage", interval=0.5)
        assert job.state == S.JOB_STATE_SUCCEEDED, (job.error, stack.workers[0].output()[-4000:])
        result = stub.GetResult(S.GetResultRequest(job_id=record.id), timeout=10).result
        assert result.metrics["steps"] == 80
        waiter.join(60)
        client.close()
        assert len(waited) == 1 and isinstance(waited[0], gansteer.JobStatus), waited
        assert waited[0].state == gansteer.JobState.SUCCEEDED
    finally:
        stack.close()
