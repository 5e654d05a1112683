"""Inversion ("inspiration", seed 003 section III-C): find the latent (and class vector) whose image resembles each
of several target images, as one resumable run that a job advances a bounded segment at a time.

A thin layer over the search core: the criterion is the objective, the class mode picks the space. T targets x R
restarts are M = T * R independent searches, optimised together as one batch (search m = t * R + r), a target
being a group of the search. Each search's variables are one row: z alone, or [z, u] when the class is searched
(III-C5 strategy 1, the class vector being c = c0 + s * u: see `LatentClassSpace`); with the class held fixed
("conditioned", strategy 2) or an unconditional generator, z alone. The models must be in eval mode: a batch-norm
in training mode would mix the searches of one batch.
"""

from __future__ import annotations

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
from gansteer_server.algorithms.search import (
    CLASS_VECTORS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_POPULATION,
    Budget,
    BudgetUnit,
    ClassSpace,
    Evaluation,
    GradientOptimizer,
    Latents,
    PopulationOptimizer,
    SearchRun,
    StepSchedule,
    class_space,
    is_gradient_optimizer,
)

ClassMode = Literal["search", "conditioned", "none"]
CLASS_MODES: tuple[str, ...] = ("search", "conditioned", "none")
ImageGenerator = Callable[[Tensor, Tensor | None], Tensor]
STATE_FORMAT = 2  # 2: the search core's state under "search"


@dataclass(frozen=True)
class InversionConfig:
    """Everything that defines a run besides the models and the targets; defaults are the seed's."""

    optimizer: str = "adam"
    criterion: str = "l2+features"  # a preset of Table I; ignored when `weights` is given
    weights: CriterionWeights | None = None  # free lambdas of eq. (8)
    budget: int = 1000  # IV-C: "all optimizations are launched with 1000 iterations"
    budget_unit: BudgetUnit = "iterations"
    learning_rate: float = DEFAULT_LEARNING_RATE  # IV-C: "a base gradient step equal to one"
    decay: float = 0.1  # IV-C: divided by 10 ...
    decay_at: tuple[float, ...] = (1 / 3, 2 / 3)  # ... at one third and two thirds of the budget
    restarts: int = 1
    population: int = DEFAULT_POPULATION  # candidates per search per step of a gradient-free optimizer
    class_mode: ClassMode = "search"  # III-C5: "search" = strategy 1 (the seed's default), "conditioned" = 2
    class_ids: tuple[int, ...] | None = None  # one for all targets or one per target
    class_vector: str = "free"  # a searched class vector: anywhere (`free`) or among the rows (`simplex`)
    latent_shell: bool = False  # z read on its prior's shell |z| = sqrt(Z)
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
        if self.class_vector not in CLASS_VECTORS:
            raise ValueError(f"class_vector must be one of {CLASS_VECTORS}, got {self.class_vector!r}")
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


