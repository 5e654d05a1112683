"""The job-kind contract: what a kind provides and what the runner drives.

A job kind is three things (STYLE: spec parsing + a call into `algorithms/` + checkpoint/progress):

- `parse(message, context)`: the kind's field of `JobSpec` -> a frozen dataclass, or a `ServiceError` naming the
  field (INVALID_ARGUMENT; NOT_FOUND for an unknown model).
  It runs in the optimization service at SubmitJob, so a bad spec never reaches a worker. The validated spec is
  stored with the job (`encode_spec`) and handed to the worker as is, with model versions pinned.
- `start(spec, backend, settings)`: the algorithm's run over the backend's models, as a `JobRun`.
- the `JobRun` it returns: one optimisation step at a time, a state dict of tensors and plain values (the
  checkpoint), a preview and the result.

A kind with rounds (`has_rounds`) may end a step by opening a `Round` (`StepProgress.round`); the runner then
checkpoints the run and releases the worker, and the next segment hands the run the round's answers (`receive`)
before its next step.

The runner (`jobs/runner.py`) does everything else: segments, leases, cancellation, time limits, events, rounds.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from torch import Tensor

from gansteer_server.jobs.backends import ModelBackend
from gansteer_server.jobs.rounds import Answer, Round
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.models import ModelCard, ModelNotFound, ModelRegistryError
from gansteer_server.proto import common_pb2
from gansteer_server.proto import optimization_pb2 as opt
from gansteer_server.wire import validation
from gansteer_server.wire.errors import invalid_argument, not_found

#: Queues by resource: model work and light work can go to different workers (`gansteer-worker --queues gpu`).
GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"
QUEUES = (GPU_QUEUE, CPU_QUEUE)


class ModelCatalog(Protocol):
    """What parsing needs to know about models: their cards (a ModelRegistry is one)."""

    def card(self, ref: str) -> ModelCard: ...


@dataclass(frozen=True)
class SubmitContext:
    """What a kind's `parse` may consult: the limits and the model cards."""

    settings: JobSettings
    catalog: ModelCatalog

    def model(self, ref: common_pb2.ModelRef, field: str, kinds: tuple[str, ...]) -> ModelCard:
        """The card of a ModelRef field, its version resolved; NOT_FOUND or INVALID_ARGUMENT naming the field."""
        text = validation.model_ref(ref, field)
        try:
            card = self.catalog.card(text)
        except ModelNotFound as error:
            raise not_found(field, error.message, "UNKNOWN_MODEL") from None
        except ModelRegistryError as error:
            raise invalid_argument(field, error.message, "BAD_MODEL_REF") from None
        if card.kind not in kinds:
            raise invalid_argument(
                field, f"{card.ref} is a {card.kind}; expected a {' or '.join(kinds)}", "WRONG_MODEL_KIND"
            )
        return card

    def image(self, image: common_pb2.Image, field: str, channels: int = 3) -> Tensor:
        """One Image (PNG or tensor) as float [channels, H, W] in [-1, 1], within the server's pixel limit."""
        settings = self.settings.settings
        limits = validation.Limits(max_images=settings.max_images_per_request, max_pixels=settings.max_image_pixels)
        return validation.image(image, field, limits, channels=channels)


@dataclass(frozen=True)
class StepProgress:
    """What one step reports: the step count so far, generator images so far, criterion values by name."""

    step: int
    generator_calls: int
    criterion: Mapping[str, float] = field(default_factory=dict)
    #: A round this step opened: the job waits for its answers, holding no worker, before the next step.
    round: Round | None = None


