"""Request builders shared by the blocking and the asyncio client: keyword arguments in, wire messages out.

Only what the caller set is sent; everything left unset takes the server's default, so the SDK never holds a
second copy of the defaults (a preset's weights, an optimiser's step size) that could drift from the server's.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from google.protobuf import struct_pb2  # type: ignore[import-untyped]

from gansteer import tensors
from gansteer._convert import ImageInput, as_image_list, image_to_proto, images_to_batch, model_ref
from gansteer.errors import ErrorDetail, InvalidArgument
from gansteer.types import ModelInfo
from gansteer.v1 import generation_pb2, optimization_pb2, scoring_pb2

ClassSpec: TypeAlias = int | str
"""A class of a class-conditional generator: its id, or its name as the model card lists it."""
Outputs: TypeAlias = str | Sequence[str] | Mapping[str, Mapping[str, Any]]
"""Scorer outputs: one name, several names, or names mapped to their parameters ({"probs": {"classes": [3]}})."""
BudgetUnit: TypeAlias = Literal["iterations", "generator_calls"]
Backend: TypeAlias = Literal["local", "remote"]

_BUDGET_UNITS = {
    "iterations": optimization_pb2.BUDGET_UNIT_ITERATIONS,
    "generator_calls": optimization_pb2.BUDGET_UNIT_GENERATOR_CALLS,
}
_BACKENDS = {"local": optimization_pb2.BACKEND_LOCAL, "remote": optimization_pb2.BACKEND_REMOTE}
# What `score` asks for when the caller names no output: the one output every model of that kind has.
DEFAULT_OUTPUTS = {
    "classifier": "probs",
    "discriminator": "realism",
    "pir_estimator": "pir",
    "feature_extractor": "feature_stats",
}


def _invalid(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {message}", details=[ErrorDetail(field, "INVALID_ARGUMENT", message)])


def class_id(cls: ClassSpec, card: ModelInfo | None, *, field: str) -> int:
    """A class id from an id or a class name; names need the generator's card."""
    if isinstance(cls, bool) or not isinstance(cls, (int, np.integer, str)):
        raise _invalid(field, f"expected a class id or name, got {cls!r}")
    if not isinstance(cls, str):
        return int(cls)
    names = card.class_names if card is not None else ()
    if cls not in names:
        model = card.ref if card is not None else "the model"
        raise _invalid(field, f"{model} has no class named {cls!r}; its classes are {', '.join(names) or 'none'}")
    return names.index(cls)


def needs_card(classes: ClassSpec | Sequence[ClassSpec] | None) -> bool:
    """True when resolving `classes` needs the generator's card (a class given by name)."""
    if classes is None:
        return False
    items = [classes] if isinstance(classes, (int, str)) else list(classes)
    return any(isinstance(c, str) for c in items)


def generate_request(
    model: str,
    n: int,
    *,
    seed: int,
    classes: ClassSpec | Sequence[ClassSpec] | None,
    truncation: float | None,
    latents: npt.ArrayLike | None,
    embeddings: npt.ArrayLike | None,
    card: ModelInfo | None,
) -> generation_pb2.GenerateRequest:
    request = generation_pb2.GenerateRequest(model=model_ref(model))
    if latents is not None:
        request.latents.CopyFrom(tensors.to_tensor_proto(np.asarray(latents, np.float32), field="latents"))
    else:
        if n < 1:
            raise _invalid("n", f"must be at least 1, got {n}")
        request.seeded.CopyFrom(generation_pb2.SeededLatents(seed=seed, count=n))
    if classes is not None and embeddings is not None:
        raise _invalid("classes", "give classes or embeddings, not both")
    if classes is not None:
        items = [classes] if isinstance(classes, (int, str, np.integer)) else list(classes)
        ids = [class_id(c, card, field=f"classes[{i}]") for i, c in enumerate(items)]
        request.condition.class_ids.ids.extend(ids)
    if embeddings is not None:
        request.condition.embeddings.CopyFrom(
            tensors.to_tensor_proto(np.asarray(embeddings, np.float32), field="embeddings")
        )
    if truncation is not None:
        request.truncation = truncation
    return request


