"""A handle on one job of the optimization service: watch it, wait for it, cancel it, fetch its result, answer its
rounds.

A `Job` is only an id and a client: it holds no state of its own, so any process can re-attach to a job with
`client.job(job_id)` and see exactly what the submitter sees. Waiting follows the job's event stream (not polling),
and the stream resumes after the last event seen when a connection breaks, so no progress is missed or repeated.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from PIL import Image as PILImage

from gansteer._convert import batch_to_pil
from gansteer._core import round_fields
from gansteer.types import (
    ChoiceAction,
    FeedbackResult,
    FeedbackRound,
    Interaction,
    JobEvent,
    JobResult,
    JobStatus,
    Rater,
    Round,
)
from gansteer.v1 import common_pb2, optimization_pb2

if TYPE_CHECKING:
    from gansteer.client import Client


class Job:
    """A submitted job. `id` identifies it across processes; `kind` is its JobSpec kind (e.g. `inversion`)."""

    def __init__(self, client: Client, job_id: str, *, kind: str = "") -> None:
        self.id = job_id
        self.kind = kind
        self._client = client

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, kind={self.kind!r})"

    def status(self) -> JobStatus:
        """The job's record now: state, step, latest criterion values, error, the round it waits on."""
        return self._client.get_job(self.id)

    def watch(self, *, after_event_id: str = "", previews: bool = True) -> Iterator[JobEvent]:
        """The job's events in order (StateChanged, ProgressEvent, PreviewEvent, ResultEvent...) from its first,
        or after `after_event_id`, until the final state change. Reconnects transparently."""
        return self._client.watch_job(self.id, after_event_id=after_event_id, previews=previews, kind=self.kind)

    def wait(self, *, progress: bool = True, timeout: float | None = None) -> JobStatus:
        """Blocks until the job ends and returns its final record.

        `progress` shows a bar with the step, the criterion and the rate. Raises JobFailed (JobCancelled for a
        cancelled job) when it did not succeed, and DeadlineExceeded after `timeout` seconds (the job goes on).
        """
        client = self._client
        return client._run(client._core.wait(self.id, kind=self.kind, progress=progress, timeout=timeout))

    def spec(self) -> optimization_pb2.JobSpec:
        """The spec as submitted (the wire message; for kinds the SDK has no typed helper for yet)."""
        return self._client.get_job_spec(self.id)

    def targets(self) -> list[PILImage.Image]:
        """An inversion job's target images as submitted (before the server resized them); empty for other kinds."""
        spec = self.spec()
        if spec.WhichOneof("kind") != "inversion":
            return []
        return batch_to_pil(common_pb2.ImageBatch(images=spec.inversion.targets))

    def cancel(self, reason: str = "") -> JobStatus:
        """Asks the job to stop (the worker checks every step); cancelling a finished job changes nothing."""
        return self._client.cancel_job(self.id, reason)

    def result(self, *, wait: bool = True, progress: bool = False) -> JobResult:
        """The result (an InversionResult for inversion jobs): PIL images, numpy latents, metrics, the curve.

        With `wait` (the default) blocks until the job ends first; without it, a job that has not succeeded raises
        FailedPrecondition.
        """
        if wait:
            self.wait(progress=progress)
        return self._client.get_result(self.id, kind=self.kind)

    # --- rounds of human-in-the-loop kinds ------------------------------------------------------------------------

    def rounds(self) -> Iterator[Round]:
        """The job's rounds as they open, the one open now first, until the job ends; each once.

        The iterator waits (following the event stream) while the job runs; between rounds it is the caller's turn
        to show `round.images()` and answer with `feedback`. A person and a simulated rater go the same way.
        """
        client = self._client
        return (self._bind(round) for round in client._iterate(client._core.rounds(self.id)))

    def feedback(
        self,
        round: FeedbackRound | str,
        *,
        choice: Sequence[int] | None = None,
        pairwise: Sequence[float | str] | None = None,
        ratings: Sequence[float] | None = None,
        action: ChoiceAction = "pick",
        step_size: float | None = None,
        rater: str = "",
        idempotency_key: str | None = None,
        latency_s: float = 0.0,
    ) -> FeedbackResult:
        """Answers a round (or a round id) with the one answer form it asks for.

        `choice`: `round.choose` item indices (the same one more than once where `round.allow_repeats`);
        `pairwise`: for each of `round.pairs` in order, a score in [-1, 1] (+1: the left image clearly better) or
        `left` / `right` / `tie`; `ratings`: one value per item in [rating_min, rating_max].
        `action` (choice rounds that offer it, `round.actions`): `none_good` (draw the round again) or `undo` (show
        the previous round again), with no indices; `step_size` sets the step size of the rounds that follow (rounds
        with `round.step_size` > 0). `rater` names who
        answered (the log keeps a keyed hash of it; empty: the API key's owner); `latency_s` is the time from showing
        to answering. A fresh `idempotency_key` is sent unless given, and a lost reply is retried with it, so an
        answer is recorded once (`result.duplicate` says the server had it already). Raises RoundClosed when the
        round is no longer open, InvalidArgument (naming the field) for an answer of the wrong shape.
        """
        return self._client.submit_feedback(
            self.id,
            round,
            choice=choice,
            pairwise=pairwise,
            ratings=ratings,
            action=action,
            step_size=step_size,
            rater=rater,
            idempotency_key=idempotency_key,
            latency_s=latency_s,
        )

    def answer_rounds(self, rater: Rater, *, max_rounds: int | None = None, rater_id: str = "") -> JobStatus:
        """Answers every round with `rater` until the job ends (or after `max_rounds` answers) and returns the job's
        record then (it does not raise for a failed job; `result()` does).

        `rater` is shown each round as it opens and returns an `Answer` (or the bare values, read as the round's
        answer kind asks); the answer goes through `feedback` with `rater_id` as its rater and the rater's time as
        its latency. A simulated rater goes exactly the path a person's answers go. A round that closed before the
        answer arrived is skipped.
        """
        client = self._client
        operation = client._core.answer_rounds(
            self.id, rater, bind=self._bind, max_rounds=max_rounds, rater_id=rater_id
        )
        return client._run(operation)

    def interactions(self) -> list[Interaction]:
        """The job's interaction log: every answer to its rounds with its provenance, oldest first."""
        return self._client.interactions(self.id)

    def _bind(self, round: FeedbackRound) -> Round:
        client = self._client
        return Round(**round_fields(round), _render=lambda shown: client._run(client._core.render(shown)))
