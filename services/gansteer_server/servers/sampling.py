"""Latents and classes drawn on the server, reproducibly: the same seed, count, prior and truncation give the same
values on every server (a CPU `torch.Generator`, whatever device the model runs on)."""

from __future__ import annotations

import torch
from torch import Tensor

#: Smallest truncation accepted: below it, redrawing until |z_i| <= t needs thousands of rounds.
MIN_TRUNCATION = 0.05
_MAX_ROUNDS = 100_000


def draw_latents(
    generator: torch.Generator,
    count: int,
    latent_size: int,
    prior: tuple[Tensor, Tensor] | None = None,
    truncation: float | None = None,
) -> Tensor:
    """`count` latents from N(0, I), or from N(mean, covariance) when `prior` is given.

    Truncation trick: standard-normal components with |z_i| > truncation are redrawn until inside (for a Gaussian
    prior the standardised components are truncated before the prior's mean and scale are applied).
    """
    z = torch.randn(count, latent_size, generator=generator)
    if truncation is not None:
        for _ in range(_MAX_ROUNDS):
            outside = z.abs() > truncation
            redraw = int(outside.sum())
            if redraw == 0:
                break
            z[outside] = torch.randn(redraw, generator=generator)
        else:
            raise RuntimeError(f"truncation {truncation} did not converge in {_MAX_ROUNDS} rounds")
    if prior is None:
        return z
    mean, covariance = prior
    return mean.float() + z @ _matrix_sqrt(covariance.double()).float().T


def draw_classes(generator: torch.Generator, count: int, num_classes: int) -> Tensor:
    """Class ids drawn uniformly, after the latents from the same generator."""
    return torch.randint(num_classes, (count,), generator=generator)


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _matrix_sqrt(covariance: Tensor) -> Tensor:
    """A factor L with L L^T = covariance: Cholesky, or the symmetric square root when the covariance is singular."""
    factor, info = torch.linalg.cholesky_ex(covariance)
    if int(info) == 0:
        return factor
    values, vectors = torch.linalg.eigh(covariance)
    return vectors * values.clamp_min(0).sqrt()