def output_requests(outputs: Outputs) -> list[scoring_pb2.OutputRequest]:
    if isinstance(outputs, str):
        return [scoring_pb2.OutputRequest(output=outputs)]
    if isinstance(outputs, Mapping):
        requests = []
        for name, params in outputs.items():
            request = scoring_pb2.OutputRequest(output=name)
            request.params.update(dict(params))
            requests.append(request)
        return requests
    return [scoring_pb2.OutputRequest(output=name) for name in outputs]


def score_request(images: ImageInput | Sequence[ImageInput], scorer: str, outputs: Outputs) -> scoring_pb2.ScoreRequest:
    return scoring_pb2.ScoreRequest(
        images=images_to_batch(as_image_list(images)), outputs=output_requests(outputs), model=model_ref(scorer)
    )


def inversion_spec(
    targets: ImageInput | Sequence[ImageInput],
    *,
    model: str,
    criterion: str | None = None,
    optimizer: str | None = None,
    budget: int | None = None,
    budget_unit: BudgetUnit = "iterations",
    conditioned_class: ClassSpec | None = None,
    card: ModelInfo | None = None,
    learning_rate: float | None = None,
    population_size: int | None = None,
    optimizer_options: Mapping[str, Any] | None = None,
    lambda_s: float | None = None,
    lambda_l: float | None = None,
    lambda_nu: float | None = None,
    lambda_r: float | None = None,
    restarts: int | None = None,
    seed: int = 0,
    discriminator: str | None = None,
    feature_extractor: str | None = None,
    backend: Backend | None = None,
    initial_latents: npt.ArrayLike | None = None,
    preview_every: int = 0,
    priority: int = 0,
    time_limit_s: float | None = None,
    labels: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
) -> optimization_pb2.JobSpec:
    """The JobSpec of an inversion job (optimization.proto, InversionSpec). The idempotency key defaults to a fresh
    UUID, which makes SubmitJob safe to retry: a retried submission returns the job the first one created."""
    images = as_image_list(targets)
    if not images:
        raise _invalid("targets", "give at least one target image")
    spec = optimization_pb2.InversionSpec(
        targets=[image_to_proto(im, field=f"targets[{i}]") for i, im in enumerate(images)],
        generator=model_ref(model),
        criterion=criterion or "",
        seed=seed,
        restarts=restarts or 0,
    )
    if optimizer is not None or learning_rate is not None or population_size is not None or optimizer_options:
        spec.optimizer.CopyFrom(
            optimization_pb2.Optimizer(
                name=optimizer or "",
                learning_rate=learning_rate or 0.0,
                population_size=population_size or 0,
                options=_struct(optimizer_options or {}),
            )
        )
    if budget is not None:
        if budget_unit not in _BUDGET_UNITS:
            raise _invalid("budget_unit", f"expected one of {', '.join(_BUDGET_UNITS)}, got {budget_unit!r}")
        spec.budget.CopyFrom(optimization_pb2.Budget(unit=_BUDGET_UNITS[budget_unit], amount=budget))
    for name, value in (
        ("lambda_s", lambda_s),
        ("lambda_l", lambda_l),
        ("lambda_nu", lambda_nu),
        ("lambda_r", lambda_r),
    ):
        if value is not None:
            setattr(spec, name, value)
    if conditioned_class is not None:
        spec.conditioned_class = class_id(conditioned_class, card, field="conditioned_class")
    if discriminator:
        spec.discriminator.CopyFrom(model_ref(discriminator))
    if feature_extractor:
        spec.feature_extractor.CopyFrom(model_ref(feature_extractor))
    if backend is not None:
        if backend not in _BACKENDS:
            raise _invalid("backend", f"expected local or remote, got {backend!r}")
        spec.backend = _BACKENDS[backend]
    if initial_latents is not None:
        spec.initial_latents.CopyFrom(
            tensors.to_tensor_proto(np.asarray(initial_latents, np.float32), field="initial_latents")
        )
    return optimization_pb2.JobSpec(
        inversion=spec,
        priority=priority,
        time_limit_s=time_limit_s or 0.0,
        idempotency_key=idempotency_key or uuid.uuid4().hex,
        labels=dict(labels or {}),
        preview_every=preview_every,
    )


def _struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(dict(values))
    return struct
