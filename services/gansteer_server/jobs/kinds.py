"""Job kinds behind a small registry: adding embedding AM, latent search or PIR tuning is one module each.

A job kind is three things (STYLE: spec parsing + a call into `algorithms/` + checkpoint/progress):

- `parse(message, context)`: the kind's field of `JobSpec` -> a frozen dataclass, or a `ServiceError` naming the
  field (INVALID_ARGUMENT; NOT_FOUND for an unknown model).
  It runs in the optimization service at SubmitJob, so a bad spec never reaches a worker. The validated spec is
  stored with the job (`encode_spec`) and handed to the worker as is, with model versions pinned.
- `start(spec, backend, settings)`: the algorithm's run over the backend's models, as a `JobRun`.
- the `JobRun` it returns: one optimisation step at a time, a state dict of tensors and plain values (the
  checkpoint), a preview and the result.

The runner (`jobs/runner.py`) does everything else: segments, leases, cancellation, time limits, events.
"""

from __future__ import annotations

import dataclasses
import io
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from google.protobuf.message import Message
from torch import Tensor

from gansteer_server.jobs.backends import ModelBackend
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


class JobKind(ABC):
    """One kind of job, named by its field in `JobSpec.kind`."""

    #: The JobSpec oneof field, e.g. `inversion`; also the Celery task's suffix and the job record's kind.
    name: str
    #: The queue its tasks go to (GPU_QUEUE for model work, CPU_QUEUE for light work).
    queue: str = GPU_QUEUE
    #: The frozen dataclass `parse` returns (the stored spec is decoded into it).
    spec_type: type[Any]

    @abstractmethod
    def parse(self, message: Message, context: SubmitContext) -> Any:
        """The validated spec (a frozen dataclass), or a ServiceError naming the field (`spec.<name>....`)."""

    @abstractmethod
    def total_steps(self, spec: Any) -> int:
        """Steps the budget allows (0 when unknown), for progress bars."""

    @abstractmethod
    def start(self, spec: Any, backend: ModelBackend, settings: JobSettings) -> JobRun:
        """The algorithm's run over the backend's models, at step 0 (the runner loads a checkpoint if any)."""

    def backend_name(self, spec: Any, settings: JobSettings) -> str:
        """`local` or `remote`: where the spec's models run (the deployment's default unless the spec chose)."""
        chosen = getattr(spec, "backend", "")
        return chosen or settings.settings.backend


_KINDS: dict[str, JobKind] = {}


def register_kind(kind: JobKind) -> JobKind:
    if kind.name in _KINDS:
        raise ValueError(f"job kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> JobKind:
    _import_builtin_kinds()
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"unknown job kind {name!r} (known: {', '.join(sorted(_KINDS))})") from None


def kind_names() -> list[str]:
    _import_builtin_kinds()
    return sorted(_KINDS)


def _import_builtin_kinds() -> None:
    from gansteer_server.jobs import inversion_job  # noqa: F401


# --- the validated spec as bytes: tensors and plain values only, read back with weights_only=True --------------


def encode_spec(spec: Any) -> bytes:
    """A frozen dataclass of plain values, tuples, tensors and nested dataclasses, as torch.save bytes."""
    buffer = io.BytesIO()
    torch.save(_to_plain(spec), buffer)
    return buffer.getvalue()


def decode_spec(spec_type: type[Any], data: bytes) -> Any:
    plain = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return _from_plain(spec_type, plain)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return tuple(_to_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str, Tensor)):
        return value
    raise TypeError(f"a spec may hold plain values, tuples, dicts, tensors and dataclasses, not {type(value)}")


def _from_plain(annotation: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        nested = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        return _from_plain(nested[0], value) if nested and isinstance(value, dict) else value
    if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        hints = typing.get_type_hints(annotation)
        return annotation(**{name: _from_plain(hints[name], item) for name, item in value.items()})
    if origin is tuple and isinstance(value, (tuple, list)):
        args = typing.get_args(annotation)
        inner = args[0] if args else Any
        return tuple(_from_plain(inner, v) for v in value)
    return value
