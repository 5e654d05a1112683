"""One search, the loop every job kind shares: a space, an objective, an optimizer from the registry, a budget and
the decay-with-reset schedule, advanced a step at a time and resumable from a checkpoint.

The space's M searches run side by side as G groups of R restarts (search m = g * R + r; in inversion a group is
a target). Each search keeps its best point; each group's best over its restarts is what the run reports, and the
curve holds that best after every step. Internally the run minimises (a maximised objective is negated) and it
reports values in the objective's own sense.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gansteer_server.algorithms.search.budget import Budget
from gansteer_server.algorithms.search.evolution import HybridOptimizer, calls_per_candidate, optimizer_options
from gansteer_server.algorithms.search.objective import Evaluation, Objective
from gansteer_server.algorithms.search.optimizers import (
    DEFAULT_POPULATION,
    OPTIMIZERS,
    GradientOptimizer,
    PopulationOptimizer,
    Variables,
    is_gradient_optimizer,
)
from gansteer_server.algorithms.search.schedule import StepSchedule
from gansteer_server.algorithms.search.space import SearchSpace, project


@dataclass(frozen=True)
class SearchReport:
    step: int  # steps completed so far
    generator_calls: int  # evaluations per group so far (see `Budget`)
    best_value: Tensor  # (G,) each group's best so far, in the objective's sense
    terms: dict[str, Tensor]  # name -> (G,) at each group's best point
    learning_rate: float | None  # None for gradient-free optimizers


class _BudgetExhausted(Exception):
    """Raised by the closure when one more evaluation would exceed a budget in generator calls."""


def _detached(variables: Variables) -> Variables:
    if isinstance(variables, Tensor):
        return variables.detach().clone()
    return [tensor.detach().clone() for tensor in variables]


def _copy_into(target: Variables, values: Variables) -> None:
    pairs = [(target, values)] if isinstance(target, Tensor) else zip(target, values, strict=True)
    with torch.no_grad():
        for tensor, value in pairs:
            tensor.copy_(value)  # type: ignore[arg-type]


class SearchRun:
    """Searches `space` for the best values of `objective` with the optimizer registered as `optimizer`."""

    def __init__(
        self,
        space: SearchSpace,
        objective: Objective,
        *,
        optimizer: str,
        budget: Budget,
        schedule: StepSchedule | None = None,
        population: int = DEFAULT_POPULATION,
        restarts: int = 1,
        seed: int = 0,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.gradient = is_gradient_optimizer(optimizer)  # raises on an unknown name
        self.options = optimizer_options(optimizer, options or {})  # raises OptionError naming the option
        if population < 1 or restarts < 1:
            raise ValueError(f"population and restarts must be >= 1, got {population} and {restarts}")
        if space.searches % restarts:
            raise ValueError(f"{space.searches} searches do not split into groups of {restarts} restarts")
        if space.gradient_only and not self.gradient:
            raise ValueError(f"{type(space).__name__} needs a gradient optimizer, not {optimizer!r}")
        self.space, self.objective, self.optimizer_name = space, objective, optimizer
        self.budget, self.schedule = budget, schedule or StepSchedule()
        self.restarts, self.groups = restarts, space.searches // restarts
        # generator calls per group per step (a hybrid's candidates cost one call per refinement step each)
        self.step_cost = restarts * (1 if self.gradient else population * calls_per_candidate(optimizer, self.options))
        if not budget.allows(0, 0, self.step_cost):
            raise ValueError(f"budget {budget.amount} generator calls is below one step's cost {self.step_cost}")

        start = space.initial(seed)
        self.optimizer: GradientOptimizer | PopulationOptimizer
        if self.gradient:
            for tensor in [start] if isinstance(start, Tensor) else start:
                tensor.requires_grad_(True)
            self.optimizer = OPTIMIZERS[optimizer](start, lr=self.schedule.learning_rate, **self.options)  # type: ignore[call-arg]
        else:
            self.optimizer = OPTIMIZERS[optimizer](  # type: ignore[call-arg]
                searches=space.searches,
                dimension=space.dimension,
                population=population,
                budget=budget.evaluations_per_search(restarts, population),
                seed=seed,
                **self.options,
            )
        self._steps = self._generator_calls = self._decays = 0
        self._exhausted = False
        self._final: GradientOptimizer | None = None  # a hybrid's closing Adam phase, once it has begun
        self._best_losses = torch.full((space.searches,), float("inf"))
        self._best_variables = _detached(start)
        self._best_terms = {name: torch.full((space.searches,), float("nan")) for name in objective.term_names}
        self._curve: list[Tensor] = []

    # ---- what the run knows -----------------------------------------------------------------------------------

    def _turn(self, values: Tensor) -> Tensor:
        """Objective values <-> the losses the run minimises (negation is its own inverse)."""
        return -values if self.objective.maximize else values

    @property
    def done(self) -> bool:
        """The budget is spent, or the optimizer has nothing left to do (every L-BFGS search converged)."""
        finished = bool(getattr(self.variables_optimizer, "finished", False))
        return (
            finished or self._exhausted or not self.budget.allows(self._steps, self._generator_calls, self._next_cost())
        )

    @property
    def variables_optimizer(self) -> GradientOptimizer | PopulationOptimizer | HybridOptimizer:
        """The optimizer that moves the variables now (a hybrid's closing Adam phase once it has begun)."""
        return self._final if self._final is not None else self.optimizer

    def _next_cost(self) -> int:
        """Generator calls per group of the next step (a hybrid's final phase: one Adam step's)."""
        return self.restarts if self._final is not None or self._final_phase_due() else self.step_cost

    def _final_phase_due(self) -> bool:
        """A hybrid with a `final_fraction` spends the last part of its budget on Adam from its best points
        (pix2latent: "then ~300 final steps"): from that fraction on, or once a whole hybrid step no longer fits."""
        optimizer = self.optimizer
        if not isinstance(optimizer, HybridOptimizer) or optimizer.final_fraction <= 0 or self._final is not None:
            return False
        used = self.budget.used(self._steps, self._generator_calls)
        fits = self.budget.allows(self._steps, self._generator_calls, self.step_cost)
        return used >= (1 - optimizer.final_fraction) * self.budget.amount or not fits

    def _start_final(self, values: Variables) -> GradientOptimizer:
        """Adam over a copy of `values`, at the schedule's step size for the decays due now."""
        assert isinstance(values, Tensor)
        variables = values.detach().clone().requires_grad_(True)
        used = self.budget.used(self._steps, self._generator_calls)
        self._decays = self.schedule.decays_due(used, self.budget.amount)
        lr = self.schedule.learning_rate_after(self._decays)
        final = OPTIMIZERS["adam"](variables, lr=lr)  # type: ignore[call-arg]
        assert isinstance(final, GradientOptimizer)
        self._final = final
        return final

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def generator_calls(self) -> int:
        return self._generator_calls

    @property
    def learning_rate(self) -> float | None:
        return self.optimizer.lr if isinstance(self.optimizer, GradientOptimizer) else None

    @property
    def variables(self) -> Variables:
        """The current variables of a gradient optimizer, the best points of a gradient-free one."""
        if self._final is not None:
            return self._final.variables
        return self.optimizer.variables if isinstance(self.optimizer, GradientOptimizer) else self._best_variables

    @property
    def best_variables(self) -> Variables:
        """Each search's best point so far: (M, D) rows, or a parameter space's tensors."""
        return self._best_variables

    @property
    def best_values(self) -> Tensor:
        """(M,) each search's best value so far, in the objective's sense."""
        return self._turn(self._best_losses)

    @property
    def best_terms(self) -> dict[str, Tensor]:
        """name -> (M,) each term at each search's best point."""
        return self._best_terms

    @property
    def curve(self) -> Tensor:
        """(steps, G) each group's best value after every step, in the objective's sense."""
        return self._turn(torch.stack(self._curve)) if self._curve else torch.empty(0, self.groups)

    def best_rows(self) -> Tensor:
        """(G,) the index of each group's best search."""
        restart = self._best_losses.view(self.groups, self.restarts).argmin(dim=1)
        return torch.arange(self.groups) * self.restarts + restart

    # ---- stepping ---------------------------------------------------------------------------------------------

    def step(self) -> SearchReport:
        if self.done:
            raise RuntimeError("the run is done")
        if self._final_phase_due():
            self._start_final(self._best_variables)
        if self._final is not None:
            self._gradient_step(self._final)
        elif isinstance(self.optimizer, GradientOptimizer):
            self._gradient_step(self.optimizer)
        elif isinstance(self.optimizer, HybridOptimizer):
            self._hybrid_step(self.optimizer)
        else:
            self._population_step(self.optimizer)
        self._steps += 1
        self._curve.append(self._best_losses.view(self.groups, self.restarts).min(dim=1).values)
        best = self.best_rows()
        return SearchReport(
            step=self._steps,
            generator_calls=self._generator_calls,
            best_value=self.best_values[best],
            terms={name: term[best] for name, term in self._best_terms.items()},
            learning_rate=self.learning_rate,
        )

    def _evaluate(self, variables: Variables, search_index: Tensor) -> tuple[Tensor, Evaluation]:
        """Losses (N,) and the evaluation of N points in one call of the objective."""
        evaluation = self.objective(self.space.decode(variables, search_index), search_index)
        self._generator_calls += len(search_index) // self.groups
        return self._turn(evaluation.values), evaluation

    def _record(self, variables: Variables, losses: Tensor, terms: dict[str, Tensor]) -> None:
        """Keep each search's best point; NaN never counts as better."""
        improved = losses < self._best_losses
        self._best_losses = torch.where(improved, losses, self._best_losses)
        if isinstance(variables, Tensor):
            self._best_variables = torch.where(improved[:, None], variables, self._best_variables)  # type: ignore[arg-type]
        elif bool(improved[0]):  # a parameter space is one search
            self._best_variables = variables
        for name, term in terms.items():
            self._best_terms[name] = torch.where(improved, term, self._best_terms[name])

    def _gradient_step(self, optimizer: GradientOptimizer) -> None:
        used = self.budget.used(self._steps, self._generator_calls)
        due = self.schedule.decays_due(used, self.budget.amount)
        if due > self._decays:  # IV-C: back to the best point found so far, then the smaller step
            optimizer.restart(self._best_variables, self.schedule.learning_rate_after(due))
            self._decays = due
        index = torch.arange(self.space.searches)

        def closure() -> Tensor:
            if not self.budget.allows(self._steps, self._generator_calls, self._next_cost()):
                raise _BudgetExhausted
            optimizer.zero_grad()
            losses, evaluation = self._evaluate(optimizer.variables, index)  # re-evaluates at the current point
            terms = {name: term.detach() for name, term in evaluation.terms.items()}
            self._record(_detached(optimizer.variables), losses.detach(), terms)
            total = losses.sum()
            total.backward()
            return losses.detach() if rowwise else total  # a rowwise optimizer reads each search's loss

        rowwise = bool(getattr(optimizer, "rowwise", False))
        try:
            optimizer.step(closure)
        except _BudgetExhausted:
            self._exhausted = True
        project(self.space, optimizer.variables)

    @torch.no_grad()
    def _population_step(self, optimizer: PopulationOptimizer) -> None:
        candidates = optimizer.ask()  # (M, P, D)
        searches, population, _ = candidates.shape
        index = torch.arange(searches).repeat_interleave(population)
        losses, evaluation = self._evaluate(candidates.reshape(searches * population, -1), index)  # one batch
        losses = losses.view(searches, population)
        optimizer.tell(losses)
        pick = torch.nan_to_num(losses, nan=float("inf")).argmin(dim=1)
        rows = torch.arange(searches)
        picked = {name: term.view(searches, population)[rows, pick] for name, term in evaluation.terms.items()}
        self._record(candidates[rows, pick], losses[rows, pick], picked)

    def _hybrid_step(self, optimizer: HybridOptimizer) -> None:
        """Ask a population, refine every candidate with Adam (all M x P in one batch per Adam step), keep each
        search's best point along the way and tell the optimizer each candidate's best refined loss."""
        candidates = optimizer.ask()  # (M, P, D)
        searches, population, _ = candidates.shape
        index = torch.arange(searches).repeat_interleave(population)
        points = candidates.reshape(searches * population, -1).clone().requires_grad_(True)
        adam = OPTIMIZERS["adam"](points, lr=optimizer.refine_lr)  # type: ignore[call-arg]
        assert isinstance(adam, GradientOptimizer)
        basin = torch.full((searches * population,), float("inf"))
        rows = torch.arange(searches)

        def closure() -> Tensor:
            nonlocal basin
            adam.zero_grad()
            losses, evaluation = self._evaluate(points, index)
            flat = torch.nan_to_num(losses.detach(), nan=float("inf"))
            basin = torch.minimum(basin, flat)
            pick = flat.view(searches, population).argmin(dim=1)
            picked = {
                name: term.detach().view(searches, population)[rows, pick] for name, term in evaluation.terms.items()
            }
            at = rows * population + pick
            self._record(points.detach()[at].clone(), flat[at], picked)
            total = losses.sum()
            total.backward()
            return total

        with torch.enable_grad():
            for _ in range(optimizer.refine_steps):
                adam.step(closure)
        optimizer.tell(basin.view(searches, population))

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (`torch.load(weights_only=True)` reads it back), detached copies.

        Gradient optimizers: the torch optimizer's own state (Adam moments, L-BFGS curvature pairs). Gradient-free:
        the generator state of random search, or nevergrad's told-loss log to replay (see `NevergradOptimizer`).
        """
        return copy.deepcopy(
            {
                "optimizer_name": self.optimizer_name,
                "steps": self._steps,
                "generator_calls": self._generator_calls,
                "decays": self._decays,
                "exhausted": self._exhausted,
                "variables": _detached(self.variables),
                "optimizer": self.optimizer.state_dict(),
                "final": {} if self._final is None else {"optimizer": self._final.state_dict()},
                "best_losses": self._best_losses,
                "best_variables": self._best_variables,
                "best_terms": dict(self._best_terms),
                "curve": torch.stack(self._curve) if self._curve else torch.empty(0, self.groups),
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`, written by a run over the same space with the same optimizer."""
        if state["optimizer_name"] != self.optimizer_name:
            raise ValueError(f"checkpoint of optimizer {state['optimizer_name']!r}, not {self.optimizer_name!r}")
        if state["best_losses"].shape != self._best_losses.shape:
            raise ValueError(f"checkpoint of {len(state['best_losses'])} searches, not {len(self._best_losses)}")
        self._steps, self._generator_calls = int(state["steps"]), int(state["generator_calls"])
        self._decays, self._exhausted = int(state["decays"]), bool(state["exhausted"])
        self._best_losses = state["best_losses"].clone()
        self._best_variables = _detached(state["best_variables"])
        self._best_terms = {name: term.clone() for name, term in state["best_terms"].items()}
        self._curve = list(state["curve"].clone())
        if isinstance(self.optimizer, GradientOptimizer):
            _copy_into(self.optimizer.variables, state["variables"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self._final = None
        if state.get("final"):
            decays = self._decays
            final = self._start_final(state["variables"])
            self._decays = decays
            final.load_state_dict(copy.deepcopy(state["final"]["optimizer"]))
