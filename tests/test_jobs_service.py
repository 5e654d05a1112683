"""The jobs API as a user meets it: a real optimization service, a real Celery worker in a subprocess, the real Redis.

Submit an inversion and watch it to its result; reconnect a watcher; cancel; submit bad specs; duplicate task
messages; a task that kills its worker every time; results that expire; jobs kept apart per API key.
"""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from job_fixtures import (
    CRASH,
    GEN,
    SLEEP,
    JobStack,
    SleepSpec,
    evolution_spec,
    final_state,
    inversion_spec,
    target_png,
    wait_for,
    watch_all,
)
from PIL import Image

from gansteer.tensors import from_tensor_proto, png_decode
from gansteer.v1 import common_pb2, optimization_pb2, optimization_pb2_grpc
from gansteer_server.jobs.records import JobState
from gansteer_server.jobs.worker import start_worker_thread
from gansteer_server.models import ModelRegistry
from gansteer_server.models.store import ModelStore
from gansteer_server.servers.errors import error_details
from gansteer_server.servers.optimization import OptimizationServicer
from gansteer_server.wire.errors import ServiceError, invalid_argument

pytestmark = [pytest.mark.job, pytest.mark.service]
S = optimization_pb2


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobStack]:
    # One delivery per segment: the prefork pool reports a dead child every 5 s, so each re-delivery of the crashing
    # task costs that long; the recovery tests cover a second delivery.
    stack = JobStack(
        tmp_path_factory.mktemp("jobs"), env={"GANSTEER_MAX_IMAGE_PIXELS": "4096"}, overrides={"max_deliveries": 1}
    )
    try:
        stack.start_worker()
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def stub(stack: JobStack) -> optimization_pb2_grpc.OptimizationServiceStub:
    return stack.start_server()[1]


def submit(stub: object, spec: optimization_pb2.JobSpec) -> str:
    return stub.SubmitJob(S.SubmitJobRequest(spec=spec), timeout=30).job_id  # type: ignore[attr-defined]


def submit_sleep(stack: JobStack, steps: int, sleep_s: float, kind: object = SLEEP) -> str:
    jobs = stack.servers[0].jobs
    record, _ = jobs.submit(kind, SleepSpec(steps=steps, sleep_s=sleep_s), owner="")  # type: ignore[arg-type]
    return record.id


def test_inversion_runs_to_its_result_and_events_arrive_in_order(stub: object) -> None:
    job_id = submit(stub, inversion_spec(budget=12, targets=2, preview_every=5, seed=3))
    events = watch_all(stub, job_id)  # type: ignore[arg-type]

    kinds = [e.WhichOneof("payload") for e in events]
    states = [e.state_change.state for e in events if e.HasField("state_change")]
    assert states == [S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING, S.JOB_STATE_SUCCEEDED]
    assert kinds[-2:] == ["result", "state_change"]
    assert [e.event_id for e in events] == sorted(e.event_id for e in events)  # stream ids increase
    steps = [e.progress.step for e in events if e.HasField("progress")]
    assert steps == list(range(1, 13))  # one progress event per step, across three segments of five steps
    assert all(math.isfinite(e.progress.criterion["total"]) for e in events if e.HasField("progress"))
    previews = [e.preview for e in events if e.HasField("preview")]
    assert [p.step for p in previews] == [5, 10]
    assert png_decode(previews[0].images.images[0].png).shape == (32, 32, 3)

    result = stub.GetResult(S.GetResultRequest(job_id=job_id), timeout=10).result  # type: ignore[attr-defined]
    assert len(result.images.images) == 2
    image = Image.open(io.BytesIO(result.images.images[0].png))
    assert image.size == (32, 32)
    assert from_tensor_proto(result.latents).shape == (2, 16)
    assert from_tensor_proto(result.class_embeddings).shape == (2, 8)
    assert {"criterion", "psnr", "ssim", "feature_distance"} <= set(result.item_metrics[0].values)
    assert from_tensor_proto(result.curve.values["total"]).shape == (2, 12)
    assert np.all(np.diff(from_tensor_proto(result.curve.values["total"]), axis=1) <= 0)  # best so far
    tensors = stub.GetResult(  # type: ignore[attr-defined]
        S.GetResultRequest(job_id=job_id, image_format=common_pb2.IMAGE_FORMAT_TENSOR), timeout=10
    ).result
    assert from_tensor_proto(tensors.images.tensor).shape == (2, 3, 32, 32)

    job = stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=10).job  # type: ignore[attr-defined]
    assert (job.state, job.step, job.total_steps, job.kind) == (S.JOB_STATE_SUCCEEDED, 12, 12, "inversion")
    assert job.last_event_id == events[-1].event_id
    assert job.spec.inversion.generator.name == GEN  # JOB_VIEW_FULL by default
    assert job.expires_at.seconds > job.finished_at.seconds


