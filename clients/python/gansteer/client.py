"""The blocking client: one object that reaches the generation, scoring and optimization services.

Every call has a deadline (`timeout`), and calls that are safe to repeat are retried on UNAVAILABLE with
exponential backoff and jitter, so a service restart or a brief network cut costs a pause, not an exception.
SubmitJob is made safe to repeat by sending an idempotency key: the server returns the job a first, lost attempt
created. Failed calls raise the `gansteer.errors` classes with the server's message and field details.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt

from gansteer import _convert, _specs
from gansteer._convert import ImageInput
from gansteer._specs import ClassSpec, InversionOptions, Outputs
from gansteer._transport import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    auth_metadata,
    backoff_delay,
    resolve_targets,
)
from gansteer.errors import DeadlineExceeded, from_rpc_error
from gansteer.job import Job
from gansteer.types import (
    GenerationResult,
    JobEvent,
    JobResult,
    JobState,
    JobStatus,
    ModelInfo,
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


class Client:
    """A connection to a gansteer deployment.

    `target` is the optimization service (`host:port`); `generation_target` and `scoring_target` default to the
    same address (a gateway serving all three) or, with the default target, to the local stack's ports 50051 and
    50052. `api_key` is sent as `authorization: Bearer <key>`. `timeout` is the deadline of each unary call in
    seconds; `retries` is how many times an idempotent call is retried on UNAVAILABLE. Pass `credentials`
    (e.g. `grpc.ssl_channel_credentials()`) for TLS. Close it (or use it as a context manager) to free the
    channels.
    """

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
        self.timeout = timeout
        self.retries = retries
        # Each WatchJob connection lasts at most this long and is then resumed from the last event, so even the
        # stream of a long job has a deadline and a silently dead connection is noticed.
        self.watch_window = watch_window
        self.generation_target, self.scoring_target, self.target = resolve_targets(
            target, generation_target, scoring_target
        )
        self._metadata = auth_metadata(api_key)
        self._channels: dict[str, grpc.Channel] = {}
        generation_channel = self._channel(self.generation_target, credentials)
        self._generation = generation_pb2_grpc.GenerationServiceStub(generation_channel)  # type: ignore[no-untyped-call]
        self._scoring = scoring_pb2_grpc.ScoringServiceStub(self._channel(self.scoring_target, credentials))  # type: ignore[no-untyped-call]
        optimization_channel = self._channel(self.target, credentials)
        self._optimization = optimization_pb2_grpc.OptimizationServiceStub(optimization_channel)  # type: ignore[no-untyped-call]
        self._cards: dict[str, ModelInfo] = {}

    def _channel(self, target: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
        if target not in self._channels:
            self._channels[target] = (
                grpc.secure_channel(target, credentials, CHANNEL_OPTIONS)
                if credentials is not None
                else grpc.insecure_channel(target, CHANNEL_OPTIONS)
            )
        return self._channels[target]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Client(target={self.target!r}, generation_target={self.generation_target!r}, "
            f"scoring_target={self.scoring_target!r})"
        )

    # --- transport ------------------------------------------------------------------------------------------------

    def _call(
        self,
        method: Callable[..., R],
        request: Any,
        *,
        target: str,
        idempotent: bool = True,
        timeout: float | None = None,
    ) -> R:
        """One unary call with a deadline; retried on UNAVAILABLE when `idempotent`; errors translated."""
        attempt = 0
        while True:
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as error:
                code = error.code()
                if idempotent and code == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    time.sleep(backoff_delay(attempt))
                    attempt += 1
                    continue
                raise from_rpc_error(error, target=target) from error

    # --- models and images ----------------------------------------------------------------------------------------

    def models(
        self, kind: str | None = None, *, name_contains: str = "", all_versions: bool = False
    ) -> list[ModelInfo]:
        """The registered models (every kind unless `kind` is `generator`, `classifier`, ...), sorted by name."""
        request = generation_pb2.ListModelsRequest(
            kind=_convert.KIND_PROTOS[kind] if kind else None, name_contains=name_contains, all_versions=all_versions
        )
        response = self._call(self._generation.ListModels, request, target=self.generation_target)
        return [_convert.model_info(card) for card in response.models]

    def model(self, name: str) -> ModelInfo:
        """One model's card (`name` or `name@version`); raises NotFound for an unknown one. Cached per client."""
        if name not in self._cards:
            request = generation_pb2.GetModelRequest(model=_convert.model_ref(name))
            response = self._call(self._generation.GetModel, request, target=self.generation_target)
            self._cards[name] = _convert.model_info(response.card)
        return self._cards[name]

    def generate(
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
        """`n` images from a generator, drawn from its prior with `seed`, or from given `latents` [N, latent_size].

        `classes`: one class (id or name) for every image, or one per image; unset on a class-conditional
        generator, classes are drawn with the seed. `embeddings`: free class vectors instead of classes.
        `truncation` redraws drawn latent components beyond it. The result holds the latents and classes used,
        so passing them back reproduces the images exactly.
        """
        card = self.model(model) if _specs.needs_card(classes) else None
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
        response = self._call(self._generation.Generate, request, target=self.generation_target, timeout=timeout)
        latents_out = _convert.optional_array(response.latents, field="latents")
        return GenerationResult(
            images=_convert.batch_to_pil(response.images),
            latents=latents_out if latents_out is not None else np.zeros((0, 0), np.float32),
            class_ids=list(response.class_ids),
            class_embeddings=_convert.optional_array(response.class_embeddings, field="class_embeddings"),
            model=_convert.ref_text(response.model),
        )

    def scorers(self, model_kind: str | None = None) -> list[ScorerInfo]:
        """The outputs `score` can compute (names, parameters, providing models); `model_kind` filters them."""
        request = scoring_pb2.ListScorersRequest(model_kind=_convert.KIND_PROTOS[model_kind] if model_kind else None)
        response = self._call(self._scoring.ListScorers, request, target=self.scoring_target)
        return [_convert.scorer_info(scorer) for scorer in response.scorers]

    def score(
        self,
        images: ImageInput | Sequence[ImageInput],
        scorer: str,
        outputs: Outputs | None = None,
        *,
        timeout: float | None = None,
    ) -> ScoreResult:
        """Scores images with a scorer model (`scenes-clf`, `scenes-disc@1`, ...).

        `outputs`: an output name (`log_probs`), several, or names mapped to parameters
        (`{"probs": {"classes": [3]}}`); unset: the model kind's main output (`probs` for classifiers, `realism`
        for discriminators). The result maps each output to its values array; `.outputs` has the extras.
        """
        if outputs is None:
            kind = self.model(scorer).kind
            if kind not in _specs.DEFAULT_OUTPUTS:
                raise _specs._invalid("outputs", f"{scorer} is a {kind}; name the outputs to compute")
            outputs = _specs.DEFAULT_OUTPUTS[kind]
        request = _specs.score_request(images, scorer, outputs)
        response = self._call(self._scoring.Score, request, target=self.scoring_target, timeout=timeout)
        return _convert.score_result(response.outputs)

    # --- jobs -----------------------------------------------------------------------------------------------------

    def invert(
        self, target: ImageInput | Sequence[ImageInput], *, model: str, **options: Unpack[InversionOptions]
    ) -> Job:
        """Submits an inversion job: find latents of generator `model` whose images resemble the target(s).

        `target`: one image or a list (PIL images, paths, image bytes, numpy arrays); all are optimised as one
        batch, one result each. `options` (see `InversionOptions`): `criterion`, `lambda_*`, `discriminator`,
        `optimizer`, `budget` (300 iterations unless given), `conditioned_class`, `restarts`, `seed`, ... Unset
        ones take the server's defaults (the `l2+features` preset, Adam). Returns at once with the job; the server
        refuses a bad spec with InvalidArgument, or NotFound for an unknown model.
        """
        card = self.model(model) if isinstance(options.get("conditioned_class"), str) else None
        return self.submit(_specs.inversion_spec(target, model=model, card=card, **options))

    def submit(self, spec: optimization_pb2.JobSpec) -> Job:
        """Submits any job kind from its JobSpec message (the typed helpers such as `invert` build one).

        Retried on UNAVAILABLE only when the spec has an idempotency key, since only then is a repeat harmless.
        """
        response = self._call(
            self._optimization.SubmitJob,
            optimization_pb2.SubmitJobRequest(spec=spec),
            target=self.target,
            idempotent=bool(spec.idempotency_key),
        )
        return Job(self, response.job_id, kind=response.job.kind or str(spec.WhichOneof("kind") or ""))

    def job(self, job_id: str) -> Job:
        """Re-attaches to an existing job by id (from another process, or after a restart); NotFound if unknown."""
        return Job(self, job_id, kind=self.get_job(job_id).kind)

    def jobs(
        self,
        *,
        states: Sequence[JobState | str] = (),
        kind: str = "",
        labels: Mapping[str, str] | None = None,
        limit: int | None = None,
        page_size: int = 50,
    ) -> Iterator[JobStatus]:
        """The caller's jobs, newest first, fetched a page at a time as the iterator advances."""
        token, seen = "", 0
        while True:
            request = _convert.list_jobs_request(
                page_size=page_size, page_token=token, states=states, kind=kind, labels=labels
            )
            response = self._call(self._optimization.ListJobs, request, target=self.target)
            for job in response.jobs:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield _convert.job_status(job)
            token = response.next_page_token
            if not token:
                return

    # Per-job calls; `Job` is the interface users hold, these are its transport.

    def get_job(self, job_id: str) -> JobStatus:
        response = self._call(
            self._optimization.GetJob,
            optimization_pb2.GetJobRequest(job_id=job_id, view=optimization_pb2.JOB_VIEW_BASIC),
            target=self.target,
        )
        return _convert.job_status(response.job)

    def get_job_spec(self, job_id: str) -> optimization_pb2.JobSpec:
        response = self._call(
            self._optimization.GetJob,
            optimization_pb2.GetJobRequest(job_id=job_id, view=optimization_pb2.JOB_VIEW_FULL),
            target=self.target,
        )
        spec: optimization_pb2.JobSpec = response.job.spec
        return spec

    def cancel_job(self, job_id: str, reason: str = "") -> JobStatus:
        response = self._call(
            self._optimization.CancelJob,
            optimization_pb2.CancelJobRequest(job_id=job_id, reason=reason),
            target=self.target,
        )
        return _convert.job_status(response.job)

    def get_result(self, job_id: str, *, kind: str = "", timeout: float | None = None) -> JobResult:
        response = self._call(
            self._optimization.GetResult,
            optimization_pb2.GetResultRequest(job_id=job_id),
            target=self.target,
            timeout=timeout,
        )
        return _convert.job_result(response.result, kind=kind)

    def watch_job(
        self,
        job_id: str,
        *,
        after_event_id: str = "",
        previews: bool = True,
        kind: str = "",
        deadline: float | None = None,
    ) -> Iterator[JobEvent]:
        """The job's events until its final state change, reconnecting after the last event seen when the stream
        breaks (UNAVAILABLE, with backoff) or its window ends. `deadline` (time.monotonic) bounds the whole watch.
        """
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
                for message in stream:
                    received, failures = True, 0
                    last = message.event_id or last
                    event = _convert.job_event(message, kind=kind)
                    yield event
                    if isinstance(event, StateChanged) and event.state.terminal:
                        return
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # the window ended: resume after the last event
                if code != grpc.StatusCode.UNAVAILABLE or failures >= self.retries:
                    raise from_rpc_error(error, target=self.target) from error
                broken = True
            finally:
                stream.cancel()
            # The stream ended without the final state change: either the connection broke (resume with backoff),
            # or the server has no more events to give (the job ended and its stream was trimmed or expired).
            if not broken and not received and self.get_job(job_id).state.terminal:
                return
            time.sleep(backoff_delay(failures))
            failures += 1
