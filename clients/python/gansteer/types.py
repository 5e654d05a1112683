"""The plain Python values the SDK hands back: PIL images, numpy arrays, frozen dataclasses and str enums.

Callers never see protobuf messages; every field a person or script reads is typed here, so `mypy --strict` code
built on the SDK checks end to end. Values are decoded once, when the response arrives.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage

from gansteer.errors import ErrorDetail

if TYPE_CHECKING:
    from gansteer.saved import SavedResult
    from gansteer.v1 import optimization_pb2

FloatArray = npt.NDArray[np.float32]


class JobState(enum.StrEnum):
    """A job's state; the value is the lower-case name the CLI prints and `--json` writes."""

    UNSPECIFIED = "unspecified"
    QUEUED = "queued"
    RUNNING = "running"
    WAITING_FOR_FEEDBACK = "waiting_for_feedback"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True once the job can change no more (its event stream has ended)."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class ModelInfo:
    """A registered model's card: the fields every model has, plus the whole card as a dict in `card`."""

    name: str
    version: int
    kind: str  # generator, discriminator, classifier, pir_estimator, feature_extractor
    architecture: str
    description: str
    resolution: int
    channels: int
    latent_size: int
    num_classes: int
    class_names: tuple[str, ...]
    embedding_size: int
    value_range: tuple[float, float]
    metrics: Mapping[str, float]
    backends: tuple[str, ...]
    format: str
    created: str
    card: Mapping[str, Any] = field(repr=False)

    @property
    def ref(self) -> str:
        """The `name@version` text that names exactly this model in every other call."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class GenerationResult:
    """Images from a generator with everything needed to reproduce them (pass `latents` and `class_ids` back)."""

    images: list[PILImage.Image]
    latents: FloatArray
    class_ids: list[int]
    class_embeddings: FloatArray | None
    model: str


@dataclass(frozen=True)
class ScorerParam:
    """One parameter of a scorer output; `default_json` is empty when the parameter is required."""

    name: str
    type: str
    default_json: str
    description: str


@dataclass(frozen=True)
class ScorerInfo:
    """An output the scoring service computes: its parameters and the models that provide it."""

    name: str
    description: str
    model_kind: str
    models: tuple[str, ...]
    params: tuple[ScorerParam, ...]
    differentiable: bool
    per_image: bool


@dataclass(frozen=True)
class ScoreOutput:
    """One requested output: `values` ([N] or [N, ...] per image), secondary arrays in `extra`."""

    key: str
    values: FloatArray
    extra: Mapping[str, npt.NDArray[Any]]
    model: str


@dataclass(frozen=True)
class ScoreResult(Mapping[str, FloatArray]):
    """The outputs of one `Client.score` call, by key; `result["log_probs"]` is that output's values array."""

    outputs: Mapping[str, ScoreOutput]

    def __getitem__(self, key: str) -> FloatArray:
        return self.outputs[key].values

    def __iter__(self) -> Iterator[str]:
        return iter(self.outputs)

    def __len__(self) -> int:
        return len(self.outputs)


@dataclass(frozen=True)
class JobStatus:
    """A job's record as the optimization service holds it."""

    id: str
    kind: str
    state: JobState
    step: int
    total_steps: int
    criterion: Mapping[str, float]
    error: str
    error_details: tuple[ErrorDetail, ...]
    cancel_requested: bool
    attempts: int
    last_event_id: str
    labels: Mapping[str, str]
    priority: int
    owner: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    pending_round: FeedbackRound | None  # the open round while the state is WAITING_FOR_FEEDBACK


@dataclass(frozen=True)
class CriterionCurve:
    """A criterion's values over the steps of a job: `values[name]` is [num_items, len(steps)]."""

    steps: npt.NDArray[np.int64]
    values: Mapping[str, FloatArray]


