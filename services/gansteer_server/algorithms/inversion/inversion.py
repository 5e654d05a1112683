"""Inversion ("inspiration", seed 003 section III-C): find the latent (and class vector) whose image resembles each
of several target images, as one resumable run that a job advances a bounded segment at a time.

Layout of the search: T targets x R restarts are M = T * R independent searches, optimised together as one
batch (search m = t * R + r). Each search's variables are one row x = [z, u] of width D: z (Z) is the latent; u is
the class part when the class is searched (III-C5 strategy 1), the class vector being c = c0 + s * u, with c0 the
embedding table's mean or a given class's row and s the table's spread, so that z and u share one unit scale for
every optimizer. With the class held fixed ("conditioned", strategy 2) or an unconditional generator, D = Z.
The models must be in eval mode: a batch-norm in training mode would mix the searches of one batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gansteer_server.algorithms.inversion import metrics
from gansteer_server.algorithms.inversion.criteria import (
    CRITERION_PRESETS,
    DEFAULT_FEATURE_LAYERS,
    CriterionWeights,
    Discriminator,
    FeatureExtractor,
    InversionCriterion,
)
from gansteer_server.algorithms.inversion.optimizers import (
    OPTIMIZERS,
    GradientOptimizer,
    PopulationOptimizer,
    is_gradient_optimizer,
)
from gansteer_server.algorithms.inversion.schedule import Budget, BudgetUnit, StepSchedule

ClassMode = Literal["search", "conditioned", "none"]
CLASS_MODES: tuple[str, ...] = ("search", "conditioned", "none")
ImageGenerator = Callable[[Tensor, Tensor | None], Tensor]
STATE_FORMAT = 1


@dataclass(frozen=True)
class InversionConfig:
    """Everything that defines a run besides the models and the targets; defaults are the seed's."""

    optimizer: str = "adam"
    criterion: str = "l2+features"  # a preset of Table I; ignored when `weights` is given
    weights: CriterionWeights | None = None  # free lambdas of eq. (8)
    budget: int = 1000  # IV-C: "all optimizations are launched with 1000 iterations"
    budget_unit: BudgetUnit = "iterations"
    learning_rate: float = 1.0  # IV-C: "a base gradient step equal to one"
    decay: float = 0.1  # IV-C: divided by 10 ...
    decay_at: tuple[float, ...] = (1 / 3, 2 / 3)  # ... at one third and two thirds of the budget
    restarts: int = 1
    population: int = 8  # candidates per search per step of a gradient-free optimizer
    class_mode: ClassMode = "search"  # III-C5: "search" = strategy 1 (the seed's default), "conditioned" = 2
    class_ids: tuple[int, ...] | None = None  # one for all targets or one per target
    feature_layers: tuple[str, ...] = DEFAULT_FEATURE_LAYERS
    feature_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        is_gradient_optimizer(self.optimizer)  # raises on an unknown name
        if self.weights is None and self.criterion not in CRITERION_PRESETS:
            raise ValueError(f"unknown criterion {self.criterion!r}; presets: {sorted(CRITERION_PRESETS)}")
        Budget(self.budget, self.budget_unit)
        StepSchedule(self.learning_rate, self.decay, self.decay_at)
        for name in ("restarts", "population", "feature_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.class_mode not in CLASS_MODES:
            raise ValueError(f"class_mode must be one of {CLASS_MODES}, got {self.class_mode!r}")
        if self.class_mode == "conditioned" and not self.class_ids:
            raise ValueError("class_mode 'conditioned' needs class_ids")
        if self.class_mode == "none" and self.class_ids:
            raise ValueError("class_mode 'none' takes no class_ids")
        if self.class_ids is not None and any(i < 0 for i in self.class_ids):
            raise ValueError(f"class_ids must be >= 0, got {self.class_ids}")

    @property
    def criterion_weights(self) -> CriterionWeights:
        return self.weights if self.weights is not None else CRITERION_PRESETS[self.criterion]

    @property
    def gradient(self) -> bool:
        return is_gradient_optimizer(self.optimizer)


@dataclass(frozen=True)
class InversionModels:
    """The models as the algorithm sees them: plain callables, local modules or remote stand-ins alike.

    `generator(z (N, Z), condition) -> (N, 3, H, W)` in [-1, 1], condition being class ids (N,) int64, class vectors
    (N, E) float, or None (class_mode "none"). `class_embeddings` (K, E) are the generator's class rows (needed to
    search the class vector and to report it). `discriminator(images, condition=None) -> (N,)`, higher = more real.
    """

    generator: ImageGenerator
    z_size: int
    class_embeddings: Tensor | None = None
    feature_extractor: FeatureExtractor | None = None
    discriminator: Discriminator | None = None

    def __post_init__(self) -> None:
        for name in ("generator", "feature_extractor", "discriminator"):
            model = getattr(self, name)
            if isinstance(model, nn.Module) and model.training:
                raise ValueError(f"{name} is in training mode; call .eval() (batch norm would mix the searches)")


@dataclass(frozen=True)
class StepReport:
    step: int  # steps completed so far
    generator_calls: int  # images generated per target so far
    best_criterion: Tensor  # (T,) best-so-far per target
    terms: dict[str, Tensor]  # name -> (T,) unweighted terms at each target's best point
    learning_rate: float | None  # None for gradient-free optimizers


@dataclass(frozen=True)
class InversionResult:
    image: Tensor  # (3, H, W) in [-1, 1]
    z: Tensor  # (Z,)
    class_vector: Tensor | None  # (E,) what the generator was given (the fixed class's row when conditioned)
    class_id: int | None  # the fixed class when conditioned
    criterion: float
    terms: dict[str, float]
    restart_criteria: Tensor  # (R,) best criterion of each restart; `criterion` is their minimum
    curve: Tensor  # (steps,) best-so-far criterion after each step
    psnr: float  # dB, [0, 1] pixel range
    ssim: float  # Wang et al. 2004 (Gaussian 11 x 11), [0, 1] pixel range
    feature_distance: float | None  # C_S of eq. (5) in the run's feature extractor, when it has one


class _BudgetExhausted(Exception):
    """Raised by the closure when one more generator call would exceed a budget in generator calls."""


class InversionRun:
    """One inversion of T targets, advanced with `step()` until `done`, resumable from `state_dict()`."""

    def __init__(self, config: InversionConfig, models: InversionModels, targets: Tensor) -> None:
        if targets.dim() != 4 or targets.shape[1] != 3 or len(targets) == 0:
            raise ValueError(f"targets must be (T, 3, H, W) with T >= 1, got {tuple(targets.shape)}")
        if not torch.isfinite(targets).all():
            raise ValueError("targets contain NaN or infinite values")
        self.config, self.models = config, models
        self.num_targets, self.restarts = len(targets), config.restarts
        self.num_searches = self.num_targets * self.restarts
        self.budget = Budget(config.budget, config.budget_unit)
        self.schedule = StepSchedule(config.learning_rate, config.decay, config.decay_at)
        self.criterion = InversionCriterion(
            targets,
            weights=config.criterion_weights,
            feature_extractor=models.feature_extractor,
            feature_layers=config.feature_layers,
            feature_size=config.feature_size,
            discriminator=models.discriminator,
        )
        self._set_up_class()
        self.dimension = models.z_size + (self._class_start.shape[1] if config.class_mode == "search" else 0)
        self._step_cost = self.restarts * (1 if config.gradient else config.population)
        if not self.budget.allows(0, 0, self._step_cost):
            raise ValueError(f"budget {config.budget} generator calls is below one step's cost {self._step_cost}")

        rng = torch.Generator().manual_seed(config.seed)
        start = torch.zeros(self.num_searches, self.dimension)
        start[:, : models.z_size] = torch.randn(self.num_searches, models.z_size, generator=rng)
        self.optimizer: GradientOptimizer | PopulationOptimizer
        if config.gradient:
            variables = start.clone().requires_grad_(True)
            self.optimizer = OPTIMIZERS[config.optimizer](variables, lr=config.learning_rate)  # type: ignore[call-arg]
        else:
            self.optimizer = OPTIMIZERS[config.optimizer](  # type: ignore[call-arg]
                searches=self.num_searches,
                dimension=self.dimension,
                population=config.population,
                budget=self._evaluations_per_search(),
                seed=config.seed,
            )
        self._steps = self._generator_calls = self._decays = 0
        self._exhausted = False
        self._best_criterion = torch.full((self.num_searches,), float("inf"))
        self._best_variables = start
        self._best_terms = {name: torch.full((self.num_searches,), float("nan")) for name in self.criterion.term_names}
        self._curve: list[Tensor] = []

    def _set_up_class(self) -> None:
        """The fixed class ids (conditioned) or the start c0 and scale s of the searched class vector."""
        config, table = self.config, self.models.class_embeddings
        self._class_start = torch.zeros(self.num_searches, 0)
        self._class_scale = 1.0
        self._class_ids: Tensor | None = None
        if config.class_mode == "none":
            return
        ids = None
        if config.class_ids is not None:
            if len(config.class_ids) not in (1, self.num_targets):
                raise ValueError(f"class_ids needs 1 or {self.num_targets} entries, got {len(config.class_ids)}")
            if table is not None and max(config.class_ids) >= len(table):
                raise ValueError(f"class_ids {config.class_ids} out of range for {len(table)} classes")
            ids = torch.tensor(config.class_ids, dtype=torch.int64).expand(self.num_targets)
            ids = ids.repeat_interleave(self.restarts)
        if config.class_mode == "conditioned":
            self._class_ids = ids
            return
        if table is None:
            raise ValueError("class_mode 'search' needs the generator's class_embeddings")
        table = table.detach().float()
        self._class_start = table.mean(dim=0).expand(self.num_searches, -1) if ids is None else table[ids]
        spread = float((table - table.mean(dim=0)).std()) if len(table) > 1 else 0.0
        self._class_scale = spread if spread > 0 else 1.0

    def _evaluations_per_search(self) -> int:
        if self.budget.unit == "iterations":
            return self.budget.amount * self.config.population
        return self.budget.amount // self.restarts

    # ---- evaluation -------------------------------------------------------------------------------------------

    def decode(self, variables: Tensor, search_index: Tensor) -> tuple[Tensor, Tensor | None]:
        """Rows of search variables -> (z, the generator's condition) for searches `search_index`."""
        z = variables[:, : self.models.z_size]
        if self.config.class_mode == "search":
            return z, self._class_start[search_index] + self._class_scale * variables[:, self.models.z_size :]
        if self.config.class_mode == "conditioned":
            assert self._class_ids is not None
            return z, self._class_ids[search_index]
        return z, None

    def _evaluate(self, variables: Tensor, search_index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z, condition = self.decode(variables, search_index)
        images = self.models.generator(z, condition)
        self._generator_calls += len(variables) // self.num_targets
        fixed_class = condition if self.config.class_mode == "conditioned" else None
        return self.criterion(images, z, search_index // self.restarts, fixed_class)

    def _record(self, variables: Tensor, losses: Tensor, terms: dict[str, Tensor]) -> None:
        """Keep each search's best point; rows are searches, NaN never counts as better."""
        improved = losses < self._best_criterion
        self._best_criterion = torch.where(improved, losses, self._best_criterion)
        self._best_variables = torch.where(improved[:, None], variables, self._best_variables)
        for name, term in terms.items():
            self._best_terms[name] = torch.where(improved, term, self._best_terms[name])

    # ---- stepping ---------------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._exhausted or not self.budget.allows(self._steps, self._generator_calls, self._step_cost)

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
    def variables(self) -> Tensor:
        """The current search variables (M, D) of a gradient optimizer, the best points of a gradient-free one."""
        return self.optimizer.variables if isinstance(self.optimizer, GradientOptimizer) else self._best_variables

    def step(self) -> StepReport:
        if self.done:
            raise RuntimeError("the run is done")
        if isinstance(self.optimizer, GradientOptimizer):
            self._gradient_step(self.optimizer)
        else:
            self._population_step(self.optimizer)
        self._steps += 1
        self._curve.append(self._best_criterion.view(self.num_targets, self.restarts).min(dim=1).values)
        best = self._best_search()
        return StepReport(
            step=self._steps,
            generator_calls=self._generator_calls,
            best_criterion=self._best_criterion[best],
            terms={name: term[best] for name, term in self._best_terms.items()},
            learning_rate=self.learning_rate,
        )

    def _gradient_step(self, optimizer: GradientOptimizer) -> None:
        used = self.budget.used(self._steps, self._generator_calls)
        due = self.schedule.decays_due(used, self.budget.amount)
        if due > self._decays:  # IV-C: back to the best point found so far, then the smaller step
            optimizer.restart(self._best_variables, self.schedule.learning_rate_after(due))
            self._decays = due
        index = torch.arange(self.num_searches)

        def closure() -> Tensor:
            if not self.budget.allows(self._steps, self._generator_calls, self._step_cost):
                raise _BudgetExhausted
            optimizer.zero_grad()
            losses, terms = self._evaluate(optimizer.variables, index)  # re-runs G at the current point, every call
            point = optimizer.variables.detach().clone()
            self._record(point, losses.detach(), {name: term.detach() for name, term in terms.items()})
            total = losses.sum()
            total.backward()
            return total

        try:
            optimizer.step(closure)
        except _BudgetExhausted:
            self._exhausted = True

    @torch.no_grad()
    def _population_step(self, optimizer: PopulationOptimizer) -> None:
        candidates = optimizer.ask()  # (M, P, D)
        searches, population, _ = candidates.shape
        index = torch.arange(searches).repeat_interleave(population)
        losses, terms = self._evaluate(candidates.reshape(searches * population, -1), index)  # one forward
        losses = losses.view(searches, population)
        optimizer.tell(losses)
        pick = torch.nan_to_num(losses, nan=float("inf")).argmin(dim=1)
        rows = torch.arange(searches)
        picked = {name: term.view(searches, population)[rows, pick] for name, term in terms.items()}
        self._record(candidates[rows, pick], losses[rows, pick], picked)

    def _best_search(self) -> Tensor:
        """Index (T,) of each target's best restart."""
        restart = self._best_criterion.view(self.num_targets, self.restarts).argmin(dim=1)
        return torch.arange(self.num_targets) * self.restarts + restart

    # ---- results ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def result(self) -> list[InversionResult]:
        """Per target: its best restart's image (one extra generator forward, not counted), latent and metrics."""
        if self._steps == 0:
            raise RuntimeError("no step has run yet")
        best = self._best_search()
        z, condition = self.decode(self._best_variables[best], best)
        images = self.models.generator(z, condition)
        targets = self.criterion.targets_at(tuple(images.shape[-2:]))
        psnr, ssim = metrics.psnr(images, targets), metrics.ssim(images, targets)
        target_index = torch.arange(self.num_targets)
        features = None
        if self.models.feature_extractor is not None:
            features = self.criterion.feature_distance(images, target_index)
        curve = torch.stack(self._curve)
        results = []
        for t in range(self.num_targets):
            class_vector, class_id = None, None
            if condition is not None and condition.dtype == torch.int64:
                class_id = int(condition[t])
                if self.models.class_embeddings is not None:
                    class_vector = self.models.class_embeddings[class_id].detach().clone()
            elif condition is not None:
                class_vector = condition[t].clone()
            results.append(
                InversionResult(
                    image=images[t].clone(),
                    z=z[t].clone(),
                    class_vector=class_vector,
                    class_id=class_id,
                    criterion=float(self._best_criterion[best[t]]),
                    terms={name: float(term[best[t]]) for name, term in self._best_terms.items()},
                    restart_criteria=self._best_criterion.view(self.num_targets, self.restarts)[t].clone(),
                    curve=curve[:, t].clone(),
                    psnr=float(psnr[t]),
                    ssim=float(ssim[t]),
                    feature_distance=None if features is None else float(features[t]),
                )
            )
        return results

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (`torch.load(weights_only=True)` reads it back), detached copies.

        Gradient optimizers: the torch optimizer's own state (Adam moments, L-BFGS curvature pairs). Gradient-free:
        the generator state of random search, or nevergrad's told-loss log to replay (see `NevergradOptimizer`).
        """
        return copy.deepcopy(
            {
                "format": STATE_FORMAT,
                "config": repr(self.config),
                "targets_shape": list(self.criterion.targets.shape),
                "steps": self._steps,
                "generator_calls": self._generator_calls,
                "decays": self._decays,
                "exhausted": self._exhausted,
                "variables": self.variables.detach(),
                "optimizer": self.optimizer.state_dict(),
                "best_criterion": self._best_criterion,
                "best_variables": self._best_variables,
                "best_terms": dict(self._best_terms),
                "curve": torch.stack(self._curve) if self._curve else torch.empty(0, self.num_targets),
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`, written by a run with the same config and targets' shape."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r}, expected {STATE_FORMAT}")
        if state["config"] != repr(self.config):
            raise ValueError(f"checkpoint of another config: {state['config']}")
        if list(state["targets_shape"]) != list(self.criterion.targets.shape):
            raise ValueError(f"checkpoint for targets of shape {state['targets_shape']}, not these targets")
        self._steps, self._generator_calls = int(state["steps"]), int(state["generator_calls"])
        self._decays, self._exhausted = int(state["decays"]), bool(state["exhausted"])
        self._best_criterion = state["best_criterion"].clone()
        self._best_variables = state["best_variables"].clone()
        self._best_terms = {name: term.clone() for name, term in state["best_terms"].items()}
        self._curve = list(state["curve"].clone())
        if isinstance(self.optimizer, GradientOptimizer):
            with torch.no_grad():
                self.optimizer.variables.copy_(state["variables"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
