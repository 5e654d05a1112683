"""Rounds that wait for people: a job opens a round, waits in WAITING_FOR_FEEDBACK holding no worker, takes a
simulated rater's answers through SubmitFeedback (the path a person's answers take), and goes on. Answers are never
lost nor doubled: not when an answer is resent, arrives late, or a worker is killed while it uses them; the
interaction log is the witness.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from job_fixtures import ROUNDS, JobStack, OptimizationStub, RoundSpec, final_state, wait_for, watch_all

from gansteer.tensors import from_tensor_proto
from gansteer.v1 import optimization_pb2 as S

pytestmark = [pytest.mark.job, pytest.mark.slow]


def picker(round_: S.FeedbackRound) -> list[int]:
    """A simulated person: picks by the first latent coordinate, the best item twice (repeats are allowed)."""
    first = [float(from_tensor_proto(item.latent)[0]) for item in round_.items]
    order = sorted(range(len(first)), key=lambda i: -first[i])
    return [order[0], *order][: round_.choose]


def wait_round(stub: OptimizationStub, job_id: str, after: str = "") -> S.Job:
    """The job once it waits on a round other than `after` (or has ended)."""

    def waiting() -> S.Job | None:
        job = stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=10).job
        open_round = job.state == S.JOB_STATE_WAITING_FOR_FEEDBACK and job.pending_round.round_id != after
        ended = job.state in (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)
        return job if open_round or ended else None

    return wait_for(waiting, 60, f"job {job_id} to open a round after {after!r}")


def answer(stub: OptimizationStub, job: S.Job, key: str = "", rater: str = "sim-1") -> S.SubmitFeedbackResponse:
    request = S.SubmitFeedbackRequest(
        job_id=job.id,
        round_id=job.pending_round.round_id,
        choice=S.Choice(indices=picker(job.pending_round)),
        rater=rater,
        idempotency_key=key,
        latency_s=1.5,
    )
    return stub.SubmitFeedback(request, timeout=10)


def broker_messages(stack: JobStack) -> int:
    """Task messages queued or held unacknowledged by a worker, under this stack's prefix."""
    count = 0
    for key in stack.redis.scan_iter(match=f"{stack.prefix}celery:*"):
        kind = stack.redis.type(key)
        if kind == b"list":
            count += stack.redis.llen(key)
        elif key.endswith(b"celery:unacked"):
            count += stack.redis.hlen(key)
    return count


def submit(stack: JobStack, spec: RoundSpec) -> str:
    record, _ = stack.servers[0].jobs.submit(ROUNDS, spec, owner="")
    return record.id


def test_a_job_waits_for_each_round_holding_no_worker_and_goes_on_with_the_answers(tmp_path: Path) -> None:
    stack = JobStack(tmp_path)
    try:
        stub = stack.start_server()[1]
        stack.start_worker()
        job_id = submit(stack, RoundSpec(rounds=3, items=6, choose=3, work_steps=2))
        store = stack.servers[0].jobs.store
        given: list[list[int]] = []
        job, previous = wait_round(stub, job_id), ""
        while job.state == S.JOB_STATE_WAITING_FOR_FEEDBACK:
            pending = job.pending_round
            assert pending.answer == S.ANSWER_KIND_CHOICE and pending.choose == 3 and len(pending.items) == 6
            assert pending.round == len(given) + 1 and pending.expires_at.seconds > time.time()
            assert all(len(from_tensor_proto(item.latent)) == 16 for item in pending.items)
            # No worker holds the job: no lease, and no task message queued or unacknowledged.
            wait_for(lambda: broker_messages(stack) == 0, 30, "the segment that opened the round to be acknowledged")
            record = store.get(job_id)
            assert record.lease_owner == "" and record.state.value == "waiting_for_feedback"
            given.append(picker(pending))
            reply = answer(stub, job, key=f"answer-{pending.round}")
            assert not reply.duplicate
            if reply.job.state == S.JOB_STATE_WAITING_FOR_FEEDBACK:  # a fast worker already opened the next round
                now = stub.GetJob(S.GetJobRequest(job_id=job_id, view=S.JOB_VIEW_FULL), timeout=10).job
                assert now.pending_round.round > pending.round, "the answered round is still pending"
            else:
                assert reply.job.state in (S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING, S.JOB_STATE_SUCCEEDED)
            previous = pending.round_id
            job = wait_round(stub, job_id, after=previous)

        events = watch_all(stub, job_id)
        assert final_state(events) == S.JOB_STATE_SUCCEEDED, stack.workers[0].output()[-3000:]
        assert sum(e.HasField("feedback_round") for e in events) == 3
        result = stub.GetResult(S.GetResultRequest(job_id=job_id), timeout=10).result
        received = [[int(m.values[f"pick{i}"]) for i in range(3)] for m in result.item_metrics]
        log = stub.ListInteractions(S.ListInteractionsRequest(job_id=job_id), timeout=10).interactions
        assert received == given == [list(entry.choice.indices) for entry in log]
        assert [entry.round for entry in log] == [1, 2, 3]
        for entry in log:  # provenance: a pseudonym, the shown items with their latents, the model, latency, time
            assert entry.rater and entry.rater != "sim-1" and entry.latency_s == 1.5 and entry.time.seconds
            assert len(entry.items) == 6 and entry.generator.name == "tiny-gen" and entry.generator.version == 1
    finally:
        stack.close()