@dataclass(frozen=True)
class JobResult:
    """What a succeeded job produced: one image (and latent) per result item, metrics and the criterion curve.

    `generator` (pinned `name@version`), `latents` and the condition (`class_ids` where a class was held, else
    `class_embeddings`) are what rendered `images`: `save` keeps them and `Client.regenerate` renders them again.
    """

    job_id: str
    images: list[PILImage.Image]
    latents: FloatArray
    class_embeddings: FloatArray | None
    metrics: Mapping[str, float]
    item_metrics: list[Mapping[str, float]]
    curve: CriterionCurve
    models: list[str]
    tensors: Mapping[str, npt.NDArray[Any]]
    generator: str = ""  # empty from a server that did not record it
    class_ids: tuple[int, ...] = ()
    kind: str = ""  # the JobSpec kind, when the client knew it

    def save(self, folder: str | os.PathLike[str], *, spec: optimization_pb2.JobSpec | None = None) -> SavedResult:
        """Writes the images and `result.json` (the generator version, each image's latent and condition, the
        metrics; with `spec=job.spec()` also the spec and its seed) into `folder`; see `gansteer.saved`."""
        from gansteer.saved import save_result  # saved.py builds on these types

        return save_result(self, folder, spec=spec)


# Events of a job's stream, in the order WatchJob sends them. Every event carries its stream id (pass it back as
# `after_event_id` to resume after it), the job id and the server's time.


@dataclass(frozen=True)
class JobEvent:
    event_id: str
    job_id: str
    time: datetime | None


@dataclass(frozen=True)
class StateChanged(JobEvent):
    """The job moved from `previous` to `state`; `message` says why it failed or was cancelled."""

    state: JobState
    previous: JobState
    message: str


@dataclass(frozen=True)
class ProgressEvent(JobEvent):
    """One step done: the criterion values at `step` (`total` is the value minimised)."""

    step: int
    total_steps: int
    criterion: Mapping[str, float]
    generator_calls: int
    elapsed_s: float


@dataclass(frozen=True)
class PreviewEvent(JobEvent):
    """The best image per target so far (every `preview_every` steps)."""

    step: int
    images: list[PILImage.Image]


@dataclass(frozen=True)
class FeedbackRoundEvent(JobEvent):
    """A human-in-the-loop round opened and waits for answers (`Job.rounds()` hands it out ready to render)."""

    round_id: str
    round: int
    images: list[PILImage.Image]
    choose: int
    num_pairs: int
    feedback_round: FeedbackRound


@dataclass(frozen=True)
class ResultEvent(JobEvent):
    """The final result, sent once just before the SUCCEEDED state change."""

    result: JobResult


# What the server can do: its job kinds and optimizers, for a design tool that builds specs.


@dataclass(frozen=True)
class JobOption:
    """One option of a job kind's spec: its field name, protobuf type, and default as JSON (empty: none)."""

    name: str
    type: str
    default_json: str


@dataclass(frozen=True)
class JobKindInfo:
    """A job kind the server runs: `name` is its JobSpec field (`inversion`), `has_rounds` whether it waits for
    feedback, `options` the fields of its spec message (`spec_message`) with their defaults."""

    name: str
    description: str
    has_rounds: bool
    spec_message: str
    options: tuple[JobOption, ...]


@dataclass(frozen=True)
class OptimizerInfo:
    """An optimizer of the server's search core, as a spec names it; `gradient` ones step on the gradient, the
    others ask a population and are told its values. The defaults are what a spec's learning rate 0 (gradient) and
    population size 0 (the others) mean unless the job kind sets its own; 0 where they do not apply."""

    name: str
    gradient: bool
    description: str
    default_learning_rate: float
    default_population: int


# Rounds of human-in-the-loop jobs: what a person (or a simulated rater) is shown, and what they answer.


ChoiceAction: TypeAlias = Literal["pick", "none_good", "undo"]
"""What a choice answer does: pick items, say none is good (the round is drawn again), or undo (back a round)."""


class AnswerKind(enum.StrEnum):
    """The answer a round expects: `choice` (pick `choose` items), `pairwise` (a score in [-1, 1] per pair, +1 the
    left image better), `rating` (a value per item in [rating_min, rating_max])."""

    UNSPECIFIED = "unspecified"
    CHOICE = "choice"
    PAIRWISE = "pairwise"
    RATING = "rating"


@dataclass(frozen=True)
class RoundItem:
    """One image of a round, as the generator regenerates it: its latent, and its class (an id or a free vector)
    for a class-conditional generator. `seed` is 0 when the latent was derived (e.g. recombined)."""

    item_id: str
    seed: int
    latent: FloatArray
    class_id: int | None
    embedding: FloatArray | None
    parent_ids: tuple[str, ...]


