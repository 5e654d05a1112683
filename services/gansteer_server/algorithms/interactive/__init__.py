"""The human loops: interactive evolution (HEVOL, seed 003)."""

from gansteer_server.algorithms.interactive.evolution import (
    DEFAULT_MUTATION_RATE,
    EvolutionConfig,
    EvolutionRun,
    Generation,
)

__all__ = ["DEFAULT_MUTATION_RATE", "EvolutionConfig", "EvolutionRun", "Generation"]
