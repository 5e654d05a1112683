"""Translation between the SDK's values (PIL images, paths, numpy arrays, dataclasses) and the wire messages.

Kept apart from the transport so the blocking client and the asyncio client share every conversion, and so the
conversions are unit-tested without a server. Images always travel as PNG: the server decodes, validates and
resizes them in one place, and a target that is too large or undecodable is refused by the server with its own
message rather than by a second, subtly different check here.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from google.protobuf import timestamp_pb2  # type: ignore[import-untyped]
from PIL import Image as PILImage

from gansteer import tensors
from gansteer.errors import ErrorDetail, InvalidArgument
from gansteer.types import (
    AnswerKind,
    ChoiceAction,
    CriterionCurve,
    FeedbackRound,
    FeedbackRoundEvent,
    GenerationResult,
    Interaction,
    JobEvent,
    JobKindInfo,
    JobOption,
    JobResult,
    JobState,
    JobStatus,
    ModelInfo,
    OptimizerInfo,
    PreviewEvent,
    ProgressEvent,
    ResultEvent,
    RoundItem,
    ScoreOutput,
    ScoreResult,
    ScorerInfo,
    ScorerParam,
    StateChanged,
)
from gansteer.v1 import common_pb2, generation_pb2, optimization_pb2, scoring_pb2

ImageInput: TypeAlias = PILImage.Image | str | os.PathLike[str] | npt.NDArray[Any] | bytes
"""What the SDK accepts as an image: a PIL image, a path to an image file, PNG (or other image file) bytes, or a
numpy array: uint8 [H, W] / [H, W, C] in [0, 255] (`np.asarray(pil_image)`), or float [H, W] / [H, W, C] in
[0, 1] (`skimage.img_as_float`)."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SERVER_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA"})
_KINDS = {
    common_pb2.MODEL_KIND_GENERATOR: "generator",
    common_pb2.MODEL_KIND_DISCRIMINATOR: "discriminator",
    common_pb2.MODEL_KIND_CLASSIFIER: "classifier",
    common_pb2.MODEL_KIND_PIR_ESTIMATOR: "pir_estimator",
    common_pb2.MODEL_KIND_FEATURE_EXTRACTOR: "feature_extractor",
}
_STATES = {
    optimization_pb2.JOB_STATE_UNSPECIFIED: JobState.UNSPECIFIED,
    optimization_pb2.JOB_STATE_QUEUED: JobState.QUEUED,
    optimization_pb2.JOB_STATE_RUNNING: JobState.RUNNING,
    optimization_pb2.JOB_STATE_WAITING_FOR_FEEDBACK: JobState.WAITING_FOR_FEEDBACK,
    optimization_pb2.JOB_STATE_SUCCEEDED: JobState.SUCCEEDED,
    optimization_pb2.JOB_STATE_FAILED: JobState.FAILED,
    optimization_pb2.JOB_STATE_CANCELLED: JobState.CANCELLED,
}
_STATE_PROTOS = {state: wire for wire, state in _STATES.items()}
_ANSWER_KINDS = {
    optimization_pb2.ANSWER_KIND_CHOICE: AnswerKind.CHOICE,
    optimization_pb2.ANSWER_KIND_PAIRWISE: AnswerKind.PAIRWISE,
    optimization_pb2.ANSWER_KIND_RATING: AnswerKind.RATING,
}
# A coarse pairwise answer as the graded score it stands for (optimization.proto, PairwiseJudgement).
PREFERENCE_SCORES = {
    optimization_pb2.PREFERENCE_LEFT: 1.0,
    optimization_pb2.PREFERENCE_RIGHT: -1.0,
    optimization_pb2.PREFERENCE_TIE: 0.0,
}
KIND_PROTOS = {name: wire for wire, name in _KINDS.items()}


# --- inputs -------------------------------------------------------------------------------------------------------