def test_the_l2_preset_still_reports_the_feature_distance(stub: object) -> None:
    job_id = submit(stub, inversion_spec(budget=3, criterion="l2", seed=4))
    watch_all(stub, job_id)  # type: ignore[arg-type]
    result = stub.GetResult(S.GetResultRequest(job_id=job_id), timeout=10).result  # type: ignore[attr-defined]
    values = result.item_metrics[0].values
    assert math.isfinite(values["feature_distance"]) and values["feature_distance"] >= 0


def test_a_watcher_that_reconnects_after_an_event_misses_nothing(stack: JobStack, stub: object) -> None:
    job_id = submit_sleep(stack, steps=8, sleep_s=0.02)
    request = S.WatchJobRequest(job_id=job_id)
    first: list[optimization_pb2.JobEvent] = []
    stream = stub.WatchJob(request, timeout=30)  # type: ignore[attr-defined]
    for event in stream:
        first.append(event)
        if len(first) == 4:
            stream.cancel()  # the client goes away mid-stream
            break
    rest = watch_all(stub, job_id, after=first[-1].event_id)  # type: ignore[arg-type]
    everything = watch_all(stub, job_id)  # type: ignore[arg-type]
    assert [e.event_id for e in first + rest] == [e.event_id for e in everything]
    assert final_state(everything) == S.JOB_STATE_SUCCEEDED
    # Resuming after the final event ends at once.
    assert watch_all(stub, job_id, after=everything[-1].event_id) == []  # type: ignore[arg-type]


def test_cancel_stops_a_running_job_within_a_step(stack: JobStack, stub: object) -> None:
    job_id = submit_sleep(stack, steps=400, sleep_s=0.05)
    stream = stub.WatchJob(S.WatchJobRequest(job_id=job_id), timeout=30)  # type: ignore[attr-defined]
    events = []
    for event in stream:
        events.append(event)
        if event.HasField("progress") and event.progress.step == 3:
            job = stub.CancelJob(S.CancelJobRequest(job_id=job_id, reason="enough"), timeout=10).job  # type: ignore[attr-defined]
            assert job.cancel_requested
            at_cancel = job.step
    assert final_state(events) == S.JOB_STATE_CANCELLED
    last_step = max(e.progress.step for e in events if e.HasField("progress"))
    assert last_step <= at_cancel + 2  # the flag is read before every step
    assert events[-1].state_change.message == "enough"
    # A cancelled job keeps its best result so far.
    result = stub.GetResult(S.GetResultRequest(job_id=job_id), timeout=10).result  # type: ignore[attr-defined]
    assert result.metrics["steps"] == last_step


def test_cancelling_a_queued_job_needs_no_worker(stub: object, stack: JobStack) -> None:
    blocker = submit_sleep(stack, steps=30, sleep_s=0.05)  # keeps the single worker busy
    wait_for(lambda: stack.servers[0].jobs.store.get(blocker).state is JobState.RUNNING, 30, "the blocker to run")
    job_id = submit_sleep(stack, steps=5, sleep_s=0.01)
    job = stub.CancelJob(S.CancelJobRequest(job_id=job_id), timeout=10).job  # type: ignore[attr-defined]
    assert job.state == S.JOB_STATE_CANCELLED
    with pytest.raises(grpc.RpcError) as error:
        stub.GetResult(S.GetResultRequest(job_id=job_id), timeout=10)  # type: ignore[attr-defined]
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stub.CancelJob(S.CancelJobRequest(job_id=blocker), timeout=10)  # type: ignore[attr-defined]


def _bad(**fields: object) -> optimization_pb2.JobSpec:
    return inversion_spec(**fields)


def _with(change: object) -> optimization_pb2.JobSpec:
    spec = inversion_spec()
    change(spec.inversion)  # type: ignore[operator]
    return spec


