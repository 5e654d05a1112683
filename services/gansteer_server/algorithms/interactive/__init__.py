"""The human loops: interactive evolution (HEVOL, seed 003)."""

from gansteer_server.algorithms.interactive.evolution import EvolutionConfig, EvolutionRun, Generation

__all__ = ["EvolutionConfig", "EvolutionRun", "Generation"]
