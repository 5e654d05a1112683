"""Latent search for a scorer's output (seed 002): find latents whose images maximise an objective such as a
classifier's pre-softmax logit of a class, with gradient ascent, CMA-ES, a genetic algorithm or any other optimizer
of the search core, and judge each optimum by its robustness and by models the search did not optimise.

A thin layer over the search core, as inversion is. C target classes x R restarts are M = C * R searches, side by
side in one batch (search m = c * R + r), each its own group of the run, so a budget in generator calls is per
search and optimizers compare at equal cost. The space is z with each search's class held ("conditioned"), z and a
continuous class vector starting from the class's row ("search"), or z alone for an unconditional generator.

Each result carries the objective, its robustness (seed 002: "the 10th percentile result of 200 perturbations;
each perturbation was created by adding uncorrelated normal noise to each dimension in latent space with mean 0
and .1 standard deviation", all 200 in one batched forward), an independent judge's probability of the class (a
search that maximises one classifier can find images that fool it; only a classifier it did not see tells those
apart) and the discriminator's realism score.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gansteer_server.algorithms.search import (
    DEFAULT_POPULATION,
    Budget,
    BudgetUnit,
    ClassSpace,
    Evaluation,
    Latents,
    SearchRun,
    StepSchedule,
    class_space,
    optimizer_options,
)

ClassMode = Literal["conditioned", "search", "none"]
CLASS_MODES: tuple[str, ...] = ("conditioned", "search", "none")
ImageGenerator = Callable[[Tensor, Tensor | None], Tensor]
#: (images (N, 3, H, W), target class per image (N,) int64 or None) -> (objective (N,), named terms (N,) each)
ScoreFn = Callable[[Tensor, Tensor | None], tuple[Tensor, dict[str, Tensor]]]
STATE_FORMAT = 1


@dataclass(frozen=True)
class LatentSearchConfig:
    """Everything that defines a run besides the models; robustness defaults are the seed's."""

    optimizer: str = "adam"
    options: tuple[tuple[str, float], ...] = ()  # the optimizer's options (sigma, mutation, ...), as sorted pairs
    budget: int = 1500
    budget_unit: BudgetUnit = "generator_calls"
    learning_rate: float = 0.05  # gradient ascent's step on z (the search core's decay with reset applies)
    population: int = DEFAULT_POPULATION
    restarts: int = 1
    class_mode: ClassMode = "conditioned"
    class_ids: tuple[int, ...] = ()  # the target classes, one group of restarts each; () = one untargeted group
    prior_weight: float = 0.0  # the latent-prior penalty: objective - prior_weight * (|z|^2 / d - 1)^2 (eq. 6, 003)
    perturbations: int = 200
    perturbation_sigma: float = 0.1
    percentile: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        Budget(self.budget, self.budget_unit)
        StepSchedule(self.learning_rate)
        optimizer_options(self.optimizer, dict(self.options))  # raises on an unknown optimizer or a bad option
        for name in ("population", "restarts", "perturbations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.perturbation_sigma > 0:
            raise ValueError(f"perturbation_sigma must be > 0, got {self.perturbation_sigma}")
        if not 0 <= self.percentile <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {self.percentile}")
        if not self.prior_weight >= 0:
            raise ValueError(f"prior_weight must be >= 0, got {self.prior_weight}")
        if self.class_mode not in CLASS_MODES:
            raise ValueError(f"class_mode must be one of {CLASS_MODES}, got {self.class_mode!r}")
        if self.class_mode == "conditioned" and not self.class_ids:
            raise ValueError("class_mode 'conditioned' needs class_ids")
        if self.class_mode == "none" and self.class_ids:
            raise ValueError("class_mode 'none' takes no class_ids")

    @property
    def groups(self) -> int:
        return max(1, len(self.class_ids))


@dataclass(frozen=True)
class LatentSearchModels:
    """The models as the algorithm sees them (local modules or remote stand-ins alike).

    `objective` is maximised; `judge` and `classifier` map images to class logits (N, K): the judge is a classifier
    the search did not optimise, `classifier` the one it did (for the comparison); `discriminator(images, ids)` is
    the realism score, higher = more real.
    """

    generator: ImageGenerator
    z_size: int
    objective: ScoreFn
    term_names: tuple[str, ...] = ()
    class_embeddings: Tensor | None = None
    judge: Callable[[Tensor], Tensor] | None = None
    classifier: Callable[[Tensor], Tensor] | None = None
    discriminator: Callable[..., Tensor] | None = None

    def __post_init__(self) -> None:
        for name in ("generator", "judge", "classifier", "discriminator"):
            model = getattr(self, name)
            if isinstance(model, nn.Module) and model.training:
                raise ValueError(f"{name} is in training mode; call .eval() (batch norm would mix the searches)")


@dataclass(frozen=True)
class LatentSearchResult:
    image: Tensor  # (3, H, W) in [-1, 1]
    z: Tensor  # (Z,)
    class_vector: Tensor | None  # (E,) the searched class vector ("search" mode)
    class_id: int | None  # the target class
    restart: int
    objective: float
    terms: dict[str, float]
    robustness: float  # the `percentile` of the objective over the perturbations
    perturbed: Tensor  # (perturbations,) the objective at each perturbation
    judge_prob: float | None  # the judge's probability of the target class
    judge_class: int | None  # the judge's most probable class
    classifier_prob: float | None  # the optimised classifier's probability of the target class
    classifier_class: int | None
    realism: float | None
    curve: Tensor = field(repr=False)  # (steps,) best-so-far objective after each step


class LatentSearchObjective:
    """Latents -> the generator's images -> the scorer objective of each search's target class, minus the optional
    latent-prior penalty."""

    maximize = True

    def __init__(self, models: LatentSearchModels, search_classes: Tensor | None, prior_weight: float) -> None:
        self.models, self.search_classes, self.prior_weight = models, search_classes, prior_weight

    @property
    def term_names(self) -> tuple[str, ...]:
        return (*self.models.term_names, *(("latent_norm",) if self.prior_weight > 0 else ()))

    def value(self, latents: Latents, classes: Tensor | None) -> Evaluation:
        images = self.models.generator(latents.z, latents.condition)
        values, terms = self.models.objective(images, classes)
        terms = dict(terms)
        if self.prior_weight > 0:
            terms["latent_norm"] = (latents.z.pow(2).mean(dim=1) - 1).pow(2)
            values = values - self.prior_weight * terms["latent_norm"]
        return Evaluation(values, terms)

    def __call__(self, latents: Latents, search_index: Tensor) -> Evaluation:
        classes = None if self.search_classes is None else self.search_classes[search_index]
        return self.value(latents, classes)


def perturbation_values(
    value: Callable[[Tensor, Tensor | None], Tensor],
    z: Tensor,
    condition: Tensor | None,
    *,
    perturbations: int = 200,
    sigma: float = 0.1,
    seed: int = 0,
) -> Tensor:
    """The objective at `perturbations` latents z + sigma * N(0, I), all in one batched call (perturbations,).

    `value(z (N, Z), condition (N, ...) or None) -> (N,)`; the condition (a class id or vector) is held: the seed
    perturbs the latent only.
    """
    noise = torch.randn(perturbations, z.shape[-1], generator=torch.Generator().manual_seed(seed)).to(z)
    points = z[None] + sigma * noise
    held = None if condition is None else condition[None].expand(perturbations, *condition.shape)
    return value(points, held)


def robustness(values: Tensor, percentile: float = 10.0) -> Tensor:
    """The `percentile` of the perturbed values along the last dimension (linear interpolation, as numpy's)."""
    return torch.quantile(values.double(), percentile / 100, dim=-1).to(values.dtype)


class LatentSearchRun:
    """One latent search of C classes x R restarts, advanced with `step()` until `done`, resumable."""

    def __init__(self, config: LatentSearchConfig, models: LatentSearchModels) -> None:
        self.config, self.models = config, models
        self.restarts = config.restarts
        self.num_searches = config.groups * config.restarts
        ids = torch.tensor(config.class_ids, dtype=torch.int64) if config.class_ids else None
        self.search_classes = None if ids is None else ids.repeat_interleave(config.restarts)
        self.space = self._space()
        self.objective = LatentSearchObjective(models, self.search_classes, config.prior_weight)
        self.search = SearchRun(
            self.space,
            self.objective,
            optimizer=config.optimizer,
            budget=Budget(config.budget, config.budget_unit),
            schedule=StepSchedule(config.learning_rate),
            population=config.population,
            restarts=1,  # every search is its own group: budgets and curves per search
            seed=config.seed,
            options=dict(config.options),
        )

    def _space(self) -> ClassSpace:
        config, models = self.config, self.models
        return class_space(
            config.class_mode, models.z_size, self.num_searches, models.class_embeddings, self.search_classes
        )

    @property
    def done(self) -> bool:
        return self.search.done

    @property
    def steps(self) -> int:
        return self.search.steps

    @property
    def generator_calls(self) -> int:
        """Images generated per search so far."""
        return self.search.generator_calls

    def step(self) -> Any:
        return self.search.step()

    @torch.no_grad()
    def best_images(self) -> Tensor:
        """Each search's best image so far (M, 3, H, W), one generator forward (not counted)."""
        rows = torch.arange(self.num_searches)
        z, condition = self.space.decode(self.search.best_variables, rows)  # type: ignore[arg-type]
        return self.models.generator(z, condition)

    @torch.no_grad()
    def result(self) -> list[LatentSearchResult]:
        """Per search (class-major): its best point, image and objective, robustness over the perturbations (one
        batched forward per search), the judge's and the optimised classifier's probability of the class, and
        realism. Generator calls made here are not counted in the budget."""
        if self.steps == 0:
            raise RuntimeError("no step has run yet")
        config, models = self.config, self.models
        rows = torch.arange(self.num_searches)
        z, condition = self.space.decode(self.search.best_variables, rows)  # type: ignore[arg-type]
        images = models.generator(z, condition)
        classes = self.search_classes
        judge = _class_probabilities(models.judge, images, classes)
        classifier = _class_probabilities(models.classifier, images, classes)
        realism = None
        if models.discriminator is not None:
            realism = models.discriminator(images, classes).reshape(len(images))
        curve = self.search.curve
        results = []
        for m in range(self.num_searches):
            held = None if condition is None else condition[m]
            target = None if classes is None else classes[m]

            def value(points: Tensor, held_condition: Tensor | None, target: Tensor | None = target) -> Tensor:
                targets = None if target is None else target.expand(len(points))
                return self.objective.value(Latents(points, held_condition), targets).values

            perturbed = perturbation_values(
                value,
                z[m],
                held,
                perturbations=config.perturbations,
                sigma=config.perturbation_sigma,
                seed=config.seed * 1_000_003 + m,
            )
            class_vector = held.clone() if held is not None and held.is_floating_point() else None
            results.append(
                LatentSearchResult(
                    image=images[m].clone(),
                    z=z[m].clone(),
                    class_vector=class_vector,
                    class_id=None if target is None else int(target),
                    restart=m % self.restarts,
                    objective=float(self.search.best_values[m]),
                    terms={name: float(term[m]) for name, term in self.search.best_terms.items()},
                    robustness=float(robustness(perturbed, config.percentile)),
                    perturbed=perturbed.clone(),
                    judge_prob=None if judge is None else float(judge[0][m]),
                    judge_class=None if judge is None else int(judge[1][m]),
                    classifier_prob=None if classifier is None else float(classifier[0][m]),
                    classifier_class=None if classifier is None else int(classifier[1][m]),
                    realism=None if realism is None else float(realism[m]),
                    curve=curve[:, m].clone(),
                )
            )
        return results

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "config": repr(self.config), "search": self.search.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')!r}, expected {STATE_FORMAT}")
        if state["config"] != repr(self.config):
            raise ValueError(f"checkpoint of another config: {state['config']}")
        self.search.load_state_dict(dict(state["search"]))


def _class_probabilities(
    classifier: Callable[[Tensor], Tensor] | None, images: Tensor, classes: Tensor | None
) -> tuple[Tensor, Tensor] | None:
    """(probability of each image's target class, the most probable class), or None without classifier or classes."""
    if classifier is None or classes is None:
        return None
    probabilities = torch.softmax(classifier(images), dim=1)
    return probabilities.gather(1, classes[:, None])[:, 0], probabilities.argmax(dim=1)
