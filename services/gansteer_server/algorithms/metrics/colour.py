"""Colour entropy of an image set: how many colours the set uses, a cheap sign of colour collapse under tuning.

Reward tuning toward a colour objective can drive every image to one hue (the notes on ReFL and DDPO); the entropy
of the pooled pixel colours falls when it does, while the objective still rises.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gansteer_server.algorithms.metrics.result import MetricResult


@torch.no_grad()
def colour_entropy(images: Tensor, levels: int = 8) -> MetricResult:
    """Shannon entropy (bits) of all pixels' colours, each channel quantised to `levels` levels of [-1, 1] (so at
    most 3 log2(levels) bits: 9 for 8 levels)."""
    pixels = ((images.clamp(-1, 1) + 1) / 2 * levels).floor().clamp(max=levels - 1).to(torch.int64)
    codes = (pixels[:, 0] * levels + pixels[:, 1]) * levels + pixels[:, 2]
    counts = torch.bincount(codes.flatten(), minlength=levels**3).double()
    share = counts[counts > 0] / counts.sum()
    return MetricResult(
        name="colour_entropy",
        value=float(-(share * share.log2()).sum()),
        n=len(images),
        resize="none",
        models=(),
        extra={"levels": levels},
    )