@dataclass(frozen=True)
class FeedbackRound:
    """A round a job waits on: the items to show (rendered by `generator`, its version pinned), the `pairs` shown
    side by side (sides already randomised), and the answer it expects; answers after `expires_at` are refused."""

    job_id: str
    round_id: str
    round: int
    answer: AnswerKind
    items: tuple[RoundItem, ...]
    pairs: tuple[tuple[int, int], ...]
    choose: int
    allow_repeats: bool
    rating_min: float
    rating_max: float
    answers_required: int
    answers_received: int
    generator: str
    expires_at: datetime | None
    #: Choice rounds: what an answer may do besides picking (`none_good`, `undo`), and the step size the next round
    #: will use, which an answer may change (0: the round takes none).
    actions: tuple[ChoiceAction, ...] = ()
    step_size: float = 0.0
    #: Pairwise rounds: the points of the graded scale to show, from -1 to 1 (0: continuous).
    answer_levels: int = 0
    #: The images to show, when the round carries its own (human NES's x +- Delta are not the generator's output
    #: alone); empty: the items are rendered by `generator` (`Round.images()` does either).
    pixels: tuple[PILImage.Image, ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class Round(FeedbackRound):
    """An open round from `Job.rounds()`; `images()` renders its items on the generation service."""

    _render: Callable[[FeedbackRound], list[PILImage.Image]] = field(repr=False, compare=False, kw_only=True)

    def images(self) -> list[PILImage.Image]:
        """The items' images, in order, regenerated from their latents and classes (one Generate call)."""
        return self._render(self)


@dataclass(frozen=True)
class AsyncRound(FeedbackRound):
    """`Round` for asyncio: `await round.images()`."""

    _render: Callable[[FeedbackRound], Awaitable[list[PILImage.Image]]] = field(repr=False, compare=False, kw_only=True)

    async def images(self) -> list[PILImage.Image]:
        """As `Round.images`."""
        return await self._render(self)


@dataclass(frozen=True)
class Answer:
    """One answer to a round: set the field its `answer` kind asks for. `choice`: item indices (repeats where the
    round allows them); `pairwise`: per pair in order, a score in [-1, 1] or `left` / `right` / `tie`; `ratings`:
    one value per item. `action` and `step_size` go with a choice where the round offers them (`round.actions`,
    `round.step_size`): `Answer(action="undo")` picks nothing."""

    choice: Sequence[int] | None = None
    pairwise: Sequence[float | str] | None = None
    ratings: Sequence[float] | None = None
    action: ChoiceAction = "pick"
    step_size: float | None = None


Reply: TypeAlias = Answer | Sequence[float]
"""What a rater returns: an `Answer`, or the bare values, read as the round's answer kind asks."""
Rater: TypeAlias = Callable[[Round], Reply]
"""A person behind a UI or a simulated rater: shown a round, returns its answer."""
AsyncRater: TypeAlias = Callable[[AsyncRound], Reply | Awaitable[Reply]]
"""`Rater` for asyncio: a plain function or a coroutine function."""


@dataclass(frozen=True)
class FeedbackResult:
    """What `Job.feedback` got back: the job after the answer, whether the server had already recorded this
    answer (the same `idempotency_key`), and the key sent."""

    job: JobStatus
    duplicate: bool
    idempotency_key: str


@dataclass(frozen=True)
class Interaction:
    """One answer in a job's interaction log, with its provenance: the pseudonymous rater id, what was shown and
    on which side, the generator version, the latency the client measured and the server's time."""

    job_id: str
    round_id: str
    round: int
    rater: str
    time: datetime | None
    latency_s: float
    answer: AnswerKind
    choice: tuple[int, ...] | None
    pairwise: tuple[float, ...] | None
    ratings: tuple[float, ...] | None
    items: tuple[RoundItem, ...]
    pairs: tuple[tuple[int, int], ...]
    generator: str
    idempotency_key: str
    action: ChoiceAction = "pick"  # a choice answer's action
    step_size: float | None = None  # the step size a choice answer set
