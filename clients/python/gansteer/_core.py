"""Every operation of the SDK, written once for the blocking and the asyncio client.

An operation is a generator of steps (`gansteer._steps`): it yields a `Call` (one unary RPC), a `Stream` (the next
message of a server stream), a `Sleep` or an `Await`, is sent back the reply, and returns its value; an iteration
(`jobs`, `watch_job`, `rounds`) also yields `Emit`s, the values its caller iterates over. `Client` performs the
steps with blocking stubs and `AsyncClient` awaits them on grpc.aio, so requests, replies, retries, the watch's
resumption and the loop that answers rounds are one code path and the two clients cannot drift. A failed call is
thrown into the operation as the SDK's error (`gansteer.errors`), where the retry rules catch what they retry.
"""

from __future__ import annotations

import inspect
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any, Protocol, TypeVar

from PIL import Image as PILImage

from gansteer import _convert, _rounds, _specs
from gansteer._convert import ImageInput
from gansteer._progress import ProgressBar
from gansteer._specs import ClassSpec, Outputs
from gansteer._steps import Await, Call, Emit, Feed, Handler, Sleep, Steps, Stream
from gansteer._transport import backoff_delay
from gansteer.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    JobCancelled,
    JobFailed,
    RoundClosed,
    Unavailable,
)
from gansteer.kinds import result_type
from gansteer.kinds.embedding_am import EMBEDDING_AM, EmbeddingAMOptions, embedding_am_spec
from gansteer.kinds.evolution import EVOLUTION, EvolutionOptions, evolution_spec
from gansteer.kinds.human_nes import HUMAN_NES, HumanNESOptions, human_nes_spec
from gansteer.kinds.inversion import INVERSION, InversionOptions, inversion_spec
from gansteer.kinds.latent_search import LATENT_SEARCH, LatentSearchOptions, latent_search_spec
from gansteer.kinds.pir import (
    PIREstimatorOptions,
    PIRTuningOptions,
    impression_record,
    impression_row,
    pir_estimator_spec,
    pir_tuning_spec,
)
from gansteer.saved import SavedInput, load_result
from gansteer.types import (
    Answer,
    FeedbackResult,
    FeedbackRound,
    FeedbackRoundEvent,
    GenerationResult,
    Interaction,
    JobEvent,
    JobKindInfo,
    JobResult,
    JobState,
    JobStatus,
    ModelInfo,
    OptimizerInfo,
    ProgressEvent,
    Reply,
    ScoreResult,
    ScorerInfo,
    StateChanged,
)
from gansteer.v1 import generation_pb2, optimization_pb2, scoring_pb2

T = TypeVar("T")
R = TypeVar("R")


class Settings(Protocol):
    retries: int
    watch_window: float
    outage_patience: float


