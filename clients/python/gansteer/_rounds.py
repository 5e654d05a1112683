"""Requests of the rounds of human-in-the-loop jobs: an answer as a SubmitFeedback request, and a round's items as
the Generate requests that render them.

The SDK checks only what it needs to build the message (one answer form, numbers where numbers go); the round's
shape (how many indices, which range) is the server's to judge, so its message, naming the field, is the one the
rater sees.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence

import numpy as np

from gansteer import tensors
from gansteer._convert import model_ref
from gansteer._specs import _invalid
from gansteer.types import Answer, AnswerKind, FeedbackRound, Reply, RoundItem
from gansteer.v1 import common_pb2, generation_pb2, optimization_pb2

_PREFERENCES = {
    "left": optimization_pb2.PREFERENCE_LEFT,
    "right": optimization_pb2.PREFERENCE_RIGHT,
    "tie": optimization_pb2.PREFERENCE_TIE,
}


_ACTIONS = {
    "pick": optimization_pb2.CHOICE_ACTION_PICK,
    "none_good": optimization_pb2.CHOICE_ACTION_NONE_GOOD,
    "undo": optimization_pb2.CHOICE_ACTION_UNDO,
}


def as_answer(round: FeedbackRound, reply: Reply) -> Answer:
    """A rater's reply as an Answer: bare values are read as the round's answer kind asks."""
    if isinstance(reply, Answer):
        return reply
    values = list(reply)
    if round.answer is AnswerKind.CHOICE:
        return Answer(choice=[_index(v, field=f"choice[{i}]") for i, v in enumerate(values)])
    if round.answer is AnswerKind.PAIRWISE:
        return Answer(pairwise=values)
    if round.answer is AnswerKind.RATING:
        return Answer(ratings=values)
    raise _invalid("answer", f"round {round.round_id} asks for an answer kind this SDK does not know")


def feedback_request(
    job_id: str,
    round_id: str,
    answer: Answer,
    *,
    rater: str,
    idempotency_key: str | None,
    latency_s: float,
) -> optimization_pb2.SubmitFeedbackRequest:
    """The SubmitFeedback request of one answer; a fresh idempotency key unless one is given, so that the SDK's
    retries (and a caller's) record the answer once."""
    if answer.action not in _ACTIONS:
        raise _invalid("action", f"expected one of {', '.join(_ACTIONS)}, got {answer.action!r}")
    choice = answer.choice
    if choice is None and (answer.action != "pick" or answer.step_size is not None):
        choice = ()  # an action, or a step size alone, travels in a choice that picks nothing
    forms = {"choice": choice, "pairwise": answer.pairwise, "ratings": answer.ratings}
    given = [name for name, value in forms.items() if value is not None]
    if len(given) != 1:
        raise _invalid("feedback", f"give exactly one of choice, pairwise or ratings, got {', '.join(given) or 'none'}")
    request = optimization_pb2.SubmitFeedbackRequest(
        job_id=job_id,
        round_id=round_id,
        rater=rater,
        idempotency_key=idempotency_key or uuid.uuid4().hex,
        latency_s=latency_s,
    )
    if choice is not None:
        request.choice.SetInParent()
        request.choice.indices.extend(_index(v, field=f"choice[{i}]") for i, v in enumerate(choice))
        request.choice.action = _ACTIONS[answer.action]
        if answer.step_size is not None:
            request.choice.step_size = _number(answer.step_size, field="step_size")
    elif answer.pairwise is not None:
        request.pairwise.SetInParent()
        for pair, value in enumerate(answer.pairwise):
            request.pairwise.judgements.append(_judgement(pair, value))
    elif answer.ratings is not None:
        request.ratings.values.extend(_number(v, field=f"ratings[{i}]") for i, v in enumerate(answer.ratings))
    return request


def _index(value: object, *, field: str) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise _invalid(field, f"expected an item index, got {value!r}")


def _number(value: object, *, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _invalid(field, f"expected a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise _invalid(field, f"expected a finite number, got {value!r}")
    return float(value)


def _judgement(pair: int, value: float | str) -> optimization_pb2.PairwiseJudgement:
    if isinstance(value, str):
        if value not in _PREFERENCES:
            raise _invalid(f"pairwise[{pair}]", f"expected a score in [-1, 1] or left, right, tie, got {value!r}")
        return optimization_pb2.PairwiseJudgement(pair=pair, preference=_PREFERENCES[value])
    return optimization_pb2.PairwiseJudgement(pair=pair, score=_number(value, field=f"pairwise[{pair}]"))


def render_requests(round: FeedbackRound) -> list[tuple[list[int], generation_pb2.GenerateRequest]]:
    """Generate requests that render a round's items on its pinned generator, each with the item indices it
    renders: one request when the items share a condition form (none, class ids, free vectors), else one per item."""
    items = list(round.items)
    forms = {_form(item) for item in items}
    groups = [list(range(len(items)))] if len(forms) <= 1 else [[i] for i in range(len(items))]
    return [(group, _generate_request(round.generator, [items[i] for i in group])) for group in groups if group]


def _form(item: RoundItem) -> str:
    return "ids" if item.class_id is not None else "vectors" if item.embedding is not None else "none"


def _generate_request(generator: str, items: Sequence[RoundItem]) -> generation_pb2.GenerateRequest:
    latents = np.stack([item.latent for item in items]).astype(np.float32)
    request = generation_pb2.GenerateRequest(
        model=model_ref(generator), latents=tensors.to_tensor_proto(latents, field="items.latent")
    )
    if items[0].class_id is not None:
        request.condition.class_ids.CopyFrom(common_pb2.ClassIds(ids=[int(item.class_id or 0) for item in items]))
    elif items[0].embedding is not None:
        vectors = np.stack([np.asarray(item.embedding, np.float32) for item in items])
        request.condition.embeddings.CopyFrom(tensors.to_tensor_proto(vectors, field="items.condition"))
    return request
