"""The PIR estimator of seed 000 (appendix C.3): a pretrained backbone with its output layer replaced by a
fully connected layer to B bins of [0, 1], trained as a classifier; the rate is read out with a low softmax
temperature (the scoring core's `pir` output).

The backbone is any registered architecture with `features()` (the built-in classifiers); its weights travel inside
the estimator's own safetensors file, so an estimator card needs nothing else to load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gansteer_server.models.architectures import build_architecture, register_architecture


@register_architecture("pir_estimator")
class PIREstimator(nn.Module):
    """R(image) -> logits over `bins` equal bins of [0, 1]; `features()` passes the backbone's through."""

    def __init__(
        self,
        backbone: str = "scenes_classifier",
        backbone_kwargs: dict[str, Any] | None = None,
        bins: int = 100,
        layer: str = "penultimate",
        resolution: int = 32,
    ) -> None:
        super().__init__()
        if bins < 2:
            raise ValueError(f"an estimator needs at least 2 bins, got {bins}")
        self.backbone = build_architecture(backbone, **(backbone_kwargs or {}))
        if not hasattr(self.backbone, "features"):
            raise ValueError(f"backbone {backbone!r} has no features() to read layer {layer!r} from")
        self.layer, self.bins = layer, bins
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            size = self.backbone.features(torch.zeros(1, 3, resolution, resolution))[layer][0].numel()  # type: ignore[operator]
        self.backbone.train(was_training)
        self.head = nn.Linear(size, bins)
        self.feature_names = getattr(self.backbone, "feature_names", ())

    def features(self, x: Tensor) -> dict[str, Tensor]:
        return self.backbone.features(x)  # type: ignore[no-any-return, operator]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)[self.layer].flatten(1))
