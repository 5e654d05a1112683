"""Inversion ("inspiration") of seed 003: retrieve a generator's latent and class vector for target images."""

from gansteer_server.algorithms.inversion.criteria import (
    CRITERION_PRESETS,
    CriterionWeights,
    InversionCriterion,
    feature_statistics,
)
from gansteer_server.algorithms.inversion.inversion import (
    InversionConfig,
    InversionModels,
    InversionResult,
    InversionRun,
    StepReport,
)
from gansteer_server.algorithms.inversion.optimizers import (
    OPTIMIZERS,
    GradientOptimizer,
    PopulationOptimizer,
    register_optimizer,
)
from gansteer_server.algorithms.inversion.schedule import Budget, StepSchedule

__all__ = [
    "CRITERION_PRESETS",
    "OPTIMIZERS",
    "Budget",
    "CriterionWeights",
    "GradientOptimizer",
    "InversionConfig",
    "InversionCriterion",
    "InversionModels",
    "InversionResult",
    "InversionRun",
    "PopulationOptimizer",
    "StepReport",
    "StepSchedule",
    "feature_statistics",
    "register_optimizer",
]