def test_resent_late_and_malformed_answers_record_nothing_twice(tmp_path: Path) -> None:
    stack = JobStack(tmp_path)
    try:
        stub = stack.start_server()[1]
        stack.start_worker()
        job_id = submit(stack, RoundSpec(rounds=2, items=4, choose=2))
        job = wait_round(stub, job_id)
        round_id = job.pending_round.round_id

        def refused(request: S.SubmitFeedbackRequest) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as caught:
                stub.SubmitFeedback(request, timeout=10)
            return caught.value

        bad = [
            (S.SubmitFeedbackRequest(job_id=job_id, round_id=round_id, choice=S.Choice(indices=[0])), "choice.indices"),
            (
                S.SubmitFeedbackRequest(job_id=job_id, round_id=round_id, choice=S.Choice(indices=[0, 4])),
                "choice.indices[1]",
            ),
            (S.SubmitFeedbackRequest(job_id=job_id, round_id=round_id, pairwise=S.PairwiseJudgements()), "choice"),
        ]
        for request, field in bad:
            error = refused(request)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(f"{field}:")
        error = refused(S.SubmitFeedbackRequest(job_id=job_id, round_id="0" * 16, choice=S.Choice(indices=[0, 0])))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION

        first = answer(stub, job, key="k1")
        again = answer(stub, job, key="k1")  # the client did not hear the reply and resends
        assert not first.duplicate and again.duplicate
        late = refused(
            S.SubmitFeedbackRequest(job_id=job_id, round_id=round_id, choice=S.Choice(indices=[1, 1]), rater="sim-2")
        )
        assert late.code() == grpc.StatusCode.FAILED_PRECONDITION and "no longer open" in late.details()

        job = wait_round(stub, job_id, after=round_id)
        answer(stub, job, key="k2")
        assert final_state(watch_all(stub, job_id)) == S.JOB_STATE_SUCCEEDED
        log = stub.ListInteractions(S.ListInteractionsRequest(job_id=job_id), timeout=10).interactions
        assert [entry.idempotency_key for entry in log] == ["k1", "k2"]
        result = stub.GetResult(S.GetResultRequest(job_id=job_id), timeout=10).result
        assert result.metrics["rounds_answered"] == 2
    finally:
        stack.close()


def test_a_worker_killed_while_it_uses_the_answers_loses_and_doubles_nothing(tmp_path: Path) -> None:
    stack = JobStack(tmp_path, overrides={"visibility_timeout_s": 4.0, "segment_seconds": 1.0, "segment_steps": 1000})
    try:
        stub = stack.start_server()[1]
        first = stack.start_worker("first")
        job_id = submit(stack, RoundSpec(rounds=2, items=5, choose=2, work_steps=30, sleep_s=0.1))
        store = stack.servers[0].jobs.store
        job = wait_round(stub, job_id)
        given = [picker(job.pending_round)]
        answer(stub, job, key="r1")

        def using_the_answers() -> bool:  # the segment after the answer runs, its checkpoint not yet written
            record = store.get(job_id)
            return record is not None and record.state.value == "running" and record.deliver_round != ""

        wait_for(using_the_answers, 60, "the segment that received the answers", interval=0.005)
        first.kill()
        stack.start_worker("second")
        job = wait_round(stub, job_id, after=job.pending_round.round_id)
        assert job.state == S.JOB_STATE_WAITING_FOR_FEEDBACK and job.pending_round.round == 2
        given.append(picker(job.pending_round))
        answer(stub, job, key="r2")

        events = watch_all(stub, job_id, timeout=120)
        assert final_state(events) == S.JOB_STATE_SUCCEEDED, stack.workers[-1].output()[-3000:]
        assert any("after a lost worker" in e.state_change.message for e in events)
        result = stub.GetResult(S.GetResultRequest(job_id=job_id), timeout=10).result
        received = [[int(m.values[f"pick{i}"]) for i in range(2)] for m in result.item_metrics]
        log = stub.ListInteractions(S.ListInteractionsRequest(job_id=job_id), timeout=10).interactions
        assert received == given == [list(entry.choice.indices) for entry in log]
    finally:
        stack.close()
