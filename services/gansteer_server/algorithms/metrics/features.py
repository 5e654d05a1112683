"""The feature network behind the `*_builtin` metrics, and the one pinned resize that feeds it.

The standard networks (Inception for FID, AlexNet/VGG for LPIPS) are downloaded at run time by every library that
uses them and cannot be here, so the metrics run in the built-in classifier's penultimate features and carry
`_builtin` in their names (ARCHITECTURE decision 9): their values are not comparable with published ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gansteer_server.models import ModelRegistry

Features = Callable[[Tensor], Tensor]
NO_RESIZE = "none"


class FeatureSpace(nn.Module):
    """Maps images in [-1, 1] to a classifier's named feature (its `features()` dict), flattened per image.

    `ref` is the classifier's registry reference, recorded in every result's `models`; `resolution` is the input
    size the classifier was trained at, which the metrics resize to (`resize_to`).
    """

    def __init__(
        self, classifier: nn.Module, layer: str = "penultimate", *, ref: str | None = None, resolution: int = 32
    ) -> None:
        super().__init__()
        self.classifier, self.layer = classifier.eval(), layer
        self.ref, self.resolution = ref, resolution
        with torch.no_grad():
            probe = self.classifier.features(torch.zeros(1, 3, resolution, resolution))[layer]  # type: ignore[operator]
        self.num_features = int(probe[0].numel())

    @classmethod
    def from_registry(
        cls, registry: ModelRegistry, ref: str = "scenes-clf", layer: str = "penultimate"
    ) -> FeatureSpace:
        """The classifier `ref` resolves to, with its exact `name@version` and resolution taken from its card."""
        entry = registry.resolve(ref)
        classifier = registry.load(entry.ref)
        assert isinstance(classifier, nn.Module), f"{entry.ref} must load as a torch module to expose features()"
        return cls(classifier, layer, ref=entry.ref, resolution=entry.card.resolution or 32)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images)[self.layer].flatten(1)  # type: ignore[operator]

    @torch.no_grad()
    def embed(self, images: Tensor, batch_size: int = 500) -> Tensor:
        return torch.cat([self(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def resize_to(images: Tensor, size: int | None) -> tuple[Tensor, str]:
    """`images` at `size` x `size` and the mode string that says what happened (for `MetricResult.resize`).

    One pinned method for every metric: bilinear with antialiasing, `align_corners=False` (the same call as the
    scorer models' `ImageInput`), because FID-like figures shift with the resize filter. No-op ("none") when the
    images already have that size or the feature network declares none.
    """
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images, NO_RESIZE
    resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized, f"bilinear-antialias-to-{size}"


def feature_models(features: Features) -> tuple[str, ...]:
    """The model refs a feature callable stands for; a callable without `ref` is named by its type, never hidden."""
    ref = getattr(features, "ref", None)
    return (ref,) if ref else (f"unregistered:{type(features).__name__}",)


@torch.no_grad()
def embed(features: Features, images: Tensor, batch_size: int = 500) -> tuple[Tensor, str]:
    """(N, F) features of `images` after `resize_to` the network's resolution, and the resize mode applied."""
    images, mode = resize_to(images, getattr(features, "resolution", None))
    chunks = [features(images[i : i + batch_size]).flatten(1) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks), mode


class FeatureModule(nn.Module):
    """Any feature callable as the `nn.Module` with `num_features` that torchmetrics' FID and KID take."""

    def __init__(self, features: Features, num_features: int) -> None:
        super().__init__()
        self.features, self.num_features = features, num_features

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.features(images).flatten(1)


def as_feature_module(features: Features, example: Tensor) -> tuple[nn.Module, int]:
    """The module torchmetrics takes and its feature dimension: `features` itself when it is a module with
    `num_features` (a FeatureSpace), else a wrapper probed on `example`."""
    num_features = getattr(features, "num_features", None)
    if isinstance(features, nn.Module) and isinstance(num_features, int):
        return features, num_features
    with torch.no_grad():
        num_features = int(features(example[:1]).flatten(1).shape[1])
    return FeatureModule(features, num_features), num_features
