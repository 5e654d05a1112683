"""Iterations-forking analysis (seed 004, section 4.3): does after-human tuning of the snapshot G_i move its images
toward those of the later snapshot G_j? Per fixed latent, d1 = d(G_i(z), G_j(z)) and d2 = d(G_i,AH(z), G_j(z));
the seed reported the fraction with d2 < d1 (24%: 76% moved away). Distances in pixels (the seed's) and in a
feature space (a classifier's features, for a distance closer to what a person sees)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Forking:
    d1: Tensor  # (N,)
    d2: Tensor  # (N,)

    @property
    def closer_fraction(self) -> float:
        """Fraction of latents whose tuned image is closer to the later snapshot's than the untuned one was."""
        return float((self.d2 < self.d1).float().mean())

    @property
    def relative_change(self) -> Tensor:
        """(d2 - d1) / d1 per latent (the seed's Figure 6)."""
        return (self.d2 - self.d1) / self.d1.clamp_min(1e-12)


def forking(
    before: Tensor, after: Tensor, later: Tensor, features: Callable[[Tensor], Tensor] | None = None
) -> Forking:
    """d1, d2 for images (N, C, H, W) of G_i, G_i,AH and G_j on the same latents; Euclidean distance of pixels, or
    of `features(images)` flattened when given."""
    embed = (lambda x: x) if features is None else features
    with torch.no_grad():
        a, b, c = (embed(x).reshape(len(x), -1).double() for x in (before, after, later))
    return Forking(d1=(a - c).norm(dim=1), d2=(b - c).norm(dim=1))
