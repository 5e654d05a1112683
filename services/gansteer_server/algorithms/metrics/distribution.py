"""Distance between two image sets in the built-in classifier's features: Fréchet distance, KID, precision/recall.

FID and KID come from torchmetrics with the feature network as its `feature=` module; precision and recall from
`prdc` (the reference implementation of Kynkäänniemi et al. 2019's k-NN manifolds). Only the resize and batching
around them is ours. `n` is the generated set's size and `n_reference` the real set's.
"""

from __future__ import annotations

import dataclasses
import warnings

import prdc
import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from gansteer_server.algorithms.metrics.features import (
    Features,
    as_feature_module,
    embed,
    feature_models,
    resize_to,
)
from gansteer_server.algorithms.metrics.result import MetricResult


def _resized(real: Tensor, generated: Tensor, features: Features) -> tuple[Tensor, Tensor, str]:
    size = getattr(features, "resolution", None)
    (real, real_mode), (generated, mode) = resize_to(real, size), resize_to(generated, size)
    return real, generated, _both_modes(mode, real_mode)


def _both_modes(mode: str, real_mode: str) -> str:
    """One mode when both sets went through the same resize, else each set's (the sets may differ in size)."""
    return mode if mode == real_mode else f"generated: {mode}; reference: {real_mode}"


@torch.no_grad()
def fid_builtin(real: Tensor, generated: Tensor, features: Features, *, batch_size: int = 500) -> MetricResult:
    """Fréchet distance between the sets' feature Gaussians (FID's formula, not Inception's features).

    Biased at finite N (Chong and Forsyth 2020) and rank-deficient unless both sets are larger than the feature
    dimension (`extra["feature_dim"]`): only compare figures measured at the same N.
    """
    real, generated, mode = _resized(real, generated, features)
    module, num_features = as_feature_module(features, real)
    metric = FrechetInceptionDistance(feature=module, normalize=False)
    for images, is_real in ((real, True), (generated, False)):
        for i in range(0, len(images), batch_size):
            metric.update(images[i : i + batch_size], real=is_real)
    return MetricResult(
        name="fid_builtin",
        value=float(metric.compute()),
        n=len(generated),
        n_reference=len(real),
        resize=mode,
        models=feature_models(features),
        extra={"feature_dim": num_features},
    )


@torch.no_grad()
def kid_builtin(
    real: Tensor,
    generated: Tensor,
    features: Features,
    subsets: int = 100,
    subset_size: int | None = None,
    *,
    seed: int = 0,
    batch_size: int = 500,
) -> MetricResult:
    """Kernel distance: the unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets.

    Unbiased at any N (near 0, possibly negative, for two samples of one distribution). `subset_size` defaults to
    min(1000, both set sizes); `extra` holds the std over subsets and the settings. The subsets are drawn from
    torch's generator seeded with `seed` inside a forked RNG state, so the caller's RNG is untouched.
    """
    real, generated, mode = _resized(real, generated, features)
    subset_size = subset_size or min(1000, len(real), len(generated))
    with warnings.catch_warnings():  # that it keeps all features: N x 128 floats here, which is the point
        warnings.filterwarnings("ignore", message="Metric `Kernel Inception Distance` will save all extracted")
        metric = KernelInceptionDistance(
            feature=as_feature_module(features, real)[0], subsets=subsets, subset_size=subset_size, normalize=False
        )
    for images, is_real in ((real, True), (generated, False)):
        for i in range(0, len(images), batch_size):
            metric.update(images[i : i + batch_size], real=is_real)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return MetricResult(
        name="kid_builtin",
        value=float(mean),
        n=len(generated),
        n_reference=len(real),
        resize=mode,
        models=feature_models(features),
        extra={"std": float(std), "subsets": subsets, "subset_size": subset_size, "seed": seed},
    )


def precision_recall_builtin(
    real: Tensor, generated: Tensor, features: Features, k: int = 3
) -> tuple[MetricResult, MetricResult]:
    """Improved precision (generated samples inside the real k-NN manifold) and recall (the converse)."""
    real_features, real_mode = embed(features, real)
    generated_features, mode = embed(features, generated)
    precision_value, recall_value = compute_precision_recall(real_features, generated_features, k)
    precision = MetricResult(
        name="precision_builtin",
        value=precision_value,
        n=len(generated),
        n_reference=len(real),
        resize=_both_modes(mode, real_mode),
        models=feature_models(features),
        extra={"k": k},
    )
    return precision, dataclasses.replace(precision, name="recall_builtin", value=recall_value)


def compute_precision_recall(real_features: Tensor, generated_features: Tensor, k: int = 3) -> tuple[float, float]:
    """prdc's precision and recall of already embedded sets, with k-NN radii in float64."""
    scores = prdc.compute_prdc(
        real_features=real_features.double().numpy(),
        fake_features=generated_features.double().numpy(),
        nearest_k=k,
    )
    return float(scores["precision"]), float(scores["recall"])
