"""Class accuracy of generated images under a judge classifier."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gansteer_server.algorithms.metrics.features import resize_to
from gansteer_server.algorithms.metrics.result import MetricResult


@torch.no_grad()
def accuracy(
    images: Tensor,
    judge: nn.Module,
    class_id: int,
    judge_ref: str,
    *,
    resolution: int | None = None,
    batch_size: int = 500,
) -> MetricResult:
    """The fraction of `images` that `judge` (logits for images in [-1, 1]) puts in `class_id`.

    Judge with a classifier the job did not optimise: images optimised against one classifier score well on it
    without looking like the class (seed 001's embedding AM), so its own accuracy is not evidence. `resolution`
    resizes to the judge's input size first; without it the images go in as they are.
    """
    images, mode = resize_to(images, resolution)
    judge.eval()
    predicted = torch.cat([judge(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
    return MetricResult(
        name="accuracy",
        value=float((predicted == class_id).double().mean()),
        n=len(images),
        resize=mode,
        models=(judge_ref,),
        extra={"class_id": class_id},
    )
