"""Per-image similarity of a retrieved image to its target, in the [0, 1] pixel range.

`psnr` is 10 log10(1 / MSE) over all pixels and channels. `ssim` is the standard SSIM of Wang et al. (2004):
Gaussian window sigma 1.5 (11 x 11), K1 = 0.01, K2 = 0.03, averaged over the channels and the window positions
that fit inside the image (22 x 22 at 32 px); torchmetrics computes it. Both need images of the same size, at
least 11 px on a side for `ssim`.
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def to_unit_range(images: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images + 1) / 2).clamp(0, 1)


def psnr(images: Tensor, targets: Tensor) -> Tensor:
    """PSNR in dB per image (N,) of images in [-1, 1], measured in the [0, 1] range."""
    return peak_signal_noise_ratio(
        to_unit_range(images), to_unit_range(targets), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


def ssim(images: Tensor, targets: Tensor) -> Tensor:
    """SSIM per image (N,) of images in [-1, 1], measured in the [0, 1] range."""
    if min(images.shape[-2:]) < 11:
        raise ValueError(f"ssim needs images of at least 11 x 11 pixels, got {tuple(images.shape[-2:])}")
    return structural_similarity_index_measure(
        to_unit_range(images), to_unit_range(targets), sigma=1.5, data_range=1.0, reduction="none"
    )
