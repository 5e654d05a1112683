"""The evolutionary optimizers of seed 002 and pix2latent's hybrid, registered in the search core's registry.

- `cmaes`: CMA-ES from the `cma` package (pycma), one strategy per search, population ~15 and initial sigma 0.5 as
  the seed found ("values between .5-1 lead to similar results"; "a fairly small sample population of about 15").
- `ga`: the seed's genetic algorithm from DEAP's operators: every latent coordinate a fixed-point binary gene, bits
  flipped with the mutation rate (1%), two-point crossover, tournament selection, the best kept (elitism).
- `basincma` (Huh et al., ECCV 2020, pix2latent's BasinCMA): CMA-ES proposes starting points, each is refined by a
  few Adam steps, and CMA-ES is told the refined losses. A `HybridOptimizer`: the search run does the refinement,
  so its generator calls (every Adam step) count against the budget.

Their knobs are optimizer options (`Optimizer.options` of a spec), checked by `optimizer_options`. Checkpoints hold
no pickle: CMA's state is the log of told losses, replayed from the seed as `NevergradOptimizer` does; the GA's is
its population of bits and its random generator's state.
"""

from __future__ import annotations

import math
import random
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
from deap import base, tools
from torch import Tensor

from gansteer_server.algorithms.search.budget import Budget
from gansteer_server.algorithms.search.optimizers import (
    OPTIMIZERS,
    GradientOptimizer,
    PopulationOptimizer,
    register_optimizer,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pycma warns that it cannot plot without matplotlib
    import cma


class OptionError(ValueError):
    """An optimizer option out of range; `name` is the option's key."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message


Check = Callable[[float], str | None]  # -> what is wrong with the value, or None


def _positive(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else f"must be a finite number > 0, got {value}"


def _open_unit(value: float) -> str | None:
    return None if 0 < value < 1 else f"must be in (0, 1), got {value}"


def _closed_unit(value: float) -> str | None:
    return None if 0 <= value <= 1 else f"must be in [0, 1], got {value}"


def _int_range(low: int, high: int) -> Check:
    def check(value: float) -> str | None:
        if value != int(value) or not low <= value <= high:
            return f"must be an integer from {low} to {high}, got {value}"
        return None

    return check


def optimizer_options(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The options of optimizer `name`: `given` checked, the rest at their defaults; OptionError names the key."""
    cls = OPTIMIZERS[name]
    known: Mapping[str, tuple[float, Check]] = getattr(cls, "options", {})
    for key in given:
        if key not in known:
            expected = f"it takes {sorted(known)}" if known else "it takes none"
            raise OptionError(key, f"{name!r} has no such option; {expected}")
    values: dict[str, Any] = {}
    for key, (default, check) in known.items():
        value = given.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise OptionError(key, f"must be a number, got {value!r}")
        problem = check(float(value))
        if problem:
            raise OptionError(key, problem)
        values[key] = type(default)(value)
    return values


def population_floor(name: str) -> int:
    """The smallest population the optimizer works with (CMA-ES and the GA need two to compare)."""
    return int(getattr(OPTIMIZERS[name], "min_population", 1))


def calls_per_candidate(name: str, options: Mapping[str, Any]) -> int:
    """Generator calls one candidate costs per step: 1, or a hybrid's refinement steps."""
    cls = OPTIMIZERS[name]
    if isinstance(cls, type) and issubclass(cls, HybridOptimizer):
        return int(options.get("refine_steps", cls.options["refine_steps"][0]))
    return 1


def planned_steps(name: str, options: Mapping[str, Any], budget: Budget, population: int, restarts: int) -> int:
    """The steps a search run will take (for progress bars), following its budget rules: a hybrid takes whole
    hybrid steps until its final fraction, then one Adam step per generator call of each search."""
    if budget.unit == "iterations":
        return budget.amount
    cls = OPTIMIZERS[name]
    if issubclass(cls, GradientOptimizer):
        return budget.amount // restarts
    cost = restarts * population * calls_per_candidate(name, options)
    if not issubclass(cls, HybridOptimizer):
        return budget.amount // cost
    final = float(options.get("final_fraction", cls.options["final_fraction"][0]))
    used = steps = 0
    while used + cost <= budget.amount and not (final > 0 and used >= (1 - final) * budget.amount):
        used, steps = used + cost, steps + 1
    return steps + ((budget.amount - used) // restarts if final > 0 else 0)


class _Replayed(PopulationOptimizer):
    """An ask/tell optimizer that is a deterministic function of its seed and the losses it was told: its state is
    the told-loss log, replayed on load (see `NevergradOptimizer`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._reset()

    def _reset(self) -> None:
        self._build()
        self._pending: np.ndarray | None = None
        self._last_candidates: Tensor | None = None
        self._told: list[Tensor] = []

    def _build(self) -> None:
        raise NotImplementedError

    def _ask(self) -> np.ndarray:
        """(searches, population, dimension) float64."""
        raise NotImplementedError

    def _tell(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        raise NotImplementedError

    def ask(self) -> Tensor:
        if self._pending is not None:
            raise RuntimeError("ask() twice without tell()")
        self._pending = self._ask()
        self._last_candidates = torch.from_numpy(self._pending).float()
        return self._last_candidates

    def tell(self, losses: Tensor) -> None:
        if self._pending is None:
            raise RuntimeError("tell() without ask()")
        told = torch.nan_to_num(losses.detach().float().cpu(), nan=torch.finfo(torch.float32).max)
        self._tell(self._pending, told.double().numpy())
        self._told.append(told)
        self._pending = None

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:
            raise RuntimeError("cannot checkpoint between ask() and tell()")
        return {
            "told": torch.stack(self._told) if self._told else torch.empty(0, self.searches, self.population),
            "last_candidates": self._last_candidates if self._last_candidates is not None else torch.empty(0),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        for losses in state["told"]:
            self.ask()
            self.tell(losses)
        if len(state["told"]) and not torch.equal(self._last_candidates, state["last_candidates"]):
            raise RuntimeError(f"replaying {type(self).__name__} did not reproduce the checkpoint's candidates")


@register_optimizer("cmaes")
class CMAES(_Replayed):
    """pycma's CMA-ES per search, from a start drawn from N(0, I) with the seed (restarts start apart), initial step
    `sigma`; sampling uses a numpy Generator of its own per search (pycma's `randn` option), never numpy's global
    state, so searches side by side and other threads cannot change each other's draws."""

    description = "CMA-ES (pycma), population 15, initial sigma 0.5 (seed 002)"
    default_population = 15
    min_population = 2
    options: ClassVar[Mapping[str, tuple[float, Check]]] = {"sigma": (0.5, _positive)}

    def __init__(self, *, sigma: float = 0.5, **kwargs: Any) -> None:
        self.sigma = sigma
        super().__init__(**kwargs)

    def _build(self) -> None:
        seeds = np.random.SeedSequence(self.seed).generate_state(self.searches)
        self._strategies = []
        for seed in seeds:
            rng = np.random.default_rng(int(seed))
            start = rng.standard_normal(self.dimension)
            settings = {
                "popsize": self.population,
                "seed": np.nan,  # pycma: "np.nan means do nothing" to numpy's global generator
                "randn": lambda lam, n, rng=rng: rng.standard_normal((lam, n)),
                "verbose": -9,
                "tolfun": 0,
                "tolflatfitness": 10**9,
            }
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._strategies.append(cma.CMAEvolutionStrategy(start, self.sigma, settings))

    def _ask(self) -> np.ndarray:
        return np.stack([np.stack(strategy.ask()) for strategy in self._strategies])

    def _tell(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for strategy, asked, row in zip(self._strategies, candidates, losses, strict=True):
                strategy.tell(list(asked), row.tolist())


class HybridOptimizer(_Replayed):
    """Gradient-free proposals refined by gradient steps before they are told: the search run refines every
    candidate with `refine_steps` Adam steps at `refine_lr` (one generator call per candidate each) and tells the
    optimizer each candidate's best value along its refinement. The last `final_fraction` of the budget goes to
    plain Adam from each search's best point, on the run's schedule."""

    refine_steps: int
    refine_lr: float
    final_fraction: float


@register_optimizer("basincma")
class BasinCMA(HybridOptimizer, CMAES):
    """pix2latent's BasinCMA: CMA-ES tells the basin's value (the best after Adam) of the point it asked, so CMA
    stays a valid strategy over starting points while Adam does the local descent."""

    description = "CMA-ES over starting points, each refined by Adam steps (BasinCMA, Huh et al. 2020)"
    default_population = 8
    options: ClassVar[Mapping[str, tuple[float, Check]]] = {
        "sigma": (0.5, _positive),
        # Chosen on three photographs the benchmark does not score (hubble_deep_field, immunohistochemistry,
        # retina) among (refine_steps, final_fraction) = (20, 0.5), the same at refine_lr 0.5, and (10, 0.7).
        "refine_steps": (10, _int_range(1, 1000)),
        "refine_lr": (0.1, _positive),
        "final_fraction": (0.7, _closed_unit),
    }

    def __init__(
        self, *, refine_steps: int = 10, refine_lr: float = 0.1, final_fraction: float = 0.7, **kwargs: Any
    ) -> None:
        self.refine_steps, self.refine_lr, self.final_fraction = refine_steps, refine_lr, final_fraction
        super().__init__(**kwargs)


# --- the genetic algorithm ------------------------------------------------------------------------------------------


def encode(z: Tensor, bits: int, bound: float) -> Tensor:
    """Latents (N, D) -> binary genes (N, D * bits) uint8: each coordinate clamped to [-bound, bound] and quantised
    to 2^bits levels, most significant bit first (a flip of a high bit is a big jump, as the seed wanted)."""
    levels = 2**bits - 1
    codes = torch.round((z.clamp(-bound, bound) + bound) / (2 * bound) * levels).to(torch.int64)
    shifts = torch.arange(bits - 1, -1, -1, device=z.device)
    return ((codes[..., None] >> shifts) & 1).to(torch.uint8).flatten(-2)


def decode(genes: Tensor, bits: int, bound: float) -> Tensor:
    """Binary genes (N, D * bits) -> latents (N, D) float32; the inverse of `encode` up to its quantisation."""
    weights = 2 ** torch.arange(bits - 1, -1, -1, device=genes.device)
    codes = (genes.unflatten(-1, (-1, bits)).to(torch.int64) * weights).sum(dim=-1)
    return (codes.float() / (2**bits - 1)) * (2 * bound) - bound


class _Fitness(base.Fitness):
    weights = (-1.0,)  # the run's losses: lower is better


class _Individual(list):  # type: ignore[type-arg]
    """A list of bits with DEAP's fitness attribute (DEAP's `creator` would register a global class instead)."""

    fitness: _Fitness


_RANDOM_LOCK = threading.Lock()


@contextmanager
def _python_random(state: tuple[Any, ...]) -> Iterator[list[tuple[Any, ...]]]:
    """DEAP's operators draw from the `random` module's global generator; run them on this GA's own state and give
    the global one back, under a lock so two GAs in one process do not interleave."""
    with _RANDOM_LOCK:
        saved = random.getstate()
        random.setstate(state)
        out: list[tuple[Any, ...]] = []
        try:
            yield out
        finally:
            out.append(random.getstate())
            random.setstate(saved)


@register_optimizer("ga")
class GeneticAlgorithm(PopulationOptimizer):
    """Seed 002's GA with DEAP's operators: binary genes (`bits` per coordinate over [-bound, bound]), tournament
    selection, two-point crossover with probability `crossover`, bit flips with probability `mutation` (1%), and the
    generation's best carried over unchanged. The first generation encodes draws from N(0, I)."""

    description = "genetic algorithm on binary genes, 1% bit-flip mutation, two-point crossover (DEAP, seed 002)"
    default_population = 16
    min_population = 2
    options: ClassVar[Mapping[str, tuple[float, Check]]] = {
        "mutation": (0.01, _open_unit),
        "crossover": (0.5, _closed_unit),
        "bits": (16, _int_range(2, 24)),
        "bound": (4.0, _positive),
        "tournament": (3, _int_range(2, 64)),
    }

    def __init__(
        self,
        *,
        mutation: float = 0.01,
        crossover: float = 0.5,
        bits: int = 16,
        bound: float = 4.0,
        tournament: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.mutation, self.crossover, self.bits, self.bound = mutation, crossover, bits, bound
        self.tournament = tournament
        start = torch.randn(
            self.searches * self.population, self.dimension, generator=torch.Generator().manual_seed(self.seed)
        )
        self._genes = encode(start, bits, bound).view(self.searches, self.population, -1)
        self._random = random.Random(self.seed).getstate()
        self._asked = False

    def ask(self) -> Tensor:
        if self._asked:
            raise RuntimeError("ask() twice without tell()")
        self._asked = True
        return decode(self._genes, self.bits, self.bound)

    def tell(self, losses: Tensor) -> None:
        if not self._asked:
            raise RuntimeError("tell() without ask()")
        told = torch.nan_to_num(losses.detach().float().cpu(), nan=torch.finfo(torch.float32).max).tolist()
        with _python_random(self._random) as state:
            bred = [self._breed(genes, row) for genes, row in zip(self._genes.tolist(), told, strict=True)]
        self._random = state[0]
        self._genes = torch.tensor(bred, dtype=torch.uint8)
        self._asked = False

    def _breed(self, genes: list[list[int]], losses: list[float]) -> list[list[int]]:
        population = []
        for bits, loss in zip(genes, losses, strict=True):
            individual = _Individual(bits)
            individual.fitness = _Fitness((loss,))
            population.append(individual)
        elite = tools.selBest(population, 1)[0]
        offspring = [
            _Individual(parent) for parent in tools.selTournament(population, len(population) - 1, self.tournament)
        ]
        for first, second in zip(offspring[::2], offspring[1::2], strict=False):
            if random.random() < self.crossover:
                tools.cxTwoPoint(first, second)
        for individual in offspring:
            tools.mutFlipBit(individual, self.mutation)
        return [list(elite), *(list(individual) for individual in offspring)]

    def state_dict(self) -> dict[str, Any]:
        if self._asked:
            raise RuntimeError("cannot checkpoint between ask() and tell()")
        version, internal, gauss = self._random
        return {
            "genes": self._genes.clone(),
            "random": torch.tensor(internal, dtype=torch.int64),
            "random_version": int(version),
            "random_gauss": float("nan") if gauss is None else float(gauss),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gauss = float(state["random_gauss"])
        internal = tuple(int(value) for value in state["random"].tolist())
        self._random = (int(state["random_version"]), internal, None if math.isnan(gauss) else gauss)
        self._genes = state["genes"].clone()
        self._asked = False
