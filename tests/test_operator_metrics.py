"""What an operator sees: a worker's job metrics (its prefork child's, through the multiprocess directory), a
service's in-flight and call metrics and the call's log line with its request id, and readiness that follows Redis
under `gansteer up`."""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from job_fixtures import SLEEP, JobStack, PrivateRedis, SleepSpec, private_redis_server, wait_for
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import GEN, LATENT, float_tensor, held, make_settings, running, shared_tiny_registry

from gansteer.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from gansteer_server.config import ANY_PORT
from gansteer_server.models import ModelRegistry
from gansteer_server.servers.calls import MAX_DETAILS, REQUEST_ID_KEY
from gansteer_server.servers.metrics import ServiceMetrics
from gansteer_server.servers.readiness import LIVENESS, READINESS, Readiness, report_serving

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# --- the worker -------------------------------------------------------------------------------------------------------


@pytest.mark.job
@pytest.mark.slow
def test_a_prefork_worker_shows_its_jobs_queue_and_checkpoints(tmp_path: Path) -> None:
    port = free_port()
    stack = JobStack(tmp_path, env={"GANSTEER_WORKER_METRICS_PORT": str(port)})
    try:
        jobs = stack.start_server()[0].jobs
        worker = stack.start_worker()
        spec = SleepSpec(steps=12, sleep_s=0.05)  # segments of 5 steps: two checkpoints, then the end
        first = jobs.submit(SLEEP, spec, owner="")[0]
        behind = [jobs.submit(SLEEP, spec, owner="")[0] for _ in range(2)]

        def queued() -> bool:
            try:
                return sample(scrape(port), "gansteer_queue_messages", queue="cpu") >= 1
            except OSError:  # the worker is still starting
                assert worker.process.poll() is None, worker.output()[-3000:]
                return False

        # One job runs, one is prefetched, the rest wait in the queue, until the worker drains it.
        wait_for(queued, 60, "a task message waiting in the queue", interval=0.2)
        store = jobs.store
        ids = [first.id, *(record.id for record in behind)]
        wait_for(lambda: all(store.get(i).state.terminal for i in ids), 60, "the jobs to end", interval=0.1)

        def settled() -> dict | None:
            s = scrape(port)
            done = sample(s, "gansteer_worker_tasks_total", kind="test_sleep", outcome="succeeded") == 3
            return s if done and sample(s, "gansteer_queue_messages", queue="cpu") == 0 else None

        samples = wait_for(settled, 10, "the metrics to show three finished jobs and an empty queue", interval=0.2)
    finally:
        stack.close()
    kind = {"kind": "test_sleep"}
    assert sample(samples, "gansteer_worker_tasks_total", outcome="segment", **kind) == 6  # 3 jobs x 2 segments
    assert sample(samples, "gansteer_job_segment_seconds_count", **kind) >= 9
    assert sample(samples, "gansteer_job_segment_seconds_sum", **kind) >= 3 * 12 * 0.05  # the sleeps, at least
    assert sample(samples, "gansteer_job_queue_wait_seconds_count", queue="cpu", **kind) >= 9
    assert sample(samples, "gansteer_job_queue_wait_seconds_sum", queue="cpu", **kind) > 0
    assert sample(samples, "gansteer_job_checkpoints_total", **kind) == 6
    assert sample(samples, "gansteer_job_redeliveries_total", **kind) == 0
    assert sample(samples, "gansteer_worker_tasks_running", **kind) == 0
    transitions = {"from_state": "queued", "to_state": "running", **kind}
    assert sample(samples, "gansteer_job_transitions_total", **transitions) == 3
    assert sample(samples, "gansteer_job_seconds_count", state="succeeded", **kind) == 3
    assert sample(samples, "gansteer_job_run_seconds_sum", state="succeeded", **kind) >= 3 * 12 * 0.05
    assert sample(samples, "gansteer_jobs", state="running") == 0
    assert sample(samples, "gansteer_redis_up") == 1
    assert sample(samples, "process_cpu_seconds_total") > 0
    assert f"job {first.id} (test_sleep): running -> succeeded" in worker.output()


# --- a service --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return shared_tiny_registry(tmp_path_factory)


def generate(stub: generation_pb2_grpc.GenerationServiceStub, **kwargs: object) -> grpc.Call:
    request = generation_pb2.GenerateRequest(
        model=common_pb2.ModelRef(name=GEN),
        latents=float_tensor(torch.zeros(1, LATENT)),
        condition=common_pb2.ClassCondition(class_ids=common_pb2.ClassIds(ids=[1])),
        format=common_pb2.IMAGE_FORMAT_TENSOR,
    )
    return stub.Generate.with_call(request, timeout=30, **kwargs)[1]


def request_id_of(call: grpc.Call) -> str:
    return dict(call.trailing_metadata() or ())[REQUEST_ID_KEY]