class JobRun(Protocol):
    """A job kind's running algorithm, as the runner drives it."""

    @property
    def done(self) -> bool: ...

    @property
    def steps(self) -> int:
        """Steps completed so far (after a checkpoint is loaded: the checkpoint's)."""
        ...

    def step(self) -> StepProgress: ...

    def preview(self) -> Tensor:
        """The current best images, float [N, C, H, W] in [-1, 1]."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def result(self) -> opt.JobResult:
        """The result so far; images as one float tensor batch in [-1, 1] (the service converts to PNG)."""
        ...


class SearchJobRun:
    """The runner's view of a search-core run (inversion, latent search): `done`, `steps` and checkpoints pass
    through to it, and progress reports each criterion as its mean over the run's items. A kind adds `preview` and
    `result`, and `best` where its reports name the best values otherwise."""

    def __init__(self, run: Any) -> None:
        self.run = run

    @property
    def done(self) -> bool:
        return bool(self.run.done)

    @property
    def steps(self) -> int:
        return int(self.run.steps)

    def step(self) -> StepProgress:
        report = self.run.step()
        criterion = {"total": float(self.best(report).mean())}
        criterion |= {name: float(term.mean()) for name, term in report.terms.items()}
        return StepProgress(step=report.step, generator_calls=report.generator_calls, criterion=criterion)

    def best(self, report: Any) -> Tensor:
        """Each item's best value so far, from one step's report."""
        return report.best_value  # type: ignore[no-any-return]

    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()  # type: ignore[no-any-return]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run.load_state_dict(state)


class PublishingRun(JobRun, Protocol):
    """The run of a kind whose product is a model (a learned embedding, a tuned generator): the runner calls
    `publish` once the job has succeeded, before its result is stored, and lists what it registered in
    `JobResult.models`. A lost worker may call it again for the same job, so it must be idempotent by job id
    (`models.lineage.register_derived` is)."""

    def publish(self, job_id: str) -> list[common_pb2.ModelRef]: ...


class BoundRun(JobRun, Protocol):
    """The run of a kind that writes records under its job's id (a PIR estimator job's simulated interactions): the
    runner calls `bind(job_id)` right after `start`, before a checkpoint is loaded."""

    def bind(self, job_id: str) -> None: ...


class RoundRun(JobRun, Protocol):
    """The run of a kind with rounds: it also takes the answers of the round its last step opened."""

    def receive(self, answers: list[Answer]) -> None:
        """The answers of the round the last step opened (as many as it required), before the next step. Called
        again with the same answers when a segment is re-run from the round's checkpoint (a lost worker)."""
        ...


class JobKind(ABC):
    """One kind of job, named by its field in `JobSpec.kind`."""

    #: The JobSpec oneof field, e.g. `inversion`; also the Celery task's suffix and the job record's kind.
    name: str
    #: The queue its tasks go to (GPU_QUEUE for model work, CPU_QUEUE for light work).
    queue: str = GPU_QUEUE
    #: The frozen dataclass `parse` returns (the stored spec is decoded into it).
    spec_type: type[Any]
    #: The kind's spec message in `JobSpec.kind` (its fields are the options `ListJobKinds` lists); None for kinds
    #: submitted only from Python (tests).
    spec_message: type[Message] | None = None
    #: One sentence for `ListJobKinds`.
    description: str = ""
    #: Whether its runs open rounds that wait for feedback (their runs are `RoundRun`s).
    has_rounds: bool = False
    #: What an unset option of the spec message means, by field name (JSON-able values), for `ListJobKinds`.
    defaults: Mapping[str, Any] = {}

    @abstractmethod
    def parse(self, message: Message, context: SubmitContext) -> Any:
        """The validated spec (a frozen dataclass), or a ServiceError naming the field (`spec.<name>....`)."""

    @abstractmethod
    def total_steps(self, spec: Any) -> int:
        """Steps the budget allows (0 when unknown), for progress bars."""

    @abstractmethod
    def start(self, spec: Any, backend: ModelBackend, settings: JobSettings) -> JobRun:
        """The algorithm's run over the backend's models, at step 0 (the runner loads a checkpoint if any)."""

    def options(self) -> list[opt.JobOption]:
        """The spec message's fields with their types and the kind's defaults."""
        if self.spec_message is None:
            return []
        return [
            opt.JobOption(
                name=f.name,
                type=_field_type(f),
                default_json=json.dumps(self.defaults[f.name]) if f.name in self.defaults else "",
            )
            for f in _descriptor(self.spec_message).fields
        ]

    def info(self) -> opt.JobKindInfo:
        return opt.JobKindInfo(
            name=self.name,
            description=self.description,
            has_rounds=self.has_rounds,
            spec_message=_descriptor(self.spec_message).full_name if self.spec_message is not None else "",
            options=self.options(),
        )

    def backend_name(self, spec: Any, settings: JobSettings) -> str:
        """`local` or `remote`: where the spec's models run (the deployment's default unless the spec chose)."""
        chosen = getattr(spec, "backend", "")
        return chosen or settings.settings.backend


def _descriptor(message: type[Message]) -> Descriptor:
    return message.DESCRIPTOR  # type: ignore[no-any-return]


def _field_type(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        name = field.message_type.full_name
    elif field.enum_type is not None:
        name = field.enum_type.full_name
    else:
        name = _SCALARS.get(field.type, "bytes")
    return f"repeated {name}" if field.is_repeated else name


_SCALARS = {
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
}
