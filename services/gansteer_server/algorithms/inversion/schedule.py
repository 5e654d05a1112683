"""The budget and the step-size schedule of seed 003, section IV-C.

"We perform gradient decay twice, dividing the gradient step by 10 at one third of the iteration budget, and then
again at two thirds. [...] we reset the model's state to the one associated with the smallest loss found so far
before each decay of the gradient step." The run applies a due decay at the start of a step; this module only
says when one is due, so the reference code's bug (a decay that never took effect) is tested on the run itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

BudgetUnit = Literal["iterations", "generator_calls"]
BUDGET_UNITS: tuple[str, ...] = ("iterations", "generator_calls")


@dataclass(frozen=True)
class Budget:
    """How long a run may go: optimizer steps, or images generated per target (a restart or a population member
    costs one generator call per evaluation; a backward pass is not counted separately)."""

    amount: int = 1000  # IV-C: "all optimizations are launched with 1000 iterations"
    unit: BudgetUnit = "iterations"

    def __post_init__(self) -> None:
        if self.amount < 1:
            raise ValueError(f"budget must be >= 1, got {self.amount}")
        if self.unit not in BUDGET_UNITS:
            raise ValueError(f"budget_unit must be one of {BUDGET_UNITS}, got {self.unit!r}")

    def used(self, steps: int, generator_calls: int) -> int:
        return steps if self.unit == "iterations" else generator_calls

    def allows(self, steps: int, generator_calls: int, cost: int) -> bool:
        """Whether one more evaluation of `cost` generator calls per target (or one more step) fits."""
        if self.unit == "iterations":
            return steps < self.amount
        return generator_calls + cost <= self.amount


@dataclass(frozen=True)
class StepSchedule:
    """Base step size, divided by 1 / `decay` at each fraction of the budget in `milestones` (IV-C)."""

    learning_rate: float = 1.0  # IV-C: "In all cases we started with a base gradient step equal to one"
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
