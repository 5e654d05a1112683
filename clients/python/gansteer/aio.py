"""The asyncio client: the same calls as `gansteer.Client`, as coroutines on `grpc.aio` channels.

For code that already runs an event loop (a web backend, a design tool's server) and must not block it while a job
runs. Both clients perform the same operations (`gansteer._core`): every request, reply, retry, deadline and
reconnect rule is written once, and tests/test_sdk_parity.py holds their methods and signatures equal. Create and
use an `AsyncClient` inside the event loop that runs it (grpc.aio channels belong to one loop).

    async with gansteer.AsyncClient("localhost:50053") as client:
        job = await client.invert(image, model="scenes-gen", budget=200)
        async for event in job.watch():
            ...
        result = await job.result()
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc  # type: ignore[import-untyped]
import grpc.aio  # type: ignore[import-untyped]
import numpy.typing as npt
from PIL import Image as PILImage

from gansteer._convert import ImageInput, batch_to_pil
from gansteer._core import Core, round_fields
from gansteer._specs import ClassSpec, Outputs
from gansteer._steps import Await, Call, Emit, Feed, Service, Sleep, Steps, Stream, settle
from gansteer._transport import CHANNEL_OPTIONS, DEFAULT_TARGET, auth_metadata, resolve_targets
from gansteer.client import STUBS
from gansteer.errors import GansteerError, from_rpc_error
from gansteer.kinds import (
    EmbeddingAMOptions,
    EvolutionOptions,
    HumanNESOptions,
    InversionOptions,
    LatentSearchOptions,
    PIREstimatorOptions,
    PIRTuningOptions,
)
from gansteer.saved import SavedInput
from gansteer.types import (
    Answer,
    AsyncRater,
    AsyncRound,
    ChoiceAction,
    FeedbackResult,
    FeedbackRound,
    GenerationResult,
    Interaction,
    JobEvent,
    JobKindInfo,
    JobResult,
    JobState,
    JobStatus,
    ModelInfo,
    OptimizerInfo,
    ScoreResult,
    ScorerInfo,
)
from gansteer.v1 import common_pb2, optimization_pb2

T = TypeVar("T")


class AsyncClient:
    """`gansteer.Client` for asyncio: same constructor arguments, every method a coroutine (iterations are async
    iterators)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        api_key: str | None = None,
        *,
        generation_target: str | None = None,
        scoring_target: str | None = None,
        timeout: float = 60.0,
        retries: int = 5,
        watch_window: float = 60.0,
        outage_patience: float = 120.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.timeout, self.retries, self.watch_window = timeout, retries, watch_window
        self.outage_patience = outage_patience
        self.generation_target, self.scoring_target, self.target = resolve_targets(
            target, generation_target, scoring_target
        )
        self._metadata = auth_metadata(api_key)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._targets: dict[Service, str] = {
            "generation": self.generation_target,
            "scoring": self.scoring_target,
            "optimization": self.target,
        }
        self._stubs: dict[Service, Any] = {
            service: stub(self._channel(self._targets[service], credentials)) for service, stub in STUBS.items()
        }
        self._core = Core(self)

    def _channel(self, target: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
        if target not in self._channels:
            self._channels[target] = (
                grpc.aio.secure_channel(target, credentials, CHANNEL_OPTIONS)
                if credentials is not None
                else grpc.aio.insecure_channel(target, CHANNEL_OPTIONS)
            )
        return self._channels[target]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return (
            f"AsyncClient(target={self.target!r}, generation_target={self.generation_target!r}, "
            f"scoring_target={self.scoring_target!r})"
        )

    # --- performing the core's operations ---------------------------------------------------------------------

    async def _run(self, operation: Steps[T]) -> T:
        """Performs one operation of the core (`gansteer._core`) and returns its value."""
        async with contextlib.aclosing(self._iterate(settle(operation))) as values:
            return await anext(values)

    async def _iterate(self, operation: Feed[T]) -> AsyncGenerator[T, None]:
        """As `Client._iterate`, awaiting each step on grpc.aio."""
        stream: tuple[Any, Any] | None = None  # (the Stream step, its open call)
        reply: Any = None
        error: GansteerError | None = None
        try:
            while True:
                try:
                    step = operation.send(reply) if error is None else operation.throw(error)
                except StopIteration:
                    return
                reply, error = None, None
                if isinstance(step, Emit):
                    yield step.value
                elif isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                elif isinstance(step, Await):
                    reply = await step.awaitable
                else:
                    try:
                        reply, stream = await self._perform(step, stream)
                    except grpc.RpcError as failure:
                        error = from_rpc_error(failure, target=self._targets[step.service])
                        error.__cause__ = failure
        finally:
            if stream is not None:
                stream[1].cancel()
            operation.close()

    async def _perform(self, step: Call | Stream, stream: tuple[Any, Any] | None) -> tuple[Any, tuple[Any, Any] | None]:
        """One call's reply (a stream's next message, None at its end), and the stream open after it."""
        method = getattr(self._stubs[step.service], step.method)
        if isinstance(step, Call):
            return await method(step.request, timeout=step.timeout or self.timeout, metadata=self._metadata), stream
        if stream is None or stream[0] is not step:
            if stream is not None:
                stream[1].cancel()
            stream = (step, method(step.request, timeout=step.timeout, metadata=self._metadata))
        message = await stream[1].read()
        return (None if message is grpc.aio.EOF else message), stream

    # --- models and images ----------------------------------------------------------------------------------------

    async def models(
        self, kind: str | None = None, *, name_contains: str = "", all_versions: bool = False
    ) -> list[ModelInfo]:
        return await self._run(self._core.models(kind, name_contains=name_contains, all_versions=all_versions))

    async def model(self, name: str) -> ModelInfo:
        return await self._run(self._core.model(name))

    async def generate(
        self,
        model: str,
        n: int = 1,
        *,
        seed: int = 0,
        classes: ClassSpec | Sequence[ClassSpec] | None = None,
        truncation: float | None = None,
        latents: npt.ArrayLike | None = None,
        embeddings: npt.ArrayLike | None = None,
        timeout: float | None = None,
    ) -> GenerationResult:
        operation = self._core.generate(
            model,
            n,
            seed=seed,
            classes=classes,
            truncation=truncation,
            latents=latents,
            embeddings=embeddings,
            timeout=timeout,
        )
        return await self._run(operation)

    async def regenerate(self, saved: SavedInput, *, timeout: float | None = None) -> GenerationResult:
        """As `Client.regenerate`."""
        return await self._run(self._core.regenerate(saved, timeout=timeout))

    async def scorers(self, model_kind: str | None = None) -> list[ScorerInfo]:
        return await self._run(self._core.scorers(model_kind))

    async def score(
        self,
        images: ImageInput | Sequence[ImageInput],
        scorer: str,
        outputs: Outputs | None = None,
        *,
        timeout: float | None = None,
    ) -> ScoreResult:
        return await self._run(self._core.score(images, scorer, outputs, timeout=timeout))

    # --- jobs -----------------------------------------------------------------------------------------------------

    async def invert(
        self, target: ImageInput | Sequence[ImageInput], *, model: str, **options: Unpack[InversionOptions]
    ) -> AsyncJob:
        """Submits an inversion job; the options are those of `Client.invert`."""
        job_id, kind = await self._run(self._core.invert(target, model=model, options=options))
        return AsyncJob(self, job_id, kind=kind)

    async def evolve(self, *, model: str, **options: Unpack[EvolutionOptions]) -> AsyncJob:
        """Submits an interactive evolution; the options are those of `Client.evolve`."""
        job_id, kind = await self._run(self._core.evolve(model=model, options=options))
        return AsyncJob(self, job_id, kind=kind)

    async def human_nes(self, *, model: str, **options: Unpack[HumanNESOptions]) -> AsyncJob:
        """Submits a human NES job; the options are those of `Client.human_nes`."""
        job_id, kind = await self._run(self._core.human_nes(model=model, options=options))
        return AsyncJob(self, job_id, kind=kind)

    async def latent_search(self, *, model: str, **options: Unpack[LatentSearchOptions]) -> AsyncJob:
        """Submits a latent search; the options are those of `Client.latent_search`."""
        job_id, kind = await self._run(self._core.latent_search(model=model, options=options))
        return AsyncJob(self, job_id, kind=kind)

    async def pir_estimator(self, *, dataset: str, **options: Unpack[PIREstimatorOptions]) -> AsyncJob:
        """Submits a PIR estimator job; the options are those of `Client.pir_estimator`."""
        job_id, kind = await self._run(self._core.pir_estimator(dataset=dataset, options=options))
        return AsyncJob(self, job_id, kind=kind)

    async def pir_tuning(self, *, model: str, estimator: str, **options: Unpack[PIRTuningOptions]) -> AsyncJob:
        """Submits a PIR tuning job; the options are those of `Client.pir_tuning`."""
        job_id, kind = await self._run(self._core.pir_tuning(model=model, estimator=estimator, options=options))
        return AsyncJob(self, job_id, kind=kind)

    async def report_impressions(
        self, dataset: str, records: Sequence[Mapping[str, Any]], *, idempotency_key: str | None = None
    ) -> tuple[int, int, bool]:
        """As `Client.report_impressions`."""
        return await self._run(self._core.report_impressions(dataset, records, idempotency_key=idempotency_key))

    async def impressions(self, dataset: str, *, page_size: int = 1000) -> list[dict[str, Any]]:
        """As `Client.impressions`."""
        return await self._run(self._core.impressions(dataset, page_size=page_size))

    async def embedding_am(self, *, model: str, **options: Unpack[EmbeddingAMOptions]) -> AsyncJob:
        """Submits an embedding activation maximisation; the options are those of `Client.embedding_am`."""
        job_id, kind = await self._run(self._core.embedding_am(model=model, options=options))
        return AsyncJob(self, job_id, kind=kind)

    async def submit(self, spec: optimization_pb2.JobSpec) -> AsyncJob:
        job_id, kind = await self._run(self._core.submit(spec))
        return AsyncJob(self, job_id, kind=kind)

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, job_id, kind=(await self.get_job(job_id)).kind)

    def jobs(
        self,
        *,
        states: Sequence[JobState | str] = (),
        kind: str = "",
        labels: Mapping[str, str] | None = None,
        limit: int | None = None,
        page_size: int = 50,
    ) -> AsyncIterator[JobStatus]:
        return self._iterate(self._core.jobs(states=states, kind=kind, labels=labels, limit=limit, page_size=page_size))

    async def job_kinds(self) -> list[JobKindInfo]:
        return await self._run(self._core.job_kinds())

    async def optimizers(self) -> list[OptimizerInfo]:
        return await self._run(self._core.optimizers())

    async def get_job(self, job_id: str) -> JobStatus:
        return await self._run(self._core.get_job(job_id))

    async def get_job_spec(self, job_id: str) -> optimization_pb2.JobSpec:
        return await self._run(self._core.get_job_spec(job_id))

    async def cancel_job(self, job_id: str, reason: str = "") -> JobStatus:
        return await self._run(self._core.cancel_job(job_id, reason))

    async def get_result(self, job_id: str, *, kind: str = "", timeout: float | None = None) -> JobResult:
        return await self._run(self._core.get_result(job_id, kind=kind, timeout=timeout))

    def watch_job(
        self,
        job_id: str,
        *,
        after_event_id: str = "",
        previews: bool = True,
        kind: str = "",
        deadline: float | None = None,
    ) -> AsyncIterator[JobEvent]:
        """As `Client.watch_job`: events until the final state, resuming after the last one on reconnect."""
        operation = self._core.watch_job(
            job_id, after_event_id=after_event_id, previews=previews, kind=kind, deadline=deadline
        )
        return self._iterate(operation)

    async def interactions(self, job_id: str) -> list[Interaction]:
        return await self._run(self._core.interactions(job_id))

    async def submit_feedback(
        self,
        job_id: str,
        round: FeedbackRound | str,
        *,
        choice: Sequence[int] | None = None,
        pairwise: Sequence[float | str] | None = None,
        ratings: Sequence[float] | None = None,
        action: ChoiceAction = "pick",
        step_size: float | None = None,
        rater: str = "",
        idempotency_key: str | None = None,
        latency_s: float = 0.0,
    ) -> FeedbackResult:
        answer = Answer(choice=choice, pairwise=pairwise, ratings=ratings, action=action, step_size=step_size)
        operation = self._core.submit_feedback(
            job_id, round, answer, rater=rater, idempotency_key=idempotency_key, latency_s=latency_s
        )
        return await self._run(operation)


