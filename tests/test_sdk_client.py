"""The client's transport rules against a scripted in-process server: retries only where safe, a deadline on every
call, the API key on every call, the server's error details, and a watch that resumes after a broken connection."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from gansteer import AsyncClient, Client, errors
from gansteer.types import JobState, ProgressEvent, StateChanged
from gansteer.v1 import common_pb2, optimization_pb2, optimization_pb2_grpc

pytestmark = pytest.mark.service

RUNNING, SUCCEEDED = optimization_pb2.JOB_STATE_RUNNING, optimization_pb2.JOB_STATE_SUCCEEDED


def _event(number: int, **payload: Any) -> optimization_pb2.JobEvent:
    return optimization_pb2.JobEvent(event_id=f"{number}-0", job_id="job-1", **payload)


EVENTS = [
    _event(1, state_change=optimization_pb2.StateChange(state=RUNNING)),
    _event(2, progress=optimization_pb2.Progress(step=1, total_steps=3, criterion={"total": 3.0})),
    _event(3, progress=optimization_pb2.Progress(step=2, total_steps=3, criterion={"total": 2.0})),
    _event(4, progress=optimization_pb2.Progress(step=3, total_steps=3, criterion={"total": 1.0})),
    _event(5, state_change=optimization_pb2.StateChange(state=SUCCEEDED, previous=RUNNING)),
]


class ScriptedOptimization(optimization_pb2_grpc.OptimizationServiceServicer):
    """Fails the first calls of each method as told, records what the client sent. The job is RUNNING until the
    event stream has delivered its final event, so that a client must follow the stream to see it end."""

    def __init__(self) -> None:
        self.final_delivered = threading.Event()
        self.calls: dict[str, list[Any]] = {}
        self.unavailable: dict[str, int] = {}
        self.metadata: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def _record(self, name: str, request: Any, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls.setdefault(name, []).append(request)
            self.metadata.append(dict(context.invocation_metadata()))
            if self.unavailable.get(name, 0) > 0:
                self.unavailable[name] -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    def SubmitJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("SubmitJob", request, context)
        if not request.spec.inversion.targets[0].png.startswith(b"\x89PNG"):
            details = common_pb2.ErrorDetails(
                details=[common_pb2.ErrorDetail(field="spec.inversion.targets[0]", reason="BAD_PNG", message="broken")]
            )
            context.set_trailing_metadata((("gansteer-error-details-bin", details.SerializeToString()),))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec.inversion.targets[0]: broken")
        job = optimization_pb2.Job(id="job-1", kind="inversion", state=optimization_pb2.JOB_STATE_QUEUED)
        return optimization_pb2.SubmitJobResponse(job_id="job-1", job=job)

    def GetJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("GetJob", request, context)
        if request.job_id == "slow":
            time.sleep(1.0)
        if request.job_id not in ("job-1", "slow"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"job_id: no job {request.job_id}")
        state = SUCCEEDED if self.final_delivered.is_set() else RUNNING
        return optimization_pb2.GetJobResponse(job=optimization_pb2.Job(id="job-1", kind="inversion", state=state))

    def WatchJob(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._record("WatchJob", request, context)
        start = next((i + 1 for i, e in enumerate(EVENTS) if e.event_id == request.after_event_id), 0)
        first_connection = len(self.calls["WatchJob"]) == 1
        for index, event in enumerate(EVENTS[start:], start):
            if first_connection and index == 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
            if index == len(EVENTS) - 1:
                self.final_delivered.set()
            yield event


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedOptimization, str]]:
    servicer = ScriptedOptimization()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    optimization_pb2_grpc.add_OptimizationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_idempotent_calls_are_retried_and_carry_the_key(scripted: tuple[ScriptedOptimization, str]) -> None:
    servicer, target = scripted
    servicer.unavailable["GetJob"] = 2
    with Client(target, api_key="secret") as client:
        assert client.job("job-1").status().state is JobState.RUNNING
    assert len(servicer.calls["GetJob"]) == 4  # two refused, then `job()` and `status()`
    assert all(m.get("authorization") == "Bearer secret" for m in servicer.metadata)


def test_submit_is_retried_with_the_same_idempotency_key(scripted: tuple[ScriptedOptimization, str]) -> None:
    servicer, target = scripted
    servicer.unavailable["SubmitJob"] = 1
    with Client(target) as client:
        job = client.invert(b"\x89PNG\r\n\x1a\n...", model="scenes-gen", budget=3)
    assert job.id == "job-1" and job.kind == "inversion"
    first, second = servicer.calls["SubmitJob"]
    assert first.spec.idempotency_key and first.spec.idempotency_key == second.spec.idempotency_key


def test_a_submit_without_idempotency_key_is_not_retried(scripted: tuple[ScriptedOptimization, str]) -> None:
    servicer, target = scripted
    servicer.unavailable["SubmitJob"] = 1
    spec = optimization_pb2.JobSpec(
        inversion=optimization_pb2.InversionSpec(targets=[common_pb2.Image(png=b"\x89PNG")])
    )
    with Client(target, retries=3) as client, pytest.raises(errors.Unavailable, match="restarting"):
        client.submit(spec)
    assert len(servicer.calls["SubmitJob"]) == 1


def test_server_errors_arrive_with_message_and_details(scripted: tuple[ScriptedOptimization, str]) -> None:
    _, target = scripted
    with Client(target) as client:
        with pytest.raises(errors.InvalidArgument) as caught:
            client.invert(b"GIF89a", model="scenes-gen")
        assert "not a decodable image file" in str(caught.value)  # refused before sending: no image at all
        with pytest.raises(errors.NotFound, match="no job nope"):
            client.job("nope")


def test_every_call_has_a_deadline(scripted: tuple[ScriptedOptimization, str]) -> None:
    _, target = scripted
    with Client(target, timeout=0.2) as client, pytest.raises(errors.DeadlineExceeded):
        client.get_job("slow")


def test_unreachable_service_raises_unavailable_after_retries() -> None:
    with (
        Client("127.0.0.1:1", retries=1, timeout=2) as client,
        pytest.raises(errors.Unavailable, match=r"127\.0\.0\.1:1"),
    ):
        client.get_job("job-1")


def test_watch_resumes_after_the_last_event(scripted: tuple[ScriptedOptimization, str]) -> None:
    servicer, target = scripted
    with Client(target) as client:
        events = list(client.job("job-1").watch())
    assert [e.event_id for e in events] == ["1-0", "2-0", "3-0", "4-0", "5-0"]
    assert [r.after_event_id for r in servicer.calls["WatchJob"]] == ["", "2-0"]
    assert isinstance(events[1], ProgressEvent) and isinstance(events[-1], StateChanged)


def test_wait_follows_the_stream_to_the_final_state(scripted: tuple[ScriptedOptimization, str]) -> None:
    servicer, target = scripted
    with Client(target) as client:
        status = client.job("job-1").wait(progress=True)
    assert status.state is JobState.SUCCEEDED
    # it followed the stream (resuming after the dropped connection) to the final event, the only way to see it end
    assert servicer.final_delivered.is_set() and [r.after_event_id for r in servicer.calls["WatchJob"]] == ["", "2-0"]


def test_async_client_watches_and_retries(scripted: tuple[ScriptedOptimization, str]) -> None:
    servicer, target = scripted
    servicer.unavailable["GetJob"] = 1

    async def story() -> list[str]:
        async with AsyncClient(target) as client:
            job = await client.job("job-1")
            ids = [event.event_id async for event in job.watch()]
            assert (await job.wait()).state is JobState.SUCCEEDED
            return ids

    assert asyncio.run(story()) == ["1-0", "2-0", "3-0", "4-0", "5-0"]


def test_embedded_without_the_server_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from gansteer import embedded

    def missing(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}", name="gansteer_server")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ImportError, match="pip install gansteer-server"), embedded():
        pass
