"""A human NES run (seed 004, section 4.2): N fixed latents, R antithetic pairs per latent per round, the raters'
graded answers turned into an image-space gradient estimate (`estimator.estimate`), one backward pass and one Adam
step per round (`update.ascend`), as many rounds as asked.

Everything a round needs is a function of the run's seed, the round's number and the weights: the perturbations and
the sides shown are drawn again from `seed * 1_000_003 + number` when the answers arrive, so a checkpoint holds only
the weights, the optimizer's state and the count of rounds answered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gansteer_server.algorithms.human_nes.basis import PCABasis
from gansteer_server.algorithms.human_nes.estimator import (
    Perturbations,
    differences_from_answers,
    draw,
    estimate,
    pair_sides,
)
from gansteer_server.algorithms.human_nes.update import BETAS, LEARNING_RATE, ascend

Sample = Callable[[Tensor, Tensor | None], Tensor]  # the trainable generator: (z, condition) -> images in [-1, 1]


@dataclass(frozen=True)
class NESConfig:
    images: int = 25  # N, the seed's 25 fixed latents
    pairs_per_image: int = 10  # R, the seed's 10
    sigma: float = 0.5
    rounds: int = 1  # the seed's forks took one AHGD iteration
    raters: int = 1  # answers per pair, averaged
    learning_rate: float = LEARNING_RATE
    seed: int = 0


@dataclass(frozen=True)
class NESRound:
    """What a round shows: pair k is (left[k], right[k]); `plus_left[k]` says which side is x + Delta."""

    number: int
    left: Tensor  # (N * R, C, H, W), clamped to [-1, 1] for showing
    right: Tensor
    plus_left: Tensor  # (N * R,) bool


class NESRun:
    """One generator tuned by people's pairwise answers; `module` is the trainable copy whose parameters move."""

    def __init__(
        self,
        config: NESConfig,
        module: nn.Module,
        sample: Sample,
        latents: Tensor,
        condition: Tensor | None,
        basis: PCABasis | None,
    ) -> None:
        self.config, self.module, self.sample = config, module, sample
        self.latents, self.condition, self.basis = latents, condition, basis
        self.optimizer = torch.optim.Adam(module.parameters(), lr=config.learning_rate, betas=BETAS)
        self.answered = 0

    @property
    def done(self) -> bool:
        return self.answered >= self.config.rounds

    def render(self) -> Tensor:
        """The N fixed latents' images under the current weights, with the graph (for the backward pass)."""
        return self.sample(self.latents, self.condition)

    def images(self) -> Tensor:
        with torch.no_grad():
            return self.render().float()

    def _draw(self, number: int, dim: int) -> tuple[Perturbations, Tensor]:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + number)
        n, r = len(self.latents), self.config.pairs_per_image
        perturbations = draw(n, r, self.config.sigma, self.basis, generator, dim=dim)
        return perturbations, pair_sides(n * r, generator)

    def open_round(self) -> NESRound:
        """The next round's pairs: x_n + Delta and x_n - Delta on random sides (eq. 12's antithetic pairs)."""
        x = self.images()
        n, shape = len(x), x.shape[1:]
        flat = x.reshape(n, 1, -1)
        perturbations, plus_left = self._draw(self.answered + 1, flat.shape[-1])
        plus = (flat + perturbations.delta).reshape(-1, *shape).clamp(-1, 1)
        minus = (flat - perturbations.delta).reshape(-1, *shape).clamp(-1, 1)
        side = plus_left[:, None, None, None]
        return NESRound(self.answered + 1, torch.where(side, plus, minus), torch.where(side, minus, plus), plus_left)

    def gradient(self, scores: Tensor) -> Tensor:
        """The image-space estimate (N, D) from the answers (raters, N * R) of the open round, +1: left better."""
        n, r = len(self.latents), self.config.pairs_per_image
        dim = int(torch.tensor(self.images().shape[1:]).prod())
        perturbations, plus_left = self._draw(self.answered + 1, dim)
        differences = differences_from_answers(scores.float().mean(0), plus_left).reshape(n, r)
        return estimate(differences, perturbations.score)

    def tell(self, scores: Tensor) -> Tensor:
        """Take the open round's answers: one backward pass of the estimate, one Adam step. Returns the estimate."""
        g_hat = self.gradient(scores)
        ascend(self.render, g_hat, self.optimizer)
        self.answered += 1
        return g_hat

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "answered": self.answered}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.answered = int(state["answered"])