class InversionObjective:
    """The criterion of eq. (8) as the search's objective: latents -> the generator's images -> criterion against
    each search's target (search m = t * R + r). Given the fixed class, the realism term's discriminator is
    conditioned on it."""

    maximize = False

    def __init__(self, generator: ImageGenerator, criterion: InversionCriterion, restarts: int, conditioned: bool):
        self.generator, self.criterion = generator, criterion
        self.restarts, self.conditioned = restarts, conditioned

    @property
    def term_names(self) -> tuple[str, ...]:
        return self.criterion.term_names

    def __call__(self, latents: Latents, search_index: Tensor) -> Evaluation:
        images = self.generator(latents.z, latents.condition)
        fixed_class = latents.condition if self.conditioned else None
        return Evaluation(*self.criterion(images, latents.z, search_index // self.restarts, fixed_class))


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
        self.criterion = InversionCriterion(
            targets,
            weights=config.criterion_weights,
            feature_extractor=models.feature_extractor,
            feature_layers=config.feature_layers,
            feature_size=config.feature_size,
            discriminator=models.discriminator,
        )
        self.space = self._space()
        conditioned = config.class_mode == "conditioned"
        self.search = SearchRun(
            self.space,
            InversionObjective(models.generator, self.criterion, config.restarts, conditioned),
            optimizer=config.optimizer,
            budget=Budget(config.budget, config.budget_unit),
            schedule=StepSchedule(config.learning_rate, config.decay, config.decay_at),
            population=config.population,
            restarts=config.restarts,
            seed=config.seed,
        )

    def _space(self) -> ClassSpace:
        """The class mode's space (`class_space`), with one class per target or one for all, repeated per restart."""
        config = self.config
        ids = None
        if config.class_ids is not None:
            if len(config.class_ids) not in (1, self.num_targets):
                raise ValueError(f"class_ids needs 1 or {self.num_targets} entries, got {len(config.class_ids)}")
            ids = torch.tensor(config.class_ids, dtype=torch.int64).expand(self.num_targets)
            ids = ids.repeat_interleave(self.restarts)
        return class_space(
            config.class_mode,
            self.models.z_size,
            self.num_searches,
            self.models.class_embeddings,
            ids,
            class_vector=config.class_vector,
            shell=config.latent_shell,
        )

    def decode(self, variables: Tensor, search_index: Tensor) -> Latents:
        """Rows of search variables -> (z, the generator's condition) for searches `search_index`."""
        return self.space.decode(variables, search_index)

    @property
    def optimizer(self) -> GradientOptimizer | PopulationOptimizer:
        return self.search.optimizer

    @property
    def done(self) -> bool:
        return self.search.done

    @property
    def steps(self) -> int:
        return self.search.steps

    @property
    def generator_calls(self) -> int:
        """Images generated per target so far."""
        return self.search.generator_calls

    @property
    def learning_rate(self) -> float | None:
        return self.search.learning_rate

    @property
    def variables(self) -> Tensor:
        """The current search variables (M, D) of a gradient optimizer, the best points of a gradient-free one."""
        return self.search.variables  # type: ignore[return-value]

    def step(self) -> StepReport:
        report = self.search.step()
        return StepReport(
            step=report.step,
            generator_calls=report.generator_calls,
            best_criterion=report.best_value,
            terms=report.terms,
            learning_rate=report.learning_rate,
        )

    @torch.no_grad()
    def result(self) -> list[InversionResult]:
        """Per target: its best restart's image (one extra generator forward, not counted), latent and metrics."""
        if self.steps == 0:
            raise RuntimeError("no step has run yet")
        best = self.search.best_rows()
        criteria = self.search.best_values
        z, condition = self.decode(self.search.best_variables[best], best)  # type: ignore[index]
        images = self.models.generator(z, condition)
        targets = self.criterion.targets_at(tuple(images.shape[-2:]))
        psnr, ssim = metrics.psnr(images, targets), metrics.ssim(images, targets)
        features = None
        if self.models.feature_extractor is not None:
            features = self.criterion.feature_distance(images, torch.arange(self.num_targets))
        curve = self.search.curve
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
                    criterion=float(criteria[best[t]]),
                    terms={name: float(term[best[t]]) for name, term in self.search.best_terms.items()},
                    restart_criteria=criteria.view(self.num_targets, self.restarts)[t].clone(),
                    curve=curve[:, t].clone(),
                    psnr=float(psnr[t]),
                    ssim=float(ssim[t]),
                    feature_distance=None if features is None else float(features[t]),
                )
            )
        return results

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The search's state (see `SearchRun.state_dict`) with what identifies the run: tensors and plain values."""
        return {
            "format": STATE_FORMAT,
            "config": repr(self.config),
            "targets_shape": list(self.criterion.targets.shape),
            "search": self.search.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`, written by a run with the same config and targets' shape."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r}, expected {STATE_FORMAT}")
        if state["config"] != repr(self.config):
            raise ValueError(f"checkpoint of another config: {state['config']}")
        if list(state["targets_shape"]) != list(self.criterion.targets.shape):
            raise ValueError(f"checkpoint for targets of shape {state['targets_shape']}, not these targets")
        self.search.load_state_dict(state["search"])
