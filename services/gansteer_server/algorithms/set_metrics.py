"""The zoo evaluation's float-valued set metrics, kept as thin wrappers over `algorithms.metrics`.

New code should call `gansteer_server.algorithms.metrics`, whose results carry N, resize mode and models.
"""

from __future__ import annotations

from torch import Tensor

from gansteer_server.algorithms.metrics import FeatureSpace, fid_builtin, random_pairs
from gansteer_server.algorithms.metrics.distribution import compute_precision_recall

__all__ = ["FeatureSpace", "frechet_distance", "mean_pairwise_distance", "precision_recall"]


def frechet_distance(features: FeatureSpace, real: Tensor, generated: Tensor, batch_size: int = 500) -> float:
    """Fréchet distance between two image sets in `features` (biased at finite N: always report N)."""
    return fid_builtin(real, generated, features, batch_size=batch_size).value


def precision_recall(real_features: Tensor, generated_features: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN radii in the given features."""
    return compute_precision_recall(real_features, generated_features, k)


def mean_pairwise_distance(samples: Tensor, pairs: int = 200, seed: int = 0) -> float:
    """Mean Euclidean distance over `pairs` random pairs of distinct samples (rows flattened)."""
    first, second = random_pairs(len(samples), pairs, seed)
    flat = samples.flatten(1).double()
    return float((flat[first] - flat[second]).norm(dim=1).mean())
