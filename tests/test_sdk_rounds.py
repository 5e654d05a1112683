"""Rounds of a human-in-the-loop job through the SDK, against a scripted in-process server that plays the jobs API's
part: a job opens a choice round, then a pairwise round, then succeeds. A simulated rater answers through
`Job.answer_rounds` (the path a person's answers take too), a person's UI through `Job.rounds()` and
`Job.feedback`; retries carry the same idempotency key, so the log holds each answer once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest

from gansteer import (
    Answer,
    AnswerKind,
    AsyncClient,
    AsyncRound,
    Client,
    JobState,
    Round,
    RoundClosed,
    tensors,
)
from gansteer.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    optimization_pb2,
    optimization_pb2_grpc,
)

pytestmark = pytest.mark.service

opt = optimization_pb2
LATENT = 4


def _item(index: int, seed: int) -> opt.RoundItem:
    latent = np.random.default_rng(seed).standard_normal(LATENT).astype(np.float32)
    return opt.RoundItem(
        item_id=f"i{index}",
        seed=seed,
        latent=tensors.to_tensor_proto(latent),
        condition=common_pb2.ClassCondition(class_ids=common_pb2.ClassIds(ids=[index % 3])),
    )


ROUNDS = [
    opt.FeedbackRound(
        round_id="r1",
        round=1,
        answer=opt.ANSWER_KIND_CHOICE,
        choose=2,
        allow_repeats=True,
        items=[_item(i, 10 + i) for i in range(4)],
        generator=common_pb2.ModelRef(name="gen", version=3),
        answers_required=1,
    ),
    opt.FeedbackRound(
        round_id="r2",
        round=2,
        answer=opt.ANSWER_KIND_PAIRWISE,
        num_pairs=2,
        items=[_item(i, 20 + i) for i in range(4)],
        pairs=[opt.RoundPair(left=0, right=1), opt.RoundPair(left=3, right=2)],
        generator=common_pb2.ModelRef(name="gen", version=3),
        answers_required=1,
    ),
]


class RoundsServer(optimization_pb2_grpc.OptimizationServiceServicer):
    """One job that waits on ROUNDS in turn and succeeds after the last; answers are logged once per key."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.state = opt.JOB_STATE_RUNNING
        self.open = -1  # index into ROUNDS of the open round
        self.events: list[opt.JobEvent] = []
        self.log: list[opt.Interaction] = []
        self.requests: list[opt.SubmitFeedbackRequest] = []
        self.outcomes: dict[str, opt.Job] = {}
        self.drop_reply_once = False  # record the answer, then answer UNAVAILABLE (a reply lost on the way)
        with self.lock:
            self._event(state_change=opt.StateChange(state=opt.JOB_STATE_RUNNING))
            self._open_next()

    def _event(self, **payload: Any) -> None:
        self.events.append(opt.JobEvent(event_id=f"{len(self.events) + 1}-0", job_id="job-1", **payload))
        self.lock.notify_all()

    def _set_state(self, state: int) -> None:
        self._event(state_change=opt.StateChange(state=state, previous=self.state))
        self.state = state

    def _open_next(self) -> None:
        self.open += 1
        if self.open == len(ROUNDS):
            self._set_state(opt.JOB_STATE_SUCCEEDED)
            return
        self._event(feedback_round=ROUNDS[self.open])
        self._set_state(opt.JOB_STATE_WAITING_FOR_FEEDBACK)

    def _job(self) -> opt.Job:
        job = opt.Job(id="job-1", kind="test_rounds", state=self.state, last_event_id=self.events[-1].event_id)
        if self.state == opt.JOB_STATE_WAITING_FOR_FEEDBACK:
            job.pending_round.CopyFrom(ROUNDS[self.open])
        return job

    def GetJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            return opt.GetJobResponse(job=self._job())

    def WatchJob(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with self.lock:
            ids = [e.event_id for e in self.events]
        sent = ids.index(request.after_event_id) + 1 if request.after_event_id else 0
        while context.is_active():
            with self.lock:
                if sent == len(self.events):
                    self.lock.wait(0.1)
                pending = self.events[sent:]
            for event in pending:
                yield event
                sent += 1
                change = event.state_change
                if event.HasField("state_change") and change.state == opt.JOB_STATE_SUCCEEDED:
                    return

    def SubmitFeedback(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.requests.append(request)
            if request.idempotency_key in self.outcomes:
                return opt.SubmitFeedbackResponse(job=self.outcomes[request.idempotency_key], duplicate=True)
            if self.state != opt.JOB_STATE_WAITING_FOR_FEEDBACK or request.round_id != ROUNDS[self.open].round_id:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"round_id: round {request.round_id} is closed")
            shown = ROUNDS[self.open]
            kind = request.WhichOneof("feedback")
            self.log.append(
                opt.Interaction(
                    job_id="job-1",
                    round_id=shown.round_id,
                    round=shown.round,
                    rater=f"pseudo-{request.rater}",
                    latency_s=request.latency_s,
                    answer_kind=shown.answer,
                    items=shown.items,
                    pairs=shown.pairs,
                    generator=shown.generator,
                    idempotency_key=request.idempotency_key,
                    **{kind: getattr(request, kind)},
                )
            )
            self._set_state(opt.JOB_STATE_RUNNING)
            self._open_next()
            self.outcomes[request.idempotency_key] = self._job()
            if self.drop_reply_once:
                self.drop_reply_once = False
                context.abort(grpc.StatusCode.UNAVAILABLE, "reply lost")
            return opt.SubmitFeedbackResponse(job=self.outcomes[request.idempotency_key])

    def ListInteractions(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            return opt.ListInteractionsResponse(interactions=self.log)


class Renderer(generation_pb2_grpc.GenerationServiceServicer):
    """Generate: one grey image per latent, its shade from the latent's first value; records the requests."""

    def __init__(self) -> None:
        self.requests: list[generation_pb2.GenerateRequest] = []

    def Generate(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        latents = tensors.from_tensor_proto(request.latents)
        images = [
            common_pb2.Image(png=tensors.png_encode(np.full((4, 4, 3), int(abs(z[0]) * 50) % 256, np.uint8)))
            for z in latents
        ]
        return generation_pb2.GenerateResponse(images=common_pb2.ImageBatch(images=images), model=request.model)


@pytest.fixture
def server() -> Iterator[tuple[RoundsServer, Renderer, Client]]:
    jobs, renderer = RoundsServer(), Renderer()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    optimization_pb2_grpc.add_OptimizationServiceServicer_to_server(jobs, grpc_server)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(renderer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    with Client(f"127.0.0.1:{port}", timeout=5, watch_window=2) as client:
        yield jobs, renderer, client
    grpc_server.stop(None)


def simulated_rater(round: Round) -> Answer:
    """Prefers items with a larger first latent value: a stand-in objective, as a benchmark's rater has one."""
    values = [float(item.latent[0]) for item in round.items]
    if round.answer is AnswerKind.CHOICE:
        best = int(np.argmax(values))
        return Answer(choice=[best] * round.choose)  # the same image twice: the round allows repeats
    return Answer(pairwise=[float(np.tanh(values[left] - values[right])) for left, right in round.pairs])


def test_a_simulated_rater_answers_every_round_until_the_job_ends(
    server: tuple[RoundsServer, Renderer, Client],
) -> None:
    _, _, client = server
    job = client.job("job-1")
    status = job.answer_rounds(simulated_rater, rater_id="sim-1")
    assert status.state is JobState.SUCCEEDED
    log = job.interactions()
    assert [(i.round_id, i.answer) for i in log] == [("r1", AnswerKind.CHOICE), ("r2", AnswerKind.PAIRWISE)]
    best = int(np.argmax([float(i.latent[0]) for i in log[0].items]))
    assert log[0].choice == (best, best) and log[1].pairwise is not None and len(log[1].pairwise) == 2
    assert all(-1.0 <= score <= 1.0 for score in log[1].pairwise)
    assert {i.rater for i in log} == {"pseudo-sim-1"} and log[0].generator == "gen@3"
    assert all(i.latency_s >= 0 for i in log) and len({i.idempotency_key for i in log}) == 2
    np.testing.assert_array_equal(log[0].items[1].latent, tensors.from_tensor_proto(ROUNDS[0].items[1].latent))


def test_a_person_iterates_rounds_renders_them_and_answers(server: tuple[RoundsServer, Renderer, Client]) -> None:
    jobs, renderer, client = server
    job = client.job("job-1")
    seen = []
    for round in job.rounds():
        images = round.images()
        assert len(images) == len(round.items) and images[0].size == (4, 4)
        seen.append((round.round_id, round.answer, round.allow_repeats, round.pairs))
        if round.answer is AnswerKind.CHOICE:
            outcome = job.feedback(round, choice=[0, 2], rater="ada", latency_s=1.5)
        else:
            outcome = job.feedback(round, pairwise=["left", 0.25], rater="ada")
        assert not outcome.duplicate and outcome.idempotency_key
    assert seen == [
        ("r1", AnswerKind.CHOICE, True, ()),
        ("r2", AnswerKind.PAIRWISE, False, ((0, 1), (3, 2))),
    ]
    assert job.status().state is JobState.SUCCEEDED
    # Rendering regenerates the items on the round's pinned generator from their latents and classes.
    request = renderer.requests[0]
    assert request.model.name == "gen@3" and list(request.condition.class_ids.ids) == [0, 1, 2, 0]
    assert tensors.from_tensor_proto(request.latents).shape == (4, LATENT)
    pairwise = jobs.requests[1].pairwise.judgements
    assert pairwise[0].preference == opt.PREFERENCE_LEFT and pairwise[1].score == 0.25
    assert job.interactions()[1].pairwise == (1.0, 0.25)


def test_a_lost_reply_is_retried_with_the_same_key_and_recorded_once(
    server: tuple[RoundsServer, Renderer, Client],
) -> None:
    jobs, _, client = server
    jobs.drop_reply_once = True
    job = client.job("job-1")
    round = next(job.rounds())
    outcome = job.feedback(round, choice=[1, 1])
    assert outcome.duplicate  # the first attempt was recorded; its reply was lost
    first, second = jobs.requests
    assert first.idempotency_key == second.idempotency_key == outcome.idempotency_key
    assert len(job.interactions()) == 1
    assert outcome.job.pending_round is not None and outcome.job.pending_round.round_id == "r2"


def test_an_answer_to_a_closed_round_raises_round_closed(server: tuple[RoundsServer, Renderer, Client]) -> None:
    _, _, client = server
    job = client.job("job-1")
    round = job.status().pending_round
    assert round is not None and round.round_id == "r1" and round.choose == 2
    job.feedback(round, choice=[0, 1])
    with pytest.raises(RoundClosed, match="closed") as caught:
        job.feedback(round, choice=[0, 1])
    assert caught.value.round_id == "r1" and caught.value.job_id == "job-1"


def test_max_rounds_stops_answering(server: tuple[RoundsServer, Renderer, Client]) -> None:
    _, _, client = server
    status = client.job("job-1").answer_rounds(simulated_rater, max_rounds=1)
    assert status.state is JobState.WAITING_FOR_FEEDBACK
    assert status.pending_round is not None and status.pending_round.round_id == "r2"


def test_the_asyncio_client_goes_the_same_way(server: tuple[RoundsServer, Renderer, Client]) -> None:
    jobs, renderer, client = server

    async def rater(round: AsyncRound) -> Answer:
        images = await round.images()
        assert len(images) == len(round.items)
        await asyncio.sleep(0)
        if round.answer is AnswerKind.CHOICE:
            return Answer(choice=[0] * round.choose)
        return Answer(pairwise=[0.5] * len(round.pairs))

    async def story() -> JobState:
        async with AsyncClient(client.target, timeout=5, watch_window=2) as aclient:
            job = await aclient.job("job-1")
            status = await job.answer_rounds(rater, rater_id="async-sim")
            assert [i.round_id for i in await job.interactions()] == ["r1", "r2"]
            return status.state

    assert asyncio.run(story()) is JobState.SUCCEEDED
    assert len(renderer.requests) == 2 and [r.rater for r in jobs.requests] == ["async-sim", "async-sim"]


def test_bare_values_are_read_as_the_round_asks(server: tuple[RoundsServer, Renderer, Client]) -> None:
    jobs, _, client = server
    answers = iter([[3, 3], [-1.0, 1.0]])
    start = time.monotonic()
    assert client.job("job-1").answer_rounds(lambda round: next(answers)).state is JobState.SUCCEEDED
    assert time.monotonic() - start < 10
    assert list(jobs.requests[0].choice.indices) == [3, 3]
    assert [j.score for j in jobs.requests[1].pairwise.judgements] == [-1.0, 1.0]


def test_async_rounds_iterate_and_answer(server: tuple[RoundsServer, Renderer, Client]) -> None:
    jobs, _, client = server

    async def story() -> list[str]:
        async with AsyncClient(client.target, timeout=5, watch_window=2) as aclient:
            job = await aclient.job("job-1")
            seen = []
            async for round in job.rounds():
                seen.append(round.round_id)
                if round.answer is AnswerKind.CHOICE:
                    await job.feedback(round, choice=[1, 2])
                else:
                    await job.feedback(round.round_id, pairwise=["tie", "right"], idempotency_key="mine-2")
            assert (await job.status()).state is JobState.SUCCEEDED
            return seen

    assert asyncio.run(story()) == ["r1", "r2"]
    assert jobs.requests[1].idempotency_key == "mine-2"
