"""A simulated rater answers a real round-based job through the SDK: the optimization service, a worker subprocess
on the real Redis and the generation service that renders the rounds, with the test kind `test_rounds` of
job_fixtures (rounds of `items` latents, `choose` picks each). The answers go the way a person's go: shown as images,
answered with `Job.feedback`, logged with their provenance, and used by the job."""

from __future__ import annotations

from pathlib import Path

import pytest
from job_fixtures import GEN, ROUNDS, JobStack, RoundSpec, make_settings

from gansteer import AnswerKind, Client, JobState, RoundClosed
from gansteer.types import Round
from gansteer_server.servers.app import start_generation_server

pytestmark = [pytest.mark.service, pytest.mark.job, pytest.mark.slow]


def test_a_simulated_rater_drives_a_real_job_to_its_end(tmp_path: Path) -> None:
    stack = JobStack(tmp_path)
    generation = start_generation_server(make_settings(stack.registry_root), port=0, metrics_port=0)
    try:
        optimization, _ = stack.start_server()
        stack.start_worker()
        record, _ = optimization.jobs.submit(ROUNDS, RoundSpec(rounds=3, items=5, choose=2, work_steps=1), owner="")
        with Client(optimization.address, generation_target=generation.address, timeout=30) as client:
            job = client.job(record.id)
            shown: list[Round] = []

            def rater(round: Round) -> list[int]:
                images = round.images()  # rendered by the generation service from the round's latents
                assert len(images) == 5 and images[0].size == (32, 32)
                shown.append(round)
                return [len(shown) % 5, len(shown) % 5]  # the same image twice: repeats are allowed

            status = job.answer_rounds(rater, rater_id="simulated-1")
            assert status.state is JobState.SUCCEEDED, stack.workers[0].output()[-3000:]
            assert [r.round for r in shown] == [1, 2, 3] and len({r.round_id for r in shown}) == 3
            assert all(r.answer is AnswerKind.CHOICE and r.choose == 2 and r.generator == f"{GEN}@1" for r in shown)

            log = job.interactions()
            assert [entry.choice for entry in log] == [(1, 1), (2, 2), (3, 3)]
            assert [entry.round_id for entry in log] == [r.round_id for r in shown]
            assert len({entry.rater for entry in log}) == 1 and log[0].rater != "simulated-1"  # a pseudonym
            assert all(entry.latency_s > 0 and entry.time is not None and len(entry.items) == 5 for entry in log)
            result = job.result(wait=False)
            assert [[m["pick0"], m["pick1"]] for m in result.item_metrics] == [[1, 1], [2, 2], [3, 3]]

            with pytest.raises(RoundClosed) as closed:  # the job ended: its last round takes no more answers
                job.feedback(shown[-1], choice=[0, 0])
            assert closed.value.round_id == shown[-1].round_id
            assert len(job.interactions()) == 3
    finally:
        stack.close()
        generation.stop(grace=None)
