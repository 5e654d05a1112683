"""One search core for every job kind (ARCHITECTURE.md, decision 11): a kind supplies a `SearchSpace` and an
`Objective`; the optimizer registry, budget, decay-with-reset schedule, best-so-far tracking, curve and
checkpoints are `SearchRun`'s."""

from gansteer_server.algorithms.search.budget import BUDGET_UNITS, Budget, BudgetUnit
from gansteer_server.algorithms.search.evolution import (
    HybridOptimizer,
    OptionError,
    calls_per_candidate,
    optimizer_options,
    planned_steps,
    population_floor,
)
from gansteer_server.algorithms.search.objective import Evaluation, Objective
from gansteer_server.algorithms.search.optimizers import (
    DEFAULT_POPULATION,
    OPTIMIZERS,
    GradientOptimizer,
    OptimizerInfo,
    PopulationOptimizer,
    Variables,
    is_gradient_optimizer,
    optimizer_catalog,
    register_optimizer,
)
from gansteer_server.algorithms.search.run import SearchReport, SearchRun
from gansteer_server.algorithms.search.schedule import DEFAULT_LEARNING_RATE, StepSchedule
from gansteer_server.algorithms.search.space import (
    CLASS_VECTORS,
    ClassSpace,
    ConditionedLatentSpace,
    EmbeddingRowSpace,
    LatentClassSpace,
    Latents,
    LatentSimplexSpace,
    LatentSpace,
    ParameterSpace,
    SearchSpace,
    class_space,
    embedding_scale,
    on_shell,
)

__all__ = [
    "BUDGET_UNITS",
    "CLASS_VECTORS",
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_POPULATION",
    "OPTIMIZERS",
    "Budget",
    "BudgetUnit",
    "ClassSpace",
    "ConditionedLatentSpace",
    "EmbeddingRowSpace",
    "Evaluation",
    "GradientOptimizer",
    "HybridOptimizer",
    "LatentClassSpace",
    "LatentSimplexSpace",
    "LatentSpace",
    "Latents",
    "Objective",
    "OptimizerInfo",
    "OptionError",
    "ParameterSpace",
    "PopulationOptimizer",
    "SearchReport",
    "SearchRun",
    "SearchSpace",
    "StepSchedule",
    "Variables",
    "calls_per_candidate",
    "class_space",
    "embedding_scale",
    "is_gradient_optimizer",
    "on_shell",
    "optimizer_catalog",
    "optimizer_options",
    "planned_steps",
    "population_floor",
    "register_optimizer",
]
