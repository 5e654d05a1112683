"""Rounds that wait for people (ARCHITECTURE decision 12): what a kind asks, what an answer must look like, and the
interaction log's entries.

A kind ends a step by opening a `Round`: the items to show (latents and seeds, from which the generator renders the
images on demand; never only pixels), the answer it expects (pick `choose` of the items, repeats allowed; a graded
score in [-1, 1] per shown pair; a rating per item) and an expiry. The runner checkpoints the run, stores the round
and releases the worker; the job waits in WAITING_FOR_FEEDBACK. `SubmitFeedback` checks an answer here
(`check_answer`), appends an `Interaction` to the job's log and queues the next segment, which hands the run the
round's answers (`answers_of`). A simulated rater answers through the same RPC as a person.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from gansteer_server.jobs.records import timestamp
from gansteer_server.proto import common_pb2
from gansteer_server.proto import optimization_pb2 as opt
from gansteer_server.wire.convert import float_tensor, image_batch
from gansteer_server.wire.errors import invalid_argument

AnswerKind = Literal["choice", "pairwise", "rating"]
_ANSWER_KINDS: dict[str, int] = {
    "choice": opt.ANSWER_KIND_CHOICE,
    "pairwise": opt.ANSWER_KIND_PAIRWISE,
    "rating": opt.ANSWER_KIND_RATING,
}
#: The SubmitFeedbackRequest / Interaction oneof field that carries each kind of answer.
_ANSWER_FIELDS = {
    opt.ANSWER_KIND_CHOICE: "choice",
    opt.ANSWER_KIND_PAIRWISE: "pairwise",
    opt.ANSWER_KIND_RATING: "ratings",
}
_PREFERENCE_SCORES = {opt.PREFERENCE_LEFT: 1.0, opt.PREFERENCE_RIGHT: -1.0, opt.PREFERENCE_TIE: 0.0}
ChoiceAction = Literal["pick", "none_good", "undo"]
#: The choice actions besides picking that a round may accept, by name.
CHOICE_ACTIONS: dict[str, int] = {"none_good": opt.CHOICE_ACTION_NONE_GOOD, "undo": opt.CHOICE_ACTION_UNDO}
_ACTION_NAMES = {opt.CHOICE_ACTION_PICK: "pick"} | {number: name for name, number in CHOICE_ACTIONS.items()}


@dataclass(frozen=True)
class RoundItem:
    """One image of a round: the generator renders it from `latent` (drawn with `seed`) and the class condition."""

    item_id: str
    latent: Tensor  # (Z,)
    seed: int = 0
    class_id: int | None = None
    class_vector: Tensor | None = None  # (E,)
    parent_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Round:
    """What a kind asks people: the items, the answer it expects, and for how long it waits."""

    number: int  # from 1
    answer: AnswerKind
    items: tuple[RoundItem, ...]
    generator: str  # the pinned `name@version` that renders the items
    choose: int = 0  # choice: how many picks
    allow_repeats: bool = True  # choice: one item picked more than once (HEVOL's picks)
    pairs: tuple[tuple[int, int], ...] = ()  # pairwise: (left, right) item indices, sides already randomised
    answers_required: int = 1  # distinct raters before the job moves on
    rating_range: tuple[float, float] = (0.0, 1.0)
    expires_in_s: float = 0.0  # 0: the deployment's default
    actions: tuple[ChoiceAction, ...] = ()  # choice: what an answer may do besides picking (none_good, undo)
    step_size: float = 0.0  # choice: the step size the next round uses, which an answer may change; 0: none taken
    #: The pixels shown, (len(items), C, H, W) in [-1, 1], when they are not the generator's output alone (human NES
    #: shows x +- Delta); stored in the round as PNG. None: whoever shows the round renders the items.
    images: Tensor | None = None
    answer_levels: int = 0  # pairwise: points of the graded scale shown, from -1 to 1 (0: continuous)

    def __post_init__(self) -> None:
        if self.answer not in _ANSWER_KINDS:
            raise ValueError(f"answer must be one of {sorted(_ANSWER_KINDS)}, got {self.answer!r}")
        if not self.items:
            raise ValueError("a round shows at least one item")
        if self.answer == "choice" and not 0 < self.choose <= (10_000 if self.allow_repeats else len(self.items)):
            raise ValueError(f"choose must be 1 to {len(self.items)} (or more with repeats), got {self.choose}")
        if self.answer == "pairwise" and not self.pairs:
            raise ValueError("a pairwise round needs pairs")
        if any(not (0 <= i < len(self.items) and 0 <= j < len(self.items)) for i, j in self.pairs):
            raise ValueError("pairs index the round's items")
        if self.answers_required < 1:
            raise ValueError(f"answers_required must be >= 1, got {self.answers_required}")
        if self.images is not None and len(self.images) != len(self.items):
            raise ValueError(f"images: one per item ({len(self.items)}), got {len(self.images)}")
        if any(action not in CHOICE_ACTIONS for action in self.actions) or (self.actions and self.answer != "choice"):
            raise ValueError(f"a choice round's actions are some of {sorted(CHOICE_ACTIONS)}, got {self.actions}")


@dataclass(frozen=True)
class Answer:
    """One rater's answer, as a kind receives it; exactly one of the three is filled, by the round's answer kind."""

    rater: str  # pseudonymous
    choice: tuple[int, ...] = ()
    scores: tuple[float, ...] = ()  # per pair in order, in [-1, 1]: +1 left better, -1 right better
    ratings: tuple[float, ...] = ()  # per item in order
    action: ChoiceAction = "pick"  # choice: what the answer does (`choice` is empty unless it picks)
    step_size: float | None = None  # choice: the step size the rater set for the rounds that follow


# --- the round as a message --------------------------------------------------------------------------------------


def round_message(round_: Round, round_id: str, expires_at: float) -> opt.FeedbackRound:
    message = opt.FeedbackRound(
        round_id=round_id,
        round=round_.number,
        answer=_ANSWER_KINDS[round_.answer],  # type: ignore[arg-type]
        choose=round_.choose,
        num_pairs=len(round_.pairs),
        allow_repeats=round_.allow_repeats,
        answers_required=round_.answers_required,
        rating_min=round_.rating_range[0],
        rating_max=round_.rating_range[1],
        generator=_model_ref(round_.generator),
        pairs=[opt.RoundPair(left=left, right=right) for left, right in round_.pairs],
        actions=[CHOICE_ACTIONS[action] for action in round_.actions],  # type: ignore[misc]
        step_size=round_.step_size,
        answer_levels=round_.answer_levels,
    )
    if round_.images is not None:
        message.images.CopyFrom(image_batch(round_.images.float().clamp(-1, 1), as_png=True))
    message.expires_at.CopyFrom(timestamp(expires_at))
    for item in round_.items:
        entry = message.items.add(item_id=item.item_id, seed=item.seed, parent_ids=list(item.parent_ids))
        entry.latent.CopyFrom(float_tensor(item.latent))
        if item.class_id is not None:
            entry.condition.class_ids.ids.append(item.class_id)
        elif item.class_vector is not None:
            entry.condition.embeddings.CopyFrom(float_tensor(item.class_vector[None]))
    return message


def _model_ref(ref: str) -> common_pb2.ModelRef:
    name, _, version = ref.partition("@")
    return common_pb2.ModelRef(name=name, version=int(version) if version.isdigit() else 0)


# --- answers ---------------------------------------------------------------------------------------------------------


def check_answer(round_: opt.FeedbackRound, request: opt.SubmitFeedbackRequest) -> None:
    """Refuse an answer of the wrong kind or shape, naming the field (INVALID_ARGUMENT)."""
    expected = _ANSWER_FIELDS[round_.answer]
    given = request.WhichOneof("feedback")
    if given != expected:
        raise invalid_argument(
            expected, f"round {round_.round} expects `{expected}`, got {f'`{given}`' if given else 'no answer'}"
        )
    items = len(round_.items)
    if given == "choice":
        indices = list(request.choice.indices)
        _check_choice_extras(round_, request.choice)
        if request.choice.action != opt.CHOICE_ACTION_PICK:
            if indices:
                raise invalid_argument("choice.indices", "an answer that does not pick gives no indices")
        elif len(indices) != round_.choose:
            raise invalid_argument("choice.indices", f"pick exactly {round_.choose} items, got {len(indices)}")
        for position, index in enumerate(indices):
            if not 0 <= index < items:
                raise invalid_argument(f"choice.indices[{position}]", f"{index} is not an item index 0 to {items - 1}")
        if not round_.allow_repeats and len(set(indices)) != len(indices):
            raise invalid_argument("choice.indices", "this round takes each item at most once", "REPEATED_PICK")
    elif given == "pairwise":
        judgements = list(request.pairwise.judgements)
        seen = sorted(j.pair for j in judgements)
        if seen != list(range(round_.num_pairs)):
            raise invalid_argument(
                "pairwise.judgements", f"answer each of the {round_.num_pairs} pairs exactly once (pairs {seen})"
            )
        for position, judgement in enumerate(judgements):
            field = f"pairwise.judgements[{position}]"
            if judgement.HasField("score"):
                if not (math.isfinite(judgement.score) and -1 <= judgement.score <= 1):
                    raise invalid_argument(f"{field}.score", f"must lie in [-1, 1], got {judgement.score}")
            elif judgement.preference not in _PREFERENCE_SCORES:
                raise invalid_argument(f"{field}.preference", "give a preference (left, right or tie) or a score")
    else:
        values = list(request.ratings.values)
        low, high = round_.rating_min, round_.rating_max
        if len(values) != items:
            raise invalid_argument("ratings.values", f"rate each of the {items} items, got {len(values)} ratings")
        for position, value in enumerate(values):
            if not (math.isfinite(value) and low <= value <= high):
                raise invalid_argument(f"ratings.values[{position}]", f"must lie in [{low:g}, {high:g}], got {value}")


def _check_choice_extras(round_: opt.FeedbackRound, choice: opt.Choice) -> None:
    """The action and the step size of a choice, against what the round accepts."""
    if choice.action != opt.CHOICE_ACTION_PICK and choice.action not in round_.actions:
        offered = ", ".join(_ACTION_NAMES[a] for a in round_.actions) or "none"
        name = _ACTION_NAMES.get(choice.action, str(choice.action))
        text = f"round {round_.round} does not take `{name}` (it takes: pick, {offered})"
        raise invalid_argument("choice.action", text)
    if choice.HasField("step_size"):
        if round_.step_size <= 0:
            raise invalid_argument("choice.step_size", f"round {round_.round} takes no step size")
        if not (math.isfinite(choice.step_size) and 0 < choice.step_size <= 1):
            raise invalid_argument("choice.step_size", f"must lie in (0, 1], got {choice.step_size}")


def interaction(
    job_id: str, round_: opt.FeedbackRound, request: opt.SubmitFeedbackRequest, rater: str, now: float
) -> opt.Interaction:
    """The log entry of a checked answer: the answer, what was shown and how, who (pseudonym), when."""
    entry = opt.Interaction(
        job_id=job_id,
        round_id=round_.round_id,
        round=round_.round,
        rater=rater,
        latency_s=request.latency_s if math.isfinite(request.latency_s) and request.latency_s > 0 else 0.0,
        answer_kind=round_.answer,
        items=round_.items,
        pairs=round_.pairs,
        generator=round_.generator,
        idempotency_key=request.idempotency_key,
    )
    entry.time.CopyFrom(timestamp(now))
    field = _ANSWER_FIELDS[round_.answer]
    getattr(entry, field).CopyFrom(getattr(request, field))
    return entry


def answer_of(entry: opt.Interaction) -> Answer:
    """What the kind receives of a logged answer: pair scores in pair order, picks and ratings as given."""
    which = entry.WhichOneof("answer")
    if which == "choice":
        choice = entry.choice
        return Answer(
            rater=entry.rater,
            choice=tuple(choice.indices),
            action=_ACTION_NAMES[choice.action],  # type: ignore[arg-type]
            step_size=choice.step_size if choice.HasField("step_size") else None,
        )
    if which == "pairwise":
        by_pair = {
            j.pair: (j.score if j.HasField("score") else _PREFERENCE_SCORES[j.preference])
            for j in entry.pairwise.judgements
        }
        return Answer(rater=entry.rater, scores=tuple(by_pair[i] for i in sorted(by_pair)))
    return Answer(rater=entry.rater, ratings=tuple(entry.ratings.values))


def pseudonym(rater: str, key: bytes) -> str:
    """A stable pseudonym of a rater's text (HMAC-SHA256 under the deployment's key): the log never holds the text."""
    return hmac.new(key, rater.encode(), hashlib.sha256).hexdigest()[:20]
