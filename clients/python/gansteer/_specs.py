"""Request builders shared by the blocking and the asyncio client: keyword arguments in, wire messages out.

Only what the caller set is sent; everything left unset takes the server's default, so the SDK never holds a
second copy of the defaults (a preset's weights, an optimiser's step size) that could drift from the server's.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias, TypedDict, Unpack

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
# The server requires a budget; this one finishes in seconds on the built-in 32x32 generator on a laptop CPU.
DEFAULT_BUDGET = 300
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


class InversionOptions(TypedDict, total=False):
    """The settings of an inversion job (optimization.proto, InversionSpec) besides its targets and generator.

    Every one is optional; an unset one takes the server's default, except `budget` (the server requires one: the
    SDK sends 300 iterations).
    """

    criterion: str  # a preset of seed 003's Table I: `l2`, `l2+features` (server default), `features`
    lambda_s: float  # weights overriding the preset's: feature statistics, pixel L2, latent norm, realism
    lambda_l: float
    lambda_nu: float
    lambda_r: float
    discriminator: str  # of the realism term; default: the generator card's pair
    feature_extractor: str  # of the feature-statistics term; default: the server's
    optimizer: str  # adam (default), lbfgs, nesterov, random_search, TwoPointsDE, DE, DiscreteOnePlusOne, CMA
    learning_rate: float
    population_size: int  # candidates per step of gradient-free optimizers, evaluated as one batch
    optimizer_options: Mapping[str, Any]  # e.g. {"momentum": 0.9}
    budget: int  # iterations, or generator calls with budget_unit="generator_calls"
    budget_unit: BudgetUnit
    restarts: int  # random starts per target; the best is kept
    conditioned_class: ClassSpec  # hold this class (id or name) fixed; unset: search the class vector too
    seed: int
    backend: Backend  # where the worker runs the models: "local" or "remote"; default: the deployment's
    initial_latents: npt.ArrayLike  # float32 [targets * restarts, latent_size]
    preview_every: int  # a PreviewEvent every this many steps (0: none)
    priority: int  # 0 to 9, higher runs first
    time_limit_s: float
    labels: Mapping[str, str]  # free labels, usable as a `jobs()` filter
    idempotency_key: str  # default: a fresh UUID, which makes a retried SubmitJob harmless


def inversion_spec(
    targets: ImageInput | Sequence[ImageInput],
    *,
    model: str,
    card: ModelInfo | None = None,
    **options: Unpack[InversionOptions],
) -> optimization_pb2.JobSpec:
    """The JobSpec of an inversion job; `card` (the generator's) is needed only for a class given by name."""
    images = as_image_list(targets)
    if not images:
        raise _invalid("targets", "give at least one target image")
    spec = optimization_pb2.InversionSpec(
        targets=[image_to_proto(im, field=f"targets[{i}]") for i, im in enumerate(images)],
        generator=model_ref(model),
        criterion=options.get("criterion", ""),
        seed=options.get("seed", 0),
        restarts=options.get("restarts", 0),
    )
    optimizer_keys = ("optimizer", "learning_rate", "population_size", "optimizer_options")
    if any(key in options for key in optimizer_keys):
        spec.optimizer.CopyFrom(
            optimization_pb2.Optimizer(
                name=options.get("optimizer", ""),
                learning_rate=options.get("learning_rate", 0.0),
                population_size=options.get("population_size", 0),
                options=_struct(options.get("optimizer_options", {})),
            )
        )
    unit = options.get("budget_unit", "iterations")
    if unit not in _BUDGET_UNITS:
        raise _invalid("budget_unit", f"expected one of {', '.join(_BUDGET_UNITS)}, got {unit!r}")
    spec.budget.CopyFrom(
        optimization_pb2.Budget(unit=_BUDGET_UNITS[unit], amount=options.get("budget", DEFAULT_BUDGET))
    )
    for name in ("lambda_s", "lambda_l", "lambda_nu", "lambda_r"):
        if name in options:
            setattr(spec, name, options[name])
    if "conditioned_class" in options:
        spec.conditioned_class = class_id(options["conditioned_class"], card, field="conditioned_class")
    for name in ("discriminator", "feature_extractor"):
        if options.get(name):
            getattr(spec, name).CopyFrom(model_ref(options[name]))  # type: ignore[literal-required]
    if "backend" in options:
        if options["backend"] not in _BACKENDS:
            raise _invalid("backend", f"expected local or remote, got {options['backend']!r}")
        spec.backend = _BACKENDS[options["backend"]]
    if "initial_latents" in options:
        latents = np.asarray(options["initial_latents"], np.float32)
        spec.initial_latents.CopyFrom(tensors.to_tensor_proto(latents, field="initial_latents"))
    return optimization_pb2.JobSpec(
        inversion=spec,
        priority=options.get("priority", 0),
        time_limit_s=options.get("time_limit_s", 0.0),
        idempotency_key=options.get("idempotency_key") or uuid.uuid4().hex,
        labels=dict(options.get("labels", {})),
        preview_every=options.get("preview_every", 0),
    )


def _struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(dict(values))
    return struct