@pytest.mark.service
def test_calls_are_counted_in_flight_measured_and_logged_with_a_request_id(
    tiny_registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gansteer_server.servers.calls")
    settings = make_settings(tiny_registry)
    with running("generation", settings, metrics_port=ANY_PORT) as (server, channel):
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        mine = generate(stub, metadata=((REQUEST_ID_KEY, "trace-42"),))
        assert request_id_of(mine) == "trace-42"
        given = request_id_of(generate(stub))  # none sent: the server makes one and says which
        assert len(given) == 16 and given != "trace-42"
        with held(server, f"{GEN}@1") as hold, ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(generate, stub)
            assert hold.entered.wait(10)
            assert server.metrics.value("gansteer_requests_in_flight", method="Generate") == 1
            hold.release.set()
            waiting.result(timeout=30)
        assert server.metrics.value("gansteer_requests_in_flight", method="Generate") == 0
        unknown = common_pb2.ModelRef(name="x" * 5000)  # a name the log must not repeat in full
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetModel(generation_pb2.GetModelRequest(model=unknown), timeout=10)
        assert request_id_of(refused.value)  # on errors too, with the error details
        samples = scrape(server.metrics_port)
    assert sample(samples, "gansteer_requests_total", service="generation", method="Generate", code="OK") == 3
    assert sample(samples, "gansteer_request_seconds_count", service="generation", method="Generate") == 3
    assert sample(samples, "gansteer_model_load_seconds_count", service="generation", model=f"{GEN}@1", runtime="torch")
    assert sample(samples, "gansteer_models_loaded", service="generation", runtime="torch") == 1
    assert sample(samples, "gansteer_ready", service="generation") == 1
    assert sample(samples, "process_resident_memory_bytes") > 0
    lines = [r for r in caplog.records if r.name == "gansteer_server.servers.calls"]
    traced = [r for r in lines if getattr(r, "request_id", "") == "trace-42"]
    assert len(traced) == 1
    line = traced[0]
    assert (line.levelno, line.method, line.code, line.service) == (logging.INFO, "Generate", "OK", "generation")
    assert 0 < line.duration_ms < 30_000 and "trace-42" not in line.getMessage()
    assert any(getattr(r, "request_id", "") == given for r in lines)
    failed = [r for r in lines if getattr(r, "code", "") != "OK"]
    assert len(failed) == 1 and failed[0].method == "GetModel"
    assert len(failed[0].details) <= MAX_DETAILS and len(failed[0].getMessage()) < 200


# --- readiness --------------------------------------------------------------------------------------------------------


def test_readiness_follows_the_checks_and_liveness_stays() -> None:
    servicer = health.HealthServicer()
    service = "gansteer.v1.OptimizationService"
    report_serving(servicer, service)
    metrics = ServiceMetrics("optimization")
    redis_up = threading.Event()
    redis_up.set()

    def ping() -> bool:
        if not redis_up.is_set():
            raise ConnectionError("Connection refused")
        return True

    readiness = Readiness("optimization", servicer, service, {"redis": ping}, metrics, interval_s=0.05)

    def status(name: str) -> int:
        return servicer.Check(health_pb2.HealthCheckRequest(service=name), None).status

    readiness.start()
    try:
        assert all(status(name) == SERVING for name in ("", READINESS, service, LIVENESS))
        redis_up.clear()
        wait_for(lambda: status("") == NOT_SERVING, 5, "readiness to drop")
        assert status(READINESS) == status(service) == NOT_SERVING and status(LIVENESS) == SERVING
        assert metrics.value("gansteer_dependency_up", dependency="redis") == 0
        assert metrics.value("gansteer_ready") == 0
        redis_up.set()
        wait_for(lambda: status(service) == SERVING, 5, "readiness to come back")
        assert metrics.value("gansteer_ready") == 1
    finally:
        readiness.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    with private_redis_server(tmp_path) as server:
        yield server


@pytest.mark.job
@pytest.mark.service
@pytest.mark.slow
def test_killing_redis_under_gansteer_up_turns_readiness_off_within_5_s_and_back(private_redis: PrivateRedis) -> None:
    env = {**os.environ, "GANSTEER_TORCH_THREADS": "1", "GANSTEER_LOG_LEVEL": "WARNING"}
    command = [sys.executable, "-m", "gansteer.cli", "up", "--any-port", "--json"]
    up = subprocess.Popen(
        [*command, "--redis-url", f"redis://127.0.0.1:{private_redis.port}/0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert up.stdout is not None
        line = queue.Queue[str]()
        threading.Thread(target=lambda: line.put(up.stdout.readline()), daemon=True).start()
        stack = json.loads(line.get(timeout=120))
        ports = {name: int(url.rsplit(":", 1)[1].split("/")[0]) for name, url in stack["metrics"].items()}
        assert set(ports) == {"generation", "scoring", "optimization", "worker"} and len(set(ports.values())) == 4
        assert sample(scrape(ports["optimization"]), "gansteer_ready", service="optimization") == 1

        channel = grpc.insecure_channel(stack["optimization"])
        stub = health_pb2_grpc.HealthStub(channel)
        statuses: queue.Queue[tuple[float, int]] = queue.Queue()
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))

        def follow() -> None:
            try:
                for reply in watch:
                    statuses.put((time.monotonic(), reply.status))
            except grpc.RpcError:
                return  # cancelled at the end of the test

        threading.Thread(target=follow, daemon=True).start()
        assert statuses.get(timeout=10)[1] == SERVING
        killed = time.monotonic()
        private_redis.kill()
        changed, status = statuses.get(timeout=10)
        assert status == NOT_SERVING
        print(f"readiness NOT_SERVING {changed - killed:.2f} s after Redis was killed")
        assert changed - killed < 5.0
        assert stub.Check(health_pb2.HealthCheckRequest(service=LIVENESS), timeout=5).status == SERVING
        assert (
            sample(scrape(ports["optimization"]), "gansteer_dependency_up", service="optimization", dependency="redis")
            == 0
        )

        private_redis.start()
        assert statuses.get(timeout=10)[1] == SERVING
        watch.cancel()
        channel.close()
        up.send_signal(signal.SIGINT)  # Ctrl-C still stops everything
        assert up.wait(60) == 0, up.stderr.read() if up.stderr else ""
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
