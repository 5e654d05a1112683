"""The blocking client: one object that reaches the generation, scoring and optimization services.

Every call has a deadline (`timeout`), and calls that are safe to repeat are retried on UNAVAILABLE with
exponential backoff and jitter, so a service restart or a brief network cut costs a pause, not an exception.
SubmitJob is made safe to repeat by sending an idempotency key: the server returns the job a first, lost attempt
created. Failed calls raise the `gansteer.errors` classes with the server's message and field details.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Unpack

import grpc  # type: ignore[import-untyped]
import numpy.typing as npt

from gansteer._convert import ImageInput
from gansteer._core import Core
from gansteer._specs import ClassSpec, Outputs
from gansteer._steps import Await, Call, Emit, Feed, Service, Sleep, Steps, Stream, settle
from gansteer._transport import CHANNEL_OPTIONS, DEFAULT_TARGET, auth_metadata, resolve_targets
from gansteer.errors import GansteerError, from_rpc_error
from gansteer.job import Job
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
from gansteer.v1 import generation_pb2_grpc, optimization_pb2, optimization_pb2_grpc, scoring_pb2_grpc

T = TypeVar("T")
STUBS: dict[Service, Any] = {
    "generation": generation_pb2_grpc.GenerationServiceStub,
    "scoring": scoring_pb2_grpc.ScoringServiceStub,
    "optimization": optimization_pb2_grpc.OptimizationServiceStub,
}


class Client:
    """A connection to a gansteer deployment.

    `target` is the optimization service (`host:port`); `generation_target` and `scoring_target` default to the
    same address (a gateway serving all three) or, with the default target, to the local stack's ports 50051 and
    50052. `api_key` is sent as `authorization: Bearer <key>`. `timeout` is the deadline of each unary call in
    seconds; `retries` is how many times an idempotent call is retried on UNAVAILABLE, and `outage_patience` how many
    seconds `wait()` and `watch()` keep retrying through an outage. Pass `credentials`
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
        outage_patience: float = 120.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.timeout = timeout
        self.retries = retries
        # How long a client following a job (wait, watch) rides out UNAVAILABLE (a server or Redis outage).
        self.outage_patience = outage_patience
        # Each WatchJob connection lasts at most this long and is then resumed from the last event, so even the
        # stream of a long job has a deadline and a silently dead connection is noticed.
        self.watch_window = watch_window
        self.generation_target, self.scoring_target, self.target = resolve_targets(
            target, generation_target, scoring_target
        )
        self._metadata = auth_metadata(api_key)
        self._channels: dict[str, grpc.Channel] = {}
        self._targets: dict[Service, str] = {
            "generation": self.generation_target,
            "scoring": self.scoring_target,
            "optimization": self.target,
        }
        self._stubs: dict[Service, Any] = {
            service: stub(self._channel(self._targets[service], credentials)) for service, stub in STUBS.items()
        }
        self._core = Core(self)

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

    # --- performing the core's operations ---------------------------------------------------------------------

    def _run(self, operation: Steps[T]) -> T:
        """Performs one operation of the core (`gansteer._core`) and returns its value."""
        with contextlib.closing(self._iterate(settle(operation))) as values:
            return next(values)

    def _iterate(self, operation: Feed[T]) -> Generator[T, None, None]:
        """Performs an operation's steps with the blocking stubs, sending back each reply (or throwing in the failed
        call's error), and yields the values it emits. A stream it left open is cancelled when it ends."""
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
                    time.sleep(step.seconds)
                elif isinstance(step, Await):
                    raise TypeError("the blocking client cannot await a coroutine; use gansteer.AsyncClient")
                else:
                    try:
                        reply, stream = self._perform(step, stream)
                    except grpc.RpcError as failure:
                        error = from_rpc_error(failure, target=self._targets[step.service])
                        error.__cause__ = failure
        finally:
            if stream is not None:
                stream[1].cancel()
            operation.close()

    def _perform(self, step: Call | Stream, stream: tuple[Any, Any] | None) -> tuple[Any, tuple[Any, Any] | None]:
        """One call's reply (a stream's next message, None at its end), and the stream open after it."""
        method = getattr(self._stubs[step.service], step.method)
        if isinstance(step, Call):
            return method(step.request, timeout=step.timeout or self.timeout, metadata=self._metadata), stream
        if stream is None or stream[0] is not step:
            if stream is not None:
                stream[1].cancel()
            stream = (step, method(step.request, timeout=step.timeout, metadata=self._metadata))
        return next(stream[1], None), stream

    # --- models and images ----------------------------------------------------------------------------------------

    def models(
        self, kind: str | None = None, *, name_contains: str = "", all_versions: bool = False
    ) -> list[ModelInfo]:
        """The registered models (every kind unless `kind` is `generator`, `classifier`, ...), sorted by name."""
        return self._run(self._core.models(kind, name_contains=name_contains, all_versions=all_versions))

    def model(self, name: str) -> ModelInfo:
        """One model's card (`name` or `name@version`); raises NotFound for an unknown one. Cached per client."""
        return self._run(self._core.model(name))

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
        return self._run(operation)

    def regenerate(self, saved: SavedInput, *, timeout: float | None = None) -> GenerationResult:
        """The images of a saved result (`JobResult.save`, the CLI's `--out`; a `SavedResult`, its folder or its
        result.json), rendered again by the generator version that made them from the saved latents and conditions:
        on the same deployment they equal the saved images exactly. Compare with `saved.load_images()`.
        """
        return self._run(self._core.regenerate(saved, timeout=timeout))

    def scorers(self, model_kind: str | None = None) -> list[ScorerInfo]:
        """The outputs `score` can compute (names, parameters, providing models); `model_kind` filters them."""
        return self._run(self._core.scorers(model_kind))

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
        return self._run(self._core.score(images, scorer, outputs, timeout=timeout))

    # --- jobs -----------------------------------------------------------------------------------------------------

    def invert(
        self, target: ImageInput | Sequence[ImageInput], *, model: str, **options: Unpack[InversionOptions]
    ) -> Job:
        """Submits an inversion job: find latents of generator `model` whose images resemble the target(s).

        `target`: one image or a list (PIL images, paths, image bytes, numpy arrays); all are optimised as one
        batch, one result each. `options` (see `InversionOptions`): `criterion`, `lambda_*`, `discriminator`,
        `optimizer`, `budget` (300 iterations unless given), `conditioned_class`, `restarts`, `seed`, ... Unset
        ones take the server's defaults (the `l2+features` preset, per-search L-BFGS); an unknown one raises
        TypeError naming the nearest valid name. Returns at once with the job; the server refuses a bad spec with
        InvalidArgument, or NotFound for an unknown model.
        """
        job_id, kind = self._run(self._core.invert(target, model=model, options=options))
        return Job(self, job_id, kind=kind)

    def evolve(self, *, model: str, **options: Unpack[EvolutionOptions]) -> Job:
        """Submits an interactive evolution (HEVOL, seed 003) on generator `model`: each round shows 1 + offspring
        images, a person picks `mu` of them (repeats allowed) and the next round is bred from the picks.

        `options` (see `EvolutionOptions`): `mu` (5), `offspring` (27), `mutation_rate` (1/d), `rounds` (0: until
        cancelled), `conditioned_class` (unset: evolve the class vector too), `seed`, ... Answer the rounds with
        `job.rounds()` and `job.feedback(...)`, or `job.answer_rounds(rater)` (a person's UI, or
        `gansteer.simulate.SimulatedPerson`). Returns at once with the job.
        """
        job_id, kind = self._run(self._core.evolve(model=model, options=options))
        return Job(self, job_id, kind=kind)

    def human_nes(self, *, model: str, **options: Unpack[HumanNESOptions]) -> Job:
        """Submits a human NES job (seed 004, HumanGAN) on generator `model`: each round shows, for `images` fixed
        latents, `pairs_per_image` pairs x + Delta / x - Delta on random sides; people answer each pair on a graded
        scale in [-1, 1] (+1: left looks better) and one optimizer step follows. The tuned generator is registered
        as a new version (`job.result().models`), served without a restart.

        `options` (see `HumanNESOptions`): `basis` (uneven), `basis_images` or `basis_folder` (default: scenes
        renders), `basis_components` (q), `sigma`, `images`, `pairs_per_image`, `rounds`, `raters_per_pair`,
        `answer_levels`, `learning_rate`, `register_as`, ... Answer with `job.answer_rounds(rater)` (a person's UI,
        `gansteer-web`, or `gansteer.simulate_pairwise.PairwisePerson`). Returns at once with the job.
        """
        job_id, kind = self._run(self._core.human_nes(model=model, options=options))
        return Job(self, job_id, kind=kind)

    def latent_search(self, *, model: str, **options: Unpack[LatentSearchOptions]) -> Job:
        """Submits a latent search (seed 002) on generator `model`: find latents whose images maximise a scorer's
        output, e.g. `classes=["mountains"]` for the most mountain-like images by the classifier's logit.

        `options` (see `LatentSearchOptions`): `classes` (ids or names), `objective` (output names or
        {"output", "params", "weight", "model"} terms; default `class_logit`), `optimizer` (`adam` gradient ascent,
        `cmaes`, `ga`, or any of `optimizers()`), `optimizer_options` ({"sigma": 0.5}, {"mutation": 0.01}),
        `budget` (600 generator calls per search unless given), `restarts`, `judge`, `prior_weight`, ... Each result
        item carries its objective, robustness (p10 over 200 perturbations), the judge's probability and realism.
        Returns at once with the job.
        """
        job_id, kind = self._run(self._core.latent_search(model=model, options=options))
        return Job(self, job_id, kind=kind)

    def pir_estimator(self, *, dataset: str, **options: Unpack[PIREstimatorOptions]) -> Job:
        """Submits a PIR estimator job (seed 000, appendix C.3) on impressions table `dataset`: a classifier backbone
        (`backbone`, default scenes-clf-alt) with a `bins`-bin softmax head (100), Adam at 5e-4, trained on the two
        disjoint halves of the table (the second estimator is the tuning guard's check; `single` trains one).
        `simulate_generator` with `simulate_objective` ({"output": "colour_single", "params": {"colour": "red"}})
        first collects simulated interactions (1000 images x 1000 impressions, binomial noise) into the table.
        `init_estimator` continues from an earlier estimator (round 2). Registers `register_as` (pir-<dataset>) and
        `<name>-check` as models of kind pir_estimator, served by the scoring service's `pir` output."""
        job_id, kind = self._run(self._core.pir_estimator(dataset=dataset, options=options))
        return Job(self, job_id, kind=kind)

    def pir_tuning(self, *, model: str, estimator: str, **options: Unpack[PIRTuningOptions]) -> Job:
        """Submits a PIR tuning job (seed 000, section 2.4): generator `model` keeps its GAN training against its
        discriminator on real images (`real_data`: `scenes` or a folder) with `pir_weight` x E[R(G(z))] added for
        `estimator` R; guarded by `anchor_weight` (pixel distance to the frozen generator) and early stopping on the
        estimator's check estimator (`no_guards` turns both off). With `objective` the result judges before
        against after (Welch's p, Cohen's d, 99.9% CI). The tuned generator is registered as a new version with
        its lineage and served at once."""
        job_id, kind = self._run(self._core.pir_tuning(model=model, estimator=estimator, options=options))
        return Job(self, job_id, kind=kind)

    def report_impressions(
        self, dataset: str, records: Sequence[Mapping[str, Any]], *, idempotency_key: str | None = None
    ) -> tuple[int, int, bool]:
        """Appends shown images' counts to impressions table `dataset`: each record names `generator`
        (name@version), `seed` or `latent`, `class_id`, `impressions`, `interactions`, and optionally `image_id`,
        `cohort`, `time`. Returns (recorded, table size, duplicate). A bad record refuses all (InvalidArgument
        naming `records[i].<field>`)."""
        return self._run(self._core.report_impressions(dataset, records, idempotency_key=idempotency_key))

    def impressions(self, dataset: str, *, page_size: int = 1000) -> list[dict[str, Any]]:
        """Impressions table `dataset` as rows (dicts), in arrival order, with their provenance."""
        return self._run(self._core.impressions(dataset, page_size=page_size))

    def embedding_am(self, *, model: str, **options: Unpack[EmbeddingAMOptions]) -> Job:
        """Submits an embedding activation maximisation (seed 001) on class-conditional generator `model`: learn
        one class embedding row, with the generator frozen, so that a classifier recognises its samples as the target.

        Exactly one of `target_class` (a generator class, id or name: its row is learned anew) and `new_label` (a
        classifier label the generator was not trained on, e.g. `dusk` of `scenes-clf-alt`: a row is added) is
        required. `options` (see `EmbeddingAMOptions`): `classifier`, `init` (`target`, `mean`, `top-k`, `random`),
        `trials` (5, stepped together), `steps` (200), `diversity_weight` with `diversity_space` (Eq. 2.1), `judge`,
        `register_as`, `dry_run`, `seed`, ... The result (`EmbeddingAMResult`) has every trial's row and metrics,
        the chosen one, before/after metrics and grid, and the registered version. Returns at once with the job.
        """
        job_id, kind = self._run(self._core.embedding_am(model=model, options=options))
        return Job(self, job_id, kind=kind)

    def submit(self, spec: optimization_pb2.JobSpec) -> Job:
        """Submits any job kind from its JobSpec message (the typed helpers such as `invert` build one).

        Retried on UNAVAILABLE only when the spec has an idempotency key, since only then is a repeat harmless.
        """
        job_id, kind = self._run(self._core.submit(spec))
        return Job(self, job_id, kind=kind)

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
        return self._iterate(self._core.jobs(states=states, kind=kind, labels=labels, limit=limit, page_size=page_size))

    def job_kinds(self) -> list[JobKindInfo]:
        """The job kinds this server runs, with each kind's options and their defaults."""
        return self._run(self._core.job_kinds())

    def optimizers(self) -> list[OptimizerInfo]:
        """The optimizers every searching kind draws from, by the name a spec gives them."""
        return self._run(self._core.optimizers())

    # Per-job calls; `Job` is the interface users hold, these are its transport.

    def get_job(self, job_id: str) -> JobStatus:
        return self._run(self._core.get_job(job_id))

    def get_job_spec(self, job_id: str) -> optimization_pb2.JobSpec:
        return self._run(self._core.get_job_spec(job_id))

    def cancel_job(self, job_id: str, reason: str = "") -> JobStatus:
        return self._run(self._core.cancel_job(job_id, reason))

    def get_result(self, job_id: str, *, kind: str = "", timeout: float | None = None) -> JobResult:
        return self._run(self._core.get_result(job_id, kind=kind, timeout=timeout))

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
        operation = self._core.watch_job(
            job_id, after_event_id=after_event_id, previews=previews, kind=kind, deadline=deadline
        )
        return self._iterate(operation)

    def interactions(self, job_id: str) -> list[Interaction]:
        """The job's interaction log: every answer to its rounds with its provenance, oldest first."""
        return self._run(self._core.interactions(job_id))

    def submit_feedback(
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
        """An answer to a round (or a round id) of a job; see `Job.feedback`."""
        answer = Answer(choice=choice, pairwise=pairwise, ratings=ratings, action=action, step_size=step_size)
        operation = self._core.submit_feedback(
            job_id, round, answer, rater=rater, idempotency_key=idempotency_key, latency_s=latency_s
        )
        return self._run(operation)
