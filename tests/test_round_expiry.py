"""An answer for an expired round (issue 14's "done when"): it is refused naming `round_id`, the log keeps the
answers given before the expiry once each and records nothing of the late one (nor of its resend), and the job ends
with its best result so far, made of exactly the logged answers."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from job_fixtures import ROUNDS, JobStack, RoundSpec, final_state, wait_for, watch_all

from gansteer.v1 import optimization_pb2 as S

pytestmark = [pytest.mark.job, pytest.mark.slow]
EXPIRY_S = 4.0  # long enough to answer the first round on a loaded machine, short enough to wait out the second


def test_an_answer_for_an_expired_round_is_refused_and_loses_or_doubles_nothing(tmp_path: Path) -> None:
    stack = JobStack(tmp_path, overrides={"round_expiry_s": EXPIRY_S})
    try:
        stub = stack.start_server()[1]
        stack.start_worker()
        record, _ = stack.servers[0].jobs.submit(ROUNDS, RoundSpec(rounds=3, items=4, choose=2), owner="")

        def waiting(after: str = "") -> S.Job | None:
            job = stub.GetJob(S.GetJobRequest(job_id=record.id), timeout=10).job
            open_now = job.state == S.JOB_STATE_WAITING_FOR_FEEDBACK and job.pending_round.round_id != after
            return job if open_now else None

        def answer(job: S.Job, picks: list[int], key: str) -> S.SubmitFeedbackResponse:
            request = S.SubmitFeedbackRequest(
                job_id=job.id, round_id=job.pending_round.round_id, choice=S.Choice(indices=picks), idempotency_key=key
            )
            return stub.SubmitFeedback(request, timeout=10)

        first = wait_for(waiting, 60, "the first round")
        assert not answer(first, [3, 3], "k1").duplicate  # answered in time
        second = wait_for(lambda: waiting(first.pending_round.round_id), 60, "the second round")
        expires_at = second.pending_round.expires_at.ToNanoseconds() / 1e9
        assert expires_at > time.time()  # it is open now, and it will expire
        wait_for(lambda: time.time() > expires_at + 0.1, EXPIRY_S + 5, "the second round to expire")

        for _ in range(2):  # the late answer, then its resend with the same key
            with pytest.raises(grpc.RpcError) as caught:
                answer(second, [0, 1], "k2")
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert caught.value.details().startswith("round_id:")

        events = watch_all(stub, record.id, timeout=60)
        assert final_state(events) == S.JOB_STATE_CANCELLED
        assert any("round 2 expired" in event.state_change.message for event in events)
        log = stub.ListInteractions(S.ListInteractionsRequest(job_id=record.id), timeout=10).interactions
        assert [(entry.idempotency_key, list(entry.choice.indices)) for entry in log] == [("k1", [3, 3])]
        result = stub.GetResult(S.GetResultRequest(job_id=record.id), timeout=10).result
        assert result.metrics["rounds_answered"] == 1
        assert [[int(m.values[f"pick{i}"]) for i in range(2)] for m in result.item_metrics] == [[3, 3]]
    finally:
        stack.close()
