"""Checks of the spec fields that job kinds share (budgets, optimizers, class conditions), so no kind re-writes
them: each returns plain values or raises INVALID_ARGUMENT naming the field under the kind's prefix."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from gansteer_server.proto import optimization_pb2 as opt
from gansteer_server.wire.errors import invalid_argument

BUDGET_UNITS = {
    opt.BUDGET_UNIT_UNSPECIFIED: "iterations",
    opt.BUDGET_UNIT_ITERATIONS: "iterations",
    opt.BUDGET_UNIT_GENERATOR_CALLS: "generator_calls",
}
#: Finite values past these turn a float32 loss or step into infinity: refused rather than run.
MAX_WEIGHT = 1e6
MAX_LEARNING_RATE = 1e3
BACKENDS = {opt.BACKEND_UNSPECIFIED: "", opt.BACKEND_LOCAL: "local", opt.BACKEND_REMOTE: "remote"}


@dataclass(frozen=True)
class OptimizerChoice:
    """An Optimizer message, checked: learning rate and population 0 mean the kind's defaults."""

    name: str
    learning_rate: float
    population: int


def budget(message: opt.Budget, field: str, max_budget: int, default: int = 0) -> tuple[int, str]:
    """(amount, unit) of a Budget; amount 0 takes `default` when the kind has one, else is refused."""
    amount = message.amount or default
    if not 0 < amount <= max_budget:
        raise invalid_argument(
            f"{field}.amount", f"must be from 1 to {max_budget} (this server's limit), got {message.amount}"
        )
    if message.unit not in BUDGET_UNITS:
        raise invalid_argument(f"{field}.unit", f"unknown unit {message.unit}")
    return amount, BUDGET_UNITS[message.unit]


def optimizer(
    message: opt.Optimizer, field: str, known: Collection[str], default: str, max_population: int
) -> OptimizerChoice:
    name = message.name or default
    if name not in known:
        raise invalid_argument(f"{field}.name", f"unknown optimizer {name!r}; expected one of {sorted(known)}")
    if message.options.fields:
        raise invalid_argument(
            f"{field}.options", f"this kind takes no optimizer options yet (got {sorted(message.options.fields)})"
        )
    if not math.isfinite(message.learning_rate) or not 0 <= message.learning_rate <= MAX_LEARNING_RATE:
        raise invalid_argument(
            f"{field}.learning_rate", f"must be from 0 to {MAX_LEARNING_RATE:g}, got {message.learning_rate}"
        )
    if not 0 <= message.population_size <= max_population:
        raise invalid_argument(
            f"{field}.population_size", f"must be 0 (the default) to {max_population}, got {message.population_size}"
        )
    return OptimizerChoice(name, message.learning_rate, message.population_size)


def class_id(value: int, field: str, num_classes: int, model: str) -> int:
    """A class of a class-conditional generator."""
    if not num_classes:
        raise invalid_argument(field, f"{model} is not class-conditional")
    if not 0 <= value < num_classes:
        raise invalid_argument(field, f"class {value} is out of range [0, {num_classes})", "CLASS_OUT_OF_RANGE")
    return int(value)


def weight(value: float, field: str) -> float:
    """A criterion or objective weight: finite, >= 0 and at most MAX_WEIGHT (larger ones overflow float32 losses)."""
    if not math.isfinite(value) or not 0 <= value <= MAX_WEIGHT:
        raise invalid_argument(field, f"must be a number from 0 to {MAX_WEIGHT:g}, got {value}", "BAD_WEIGHT")
    return float(value)
