"""The NES estimate of the gradient of a person's judgement in image space (seed 004, eqs. 7-12, appendix).

For antithetic pairs x + Delta_r, x - Delta_r with Delta ~ N(0, Sigma), a person's graded answer
dD_r = D(x + Delta_r) - D(x - Delta_r) gives grad D(x) ~ (1 / 2R) sum_r dD_r Sigma^-1 Delta_r (eq. 12).

- even: Delta = sigma * eps, eps ~ N(0, I): Sigma^-1 Delta = Delta / sigma^2.
- uneven: Delta = V z_q, z_q ~ N(0, sigma^2 D) (eqs. 8-9). Sigma = sigma^2 V D V^T has rank q, so its inverse does
  not exist; the score function of the subspace Gaussian is V (sigma^2 D)^-1 z_q (the pseudo-inverse applied to
  Delta), whose expectation against a linear judgement is the judgement's gradient projected on span(V). The
  seed's code inverted the full singular matrix instead; `source_score` reproduces that for the harness only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from gansteer_server.algorithms.human_nes.basis import PCABasis

BasisKind = Literal["even", "uneven"]


@dataclass(frozen=True)
class Perturbations:
    """R perturbations per image: `delta` (N, R, D) in pixels, and `score` (N, R, D), Sigma^+ Delta of each."""

    delta: Tensor
    score: Tensor


def draw(
    n: int, r: int, sigma: float, basis: PCABasis | None, generator: torch.Generator, dim: int | None = None
) -> Perturbations:
    """R perturbations for each of n images: isotropic (basis None, `dim` pixels) or from the basis (uneven)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if basis is None:
        if dim is None:
            raise ValueError("even perturbations need the image size `dim`")
        eps = torch.randn(n, r, dim, generator=generator)
        delta = sigma * eps
        return Perturbations(delta=delta, score=delta / sigma**2)
    variance = sigma**2 * basis.eigenvalues  # the diagonal of Sigma_q = sigma^2 D (eq. 8)
    z_q = torch.randn(n, r, basis.q, generator=generator) * variance.sqrt()
    delta = z_q @ basis.components.T  # eq. 4: Delta = V z_q
    score = (z_q / variance) @ basis.components.T  # V (sigma^2 D)^-1 z_q: never the inverse of V Sigma_q V^T
    return Perturbations(delta=delta, score=score)


def estimate(differences: Tensor, score: Tensor) -> Tensor:
    """grad D(x_n) ~ (1 / 2R) sum_r dD_r score_r (eq. 12) for differences (N, R) and scores (N, R, D) -> (N, D).
    A difference is the mean over the raters who judged the pair (several raters per pair average their noise)."""
    r = differences.shape[1]
    return torch.einsum("nr,nrd->nd", differences.to(score), score) / (2 * r)


def source_score(delta: Tensor, basis: PCABasis, sigma: float) -> Tensor:
    """The seed's own uneven formula, Sigma^-1 Delta with Sigma = sigma^2 V D V^T inverted as a full D x D matrix in
    float64 (numpy's inverse, as the seed's code did). Sigma has rank q < D, so the 'inverse' is numerical noise of
    enormous magnitude; kept only so the known-gradient harness can measure what it costs."""
    import numpy as np

    v = basis.components.double().numpy()
    sigma_full = (sigma**2) * (v * basis.eigenvalues.double().numpy()) @ v.T
    try:
        inverse = np.linalg.inv(sigma_full)
    except np.linalg.LinAlgError:  # exactly singular in float64: numpy refuses; Matlab returns inf (seed 004, 6.1)
        inverse = np.full_like(sigma_full, np.nan)
    flat = delta.reshape(-1, delta.shape[-1]).double().numpy()
    return torch.from_numpy(flat @ inverse.T).reshape(delta.shape).float()


def pair_sides(n_pairs: int, generator: torch.Generator) -> Tensor:
    """Which side shows x + Delta, per pair: True left, False right, drawn at random (a person favours one side;
    the seed always showed x - Delta on the left)."""
    return torch.rand(n_pairs, generator=generator) < 0.5


def differences_from_answers(scores: Tensor, plus_left: Tensor) -> Tensor:
    """dD = D(x + Delta) - D(x - Delta) from answers in [-1, 1] (+1: left better) and the sides shown."""
    return torch.where(plus_left, scores, -scores)


def cosine(estimate_: Tensor, truth: Tensor) -> Tensor:
    """Cosine per row between estimates and true gradients (N, D) -> (N,); 0 where either is zero."""
    dot = (estimate_ * truth).sum(-1)
    norms = estimate_.norm(dim=-1) * truth.norm(dim=-1)
    return torch.where(norms > 0, dot / norms.clamp_min(1e-30), torch.zeros_like(dot))
