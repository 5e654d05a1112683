"""The known-gradient harness: a simulated person whose hidden judgement J is differentiable, so the NES estimate
can be compared with the true gradient of J in image space (the check the seed lacked: its 76% 'moved away' cannot
be told from estimator noise without it).

The person answers a pair (left, right) on the graded scale as a person would: the psychometric curve
tanh(slope * (J(left) - J(right)) / scale + position_bias + noise * N(0, 1)), quantised to `levels` points in
[-1, 1] (5: -1, -0.5, 0, 0.5, 1; odd counts have a tie). `scale` is the median |J(x + Delta) - J(x - Delta)| of the
first pairs it sees (its sense of what "different" means), fixed from then on; `position_bias` > 0 favours the
left image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from gansteer_server.algorithms.human_nes.basis import PCABasis
from gansteer_server.algorithms.human_nes.estimator import (
    cosine,
    differences_from_answers,
    draw,
    estimate,
    pair_sides,
    source_score,
)

Judgement = Callable[[Tensor], Tensor]  # images (N, C, H, W) in [-1, 1] -> (N,), differentiable
Estimator = Literal["even", "uneven", "uneven_source"]


def quantise(values: Tensor, levels: int) -> Tensor:
    """Values in [-1, 1] to the nearest of `levels` evenly spaced points (0: left continuous)."""
    if levels <= 0:
        return values.clamp(-1, 1)
    if levels < 2:
        raise ValueError(f"a graded scale has at least 2 points, got {levels}")
    steps = levels - 1
    return torch.round((values.clamp(-1, 1) + 1) / 2 * steps) / steps * 2 - 1


@dataclass
class PairwisePerson:
    """A simulated rater of pairs with a hidden differentiable judgement, a psychometric curve, noise, a graded
    scale and a position bias."""

    judgement: Judgement
    slope: float = 1.0
    noise: float = 0.5
    levels: int = 5
    position_bias: float = 0.0
    scale: float | None = None
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def gradient(self, images: Tensor) -> Tensor:
        """dJ/dx for each image (N, C, H, W): the truth the estimate is measured against."""
        x = images.detach().clone().requires_grad_(True)
        self.judgement(x).sum().backward()
        assert x.grad is not None
        return x.grad.detach()

    def judge(self, images: Tensor, batch: int = 512) -> Tensor:
        with torch.no_grad():
            return torch.cat([self.judgement(images[i : i + batch]).reshape(-1) for i in range(0, len(images), batch)])

    def answer(self, left: Tensor, right: Tensor) -> Tensor:
        """Graded answers in [-1, 1] (+1: left better) for pairs of images (P, C, H, W)."""
        difference = self.judge(left) - self.judge(right)
        if self.scale is None:
            self.scale = max(float(difference.abs().median()), 1e-12)
        noise = torch.randn(len(difference), generator=self.generator)
        latent = self.slope * difference / self.scale + self.position_bias + self.noise * noise
        return quantise(torch.tanh(latent), self.levels)


@dataclass(frozen=True)
class CosineReport:
    queries: int  # per image set
    pairs_per_image: int
    estimator: Estimator
    sigma: float
    mean: float
    ci95: tuple[float, float]
    values: list[float]


def measure(
    images: Tensor,
    person: PairwisePerson,
    *,
    queries: int,
    estimator: Estimator,
    sigma: float,
    basis: PCABasis | None,
    raters: int = 1,
    trials: int = 1,
    generator: torch.Generator | None = None,
) -> CosineReport:
    """Cosine between the NES estimate from `queries` pairs over the image set (R = queries / N per image, each pair
    answered by `raters` raters and averaged) and dJ/dx, per image and trial; mean with a 95% t-interval."""
    generator = generator or torch.Generator().manual_seed(0)
    n = len(images)
    r = max(1, queries // n)
    flat = images.reshape(n, -1)
    truth = person.gradient(images).reshape(n, -1)
    values: list[float] = []
    for _ in range(trials):
        p = draw(n, r, sigma, None if estimator == "even" else basis, generator, dim=flat.shape[1])
        plus = (flat[:, None] + p.delta).reshape(n * r, *images.shape[1:]).clamp(-1, 1)
        minus = (flat[:, None] - p.delta).reshape(n * r, *images.shape[1:]).clamp(-1, 1)
        plus_left = pair_sides(n * r, generator)
        left = torch.where(plus_left[:, None, None, None], plus, minus)
        right = torch.where(plus_left[:, None, None, None], minus, plus)
        scores = torch.stack([person.answer(left, right) for _ in range(raters)]).mean(0)
        differences = differences_from_answers(scores, plus_left).reshape(n, r)
        score = p.score if estimator != "uneven_source" else source_score(p.delta, _required(basis), sigma)
        values += cosine(estimate(differences, score), truth).tolist()
    return CosineReport(queries, r, estimator, sigma, *_mean_ci(values), values)


def _required(basis: PCABasis | None) -> PCABasis:
    if basis is None:
        raise ValueError("the uneven estimators need a basis")
    return basis


def _mean_ci(values: list[float]) -> tuple[float, tuple[float, float]]:
    array = np.nan_to_num(np.asarray(values, np.float64))
    mean = float(array.mean())
    if len(array) < 2 or float(array.std()) == 0.0:
        return mean, (mean, mean)
    half = float(stats.t.ppf(0.975, len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array)))
    return mean, (mean - half, mean + half)
