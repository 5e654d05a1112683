"""Diversity of one image set: mean similarity or distance over random pairs of distinct images.

Both metrics draw their pairs from `random_pairs`, so for one seed they look at the same pairs of images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from gansteer_server.algorithms.metrics.features import NO_RESIZE, Features, embed, feature_models
from gansteer_server.algorithms.metrics.result import MetricResult

# The standard five-scale MS-SSIM weights (Wang et al. 2003); at 32 px only three scales fit, so the first three
# are kept and renormalised to sum to one.
_FIVE_SCALE_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_BETAS = tuple(b / sum(_FIVE_SCALE_BETAS[:3]) for b in _FIVE_SCALE_BETAS[:3])
MS_SSIM_WINDOW = 7
# torchmetrics ignores `kernel_size` for a Gaussian window and sizes it as 2 * int(3.5 * sigma + 0.5) + 1 (11 px at
# the standard sigma 1.5); sigma 6/7 puts the window's edge at 3.5 sigma = 3 px, i.e. the 7-pixel window of the name.
MS_SSIM_SIGMA = (MS_SSIM_WINDOW // 2) / 3.5


def random_pairs(n: int, pairs: int, seed: int) -> tuple[Tensor, Tensor]:
    """`pairs` index pairs (first, second) with first != second in each, drawn from range(n); the same for one seed.

    The second index is the first plus a uniform non-zero offset modulo n, so it is uniform over the other n - 1.
    """
    if n < 2:
        raise ValueError(f"pairs of distinct images need at least 2 images, got {n}")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n, size=pairs)
    second = (first + rng.integers(1, n, size=pairs)) % n
    return torch.from_numpy(first), torch.from_numpy(second)


@torch.no_grad()
def ms_ssim_3s_k7(images: Tensor, pairs: int = 200, seed: int = 0, *, batch_size: int = 100) -> MetricResult:
    """Mean MS-SSIM over `pairs` random pairs of distinct images: lower means a more diverse set.

    Three scales with renormalised weights and a 7-pixel Gaussian window (sigma 6/7), because the standard five
    scales and 11-pixel window need images over 160 px: never compare with published MS-SSIM figures. Computed by
    torchmetrics in float64 on images mapped from [-1, 1] to [0, 1] (data range 1, clamped), negative contrast terms
    set to 0 (its "relu" normalisation; unrelated noise scores 0). Pixels are compared at the images' own size.
    """
    first, second = random_pairs(len(images), pairs, seed)
    unit = (images.double() + 1) / 2  # float64: in float32, E[xy] - E[x]E[y] cancels to errors ~C2 on flat regions
    scores = [
        multiscale_structural_similarity_index_measure(
            unit[first[i : i + batch_size]],
            unit[second[i : i + batch_size]],
            sigma=MS_SSIM_SIGMA,
            kernel_size=MS_SSIM_WINDOW,
            data_range=(0.0, 1.0),
            betas=MS_SSIM_BETAS,
            normalize="relu",
            reduction="none",
        )
        for i in range(0, pairs, batch_size)
    ]
    return MetricResult(
        name="ms_ssim_3s_k7",
        value=float(torch.cat(scores).mean()),
        n=pairs,
        resize=NO_RESIZE,
        models=(),
        extra={"scales": len(MS_SSIM_BETAS), "window": MS_SSIM_WINDOW, "sigma": MS_SSIM_SIGMA, "seed": seed},
    )


@torch.no_grad()
def lpips_builtin(images: Tensor, features: Features, pairs: int = 200, seed: int = 0) -> MetricResult:
    """Mean perceptual distance over `pairs` random pairs of distinct images, in the built-in classifier's features.

    NOT LPIPS: LPIPS (Zhang et al. 2018) uses AlexNet/VGG layers, which would be downloaded, and linear weights
    learned from human judgements. "builtin" says it is computed LPIPS-style in the feature network `features`
    (the classifier's penultimate vector): each image's vector is unit-normalised and the squared L2 distance taken,
    which is LPIPS's formula for a single 1x1 layer with uniform weights (squared differences of unit-normalised
    channel vectors, summed over channels). Range [0, 4]; 0 for identical images; higher means more diverse.
    """
    first, second = random_pairs(len(images), pairs, seed)
    vectors, mode = embed(features, images)
    vectors = vectors.double()
    unit = vectors / (vectors.norm(dim=1, keepdim=True) + 1e-10)  # LPIPS's normalize_tensor epsilon
    distances = (unit[first] - unit[second]).pow(2).sum(dim=1)
    return MetricResult(
        name="lpips_builtin",
        value=float(distances.mean()),
        n=pairs,
        resize=mode,
        models=feature_models(features),
        extra={"seed": seed},
    )