class AsyncJob:
    """`gansteer.Job` for asyncio: `await job.status()`, `async for event in job.watch()`, `await job.result()`."""

    def __init__(self, client: AsyncClient, job_id: str, *, kind: str = "") -> None:
        self.id = job_id
        self.kind = kind
        self._client = client

    def __repr__(self) -> str:
        return f"AsyncJob(id={self.id!r}, kind={self.kind!r})"

    async def status(self) -> JobStatus:
        return await self._client.get_job(self.id)

    def watch(self, *, after_event_id: str = "", previews: bool = True) -> AsyncIterator[JobEvent]:
        return self._client.watch_job(self.id, after_event_id=after_event_id, previews=previews, kind=self.kind)

    async def wait(self, *, progress: bool = False, timeout: float | None = None) -> JobStatus:
        """As `Job.wait`; the bar is off by default, since async code rarely owns the terminal."""
        client = self._client
        return await client._run(client._core.wait(self.id, kind=self.kind, progress=progress, timeout=timeout))

    async def spec(self) -> optimization_pb2.JobSpec:
        return await self._client.get_job_spec(self.id)

    async def targets(self) -> list[PILImage.Image]:
        spec = await self.spec()
        if spec.WhichOneof("kind") != "inversion":
            return []
        return batch_to_pil(common_pb2.ImageBatch(images=spec.inversion.targets))

    async def cancel(self, reason: str = "") -> JobStatus:
        return await self._client.cancel_job(self.id, reason)

    async def result(self, *, wait: bool = True, progress: bool = False) -> JobResult:
        if wait:
            await self.wait(progress=progress)
        return await self._client.get_result(self.id, kind=self.kind)

    async def rounds(self) -> AsyncIterator[AsyncRound]:
        client = self._client
        async with contextlib.aclosing(client._iterate(client._core.rounds(self.id))) as rounds:
            async for round in rounds:
                yield self._bind(round)

    async def feedback(
        self,
        round: FeedbackRound | str,
        *,
        choice: Sequence[int] | None = None,
        pairwise: Sequence[float | str] | None = None,
        ratings: Sequence[float] | None = None,
        action: ChoiceAction = "pick",
        step_size: float | None = None,
        rater: str = "",
        idempotency_key: str | None = None,
        latency_s: float = 0.0,
    ) -> FeedbackResult:
        return await self._client.submit_feedback(
            self.id,
            round,
            choice=choice,
            pairwise=pairwise,
            ratings=ratings,
            action=action,
            step_size=step_size,
            rater=rater,
            idempotency_key=idempotency_key,
            latency_s=latency_s,
        )

    async def answer_rounds(self, rater: AsyncRater, *, max_rounds: int | None = None, rater_id: str = "") -> JobStatus:
        """As `Job.answer_rounds`; `rater` may be a plain function or a coroutine function."""
        client = self._client
        operation = client._core.answer_rounds(
            self.id, rater, bind=self._bind, max_rounds=max_rounds, rater_id=rater_id
        )
        return await client._run(operation)

    async def interactions(self) -> list[Interaction]:
        return await self._client.interactions(self.id)

    def _bind(self, round: FeedbackRound) -> AsyncRound:
        client = self._client
        return AsyncRound(**round_fields(round), _render=lambda shown: client._run(client._core.render(shown)))
