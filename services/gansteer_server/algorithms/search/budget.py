"""How long a search may go (seed 003, section IV-C): a number of optimizer steps, or of generator calls.

A generator call is one image generated for one group (in inversion, one target): a restart or a population
member costs one call per evaluation; a backward pass is not counted separately. Counting per group lets a budget
mean the same whatever the number of targets searched side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BudgetUnit = Literal["iterations", "generator_calls"]
BUDGET_UNITS: tuple[str, ...] = ("iterations", "generator_calls")


@dataclass(frozen=True)
class Budget:
    """A budget in optimizer steps ("iterations") or in generator calls per group."""

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
        """Whether one more evaluation of `cost` generator calls per group (or one more step) fits."""
        if self.unit == "iterations":
            return steps < self.amount
        return generator_calls + cost <= self.amount

    def evaluations_per_search(self, restarts: int, population: int) -> int:
        """What a gradient-free optimizer may spend on one search: every step asks `population` candidates of
        each of the `restarts` searches of a group."""
        if self.unit == "iterations":
            return self.amount * population
        return self.amount // restarts