class Core:
    """The operations of one client; `settings` is the client (its `retries` and `watch_window` as set now)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._cards: dict[str, ModelInfo] = {}

    def unary(self, call: Call, *, idempotent: bool = True, patient: bool = False) -> Steps[Any]:
        """One call, repeated on UNAVAILABLE with backoff when `idempotent` (safe to repeat): `retries` times, or
        when `patient` (following a job) for as long as `outage_patience` seconds, so a waiting client rides out a
        server or Redis outage."""
        attempt, started = 0, time.monotonic()
        while True:
            try:
                return (yield call)
            except Unavailable:
                within = time.monotonic() - started < self._settings.outage_patience
                if not idempotent or (attempt >= self._settings.retries and not (patient and within)):
                    raise
            yield Sleep(backoff_delay(attempt))
            attempt += 1

    # --- models and images ----------------------------------------------------------------------------------------

    def models(self, kind: str | None, *, name_contains: str, all_versions: bool) -> Steps[list[ModelInfo]]:
        request = generation_pb2.ListModelsRequest(
            kind=_convert.KIND_PROTOS[kind] if kind else None, name_contains=name_contains, all_versions=all_versions
        )
        response = yield from self.unary(Call("generation", "ListModels", request))
        return [_convert.model_info(card) for card in response.models]

    def model(self, name: str) -> Steps[ModelInfo]:
        if name not in self._cards:
            request = generation_pb2.GetModelRequest(model=_convert.model_ref(name))
            response = yield from self.unary(Call("generation", "GetModel", request))
            self._cards[name] = _convert.model_info(response.card)
        return self._cards[name]

    def generate(
        self,
        model: str,
        n: int,
        *,
        seed: int,
        classes: ClassSpec | Sequence[ClassSpec] | None,
        truncation: float | None,
        latents: Any,
        embeddings: Any,
        timeout: float | None,
    ) -> Steps[GenerationResult]:
        card = (yield from self.model(model)) if _specs.needs_card(classes) else None
        request = _specs.generate_request(
            model,
            n,
            seed=seed,
            classes=classes,
            truncation=truncation,
            latents=latents,
            embeddings=embeddings,
            card=card,
        )
        response = yield from self.unary(Call("generation", "Generate", request, timeout))
        return _convert.generation_result(response)

    def regenerate(self, saved: SavedInput, *, timeout: float | None) -> Steps[GenerationResult]:
        """The saved result's images, rendered again by its pinned generator from its latents and conditions."""
        result = load_result(saved)
        if "@" not in result.generator or len(result.latents) != len(result.images):
            raise _specs._invalid(
                "saved",
                f"{result.path} lacks the pinned generator or the latents: the server that ran the job kept none",
            )
        request = _specs.generate_request(
            result.generator,
            len(result.latents),
            seed=0,
            classes=list(result.class_ids) or None,
            truncation=None,
            latents=result.latents,
            embeddings=None if result.class_ids else result.class_embeddings,
            card=None,
        )
        response = yield from self.unary(Call("generation", "Generate", request, timeout))
        return _convert.generation_result(response)

    def scorers(self, model_kind: str | None) -> Steps[list[ScorerInfo]]:
        request = scoring_pb2.ListScorersRequest(model_kind=_convert.KIND_PROTOS[model_kind] if model_kind else None)
        response = yield from self.unary(Call("scoring", "ListScorers", request))
        return [_convert.scorer_info(scorer) for scorer in response.scorers]

    def score(
        self, images: ImageInput | Sequence[ImageInput], scorer: str, outputs: Outputs | None, *, timeout: float | None
    ) -> Steps[ScoreResult]:
        if outputs is None:
            kind = (yield from self.model(scorer)).kind
            if kind not in _specs.DEFAULT_OUTPUTS:
                raise _specs._invalid("outputs", f"{scorer} is a {kind}; name the outputs to compute")
            outputs = _specs.DEFAULT_OUTPUTS[kind]
        request = _specs.score_request(images, scorer, outputs)
        response = yield from self.unary(Call("scoring", "Score", request, timeout))
        return _convert.score_result(response.outputs)

    # --- jobs -----------------------------------------------------------------------------------------------------

    def invert(
        self, targets: ImageInput | Sequence[ImageInput], *, model: str, options: InversionOptions
    ) -> Steps[tuple[str, str]]:
        INVERSION.check(options)  # before any call: a misspelled option must not cost a round trip either
        named_class = isinstance(options.get("conditioned_class"), str)
        card = (yield from self.model(model)) if named_class else None
        return (yield from self.submit(inversion_spec(targets, model=model, card=card, **options)))

    def evolve(self, *, model: str, options: EvolutionOptions) -> Steps[tuple[str, str]]:
        EVOLUTION.check(options)
        named_class = isinstance(options.get("conditioned_class"), str)
        card = (yield from self.model(model)) if named_class else None
        return (yield from self.submit(evolution_spec(model=model, card=card, **options)))

    def human_nes(self, *, model: str, options: HumanNESOptions) -> Steps[tuple[str, str]]:
        HUMAN_NES.check(options)
        named_class = isinstance(options.get("conditioned_class"), str)
        card = (yield from self.model(model)) if named_class else None
        return (yield from self.submit(human_nes_spec(model=model, card=card, **options)))

    def latent_search(self, *, model: str, options: LatentSearchOptions) -> Steps[tuple[str, str]]:
        LATENT_SEARCH.check(options)
        named_class = _specs.needs_card(list(options.get("classes", ())))
        card = (yield from self.model(model)) if named_class else None
        return (yield from self.submit(latent_search_spec(model=model, card=card, **options)))

    def pir_estimator(self, *, dataset: str, options: PIREstimatorOptions) -> Steps[tuple[str, str]]:
        return (yield from self.submit(pir_estimator_spec(dataset=dataset, **options)))

    def pir_tuning(self, *, model: str, estimator: str, options: PIRTuningOptions) -> Steps[tuple[str, str]]:
        return (yield from self.submit(pir_tuning_spec(model=model, estimator=estimator, **options)))

    def report_impressions(
        self, dataset: str, records: Sequence[Mapping[str, Any]], *, idempotency_key: str | None
    ) -> Steps[tuple[int, int, bool]]:
        """(recorded, table size, duplicate). Retried on UNAVAILABLE with one idempotency key, so a retry whose first
        attempt arrived records nothing twice."""
        request = optimization_pb2.ReportImpressionsRequest(
            records=[impression_record(dataset, row, i) for i, row in enumerate(records)],
            idempotency_key=idempotency_key or uuid.uuid4().hex,
        )
        response = yield from self.unary(Call("optimization", "ReportImpressions", request), idempotent=True)
        return int(response.recorded), int(response.total), bool(response.duplicate)

    def impressions(self, dataset: str, *, page_size: int) -> Steps[list[dict[str, Any]]]:
        rows: list[dict[str, Any]] = []
        while True:
            request = optimization_pb2.ListImpressionsRequest(dataset=dataset, offset=len(rows), page_size=page_size)
            response = yield from self.unary(Call("optimization", "ListImpressions", request))
            rows.extend(dict(impression_row(record)) for record in response.records)
            if not response.records or len(rows) >= response.total:
                return rows

    def embedding_am(self, *, model: str, options: EmbeddingAMOptions) -> Steps[tuple[str, str]]:
        EMBEDDING_AM.check(options)  # the server resolves class names itself: no card is fetched
        return (yield from self.submit(embedding_am_spec(model=model, **options)))

    def submit(self, spec: optimization_pb2.JobSpec) -> Steps[tuple[str, str]]:
        """(job id, kind). Repeated on UNAVAILABLE only with an idempotency key, since only then is a repeat
        harmless."""
        request = optimization_pb2.SubmitJobRequest(spec=spec)
        call = Call("optimization", "SubmitJob", request)
        response = yield from self.unary(call, idempotent=bool(spec.idempotency_key))
        return response.job_id, response.job.kind or str(spec.WhichOneof("kind") or "")

    def jobs(
        self,
        *,
        states: Sequence[JobState | str],
        kind: str,
        labels: Mapping[str, str] | None,
        limit: int | None,
        page_size: int,
    ) -> Feed[JobStatus]:
        token, seen = "", 0
        while True:
            request = _convert.list_jobs_request(
                page_size=page_size, page_token=token, states=states, kind=kind, labels=labels
            )
            response = yield from self.unary(Call("optimization", "ListJobs", request))
            for job in response.jobs:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield Emit(_convert.job_status(job))
            token = response.next_page_token
            if not token:
                return

    def get_job(self, job_id: str, *, patient: bool = False) -> Steps[JobStatus]:
        request = optimization_pb2.GetJobRequest(job_id=job_id, view=optimization_pb2.JOB_VIEW_BASIC)
        response = yield from self.unary(Call("optimization", "GetJob", request), patient=patient)
        return _convert.job_status(response.job)

    def get_job_spec(self, job_id: str) -> Steps[optimization_pb2.JobSpec]:
        request = optimization_pb2.GetJobRequest(job_id=job_id, view=optimization_pb2.JOB_VIEW_FULL)
        response = yield from self.unary(Call("optimization", "GetJob", request))
        spec: optimization_pb2.JobSpec = response.job.spec
        return spec

    def cancel_job(self, job_id: str, reason: str) -> Steps[JobStatus]:
        request = optimization_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        response = yield from self.unary(Call("optimization", "CancelJob", request))
        return _convert.job_status(response.job)

    def get_result(self, job_id: str, *, kind: str, timeout: float | None) -> Steps[JobResult]:
        request = optimization_pb2.GetResultRequest(job_id=job_id)
        response = yield from self.unary(Call("optimization", "GetResult", request, timeout))
        return _convert.job_result(response.result, result_type=result_type(kind), kind=kind)

    def watch_job(
        self, job_id: str, *, after_event_id: str, previews: bool, kind: str, deadline: float | None
    ) -> Feed[JobEvent]:
        def emit(event: JobEvent) -> Steps[bool]:
            yield Emit(event)
            return False

        yield from self._follow(
            job_id, after_event_id=after_event_id, previews=previews, kind=kind, deadline=deadline, handle=emit
        )

    def _follow(
        self,
        job_id: str,
        *,
        after_event_id: str = "",
        previews: bool = False,
        kind: str = "",
        deadline: float | None = None,
        handle: Handler[JobEvent],
    ) -> Steps[None]:
        """Hands the job's events in order to `handle` until the final state change (or until `handle` says stop),
        reconnecting after the last event seen when the stream breaks (UNAVAILABLE, with backoff) or its window
        ends. Each connection lasts at most `watch_window` seconds, so even a long job's stream has a deadline and
        a silently dead connection is noticed. `deadline` (time.monotonic) bounds the whole watch."""
        results = result_type(kind)
        last, failures = after_event_id, 0
        failing_since: float | None = None  # a broken stream is resumed for `outage_patience` seconds
        while True:
            window = self._settings.watch_window
            if deadline is not None:
                window = min(window, deadline - time.monotonic())
                if window <= 0:
                    raise DeadlineExceeded(f"job {job_id}: still running when the wait's deadline passed")
            request = optimization_pb2.WatchJobRequest(job_id=job_id, after_event_id=last, skip_previews=not previews)
            stream = Stream("optimization", "WatchJob", request, window)
            received, ended = False, "finished"
            while True:
                try:
                    message = yield stream
                except DeadlineExceeded:
                    ended = "window"
                    break
                except Unavailable:
                    failing_since = failing_since if failing_since is not None else time.monotonic()
                    if time.monotonic() - failing_since >= self._settings.outage_patience:
                        raise
                    ended = "broken"
                    break
                if message is None:
                    break
                received, failures, failing_since = True, 0, None
                last = message.event_id or last
                event = _convert.job_event(message, result_type=results, kind=kind)
                outcome = handle(event)
                stop = outcome if isinstance(outcome, bool) else (yield from outcome)
                if stop or (isinstance(event, StateChanged) and event.state.terminal):
                    return
            if ended == "window":
                continue  # resume after the last event at once
            # The stream ended without the final state change: either the connection broke (resume with backoff),
            # or the server has no more events to give (the job ended and its stream was trimmed or expired).
            if ended == "finished" and not received and (yield from self.get_job(job_id, patient=True)).state.terminal:
                return
            yield Sleep(backoff_delay(failures))
            failures += 1

    def wait(self, job_id: str, *, kind: str, progress: bool, timeout: float | None) -> Steps[JobStatus]:
        """Follows the job to its end (with a progress bar) and returns its final record; raises JobFailed (or
        JobCancelled) when it did not succeed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with ProgressBar(f"{kind or 'job'} {job_id[:12]}", enabled=progress) as bar:

            def show(event: JobEvent) -> bool:
                if isinstance(event, ProgressEvent):
                    bar.update(event.step, event.total_steps, event.criterion, event.elapsed_s)
                return False

            yield from self._follow(job_id, kind=kind, deadline=deadline, handle=show)
        status = yield from self.get_job(job_id, patient=True)
        if status.state == JobState.CANCELLED:
            raise JobCancelled(status)
        if status.state != JobState.SUCCEEDED:
            raise JobFailed(status)
        return status

    # --- what the server can do -----------------------------------------------------------------------------------

    def job_kinds(self) -> Steps[list[JobKindInfo]]:
        response = yield from self.unary(Call("optimization", "ListJobKinds", optimization_pb2.ListJobKindsRequest()))
        return [_convert.job_kind_info(kind) for kind in response.kinds]

    def optimizers(self) -> Steps[list[OptimizerInfo]]:
        request = optimization_pb2.ListOptimizersRequest()
        response = yield from self.unary(Call("optimization", "ListOptimizers", request))
        return [_convert.optimizer_info(info) for info in response.optimizers]

    # --- rounds of human-in-the-loop jobs -------------------------------------------------------------------------

    def interactions(self, job_id: str) -> Steps[list[Interaction]]:
        request = optimization_pb2.ListInteractionsRequest(job_id=job_id)
        response = yield from self.unary(Call("optimization", "ListInteractions", request))
        return [_convert.interaction(message) for message in response.interactions]

    def submit_feedback(
        self,
        job_id: str,
        round: FeedbackRound | str,
        answer: Answer,
        *,
        rater: str,
        idempotency_key: str | None,
        latency_s: float,
    ) -> Steps[FeedbackResult]:
        """One answer. Repeated on UNAVAILABLE with the same idempotency key, so a retry whose first attempt did
        arrive records nothing twice (the server answers `duplicate`); an answer to a round no longer open raises
        RoundClosed."""
        round_id = round if isinstance(round, str) else round.round_id
        request = _rounds.feedback_request(
            job_id, round_id, answer, rater=rater, idempotency_key=idempotency_key, latency_s=latency_s
        )
        try:
            response = yield from self.unary(Call("optimization", "SubmitFeedback", request))
        except FailedPrecondition as error:
            raise RoundClosed(error.message, job_id=job_id, round_id=round_id, details=error.details) from error
        return FeedbackResult(
            job=_convert.job_status(response.job),
            duplicate=response.duplicate,
            idempotency_key=request.idempotency_key,
        )

    def render(self, round: FeedbackRound) -> Steps[list[PILImage.Image]]:
        """The round's items rendered by its pinned generator, in order; the round's own images when it carries them
        (a kind whose images are not the generator's output alone, e.g. human NES's x +- Delta)."""
        if round.pixels:
            return list(round.pixels)
        images: dict[int, PILImage.Image] = {}
        for indices, request in _rounds.render_requests(round):
            response = yield from self.unary(Call("generation", "Generate", request))
            images.update(zip(indices, _convert.batch_to_pil(response.images), strict=True))
        return [images[i] for i in range(len(round.items))]

    def rounds(self, job_id: str) -> Feed[FeedbackRound]:
        def emit(round: FeedbackRound) -> Steps[bool]:
            yield Emit(round)
            return False

        yield from self._open_rounds(job_id, emit)

    def answer_rounds(
        self,
        job_id: str,
        rater: Callable[[R], Reply | Awaitable[Reply]],
        *,
        bind: Callable[[FeedbackRound], R],
        max_rounds: int | None,
        rater_id: str,
    ) -> Steps[JobStatus]:
        """Shows each round as it opens to `rater` and submits its answer, until the job ends (or `max_rounds`
        answers); returns the job's record then. A round that closed before the answer arrived (answered by others,
        expired) is skipped: the job moves on or ends without it."""
        answered = 0

        def answer(round: FeedbackRound) -> Steps[bool]:
            nonlocal answered
            started = time.monotonic()
            reply = rater(bind(round))
            if inspect.isawaitable(reply):
                reply = yield Await(reply)
            latency = time.monotonic() - started
            try:
                yield from self.submit_feedback(
                    job_id,
                    round,
                    _rounds.as_answer(round, reply),
                    rater=rater_id,
                    idempotency_key=None,
                    latency_s=latency,
                )
            except RoundClosed:
                return False
            answered += 1
            return max_rounds is not None and answered >= max_rounds

        if max_rounds is None or max_rounds > 0:
            yield from self._open_rounds(job_id, answer)
        return (yield from self.get_job(job_id))

    def _open_rounds(self, job_id: str, on_round: Handler[FeedbackRound]) -> Steps[None]:
        """Hands each round of the job to `on_round` once, as it opens (the one open now first), until the job ends
        or `on_round` says stop. A round is seen either way the server announces it: a `feedback_round` event, or
        the job's `pending_round` once its state is WAITING_FOR_FEEDBACK."""
        status = yield from self.get_job(job_id)
        seen: set[str] = set()

        def offer(round: FeedbackRound | None) -> Steps[bool]:
            if round is None or round.round_id in seen:
                return False
            seen.add(round.round_id)
            outcome = on_round(round)
            return outcome if isinstance(outcome, bool) else (yield from outcome)

        def handle(event: JobEvent) -> Steps[bool]:
            if isinstance(event, FeedbackRoundEvent):
                return (yield from offer(event.feedback_round))
            if isinstance(event, StateChanged) and event.state is JobState.WAITING_FOR_FEEDBACK:
                now = yield from self.get_job(job_id)
                return (yield from offer(now.pending_round if now.state is JobState.WAITING_FOR_FEEDBACK else None))
            return False

        if status.state is JobState.WAITING_FOR_FEEDBACK and (yield from offer(status.pending_round)):
            return
        if not status.state.terminal:
            yield from self._follow(job_id, after_event_id=status.last_event_id, kind=status.kind, handle=handle)


def round_fields(round: FeedbackRound) -> dict[str, Any]:
    """A round's fields, to bind it to a client as a `Round` or `AsyncRound`."""
    return {field.name: getattr(round, field.name) for field in fields(FeedbackRound)}
