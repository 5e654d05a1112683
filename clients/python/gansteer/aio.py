"""The asyncio client: the same calls as `gansteer.Client`, as coroutines on `grpc.aio` channels.

For code that already runs an event loop (a web backend, a design tool's server) and must not block it while a job
runs. Requests and results are built by the same functions as the blocking client's, so the two cannot disagree;
the retry, deadline and reconnect rules are the same too. Create and use an `AsyncClient` inside the event loop
that runs it (grpc.aio channels belong to one loop).

    async with gansteer.AsyncClient("localhost:50053") as client:
        job = await client.invert(image, model="scenes-gen", budget=200)
        async for event in job.watch():
            ...
        result = await job.result()
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc  # type: ignore[import-untyped]
import grpc.aio  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt

from gansteer import _convert, _specs
from gansteer._convert import ImageInput
from gansteer._progress import ProgressBar
from gansteer._specs import ClassSpec, InversionOptions, Outputs
from gansteer._transport import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    auth_metadata,
    backoff_delay,
    resolve_targets,
)
from gansteer.errors import DeadlineExceeded, JobCancelled, JobFailed, from_rpc_error
from gansteer.types import (
    GenerationResult,
    JobEvent,
    JobResult,
    JobState,
    JobStatus,
    ModelInfo,
    ProgressEvent,
    ScoreResult,
    ScorerInfo,
    StateChanged,
)
from gansteer.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    optimization_pb2,
    optimization_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)

R = TypeVar("R")


class AsyncClient:
    """`gansteer.Client` for asyncio: same constructor arguments, every method a coroutine."""

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
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.timeout, self.retries, self.watch_window = timeout, retries, watch_window
        self.generation_target, self.scoring_target, self.target = resolve_targets(
            target, generation_target, scoring_target
        )
        self._metadata = auth_metadata(api_key)
        self._channels: dict[str, grpc.aio.Channel] = {}
        generation_channel = self._channel(self.generation_target, credentials)
        self._generation = generation_pb2_grpc.GenerationServiceStub(generation_channel)  # type: ignore[no-untyped-call]
        self._scoring = scoring_pb2_grpc.ScoringServiceStub(self._channel(self.scoring_target, credentials))  # type: ignore[no-untyped-call]
        optimization_channel = self._channel(self.target, credentials)
        self._optimization = optimization_pb2_grpc.OptimizationServiceStub(optimization_channel)  # type: ignore[no-untyped-call]
        self._cards: dict[str, ModelInfo] = {}

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

    async def _call(
        self,
        method: Callable[..., Awaitable[R]],
        request: Any,
        *,
        target: str,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> R:
        attempt = 0
        while True:
            try:
                return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as error:
                if idempotent and error.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    await asyncio.sleep(backoff_delay(attempt))
                    attempt += 1
                    continue
                raise from_rpc_error(error, target=target) from error

    async def models(
        self, kind: str | None = None, *, name_contains: str = "", all_versions: bool = False
    ) -> list[ModelInfo]:
        request = generation_pb2.ListModelsRequest(
            kind=_convert.KIND_PROTOS[kind] if kind else None, name_contains=name_contains, all_versions=all_versions
        )
        response = await self._call(self._generation.ListModels, request, target=self.generation_target)
        return [_convert.model_info(card) for card in response.models]

    async def model(self, name: str) -> ModelInfo:
        if name not in self._cards:
            request = generation_pb2.GetModelRequest(model=_convert.model_ref(name))
            response = await self._call(self._generation.GetModel, request, target=self.generation_target)
            self._cards[name] = _convert.model_info(response.card)
        return self._cards[name]

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
        card = await self.model(model) if _specs.needs_card(classes) else None
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
        response = await self._call(self._generation.Generate, request, target=self.generation_target, timeout=timeout)
        latents_out = _convert.optional_array(response.latents, field="latents")
        return GenerationResult(
            images=_convert.batch_to_pil(response.images),
            latents=latents_out if latents_out is not None else np.zeros((0, 0), np.float32),
            class_ids=list(response.class_ids),
            class_embeddings=_convert.optional_array(response.class_embeddings, field="class_embeddings"),
            model=_convert.ref_text(response.model),
        )

    async def scorers(self, model_kind: str | None = None) -> list[ScorerInfo]:
        request = scoring_pb2.ListScorersRequest(model_kind=_convert.KIND_PROTOS[model_kind] if model_kind else None)
        response = await self._call(self._scoring.ListScorers, request, target=self.scoring_target)
        return [_convert.scorer_info(scorer) for scorer in response.scorers]

    async def score(
        self,
        images: ImageInput | Sequence[ImageInput],
        scorer: str,
        outputs: Outputs | None = None,
        *,
        timeout: float | None = None,
    ) -> ScoreResult:
        if outputs is None:
            kind = (await self.model(scorer)).kind
            if kind not in _specs.DEFAULT_OUTPUTS:
                raise _specs._invalid("outputs", f"{scorer} is a {kind}; name the outputs to compute")
            outputs = _specs.DEFAULT_OUTPUTS[kind]
        request = _specs.score_request(images, scorer, outputs)
        response = await self._call(self._scoring.Score, request, target=self.scoring_target, timeout=timeout)
        return _convert.score_result(response.outputs)

    async def invert(
        self, target: ImageInput | Sequence[ImageInput], *, model: str, **options: Unpack[InversionOptions]
    ) -> AsyncJob:
        """Submits an inversion job; the options are those of `Client.invert`."""
        card = await self.model(model) if isinstance(options.get("conditioned_class"), str) else None
        return await self.submit(_specs.inversion_spec(target, model=model, card=card, **options))

    async def submit(self, spec: optimization_pb2.JobSpec) -> AsyncJob:
        response = await self._call(
            self._optimization.SubmitJob,
            optimization_pb2.SubmitJobRequest(spec=spec),
            target=self.target,
            idempotent=bool(spec.idempotency_key),
        )
        return AsyncJob(self, response.job_id, kind=response.job.kind or str(spec.WhichOneof("kind") or ""))

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, job_id, kind=(await self.get_job(job_id)).kind)

    async def jobs(
        self,
        *,
        states: Sequence[JobState | str] = (),
        kind: str = "",
        labels: Mapping[str, str] | None = None,
        limit: int | None = None,
        page_size: int = 50,
    ) -> AsyncIterator[JobStatus]:
        token, seen = "", 0
        while True:
            request = _convert.list_jobs_request(
                page_size=page_size, page_token=token, states=states, kind=kind, labels=labels
            )
            response = await self._call(self._optimization.ListJobs, request, target=self.target)
            for job in response.jobs:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield _convert.job_status(job)
            token = response.next_page_token
            if not token:
                return

    async def get_job(self, job_id: str) -> JobStatus:
        request = optimization_pb2.GetJobRequest(job_id=job_id, view=optimization_pb2.JOB_VIEW_BASIC)
        response = await self._call(self._optimization.GetJob, request, target=self.target)
        return _convert.job_status(response.job)

    async def cancel_job(self, job_id: str, reason: str = "") -> JobStatus:
        request = optimization_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        response = await self._call(self._optimization.CancelJob, request, target=self.target)
        return _convert.job_status(response.job)

    async def get_result(self, job_id: str, *, kind: str = "") -> JobResult:
        request = optimization_pb2.GetResultRequest(job_id=job_id)
        response = await self._call(self._optimization.GetResult, request, target=self.target)
        return _convert.job_result(response.result, kind=kind)

    async def watch_job(
        self,
        job_id: str,
        *,
        after_event_id: str = "",
        previews: bool = True,
        kind: str = "",
        deadline: float | None = None,
    ) -> AsyncIterator[JobEvent]:
        """As `Client.watch_job`: events until the final state, resuming after the last one on reconnect."""
        last, failures = after_event_id, 0
        while True:
            window = self.watch_window
            if deadline is not None:
                window = min(window, deadline - time.monotonic())
                if window <= 0:
                    raise DeadlineExceeded(f"job {job_id}: still running when the wait's deadline passed")
            request = optimization_pb2.WatchJobRequest(job_id=job_id, after_event_id=last, skip_previews=not previews)
            stream = self._optimization.WatchJob(request, timeout=window, metadata=self._metadata)
            received = broken = False
            try:
                async for message in stream:
                    received, failures = True, 0
                    last = message.event_id or last
                    event = _convert.job_event(message, kind=kind)
                    yield event
                    if isinstance(event, StateChanged) and event.state.terminal:
                        return
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue
                if error.code() != grpc.StatusCode.UNAVAILABLE or failures >= self.retries:
                    raise from_rpc_error(error, target=self.target) from error
                broken = True
            finally:
                stream.cancel()
            if not broken and not received and (await self.get_job(job_id)).state.terminal:
                return
            await asyncio.sleep(backoff_delay(failures))
            failures += 1


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
        deadline = None if timeout is None else time.monotonic() + timeout
        with ProgressBar(f"{self.kind or 'job'} {self.id[:12]}", enabled=progress) as bar:
            async for event in self._client.watch_job(self.id, previews=False, kind=self.kind, deadline=deadline):
                if isinstance(event, ProgressEvent):
                    bar.update(event.step, event.total_steps, event.criterion, event.elapsed_s)
                elif isinstance(event, StateChanged) and event.state.terminal:
                    break
        status = await self.status()
        if status.state == JobState.CANCELLED:
            raise JobCancelled(status)
        if status.state != JobState.SUCCEEDED:
            raise JobFailed(status)
        return status

    async def cancel(self, reason: str = "") -> JobStatus:
        return await self._client.cancel_job(self.id, reason)

    async def result(self, *, wait: bool = True) -> JobResult:
        if wait:
            await self.wait()
        return await self._client.get_result(self.id, kind=self.kind)
