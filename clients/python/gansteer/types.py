"""The plain Python values the SDK hands back: PIL images, numpy arrays, frozen dataclasses and str enums.

Callers never see protobuf messages; every field a person or script reads is typed here, so `mypy --strict` code
built on the SDK checks end to end. Values are decoded once, when the response arrives.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage

from gansteer.errors import ErrorDetail

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


@dataclass(frozen=True)
class CriterionCurve:
    """A criterion's values over the steps of a job: `values[name]` is [num_items, len(steps)]."""

    steps: npt.NDArray[np.int64]
    values: Mapping[str, FloatArray]


@dataclass(frozen=True)
class JobResult:
    """What a succeeded job produced: one image (and latent) per result item, metrics and the criterion curve."""

    job_id: str
    images: list[PILImage.Image]
    latents: FloatArray
    class_embeddings: FloatArray | None
    metrics: Mapping[str, float]
    item_metrics: list[Mapping[str, float]]
    curve: CriterionCurve
    models: list[str]
    tensors: Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class InversionResult(JobResult):
    """An inversion job's result: per target, the best image found, its latent, and how close it came."""

    @property
    def criterion(self) -> list[float]:
        """The final criterion per target (lower is closer)."""
        return [m.get("criterion", float("nan")) for m in self.item_metrics]

    @property
    def psnr(self) -> list[float]:
        """PSNR in dB of each best image against its (resized) target."""
        return [m.get("psnr", float("nan")) for m in self.item_metrics]


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
    """A human-in-the-loop round opened and waits for `SubmitFeedback`."""

    round_id: str
    round: int
    images: list[PILImage.Image]
    choose: int
    num_pairs: int


@dataclass(frozen=True)
class ResultEvent(JobEvent):
    """The final result, sent once just before the SUCCEEDED state change."""

    result: JobResult
