"""Inversion ("inspiration") of seed 003: retrieve a generator's latent and class vector for target images.

The optimizers, budget and schedule live in the search core (`algorithms.search`); they are re-exported here for
the callers that know them as inversion's.
"""

from gansteer_server.algorithms.inversion.criteria import (
    CRITERION_PRESETS,
    CriterionWeights,
    InversionCriterion,
    feature_statistics,
)
from gansteer_server.algorithms.inversion.inversion import (
    InversionConfig,
    InversionModels,
    InversionObjective,
    InversionResult,
    InversionRun,
    StepReport,
)
from gansteer_server.algorithms.search import (
    OPTIMIZERS,
    Budget,
    GradientOptimizer,
    PopulationOptimizer,
    StepSchedule,
    register_optimizer,
)

__all__ = [
    "CRITERION_PRESETS",
    "OPTIMIZERS",
    "Budget",
    "CriterionWeights",
    "GradientOptimizer",
    "InversionConfig",
    "InversionCriterion",
    "InversionModels",
    "InversionObjective",
    "InversionResult",
    "InversionRun",
    "PopulationOptimizer",
    "StepReport",
    "StepSchedule",
    "feature_statistics",
    "register_optimizer",
]
