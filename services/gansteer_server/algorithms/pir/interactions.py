"""Impressions and interactions per shown image, the data a PIR estimator learns from (seed 000, section 2.2).

A product shows each image `impressions` times and counts the positive interactions; the observed rate is
interactions / impressions. The simulated source draws the interactions as Binomial(impressions, true rate) from
any scorer output in [0, 1], the seed's noise model, so a simulated table and a product's table look alike.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

#: The seed's data set: 1,000 images, each shown 1,000 times.
DEFAULT_IMAGES = 1000
DEFAULT_IMPRESSIONS = 1000


def simulate_interactions(rates: Tensor, impressions: int, seed: int) -> Tensor:
    """Interaction counts (N,) int64 ~ Binomial(impressions, clamp(rate, 0, 1)), reproducible from `seed`."""
    if impressions < 1:
        raise ValueError(f"impressions must be positive, got {impressions}")
    generator = torch.Generator().manual_seed(seed)
    probabilities = rates.detach().to("cpu", torch.float64).clamp(0, 1)
    counts = torch.binomial(torch.full_like(probabilities, float(impressions)), probabilities, generator=generator)
    return counts.to(torch.int64)


def near_zero_share(rates: Tensor, bins: int) -> float:
    """The share of observed rates below one bin width (1 / bins): the seed found it predicts failure (C.4.2)."""
    return float((rates < 1.0 / bins).double().mean()) if len(rates) else 0.0


def half_of(key: str) -> int:
    """0 or 1: which disjoint half a record belongs to, a stable hash of its image key (seed, version, class), so
    the two halves never share an image however the table grows (the second estimator's guard)."""
    return hashlib.sha256(key.encode()).digest()[0] & 1


def rate_bins(rates: Tensor, bins: int) -> Tensor:
    """The bin index of each rate in [0, 1] among `bins` equal bins (1.0 falls in the last)."""
    return (rates.clamp(0, 1) * bins).floor().clamp(max=bins - 1).to(torch.int64)


def seed_latent(seed: int, latent_size: int, prior: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The latent (latent_size,) a Generate request with this seed and count 1 draws (the generation service's
    `draw_latents`, untruncated): a record names its image by seed, and the estimator job renders it again."""
    z = torch.randn(1, latent_size, generator=torch.Generator().manual_seed(seed))
    if prior is None:
        return z[0]
    mean, covariance = prior
    factor, info = torch.linalg.cholesky_ex(covariance.double())
    if int(info) != 0:
        values, vectors = torch.linalg.eigh(covariance.double())
        factor = vectors * values.clamp_min(0).sqrt()
    return (mean.float() + z @ factor.float().T)[0]
