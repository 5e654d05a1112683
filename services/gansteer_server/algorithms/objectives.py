"""The simulated interaction objectives of seed 000 (PIR paper, appendix C.4), registered as scorer outputs.

Each objective is a ratio of l2 norms, so it lies in [0, 1] and can stand in for a positive-interaction rate: a
chosen part of a signal (k filters of a layer, one colour channel in a band of the image) over the whole signal.
Normalising by the whole keeps an optimiser from "cheating" by raising contrast (appendix C.4.1).

Every ratio is computed as sqrt(part^2 / whole^2) with both squares clamped away from zero, so that an all-zero
part or image gives a finite value (about 1e-6) and a finite gradient instead of 0/0 and sqrt'(0) = inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gansteer_server.algorithms.scorers import (
    LAYER_PARAM,
    ParamSpec,
    ScorerInputError,
    ScoringModels,
    layer_activations,
    register_output,
)

# Squared-norm floor: keeps sqrt and the division differentiable at zero; far below any real activation's energy.
_TINY = 1e-12

#: Channel index of each colour the seed targets (RGB images; appendix C.4.3 indexes `i(:, :, red)`).
COLOURS: dict[str, int] = {"red": 0, "green": 1, "blue": 2}


def norm_ratio(part_sq: Tensor, whole_sq: Tensor) -> Tensor:
    """sqrt(part_sq / whole_sq) per image, from squared norms (N,); safe at zero (see the module docstring)."""
    return torch.sqrt((part_sq / whole_sq.clamp_min(_TINY)).clamp_min(_TINY))


def select_filters(num_filters: int, k: int, seed: int = 0, offset: int = -1) -> Tensor:
    """The k target filter indices a_1..a_k of a layer with `num_filters` filters (appendix C.4.2).

    As in the seed they are sampled without replacement, here with a torch.Generator seeded by `seed`, so an
    objective is reproducible from (layer, k, seed). `offset >= 0` instead picks the contiguous filters
    offset..offset+k-1, which names one filter exactly when k = 1 (the seed's single-filter objectives).
    """
    if not 1 <= k <= num_filters:
        raise ValueError(f"k = {k} is outside [1, {num_filters}] (the layer's filter count)")
    if offset >= 0:
        if offset + k > num_filters:
            raise ValueError(f"offset {offset} + k {k} exceeds the layer's {num_filters} filters")
        return torch.arange(offset, offset + k)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_filters, generator=generator)[:k]


def filter_ratio(activations: Tensor, filters: Tensor) -> Tensor:
    """PIR_{l,f,k}(i) = sqrt(sum_j |VGG_{l,a_j}(i)|^2 / sum_f |VGG_{l,f}(i)|^2) (appendix C.4.2; C.4.1 is k = 1).

    `activations` is one layer's output (N, C, ...): filter f's activation vector is everything after the channel
    dimension (its spatial map, or one unit for a fully-connected layer). Returns (N,) in [0, 1].
    """
    per_filter_sq = activations.flatten(2).square().sum(dim=2) if activations.dim() > 2 else activations.square()
    filters = filters.to(per_filter_sq.device)
    return norm_ratio(per_filter_sq[:, filters].sum(dim=1), per_filter_sq.sum(dim=1))


def colour_band_ratio(images: Tensor, colours: Sequence[str]) -> Tensor:
    """The colour objectives of appendix C.4.3: the image split left to right into len(colours) vertical bands.

    PIR(i) = sqrt(sum_b |i(:, band_b, colour_b)|^2) / |i(:, :, :)|_2: one colour is the single-colour objective
    PIR_red, two the left/right-halves objective PIR_red,blue, three the thirds objective. The split is along the
    width, as the seed insists, because a split along the height (sky above, ground below) carries class
    information. Bands come from `torch.tensor_split` (a 32-pixel width gives thirds of 11, 11 and 10 columns).

    Images are NCHW in [-1, 1] (the project's convention) and are mapped to [0, 1] first, so that black counts as no
    colour, as with the seed's pixel values; the ratio is 1 exactly when each band holds only its colour. Returns
    (N,) in [0, 1].
    """
    pixels = (images + 1) / 2
    bands = torch.tensor_split(pixels, len(colours), dim=3)
    part_sq = sum(
        band[:, COLOURS[colour]].square().sum(dim=(1, 2)) for band, colour in zip(bands, colours, strict=True)
    )
    return norm_ratio(part_sq, pixels.square().sum(dim=(1, 2, 3)))


# --- the registered outputs ---------------------------------------------------------------------------------------


@register_output(
    "filter_norm_ratio",
    "l2 norm of k filters' activations over that of the whole layer, in [0, 1] (seed 000, C.4.1-C.4.2)",
    {
        "layer": LAYER_PARAM,
        "k": ParamSpec("int", default=1, min=1, doc="number of target filters (the seed uses 1 and 20)"),
        "seed": ParamSpec(
            "int", default=0, min=0, max=2**63 - 1, doc="seed of the filters sampled without replacement"
        ),
        "offset": ParamSpec("int", default=-1, min=-1, doc=">= 0: use filters offset..offset+k-1 instead of sampling"),
    },
    model="feature_extractor",
    is_rate=True,
)
def filter_norm_ratio(images: Tensor, models: ScoringModels, layer: str, k: int, seed: int, offset: int) -> Tensor:
    activations = layer_activations(images, models, layer)
    num_filters = activations.shape[1]
    if k > num_filters:
        raise ScorerInputError("params.k", f"{k} exceeds the {num_filters} filters of layer {layer!r}")
    if offset + k > num_filters:
        raise ScorerInputError("params.offset", f"offset {offset} + k {k} exceeds the {num_filters} filters")
    return filter_ratio(activations, select_filters(num_filters, k, seed, offset))


def _colour(default: str, position: str) -> ParamSpec:
    return ParamSpec("str", default=default, choices=tuple(COLOURS), doc=f"colour of the {position}")


def _colour_objective(images: Tensor, colours: Sequence[str]) -> Tensor:
    if images.shape[1] != 3:
        raise ScorerInputError("images", f"colour objectives need RGB images, got {images.shape[1]} channels")
    if images.shape[3] < len(colours):
        raise ScorerInputError("images", f"{images.shape[3]} columns cannot split into {len(colours)} bands")
    return colour_band_ratio(images, colours)


@register_output(
    "colour_single",
    "l2 norm of one colour channel over that of the whole image, in [0, 1] (seed 000, C.4.3 PIR_red)",
    {"colour": _colour("red", "image")},
    is_rate=True,
)
def colour_single(images: Tensor, models: ScoringModels, colour: str) -> Tensor:
    return _colour_objective(images, [colour])


@register_output(
    "colour_two",
    "one colour in the left half and another in the right half, over the whole image, in [0, 1] (seed 000, C.4.3)",
    {"left": _colour("red", "left half"), "right": _colour("blue", "right half")},
    is_rate=True,
)
def colour_two(images: Tensor, models: ScoringModels, left: str, right: str) -> Tensor:
    return _colour_objective(images, [left, right])


@register_output(
    "colour_three",
    "a colour in each third of the width, left to right, over the whole image, in [0, 1] (seed 000, C.4.3)",
    {
        "left": _colour("red", "left third"),
        "middle": _colour("green", "middle third"),
        "right": _colour("blue", "right third"),
    },
    is_rate=True,
)
def colour_three(images: Tensor, models: ScoringModels, left: str, middle: str, right: str) -> Tensor:
    return _colour_objective(images, [left, middle, right])