def _bad_image(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {message}", details=[ErrorDetail(field, "BAD_IMAGE", message)])


def image_to_proto(image: ImageInput, *, field: str = "image") -> common_pb2.Image:
    """One image as a PNG `Image`. PNG files and bytes go unchanged (the server validates them); other formats
    are decoded here and re-encoded, since the wire carries PNG or raw tensors only.

    Raises InvalidArgument naming `field` for inputs that are no image at all, FileNotFoundError for a missing path.
    """
    if isinstance(image, bytes):
        return common_pb2.Image(png=image if image.startswith(_PNG_SIGNATURE) else _reencode(image, field))
    if isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
        return common_pb2.Image(png=data if data.startswith(_PNG_SIGNATURE) else _reencode(data, field))
    if isinstance(image, PILImage.Image):
        return common_pb2.Image(png=tensors.png_encode(image if image.mode in _SERVER_MODES else image.convert("RGB")))
    if isinstance(image, np.ndarray):
        return common_pb2.Image(png=_array_png(image, field))
    raise _bad_image(field, f"expected a PIL image, a path, bytes or a numpy array, got {type(image).__name__}")


def _reencode(data: bytes, field: str) -> bytes:
    try:
        with PILImage.open(io.BytesIO(data)) as decoded:
            decoded.load()
            return tensors.png_encode(decoded if decoded.mode in _SERVER_MODES else decoded.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:
        raise _bad_image(field, f"not a decodable image file ({error})") from error


def _array_png(array: npt.NDArray[Any], field: str) -> bytes:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise _bad_image(field, f"array shape must be [H, W] or [H, W, 1|3|4], got {list(array.shape)}")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or array.min(initial=0.0) < 0.0 or array.max(initial=0.0) > 1.0:
            raise _bad_image(field, "float arrays must hold finite values in [0, 1]")
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise _bad_image(field, f"array dtype must be uint8 ([0, 255]) or float ([0, 1]), got {array.dtype}")
    try:
        return tensors.png_encode(array)
    except ValueError as error:
        raise _bad_image(field, str(error)) from error


def images_to_batch(images: Sequence[ImageInput], *, field: str = "images") -> common_pb2.ImageBatch:
    return common_pb2.ImageBatch(images=[image_to_proto(im, field=f"{field}[{i}]") for i, im in enumerate(images)])


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or a list of them, as a list (a string or bytes is one image, never a sequence of them)."""
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]  # type: ignore[list-item]


def model_ref(model: str) -> common_pb2.ModelRef:
    """`name` or `name@version` as a ModelRef (the server parses the text form; 0 means the newest)."""
    return common_pb2.ModelRef(name=model)


def ref_text(ref: common_pb2.ModelRef) -> str:
    if not ref.name:
        return ""
    return f"{ref.name}@{ref.version}" if ref.version else ref.name


def state_to_proto(state: JobState | str) -> int:
    return _STATE_PROTOS[JobState(state)]


def list_jobs_request(
    *, page_size: int, page_token: str, states: Sequence[JobState | str], kind: str, labels: Mapping[str, str] | None
) -> optimization_pb2.ListJobsRequest:
    """One page's ListJobs request; shared by the blocking and the asyncio client."""
    return optimization_pb2.ListJobsRequest(
        page_size=page_size,
        page_token=page_token,
        states=[state_to_proto(s) for s in states],  # type: ignore[misc]
        kind=kind,
        labels=dict(labels or {}),
    )


# --- outputs ------------------------------------------------------------------------------------------------------


def array_to_pil(array: npt.NDArray[Any]) -> PILImage.Image:
    """A wire tensor image as PIL: float [C, H, W] in [-1, 1], or uint8 [H, W, C]."""
    if array.dtype.kind == "f":
        pixels = np.clip(np.round((np.asarray(array, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
        array = np.moveaxis(pixels, 0, -1)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return PILImage.fromarray(np.ascontiguousarray(array))


def batch_to_pil(batch: common_pb2.ImageBatch) -> list[PILImage.Image]:
    """Every image of a batch (PNG entries, tensor entries or one batch tensor) as a PIL image."""
    if batch.HasField("tensor"):
        return [array_to_pil(item) for item in tensors.from_tensor_proto(batch.tensor, field="images.tensor")]
    images: list[PILImage.Image] = []
    for i, image in enumerate(batch.images):
        if image.HasField("png"):
            pil = PILImage.open(io.BytesIO(image.png))
            pil.load()
            images.append(pil)
        else:
            images.append(array_to_pil(tensors.from_tensor_proto(image.tensor, field=f"images[{i}].tensor")))
    return images


def optional_array(tensor: common_pb2.Tensor, *, field: str) -> npt.NDArray[Any] | None:
    """A tensor field the server leaves empty when it does not apply (e.g. class embeddings of a plain GAN)."""
    if tensor.dtype == common_pb2.DTYPE_UNSPECIFIED and not tensor.shape:
        return None
    return tensors.from_tensor_proto(tensor, field=field, copy=True)


def model_info(card: common_pb2.ModelCard) -> ModelInfo:
    return ModelInfo(
        name=card.name,
        version=card.version,
        kind=_KINDS.get(card.kind, "unspecified"),
        architecture=card.architecture,
        description=card.description,
        resolution=card.resolution,
        channels=card.channels,
        latent_size=card.latent_size,
        num_classes=card.num_classes,
        class_names=tuple(card.class_names),
        embedding_size=card.embedding_size,
        value_range=(card.value_range.low, card.value_range.high),
        metrics=dict(card.metrics),
        backends=tuple(card.backends),
        format=card.format,
        created=card.created,
        card=json.loads(card.card_json) if card.card_json else {},
    )


def generation_result(response: generation_pb2.GenerateResponse) -> GenerationResult:
    latents = optional_array(response.latents, field="latents")
    return GenerationResult(
        images=batch_to_pil(response.images),
        latents=latents if latents is not None else np.zeros((0, 0), np.float32),
        class_ids=list(response.class_ids),
        class_embeddings=optional_array(response.class_embeddings, field="class_embeddings"),
        model=ref_text(response.model),
    )


def scorer_info(scorer: scoring_pb2.Scorer) -> ScorerInfo:
    return ScorerInfo(
        name=scorer.name,
        description=scorer.description,
        model_kind=_KINDS.get(scorer.model_kind, ""),
        models=tuple(scorer.models),
        params=tuple(ScorerParam(p.name, p.type, p.default_json, p.description) for p in scorer.params),
        differentiable=scorer.differentiable,
        per_image=scorer.per_image,
    )


def score_result(outputs: Iterable[scoring_pb2.ScoreOutput]) -> ScoreResult:
    return ScoreResult(
        outputs={
            out.key: ScoreOutput(
                key=out.key,
                values=tensors.from_tensor_proto(out.values, field=f"outputs[{out.key}].values", copy=True),
                extra={
                    name: tensors.from_tensor_proto(t, field=f"outputs[{out.key}].extra[{name}]", copy=True)
                    for name, t in out.extra.items()
                },
                model=ref_text(out.model),
            )
            for out in outputs
        }
    )


def _time(stamp: timestamp_pb2.Timestamp) -> datetime | None:
    if not stamp.seconds and not stamp.nanos:
        return None
    moment: datetime = stamp.ToDatetime(tzinfo=UTC)
    return moment


def job_state(wire: int) -> JobState:
    return _STATES.get(wire, JobState.UNSPECIFIED)  # type: ignore[call-overload, no-any-return]


def job_status(job: optimization_pb2.Job) -> JobStatus:
    return JobStatus(
        id=job.id,
        kind=job.kind,
        state=job_state(job.state),
        step=job.step,
        total_steps=job.total_steps,
        criterion=dict(job.criterion),
        error=job.error,
        error_details=tuple(ErrorDetail(d.field, d.reason, d.message) for d in job.error_details),
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
        last_event_id=job.last_event_id,
        labels=dict(job.labels),
        priority=job.priority,
        owner=job.owner,
        created_at=_time(job.created_at),
        started_at=_time(job.started_at),
        finished_at=_time(job.finished_at),
        expires_at=_time(job.expires_at),
        pending_round=feedback_round(job.pending_round, job_id=job.id) if job.pending_round.round_id else None,
    )


def job_result(
    result: optimization_pb2.JobResult, *, result_type: type[JobResult] = JobResult, kind: str = ""
) -> JobResult:
    """A JobResult (of the kind's `result_type`, e.g. InversionResult) with images decoded and arrays copied out."""
    latents = optional_array(result.latents, field="result.latents")
    values = {
        name: tensors.from_tensor_proto(t, field=f"result.curve.values[{name}]", copy=True)
        for name, t in result.curve.values.items()
    }
    return result_type(
        job_id=result.job_id,
        images=batch_to_pil(result.images),
        latents=latents if latents is not None else np.zeros((0, 0), np.float32),
        class_embeddings=optional_array(result.class_embeddings, field="result.class_embeddings"),
        metrics=dict(result.metrics),
        item_metrics=[dict(item.values) for item in result.item_metrics],
        curve=CriterionCurve(steps=np.asarray(result.curve.steps, dtype=np.int64), values=values),
        models=[ref_text(ref) for ref in result.models],
        tensors={
            name: tensors.from_tensor_proto(t, field=f"result.tensors[{name}]", copy=True)
            for name, t in result.tensors.items()
        },
        generator=ref_text(result.generator),
        class_ids=tuple(result.class_ids),
        kind=kind,
    )


def job_event(
    event: optimization_pb2.JobEvent, *, result_type: type[JobResult] = JobResult, kind: str = ""
) -> JobEvent:
    """The typed event for one WatchJob message; an unknown payload (a newer server) becomes a bare JobEvent."""
    base: dict[str, Any] = {"event_id": event.event_id, "job_id": event.job_id, "time": _time(event.time)}
    payload = event.WhichOneof("payload")
    if payload == "state_change":
        change = event.state_change
        return StateChanged(
            **base, state=job_state(change.state), previous=job_state(change.previous), message=change.message
        )
    if payload == "progress":
        p = event.progress
        return ProgressEvent(
            **base,
            step=p.step,
            total_steps=p.total_steps,
            criterion=dict(p.criterion),
            generator_calls=p.generator_calls,
            elapsed_s=p.elapsed_s,
        )
    if payload == "preview":
        return PreviewEvent(**base, step=event.preview.step, images=batch_to_pil(event.preview.images))
    if payload == "feedback_round":
        r = event.feedback_round
        return FeedbackRoundEvent(
            **base,
            round_id=r.round_id,
            round=r.round,
            images=batch_to_pil(r.images),
            choose=r.choose,
            num_pairs=r.num_pairs,
            feedback_round=feedback_round(r, job_id=event.job_id),
        )
    if payload == "result":
        return ResultEvent(**base, result=job_result(event.result, result_type=result_type, kind=kind))
    return JobEvent(**base)


# --- the server's capabilities and the rounds of human-in-the-loop jobs --------------------------------------------


def job_kind_info(kind: optimization_pb2.JobKindInfo) -> JobKindInfo:
    return JobKindInfo(
        name=kind.name,
        description=kind.description,
        has_rounds=kind.has_rounds,
        spec_message=kind.spec_message,
        options=tuple(JobOption(o.name, o.type, o.default_json) for o in kind.options),
    )


def optimizer_info(info: optimization_pb2.OptimizerInfo) -> OptimizerInfo:
    return OptimizerInfo(
        name=info.name,
        gradient=info.gradient,
        description=info.description,
        default_learning_rate=info.default_learning_rate,
        default_population=info.default_population,
    )


def answer_kind(wire: int) -> AnswerKind:
    return _ANSWER_KINDS.get(wire, AnswerKind.UNSPECIFIED)  # type: ignore[call-overload, no-any-return]


def round_item(item: optimization_pb2.RoundItem, *, field: str) -> RoundItem:
    condition = item.condition.WhichOneof("condition")
    embedding = None
    if condition == "embeddings":
        embedding = tensors.from_tensor_proto(item.condition.embeddings, field=f"{field}.condition", copy=True)
        embedding = embedding.reshape(-1)
    return RoundItem(
        item_id=item.item_id,
        seed=item.seed,
        latent=tensors.from_tensor_proto(item.latent, field=f"{field}.latent", copy=True).reshape(-1),
        class_id=int(item.condition.class_ids.ids[0]) if condition == "class_ids" else None,
        embedding=embedding,
        parent_ids=tuple(item.parent_ids),
    )


def round_items(items: Iterable[optimization_pb2.RoundItem]) -> tuple[RoundItem, ...]:
    return tuple(round_item(item, field=f"items[{i}]") for i, item in enumerate(items))


CHOICE_ACTIONS: dict[int, ChoiceAction] = {
    optimization_pb2.CHOICE_ACTION_PICK: "pick",
    optimization_pb2.CHOICE_ACTION_NONE_GOOD: "none_good",
    optimization_pb2.CHOICE_ACTION_UNDO: "undo",
}


def feedback_round(message: optimization_pb2.FeedbackRound, *, job_id: str) -> FeedbackRound:
    return FeedbackRound(
        job_id=job_id,
        round_id=message.round_id,
        round=message.round,
        answer=answer_kind(message.answer),
        items=round_items(message.items),
        pairs=tuple((pair.left, pair.right) for pair in message.pairs),
        choose=message.choose,
        allow_repeats=message.allow_repeats,
        rating_min=message.rating_min,
        rating_max=message.rating_max,
        answers_required=message.answers_required,
        answers_received=message.answers_received,
        generator=ref_text(message.generator),
        expires_at=_time(message.expires_at),
        actions=tuple(CHOICE_ACTIONS[action] for action in message.actions if action in CHOICE_ACTIONS),
        step_size=message.step_size,
        answer_levels=message.answer_levels,
        pixels=tuple(batch_to_pil(message.images)) if _has_images(message.images) else (),
    )


def _has_images(batch: common_pb2.ImageBatch) -> bool:
    return len(batch.images) > 0 or batch.HasField("tensor")


def interaction(message: optimization_pb2.Interaction) -> Interaction:
    answer = message.WhichOneof("answer")
    judgements = sorted(message.pairwise.judgements, key=lambda j: j.pair)
    return Interaction(
        job_id=message.job_id,
        round_id=message.round_id,
        round=message.round,
        rater=message.rater,
        time=_time(message.time),
        latency_s=message.latency_s,
        answer=answer_kind(message.answer_kind),
        choice=tuple(message.choice.indices) if answer == "choice" else None,
        pairwise=tuple(j.score if j.HasField("score") else PREFERENCE_SCORES.get(j.preference, 0.0) for j in judgements)
        if answer == "pairwise"
        else None,
        ratings=tuple(message.ratings.values) if answer == "ratings" else None,
        items=round_items(message.items),
        pairs=tuple((pair.left, pair.right) for pair in message.pairs),
        generator=ref_text(message.generator),
        idempotency_key=message.idempotency_key,
        action=CHOICE_ACTIONS.get(message.choice.action, "pick"),
        step_size=message.choice.step_size if message.choice.HasField("step_size") else None,
    )
