"""A simulated rater of pairs, for human NES: it answers pairwise rounds through the same API a person's UI uses
(`Job.answer_rounds`), so the loop is tested and benchmarked without people.

Its hidden judgement is a scorer output asked of the scoring service (default: the discriminator's realism). A pair
(left, right) gets tanh(slope * (J(left) - J(right)) / scale + position_bias + noise * N(0, 1)), on the round's
graded scale (its `answer_levels` points from -1 to 1; continuous when 0). `scale` is the median |J(left) -
J(right)| of the first round it answers (its sense of what "different" means), fixed from then on.

    rater = PairwisePerson(client, rater_id="sim-1", noise=0.5)
    job = client.human_nes(model="scenes-gen-step900", rounds=2)
    job.answer_rounds(rater, rater_id=rater.rater_id)

Needs only the SDK (numpy). The server's known-gradient harness (`gansteer_server.algorithms.human_nes.harness`)
is the same person with a differentiable judgement in-process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gansteer.client import Client
from gansteer.types import Answer, AnswerKind, Round


class PairwisePerson:
    """A rater with a hidden scorer judgement, a psychometric curve, noise, a graded scale and a position bias."""

    def __init__(
        self,
        client: Client,
        *,
        scorer: str = "scenes-disc",
        output: str = "realism",
        params: Mapping[str, Any] | None = None,
        slope: float = 1.0,
        noise: float = 0.5,
        position_bias: float = 0.0,
        rater_id: str = "simulated-pairwise",
        seed: int = 0,
    ) -> None:
        if noise < 0 or slope <= 0:
            raise ValueError(f"noise must be >= 0 and slope > 0, got {noise} and {slope}")
        self.client, self.scorer, self.output, self.params = client, scorer, output, dict(params or {})
        self.slope, self.noise, self.position_bias = slope, noise, position_bias
        self.rater_id = rater_id
        self.scale: float | None = None
        self._rng = np.random.default_rng(seed)

    def judge(self, images: list[Any]) -> np.ndarray[Any, np.dtype[np.float64]]:
        """The hidden judgement of each image, without noise."""
        scores = self.client.score(images, self.scorer, {self.output: self.params})
        values: np.ndarray[Any, np.dtype[np.float64]] = np.asarray(scores[self.output], np.float64)
        means: np.ndarray[Any, np.dtype[np.float64]] = values.reshape(len(images), -1).mean(axis=1)
        return means

    def __call__(self, round: Round) -> Answer:
        if round.answer is not AnswerKind.PAIRWISE:
            raise ValueError(f"a pairwise person answers pairwise rounds; round {round.round} asks for {round.answer}")
        values = self.judge(round.images())
        difference = np.array([values[left] - values[right] for left, right in round.pairs])
        if self.scale is None:
            self.scale = max(float(np.median(np.abs(difference))), 1e-12)
        latent = self.slope * difference / self.scale + self.position_bias
        answers = np.tanh(latent + self.noise * self._rng.standard_normal(len(difference)))
        if round.answer_levels >= 2:
            steps = round.answer_levels - 1
            answers = np.round((answers + 1) / 2 * steps) / steps * 2 - 1
        return Answer(pairwise=[float(a) for a in np.clip(answers, -1, 1)])


__all__ = ["PairwisePerson"]
