"""The inversion criterion of seed 003 (section III-C): how far a generated image is from its target image.

Every term is computed per image, so one batched call scores many targets, restarts and population members at once;
`target_index` says which target each generated image is compared with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_FEATURE_LAYERS: tuple[str, ...] = ("stage1", "stage2", "stage3")


class FeatureExtractor(Protocol):
    """Anything with named intermediate activations, e.g. the built-in `ScenesClassifier`."""

    def features(self, images: Tensor) -> dict[str, Tensor]: ...


Discriminator = Callable[..., Tensor]


@dataclass(frozen=True)
class CriterionWeights:
    """The lambdas of eq. (8); the field names are the names of the terms they weigh."""

    features: float = 1.0  # lambda_S, eq. (5)
    pixel_l2: float = 50.0  # lambda_L, eq. (4)
    latent_norm: float = 1.0  # lambda_nu, eq. (6): "lambda_nu = 1 was an acceptable value for all models"
    realism: float = 0.1  # lambda_R, eq. (7)

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"weights.{field.name} must be a finite number >= 0, got {value}")


# Table I of seed 003 (lambda_nu = 1 in all three).
CRITERION_PRESETS: dict[str, CriterionWeights] = {
    "l2": CriterionWeights(features=0.0, pixel_l2=50.0, realism=0.0),
    "l2+features": CriterionWeights(features=1.0, pixel_l2=50.0, realism=0.1),
    "features": CriterionWeights(features=1.0, pixel_l2=0.0, realism=0.1),
}


def feature_statistics(activations: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and variance across the image of (N, C, H, W) activations: the mu and sigma^2 of eq. (5)."""
    if activations.dim() != 4:
        raise ValueError(f"feature layers must be (N, C, H, W) maps, got shape {tuple(activations.shape)}")
    return activations.mean(dim=(2, 3)), activations.var(dim=(2, 3), unbiased=False)


def resize(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear resize with antialiasing (needed when shrinking); a no-op when the size already matches."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def centre_square(images: Tensor) -> Tensor:
    """The largest centred square of (N, C, H, W) images: a target is cropped, not stretched, to the generator's
    square frame (a 4:3 photograph keeps its proportions)."""
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return images[..., top : top + side, left : left + side]


class InversionCriterion:
    """C = lambda_S C_S + lambda_nu C_nu + lambda_R C_R + lambda_L C_L (eq. 8) against a fixed set of targets.

    A term whose weight is zero is not computed (the feature extractor and the discriminator are then not called),
    except the two cheap ones, `pixel_l2` and `latent_norm`, which are always reported.
    """

    def __init__(
        self,
        targets: Tensor,
        *,
        weights: CriterionWeights,
        feature_extractor: FeatureExtractor | None = None,
        feature_layers: Sequence[str] = DEFAULT_FEATURE_LAYERS,
        feature_size: int = 32,
        discriminator: Discriminator | None = None,
    ) -> None:
        if weights.features > 0 and feature_extractor is None:
            raise ValueError("weights.features > 0 needs a feature extractor")
        if weights.realism > 0 and discriminator is None:
            raise ValueError("weights.realism > 0 needs a discriminator")
        if not feature_layers:
            raise ValueError("feature_layers must name at least one layer")
        self.weights = weights
        self.targets = targets.detach()
        self.feature_extractor = feature_extractor
        self.feature_layers = tuple(feature_layers)
        self.feature_size = feature_size
        self.discriminator = discriminator
        self._resized_targets: dict[tuple[int, int], Tensor] = {}
        self._target_statistics: list[tuple[Tensor, Tensor]] | None = None
        if feature_extractor is not None:
            with torch.no_grad():
                self._target_statistics = self._statistics(self.targets)

    @property
    def term_names(self) -> tuple[str, ...]:
        optional = tuple(name for name in ("features", "realism") if getattr(self.weights, name) > 0)
        return ("pixel_l2", "latent_norm", *optional)

    def _statistics(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        assert self.feature_extractor is not None
        activations = self.feature_extractor.features(resize(images, self.feature_size))
        missing = [name for name in self.feature_layers if name not in activations]
        if missing:
            raise ValueError(f"feature_layers {missing} not among the extractor's layers {sorted(activations)}")
        return [feature_statistics(activations[name]) for name in self.feature_layers]

    def targets_at(self, size: tuple[int, int]) -> Tensor:
        """The targets resized to the generated images' size (cached per size)."""
        if size not in self._resized_targets:
            self._resized_targets[size] = resize(self.targets, size)
        return self._resized_targets[size]

    def feature_distance(self, images: Tensor, target_index: Tensor) -> Tensor:
        """C_S of eq. (5) per image, against target `target_index[i]`."""
        if self._target_statistics is None:
            raise ValueError("the feature distance needs a feature extractor")
        distance = images.new_zeros(len(images))
        for (mean, variance), (target_mean, target_variance) in zip(
            self._statistics(images), self._target_statistics, strict=True
        ):
            # eq. (5), channel-averaged and with both differences squared as in the reference code (the seed's
            # unsquared norm of the variance difference has a kink exactly at the optimum)
            distance = distance + (mean - target_mean[target_index]).pow(2).mean(dim=1)
            distance = distance + (variance - target_variance[target_index]).pow(2).mean(dim=1)
        return distance

    def __call__(
        self,
        images: Tensor,
        z: Tensor,
        target_index: Tensor | None = None,
        realism_condition: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-image criterion (N,) and each named, unweighted term (N,).

        `images` (N, 3, H, W) in [-1, 1] and their latents `z` (N, Z); image i is compared with target
        `target_index[i]` (default: image i with target i). `realism_condition` goes to the discriminator.
        """
        if target_index is None:
            if len(images) != len(self.targets):
                raise ValueError(f"{len(images)} images for {len(self.targets)} targets: pass target_index")
            target_index = torch.arange(len(images), device=images.device)
        targets = self.targets_at(tuple(images.shape[-2:]))[target_index]
        terms = {
            "pixel_l2": (images - targets).pow(2).sum(dim=1).mean(dim=(1, 2)),  # eq. (4)
            "latent_norm": (z.pow(2).mean(dim=1) - 1).pow(2),  # eq. (6)
        }
        if self.weights.features > 0:
            terms["features"] = self.feature_distance(images, target_index)  # eq. (5)
        if self.weights.realism > 0:
            assert self.discriminator is not None
            terms["realism"] = -self.discriminator(images, realism_condition).reshape(len(images))  # eq. (7)
        total = sum(getattr(self.weights, name) * term for name, term in terms.items())  # eq. (8)
        return total, terms
