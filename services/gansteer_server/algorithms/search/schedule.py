"""The step-size schedule of seed 003, section IV-C: decay with a reset to the best point.

"We perform gradient decay twice, dividing the gradient step by 10 at one third of the iteration budget, and then
again at two thirds. [...] we reset the model's state to the one associated with the smallest loss found so far
before each decay of the gradient step." The search run applies a due decay at the start of a step; this module
only says when one is due, so the reference code's bug (a decay that never took effect) is tested on the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

DEFAULT_LEARNING_RATE = 1.0  # IV-C: "In all cases we started with a base gradient step equal to one"


@dataclass(frozen=True)
class StepSchedule:
    """Base step size, divided by 1 / `decay` at each fraction of the budget in `milestones` (IV-C)."""

    learning_rate: float = DEFAULT_LEARNING_RATE
    decay: float = 0.1
    milestones: tuple[float, ...] = (1 / 3, 2 / 3)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if any(not 0 < m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"decay_at must be increasing fractions in (0, 1), got {self.milestones}")

    def decays_due(self, used: int, budget: int) -> int:
        """How many milestones `used` of `budget` has reached (exact rational comparison: 1/3 of 300 is 100)."""
        return sum(used >= Fraction(m).limit_denominator(10_000) * budget for m in self.milestones)

    def learning_rate_after(self, decays: int) -> float:
        return self.learning_rate * self.decay**decays
