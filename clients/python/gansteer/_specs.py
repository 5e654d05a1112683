"""Request builders of the generation and scoring calls: keyword arguments in, wire messages out. The job kinds'
spec builders are in `gansteer.kinds`.

Only what the caller set is sent; everything left unset takes the server's default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from gansteer import tensors
from gansteer._convert import ImageInput, as_image_list, images_to_batch, model_ref
from gansteer.errors import ErrorDetail, InvalidArgument
from gansteer.types import ModelInfo
from gansteer.v1 import generation_pb2, scoring_pb2

ClassSpec: TypeAlias = int | str
"""A class of a class-conditional generator: its id, or its name as the model card lists it."""
Outputs: TypeAlias = str | Sequence[str] | Mapping[str, Mapping[str, Any]]
"""Scorer outputs: one name, several names, or names mapped to their parameters ({"probs": {"classes": [3]}})."""
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
