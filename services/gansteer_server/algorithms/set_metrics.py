"""Image-set metrics in a given feature space: Fréchet distance, improved precision and recall, diversity.

The standard networks (Inception for FID) cannot be downloaded here, so these run in the built-in classifier's
penultimate features and are named for it (`fid_builtin`, `precision_builtin`, ...; ARCHITECTURE decision 9).
The Fréchet distance comes from torchmetrics and precision/recall from `prdc` (the reference implementation of
Kynkäänniemi et al. 2019's k-NN manifolds); only the batching around them is ours.
"""

from __future__ import annotations

import numpy as np
import prdc
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance


class FeatureSpace(nn.Module):
    """Maps images in [-1, 1] to a classifier's named feature (its `features()` dict), flattened per image."""

    def __init__(self, classifier: nn.Module, layer: str = "penultimate") -> None:
        super().__init__()
        self.classifier, self.layer = classifier.eval(), layer
        with torch.no_grad():
            probe = self.classifier.features(torch.zeros(1, 3, 32, 32))[layer]  # type: ignore[operator]
        self.num_features = int(probe[0].numel())

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images)[self.layer].flatten(1)  # type: ignore[operator]

    @torch.no_grad()
    def embed(self, images: Tensor, batch_size: int = 500) -> Tensor:
        return torch.cat([self(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def frechet_distance(features: FeatureSpace, real: Tensor, generated: Tensor, batch_size: int = 500) -> float:
    """Fréchet distance between two image sets in `features` (biased at finite N: always report N)."""
    metric = FrechetInceptionDistance(feature=features, normalize=False)
    for images, is_real in ((real, True), (generated, False)):
        for i in range(0, len(images), batch_size):
            metric.update(images[i : i + batch_size], real=is_real)
    return float(metric.compute())


def precision_recall(real_features: Tensor, generated_features: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN radii in the given features."""
    scores = prdc.compute_prdc(
        real_features=real_features.double().numpy(),
        fake_features=generated_features.double().numpy(),
        nearest_k=k,
    )
    return float(scores["precision"]), float(scores["recall"])


def mean_pairwise_distance(samples: Tensor, pairs: int = 200, seed: int = 0) -> float:
    """Mean Euclidean distance over `pairs` random pairs of distinct samples (rows flattened)."""
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(samples), size=pairs)
    second = (first + rng.integers(1, len(samples), size=pairs)) % len(samples)
    flat = samples.flatten(1).double()
    return float((flat[first] - flat[second]).norm(dim=1).mean())