BAD_SPECS = [
    ("unknown model", _with(lambda s: s.generator.CopyFrom(common_pb2.ModelRef(name="no-such-gen"))),
     grpc.StatusCode.NOT_FOUND, "spec.inversion.generator"),
    ("wrong model kind", _with(lambda s: s.generator.CopyFrom(common_pb2.ModelRef(name="tiny-clf"))),
     grpc.StatusCode.INVALID_ARGUMENT, "spec.inversion.generator"),
    ("discriminator of the wrong kind", _with(lambda s: s.discriminator.CopyFrom(common_pb2.ModelRef(name=GEN))),
     grpc.StatusCode.INVALID_ARGUMENT, "spec.inversion.discriminator"),
    ("unknown optimizer", _with(lambda s: setattr(s.optimizer, "name", "sgd-ish")),
     grpc.StatusCode.INVALID_ARGUMENT, "spec.inversion.optimizer.name"),
    ("budget of zero", _bad(budget=0), grpc.StatusCode.INVALID_ARGUMENT, "spec.inversion.budget.amount"),
    ("budget above the limit", _bad(budget=10**9), grpc.StatusCode.INVALID_ARGUMENT, "spec.inversion.budget.amount"),
    ("no targets", _with(lambda s: s.ClearField("targets")),
     grpc.StatusCode.INVALID_ARGUMENT, "spec.inversion.targets"),
    ("empty target", _with(lambda s: s.targets[0].CopyFrom(common_pb2.Image(png=b""))),
     grpc.StatusCode.INVALID_ARGUMENT, "spec.inversion.targets[0].png"),
    ("undecodable target", _with(lambda s: s.targets[0].CopyFrom(common_pb2.Image(png=b"\x89PNG not really"))),
     grpc.StatusCode.INVALID_ARGUMENT, "spec.inversion.targets[0].png"),
    ("target above the pixel limit", _with(lambda s: s.targets.add(png=target_png(1, size=80))),
     grpc.StatusCode.INVALID_ARGUMENT, "spec.inversion.targets[1].png"),
    ("NaN weight", _bad(lambda_l=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "spec.inversion.lambda_l"),
    ("negative weight", _bad(lambda_r=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "spec.inversion.lambda_r"),
    ("overflowing weight", _bad(lambda_l=1e308), grpc.StatusCode.INVALID_ARGUMENT, "spec.inversion.lambda_l"),
    ("overflowing learning rate", _with(lambda s: setattr(s.optimizer, "learning_rate", 1e30)),
     grpc.StatusCode.INVALID_ARGUMENT, "spec.inversion.optimizer.learning_rate"),
    ("unknown preset", _bad(criterion="vibes"), grpc.StatusCode.INVALID_ARGUMENT, "spec.inversion.criterion"),
    ("class out of range", _bad(conditioned_class=99), grpc.StatusCode.INVALID_ARGUMENT,
     "spec.inversion.conditioned_class"),
    ("priority out of range", _bad(priority=12), grpc.StatusCode.INVALID_ARGUMENT, "spec.priority"),
    ("no kind", optimization_pb2.JobSpec(), grpc.StatusCode.INVALID_ARGUMENT, "spec.kind"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "spec", "code", "field"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_a_bad_spec_is_refused_at_submission_naming_the_field(
    stub: object, case: str, spec: optimization_pb2.JobSpec, code: grpc.StatusCode, field: str
) -> None:
    before = len(stub.ListJobs(S.ListJobsRequest(page_size=500), timeout=10).jobs)  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as error:
        submit(stub, spec)
    assert error.value.code() == code, error.value.details()
    assert error.value.details().startswith(f"{field}:"), error.value.details()
    assert [d.field for d in error_details(error.value)] == [field]
    after = len(stub.ListJobs(S.ListJobsRequest(page_size=500), timeout=10).jobs)  # type: ignore[attr-defined]
    assert after == before  # nothing was recorded, so nothing reached a worker


def test_targets_of_another_size_are_resized(stub: object) -> None:
    spec = inversion_spec(budget=2)
    spec.inversion.targets.add(png=target_png(7, size=50))
    job_id = submit(stub, spec)
    assert final_state(watch_all(stub, job_id)) == S.JOB_STATE_SUCCEEDED  # type: ignore[arg-type]


def test_list_jobs_filters_by_labels_states_and_kind(stub: object) -> None:
    run = uuid.uuid4().hex[:8]  # labels of this test only: the module's other jobs share the store
    done = submit(stub, inversion_spec(budget=2, labels={"run": run, "side": "a"}))
    assert final_state(watch_all(stub, done)) == S.JOB_STATE_SUCCEEDED  # type: ignore[arg-type]
    evolution = evolution_spec()
    evolution.labels.update({"run": run, "side": "b"})
    other = submit(stub, evolution)

    def listed(**fields: object) -> list[str]:
        request = S.ListJobsRequest(labels={"run": run, **fields.pop("labels", {})}, **fields)  # type: ignore[arg-type]
        return [job.id for job in stub.ListJobs(request, timeout=10).jobs]  # type: ignore[attr-defined]

    assert listed() == [other, done]  # newest first
    assert listed(labels={"side": "a"}) == [done]
    assert listed(labels={"side": "c"}) == []
    assert listed(states=[S.JOB_STATE_SUCCEEDED]) == [done]
    assert listed(kind="interactive_evolution") == [other]
    assert listed(kind="inversion", states=[S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING]) == []
    stub.CancelJob(S.CancelJobRequest(job_id=other), timeout=10)  # type: ignore[attr-defined]


def test_the_same_idempotency_key_returns_the_first_job(stub: object) -> None:
    spec = inversion_spec(budget=2, idempotency_key="once-only")
    first = stub.SubmitJob(S.SubmitJobRequest(spec=spec), timeout=30)  # type: ignore[attr-defined]
    again = stub.SubmitJob(S.SubmitJobRequest(spec=spec), timeout=30)  # type: ignore[attr-defined]
    assert (again.job_id, again.existing, first.existing) == (first.job_id, True, False)


def test_duplicate_task_messages_stand_down(stack: JobStack, stub: object) -> None:
    """Re-delivered copies of a job's tasks (celery #5935) find the lease held or the segment past, and do
    nothing: the job runs each step once and ends with one result."""
    job_id = submit_sleep(stack, steps=20, sleep_s=0.03)
    jobs = stack.servers[0].jobs
    wait_for(lambda: jobs.store.get(job_id).segment >= 1, 30, "the second segment")
    record = jobs.store.get(job_id)
    for segment in (0, record.segment, record.segment):
        jobs.enqueue(record, segment)
    events = watch_all(stub, job_id)  # type: ignore[arg-type]
    assert final_state(events) == S.JOB_STATE_SUCCEEDED
    assert sum(e.HasField("result") for e in events) == 1
    steps = [e.progress.step for e in events if e.HasField("progress")]
    assert steps == list(range(1, 21))  # no step ran twice
    wait_for(lambda: "stale" in stack.workers[0].output(), 10, "the duplicates to be seen as stale")


def test_a_task_that_kills_its_worker_every_time_fails_at_the_delivery_cap(stack: JobStack, stub: object) -> None:
    job_id = submit_sleep(stack, steps=5, sleep_s=0.0, kind=CRASH)
    events = watch_all(stub, job_id)  # type: ignore[arg-type]
    assert final_state(events) == S.JOB_STATE_FAILED
    job = stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=10).job  # type: ignore[attr-defined]
    assert job.error_details[0].reason == "DELIVERY_CAP"
    assert "delivered 2 times" in job.error
    # The worker's pool replaced the killed child and serves the next job.
    assert final_state(watch_all(stub, submit_sleep(stack, steps=2, sleep_s=0.0))) == S.JOB_STATE_SUCCEEDED  # type: ignore[arg-type]


def test_results_expire_after_the_ttl(tmp_path: Path) -> None:
    """Also runs the in-thread worker (the embedded mode's) against the real Redis."""
    stack = JobStack(tmp_path, env={"GANSTEER_JOB_RESULT_TTL_S": "2"})
    try:
        stub = stack.start_server()[1]
        with start_worker_thread(stack.settings):
            job_id = submit(stub, inversion_spec(budget=2))
            assert final_state(watch_all(stub, job_id)) == S.JOB_STATE_SUCCEEDED
            stub.GetResult(S.GetResultRequest(job_id=job_id), timeout=10)
        keys = lambda: list(stack.redis.scan_iter(match=f"{stack.prefix}job:{job_id}*"))  # noqa: E731
        wait_for(lambda: not keys(), 6, "the job's keys to expire")
        with pytest.raises(grpc.RpcError) as error:
            stub.GetResult(S.GetResultRequest(job_id=job_id), timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        stack.close()


def test_with_auth_on_callers_see_only_their_own_jobs(stack: JobStack) -> None:
    server, _ = stack.start_server(GANSTEER_API_KEYS="alice-key,bob-key")
    channel = grpc.insecure_channel(server.address)
    stub = optimization_pb2_grpc.OptimizationServiceStub(channel)
    alice, bob = (("authorization", "Bearer alice-key"),), (("authorization", "Bearer bob-key"),)
    spec = inversion_spec(budget=1)
    mine = {stub.SubmitJob(S.SubmitJobRequest(spec=spec), metadata=alice, timeout=30).job_id for _ in range(2)}
    theirs = stub.SubmitJob(S.SubmitJobRequest(spec=spec), metadata=bob, timeout=30).job_id
    listed = stub.ListJobs(S.ListJobsRequest(), metadata=alice, timeout=10).jobs
    assert {j.id for j in listed} == mine
    assert {j.owner for j in listed} == {listed[0].owner} and listed[0].owner.startswith("key-")
    page = stub.ListJobs(S.ListJobsRequest(page_size=1), metadata=alice, timeout=10)
    second = stub.ListJobs(S.ListJobsRequest(page_size=1, page_token=page.next_page_token), metadata=alice, timeout=10)
    assert {page.jobs[0].id, second.jobs[0].id} == mine  # newest first, a page at a time
    for call, request in (
        (stub.GetJob, S.GetJobRequest(job_id=theirs)),
        (stub.CancelJob, S.CancelJobRequest(job_id=theirs)),
        (stub.GetResult, S.GetResultRequest(job_id=theirs)),
    ):
        with pytest.raises(grpc.RpcError) as error:
            call(request, metadata=alice, timeout=10)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        stub.ListJobs(S.ListJobsRequest(), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # no key needed for health checks


def test_an_echoed_value_is_capped_in_the_status_and_its_details(stub: object) -> None:
    """A huge job id is refused as INVALID_ARGUMENT (not RESOURCE_EXHAUSTED from the metadata limit), and the
    status and the error trailer carry at most a few hundred characters of it, with its length."""
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetJob(S.GetJobRequest(job_id="a" * 9000), timeout=10)  # type: ignore[attr-defined]
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "job_id: a text of 9000 characters is not a job id (24 hex digits)"
    (detail,) = error_details(error)
    assert detail.field == "job_id" and detail.reason == "BAD_JOB_ID"


def test_every_error_message_is_capped() -> None:
    """The safety net under every echo: a ServiceError never carries more than a few hundred characters."""
    error = invalid_argument("x" * 1000, "y" * 100_000)
    assert len(error.message) < 600 and error.message.endswith("(100000 characters)")
    assert len(error.field) < 300 and error.field.endswith("(1000 characters)")


def test_an_idempotency_key_reused_with_another_spec_is_refused(stub: object) -> None:
    first = inversion_spec(budget=2, idempotency_key="one-key")
    stub.SubmitJob(S.SubmitJobRequest(spec=first), timeout=30)  # type: ignore[attr-defined]
    other = inversion_spec(budget=3, idempotency_key="one-key")
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitJob(S.SubmitJobRequest(spec=other), timeout=30)  # type: ignore[attr-defined]
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert caught.value.details().startswith("spec.idempotency_key:")


class _ExpiredCall:
    """The servicer's view of a call whose client's deadline passed while the spec was being checked."""

    def time_remaining(self) -> float:
        return -0.5

    def invocation_metadata(self) -> tuple[()]:
        return ()


def test_a_submission_past_its_deadline_creates_no_job(stack: JobStack, stub: object) -> None:
    jobs = stack.servers[0].jobs
    servicer = OptimizationServicer(jobs, ModelStore(ModelRegistry([stack.registry_root])))
    before = jobs.store.list_ids(None, limit=1000)
    with pytest.raises(ServiceError) as caught:
        servicer.SubmitJob(S.SubmitJobRequest(spec=inversion_spec(budget=2)), _ExpiredCall())  # type: ignore[arg-type]
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert jobs.store.list_ids(None, limit=1000) == before
