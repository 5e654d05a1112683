"""A simulated person: how every human loop of gansteer is tested and benchmarked without people.

It holds a hidden goal, a target image (`Target`) or a scorer output to raise (`ScorerGoal`, e.g. the probability
of "dusk" by `scenes-clf-alt`), perceives images through a feature distance (a classifier's feature layers, asked of
the scoring service) with noise, and answers rounds through the same API a person's UI uses (`Job.answer_rounds`,
hence `Job.feedback`): rounds are rendered by the generation service with `Round.images()`, answers are logged
under its rater id, with its latency.

    person = SimulatedPerson(client, Target("target.png"), noise=0.05, rater_id="sim-1")
    job = client.evolve(model="scenes-gen", rounds=6)
    person.answer(job)                      # every round, until the job ends
    best = job.result().images[0]

Perception: `perceived = distance + noise * scale * N(0, 1) - position_bias * scale * (1 - position / (n - 1))`,
where `distance` is the mean over the feature layers of |f(x) - f(goal)| / |f(goal)| (for a scorer goal, minus the
score), `scale` is the median distance of the first images it was shown (its sense of what "different" means, fixed
from then on), and `position` is an image's place in the round as shown (a person favours the first images of a
grid). It picks the `round.choose` images it perceives best, in order, best first.

Needs only the SDK (numpy): features and scores come from the scoring service.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from gansteer._convert import ImageInput
from gansteer.client import Client
from gansteer.job import Job
from gansteer.types import Answer, AnswerKind, JobStatus, Round

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Target:
    """A hidden target image: the person wants images that look like it."""

    image: ImageInput


@dataclass(frozen=True)
class ScorerGoal:
    """A hidden goal as a scorer output to raise (e.g. `class_prob` of `scenes-clf-alt` with `class_id` 1: dusk)."""

    scorer: str
    output: str
    params: Mapping[str, Any] = field(default_factory=dict)


Goal = Target | ScorerGoal


class SimulatedPerson:
    """A rater with a hidden goal, a noisy perception and a position bias; callable as a `Rater`."""

    def __init__(
        self,
        client: Client,
        goal: Goal,
        *,
        perceive_with: str = "scenes-clf",
        layers: Sequence[str] = ("stage2", "penultimate"),
        noise: float = 0.0,
        position_bias: float = 0.0,
        rater_id: str = "simulated-person",
        seed: int = 0,
    ) -> None:
        if noise < 0 or position_bias < 0:
            raise ValueError(f"noise and position_bias must be >= 0, got {noise} and {position_bias}")
        self.client, self.goal = client, goal
        self.perceive_with, self.layers = perceive_with, tuple(layers)
        self.noise, self.position_bias = noise, position_bias
        self.rater_id = rater_id
        self.scale: float | None = None
        self._rng = np.random.default_rng(seed)
        self._goal_features: list[FloatArray] | None = None

    # --- perception -----------------------------------------------------------------------------------------------

    def distances(self, images: Sequence[ImageInput]) -> FloatArray:
        """How far each image is from the goal, without noise (lower is closer): the judge of a benchmark."""
        if isinstance(self.goal, ScorerGoal):
            scores = self.client.score(list(images), self.goal.scorer, {self.goal.output: dict(self.goal.params)})
            values: FloatArray = np.asarray(scores[self.goal.output], np.float64).reshape(len(images), -1)
            negated: FloatArray = -values.mean(axis=1)
            return negated
        if self._goal_features is None:
            self._goal_features = self._features([self.goal.image])
        total = np.zeros(len(images))
        for mine, goal in zip(self._features(images), self._goal_features, strict=True):
            total += np.linalg.norm(mine - goal, axis=1) / max(float(np.linalg.norm(goal)), 1e-12)
        return total / len(self.layers)

    def perceive(self, images: Sequence[ImageInput]) -> FloatArray:
        """The distances as this person perceives them, with noise and the position bias (lower seems closer)."""
        distances = self.distances(images)
        if self.scale is None:
            self.scale = max(float(np.median(np.abs(distances))), 1e-12)
        n = len(images)
        position = np.arange(n) / max(n - 1, 1)
        perceived = distances + self.noise * self.scale * self._rng.standard_normal(n)
        biased: FloatArray = perceived - self.position_bias * self.scale * (1 - position)
        return biased

    def pick(self, images: Sequence[ImageInput], k: int) -> list[int]:
        """The `k` images it perceives closest to its goal, best first."""
        return [int(i) for i in np.argsort(self.perceive(images), kind="stable")[:k]]

    def _features(self, images: Sequence[ImageInput]) -> list[FloatArray]:
        return [
            np.asarray(
                self.client.score(list(images), self.perceive_with, {"features": {"layer": layer}})["features"],
                np.float64,
            ).reshape(len(images), -1)
            for layer in self.layers
        ]

    # --- answering ------------------------------------------------------------------------------------------------

    def __call__(self, round: Round) -> Answer:
        """The answer to a choice round: the `choose` images it perceives best, best first."""
        if round.answer is not AnswerKind.CHOICE:
            raise ValueError(f"a simulated person answers choice rounds; round {round.round} asks for {round.answer}")
        images = round.images()
        return Answer(choice=self.pick(images, min(round.choose, len(images))))

    def answer(self, job: Job, *, max_rounds: int | None = None) -> JobStatus:
        """Answers the job's rounds as they open until it ends (or after `max_rounds`), through `Job.feedback`."""
        return job.answer_rounds(self, max_rounds=max_rounds, rater_id=self.rater_id)


__all__ = ["Goal", "ScorerGoal", "SimulatedPerson", "Target"]
