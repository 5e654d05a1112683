"""Human NES (seed 004 after Fujii et al.'s HumanGAN): people's pairwise judgements of x +- Delta as a gradient
estimate in image space, carried into a generator's weights by one backward pass."""

from gansteer_server.algorithms.human_nes.basis import BasisError, PCABasis, max_components, pca_basis, scenes_images
from gansteer_server.algorithms.human_nes.estimator import (
    Perturbations,
    cosine,
    differences_from_answers,
    draw,
    estimate,
    pair_sides,
    source_score,
)
from gansteer_server.algorithms.human_nes.forking import Forking, forking
from gansteer_server.algorithms.human_nes.run import NESConfig, NESRound, NESRun
from gansteer_server.algorithms.human_nes.update import (
    BETAS,
    LEARNING_RATE,
    adam,
    ascend,
    parameter_gradient,
    per_pixel_gradient,
)

__all__ = [
    "BETAS",
    "LEARNING_RATE",
    "BasisError",
    "Forking",
    "NESConfig",
    "NESRound",
    "NESRun",
    "PCABasis",
    "Perturbations",
    "adam",
    "ascend",
    "cosine",
    "differences_from_answers",
    "draw",
    "estimate",
    "forking",
    "max_components",
    "pair_sides",
    "parameter_gradient",
    "pca_basis",
    "per_pixel_gradient",
    "scenes_images",
    "source_score",
]
