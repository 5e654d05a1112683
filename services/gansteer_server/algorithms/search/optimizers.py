"""The optimizers of every search (seed 003, section III-D), behind one registry keyed by name.

Two families share the registry. A `GradientOptimizer` wraps a `torch.optim` optimizer over the search variables
(one (M, D) tensor of M searches, or a list of parameter tensors) and steps with a closure that re-evaluates the
objective every time it is called. A `PopulationOptimizer` is ask/tell over M independent searches in R^D: `ask()`
gives P candidates for each search, the run scores all M x P of them in one batched evaluation, and `tell()` hands
back the (M, P) losses. Both minimise; the run turns a maximised objective around.

Adding an optimizer is one class with a `description` and one `@register_optimizer` line; `optimizer_catalog()`
lists them for a server to show.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import nevergrad as ng
import numpy as np
import torch
from torch import Tensor

from gansteer_server.algorithms.search.schedule import DEFAULT_LEARNING_RATE

Variables = Tensor | list[Tensor]
DEFAULT_POPULATION = 8
OPTIMIZERS: dict[str, type[GradientOptimizer] | type[PopulationOptimizer]] = {}
OptimizerClass = TypeVar("OptimizerClass", bound=type)


def register_optimizer(name: str) -> Callable[[OptimizerClass], OptimizerClass]:
    def register(cls: OptimizerClass) -> OptimizerClass:
        if name in OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is already registered")
        if not getattr(cls, "description", ""):
            raise ValueError(f"optimizer {name!r} needs a one-line description")
        OPTIMIZERS[name] = cls
        return cls

    return register


@dataclass(frozen=True)
class OptimizerInfo:
    """What a design tool may show of a registered optimizer."""

    name: str
    gradient: bool  # False: gradient-free, one population per step
    description: str
    default_learning_rate: float | None  # gradient optimizers only
    default_population: int | None  # gradient-free optimizers only


def optimizer_catalog() -> list[OptimizerInfo]:
    """Every registered optimizer, in registration order."""
    catalog = []
    for name, cls in OPTIMIZERS.items():
        if issubclass(cls, GradientOptimizer):
            catalog.append(OptimizerInfo(name, True, cls.description, cls.default_learning_rate, None))
        else:
            catalog.append(OptimizerInfo(name, False, cls.description, None, cls.default_population))
    return catalog


def is_gradient_optimizer(name: str) -> bool:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    return issubclass(OPTIMIZERS[name], GradientOptimizer)


class GradientOptimizer:
    """A torch.optim optimizer over the search variables (leaf tensors); subclasses say which one in `build`."""

    description: ClassVar[str]
    default_learning_rate: ClassVar[float] = DEFAULT_LEARNING_RATE

    #: Settings beyond the step size: name -> (default, check), validated by `optimizer_options`.
    options: ClassVar[dict[str, tuple[float, Callable[[float], str | None]]]] = {}

    def __init__(self, variables: Variables, *, lr: float, **options: float) -> None:
        self.variables = variables
        self.settings = {key: options.get(key, default) for key, (default, _) in self.options.items()}
        self.torch_optimizer = self.build(self.parameters, lr)

    @property
    def parameters(self) -> list[Tensor]:
        return [self.variables] if isinstance(self.variables, Tensor) else list(self.variables)

    def build(self, parameters: list[Tensor], lr: float) -> torch.optim.Optimizer:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        return float(self.torch_optimizer.param_groups[0]["lr"])

    def zero_grad(self) -> None:
        self.torch_optimizer.zero_grad(set_to_none=True)

    def step(self, closure: Any) -> None:
        """`closure` zeroes the gradient, re-runs generator and criterion, back-propagates and returns the loss."""
        self.torch_optimizer.step(closure)

    def restart(self, values: Variables, lr: float) -> None:
        """Move the variables to `values` and start afresh at step size `lr` (IV-C's reset-to-best before a decay):
        moments and curvature pairs gathered elsewhere would be wrong at the new point."""
        values = [values] if isinstance(values, Tensor) else values
        with torch.no_grad():
            for parameter, value in zip(self.parameters, values, strict=True):
                parameter.copy_(value)
        self.torch_optimizer = self.build(self.parameters, lr)

    def state_dict(self) -> dict[str, Any]:
        return self.torch_optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.torch_optimizer = self.build(self.parameters, float(state["param_groups"][0]["lr"]))
        self.torch_optimizer.load_state_dict(state)


def _beta(value: float) -> str | None:
    return None if 0 <= value < 1 else f"must be in [0, 1), got {value}"


@register_optimizer("adam")
class Adam(GradientOptimizer):
    """Progressive growing's betas (0, 0.99) by default, as in IV-C and the reference code; embedding AM uses
    torch's (0.9, 0.999) as seed 001 did. Each element has its own moments, so searches stacked as rows of one
    tensor are stepped exactly as if each had its own optimizer."""

    description = "Adam with betas (0, 0.99); options beta1, beta2"
    options: ClassVar[dict[str, tuple[float, Callable[[float], str | None]]]] = {
        "beta1": (0.0, _beta),
        "beta2": (0.99, _beta),
    }

    def build(self, parameters: list[Tensor], lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(parameters, lr=lr, betas=(self.settings["beta1"], self.settings["beta2"]))


def _rows(variables: Variables) -> Tensor:
    """The variables as (M, D) rows: an (M, D) tensor as it is, a parameter list as one row (a copy)."""
    if isinstance(variables, Tensor):
        return variables.detach()
    return torch.cat([v.detach().flatten() for v in variables])[None]


def _set_rows(variables: Variables, rows: Tensor) -> None:
    with torch.no_grad():
        if isinstance(variables, Tensor):
            variables.copy_(rows)
            return
        offset = 0
        for tensor in variables:
            tensor.copy_(rows[0, offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def _grad_rows(variables: Variables) -> Tensor:
    tensors = [variables] if isinstance(variables, Tensor) else variables
    grads = [torch.zeros_like(t) if t.grad is None else t.grad.detach() for t in tensors]
    if isinstance(variables, Tensor):
        return grads[0].clone()
    return torch.cat([g.flatten() for g in grads])[None]


@register_optimizer("lbfgs")
class LBFGS(GradientOptimizer):
    """L-BFGS for every search on its own, all searches evaluated in one batch.

    Each search keeps its own curvature pairs and does its own backtracking line search (Armijo condition, the step
    halved up to `MAX_TRIALS` times; every trial is one batched evaluation of all searches, so a step costs as many
    generator calls as its longest line search). torch's L-BFGS would treat the M searches as one problem with one
    shared line search, so that one hard search stalls all of them (issue 20: a zero step after 1-23 iterations, then
    ~85% of the budget spent re-evaluating the same point); no library offers per-row line searches over a batched
    objective, hence this class. A search whose line search fails forgets its curvature pairs and starts again from
    steepest descent; one that fails twice in a row has converged to the objective's float precision and stops
    moving (`stopped`), as does one whose gradient vanishes or whose loss is not finite; when every search has
    stopped the optimizer is `finished` and the run ends early, its remaining budget unspent. `lr` scales the first
    step of a search (with the direction's length, as torch does).
    """

    description = "L-BFGS per search: own curvature pairs and backtracking line search, restart or stop on a stall"
    rowwise = True  # the run's closure returns each search's loss (M,)
    HISTORY = 10
    MAX_TRIALS = 10
    ARMIJO = 1e-4
    TOLERANCE_GRAD = 1e-7

    def __init__(self, variables: Variables, *, lr: float, **options: float) -> None:
        self.variables, self._lr = variables, lr
        self.settings = {}
        self._reset(_rows(variables).shape)

    def _reset(self, shape: torch.Size) -> None:
        searches, dimension = shape
        self.s = torch.zeros(self.HISTORY, searches, dimension)
        self.y = torch.zeros(self.HISTORY, searches, dimension)
        self.pairs = torch.zeros(searches, dtype=torch.int64)  # valid pairs per search, newest first
        self.loss: Tensor | None = None  # (M,) at the current point, known after a step
        self.grad: Tensor | None = None  # (M, D)
        self.point: Tensor | None = None  # (M, D) where they were measured
        self.failures = torch.zeros(searches, dtype=torch.int64)  # consecutive failed line searches
        self.stopped = torch.zeros(searches, dtype=torch.bool)
        self.stalled_steps = torch.zeros(searches, dtype=torch.int64)  # steps whose line search failed
        self.steps = 0

    @property
    def lr(self) -> float:
        return self._lr

    @property
    def finished(self) -> bool:
        return bool(self.stopped.all())

    def zero_grad(self) -> None:
        for tensor in [self.variables] if isinstance(self.variables, Tensor) else self.variables:
            tensor.grad = None

    def _evaluate(self, closure: Any) -> tuple[Tensor, Tensor]:
        losses = closure().detach().double()
        return torch.nan_to_num(losses, nan=float("inf")), _grad_rows(self.variables).double()

    def _direction(self, grad: Tensor) -> Tensor:
        """-H g per search by the two-loop recursion over its own pairs (newest first)."""
        q = grad.clone()
        alphas = []
        for i in range(self.HISTORY):
            valid = (i < self.pairs).double()
            s, y = self.s[i].double(), self.y[i].double()
            rho = valid / (s * y).sum(dim=1).clamp_min(1e-300)
            alpha = rho * (s * q).sum(dim=1)
            q -= alpha[:, None] * y
            alphas.append((alpha, rho, valid))
        newest_s, newest_y = self.s[0].double(), self.y[0].double()
        gamma = (newest_s * newest_y).sum(dim=1) / (newest_y * newest_y).sum(dim=1).clamp_min(1e-300)
        gamma = torch.where(self.pairs > 0, gamma, torch.ones_like(gamma))
        r = gamma[:, None] * q
        for i in reversed(range(self.HISTORY)):
            alpha, rho, valid = alphas[i]
            beta = rho * (self.y[i].double() * r).sum(dim=1)
            r += (valid * (alpha - beta))[:, None] * self.s[i].double()
        return -r

    def step(self, closure: Any) -> None:
        start = _rows(self.variables).double()
        if self.loss is None or self.grad is None or self.point is None or not torch.equal(start, self.point):
            self.loss, self.grad = self._evaluate(closure)  # first step, or the variables moved since (a projection)
        loss, grad = self.loss, self.grad
        # Converged (a vanishing gradient, torch's tolerance_grad) or broken (a non-finite loss or gradient): stop.
        self.stopped |= (grad.abs().amax(dim=1) <= self.TOLERANCE_GRAD) | ~torch.isfinite(loss)
        self.stopped |= ~torch.isfinite(grad).all(dim=1)
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        direction = self._direction(grad)
        slope = (grad * direction).sum(dim=1)
        uphill = ~(slope < 0)  # not a descent direction (or NaN): forget the pairs, go down the gradient
        self.pairs[uphill] = 0
        direction[uphill], slope[uphill] = -grad[uphill], -(grad[uphill] ** 2).sum(dim=1)
        fresh = self.pairs == 0
        length = grad.abs().sum(dim=1).clamp_min(1e-12)
        step = torch.where(fresh, self._lr * torch.clamp(1 / length, max=1.0), torch.full_like(length, self._lr))
        moving = ~self.stopped & (slope < 0)
        accepted = ~moving
        point, new_loss, new_grad = start.clone(), loss.clone(), grad.clone()
        for _ in range(self.MAX_TRIALS):
            trial = torch.where(accepted[:, None], point, start + step[:, None] * direction)
            _set_rows(self.variables, trial.to(_rows(self.variables).dtype))
            trial_loss, trial_grad = self._evaluate(closure)
            ok = ~accepted & torch.isfinite(trial_loss) & (trial_loss <= loss + self.ARMIJO * step * slope)
            point = torch.where(ok[:, None], trial, point)
            new_loss = torch.where(ok, trial_loss, new_loss)
            new_grad = torch.where(ok[:, None], trial_grad, new_grad)
            accepted |= ok
            if bool(accepted.all()):
                break
            step = torch.where(accepted, step, step / 2)
        _set_rows(self.variables, point.to(_rows(self.variables).dtype))
        failed = moving & ~accepted
        took = moving & accepted
        s, y = point - start, new_grad - grad
        curvature = (s * y).sum(dim=1)
        keep = took & (curvature > 1e-10 * (y * y).sum(dim=1).sqrt() * (s * s).sum(dim=1).sqrt())
        self.s = torch.where(keep[None, :, None], torch.cat([s[None].float(), self.s[:-1]]), self.s)
        self.y = torch.where(keep[None, :, None], torch.cat([y[None].float(), self.y[:-1]]), self.y)
        self.pairs = torch.where(keep, (self.pairs + 1).clamp(max=self.HISTORY), self.pairs)
        self.pairs[failed] = 0
        self.failures = torch.where(failed, self.failures + 1, torch.zeros_like(self.failures))
        self.stopped |= self.failures >= 2
        self.stalled_steps += failed.long()
        self.loss, self.grad = new_loss, new_grad
        self.point = _rows(self.variables).double()  # as stored (float32), so the next step recognises it
        self.steps += 1

    def restart(self, values: Variables, lr: float) -> None:
        _set_rows(self.variables, _rows(values))
        self._lr = lr
        self._reset(_rows(self.variables).shape)

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self._lr,
            "s": self.s.clone(),
            "y": self.y.clone(),
            "pairs": self.pairs.clone(),
            "loss": None if self.loss is None else self.loss.clone(),
            "grad": None if self.grad is None else self.grad.clone(),
            "point": None if self.point is None else self.point.clone(),
            "failures": self.failures.clone(),
            "stopped": self.stopped.clone(),
            "stalled_steps": self.stalled_steps.clone(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._lr = float(state["lr"])
        self.s, self.y, self.pairs = state["s"].clone(), state["y"].clone(), state["pairs"].clone()
        self.loss = None if state["loss"] is None else state["loss"].clone()
        self.grad = None if state["grad"] is None else state["grad"].clone()
        self.point = None if state.get("point") is None else state["point"].clone()
        self.failures, self.stopped = state["failures"].clone(), state["stopped"].clone()
        self.stalled_steps, self.steps = state["stalled_steps"].clone(), int(state["steps"])


@register_optimizer("nesterov")
class Nesterov(GradientOptimizer):
    """III-D1, after Bojanowski et al. Its default step is 0.1, not the seed's 1: with momentum 0.9 a step of 1
    diverges on the built-in generator (issue 20: criterion 22.8 where Adam reaches 1.5); 0.1 was the best of
    1, 0.3, 0.1, 0.03 and 0.01 on reconstruction and semi-specified targets at 300 calls (bench/inversion.py)."""

    description = "SGD with Nesterov momentum 0.9"
    default_learning_rate = 0.1

    def build(self, parameters: list[Tensor], lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True)


class PopulationOptimizer:
    """Ask/tell over `searches` independent searches in R^dimension, `population` candidates per search per step.

    The search spaces are normalised (z ~ N(0, I), a class vector in units of the embedding table's spread), so
    candidates may be drawn on the unit scale. `budget` is the number of evaluations per search.
    """

    description: ClassVar[str]
    default_population: ClassVar[int] = DEFAULT_POPULATION

    def __init__(self, *, searches: int, dimension: int, population: int, budget: int, seed: int) -> None:
        self.searches, self.dimension, self.population = searches, dimension, population
        self.budget, self.seed = budget, seed

    def ask(self) -> Tensor:
        """Candidates (searches, population, dimension), float32."""
        raise NotImplementedError

    def tell(self, losses: Tensor) -> None:
        """Losses (searches, population) of the candidates of the last `ask()`, lower is better."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


@register_optimizer("random_search")
class RandomSearch(PopulationOptimizer):
    """III-D: "repetitively sampling random z" from the prior N(0, I); the run keeps the best."""

    description = "independent samples from N(0, I), keeping the best"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.generator = torch.Generator().manual_seed(self.seed)

    def ask(self) -> Tensor:
        return torch.randn(self.searches, self.population, self.dimension, generator=self.generator)

    def tell(self, losses: Tensor) -> None:
        del losses  # memoryless

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["rng"])


class NevergradOptimizer(PopulationOptimizer):
    """One nevergrad optimizer per search, with `num_workers = population` so that P candidates can be out at once
    (never more: nevergrad #1461), run with nevergrad's default parameters as in IV-C.

    Checkpoints hold no pickle. Given its seed, a nevergrad optimizer is a deterministic function of the losses it
    was told, so the state is the log of told losses (a float32 tensor, steps x searches x population): loading
    rebuilds fresh optimizers and replays ask/tell with the logged losses, then checks that the replay asks the
    very candidates recorded at the checkpoint (a different nevergrad version fails loudly instead of drifting).
    Replay costs the optimizers' own bookkeeping again (about 0.1 to 0.5 ms per evaluation), no generator call.
    """

    ng_name: ClassVar[str]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._build()

    def _build(self) -> None:
        seeds = np.random.SeedSequence(self.seed).generate_state(self.searches)
        self._optimizers = [self._make(int(seed)) for seed in seeds]
        self._asked: list[list[Any]] | None = None
        self._last_candidates: Tensor | None = None
        self._told: list[Tensor] = []

    def _make(self, seed: int) -> Any:
        parametrization = ng.p.Array(shape=(self.dimension,))
        parametrization.random_state = np.random.RandomState(seed)
        return ng.optimizers.registry[self.ng_name](
            parametrization=parametrization, budget=self.budget, num_workers=self.population
        )

    def ask(self) -> Tensor:
        if self._asked is not None:
            raise RuntimeError("ask() twice without tell(): more outstanding candidates than num_workers")
        self._asked = [[optimizer.ask() for _ in range(self.population)] for optimizer in self._optimizers]
        values = np.stack([np.stack([candidate.value for candidate in row]) for row in self._asked])
        self._last_candidates = torch.from_numpy(values)
        return self._last_candidates.float()

    def tell(self, losses: Tensor) -> None:
        if self._asked is None:
            raise RuntimeError("tell() without ask()")
        losses = losses.detach().float().cpu()
        # nevergrad needs finite losses; a diverged candidate is simply the worst one
        told = torch.nan_to_num(losses, nan=torch.finfo(torch.float32).max)
        for optimizer, row, row_losses in zip(self._optimizers, self._asked, told.tolist(), strict=True):
            for candidate, loss in zip(row, row_losses, strict=True):
                optimizer.tell(candidate, loss)
        self._told.append(told)
        self._asked = None

    def state_dict(self) -> dict[str, Any]:
        if self._asked is not None:
            raise RuntimeError("cannot checkpoint between ask() and tell()")
        empty = torch.empty(0, self.searches, self.population)
        return {
            "nevergrad_version": ng.__version__,
            "told": torch.stack(self._told) if self._told else empty,
            "last_candidates": self._last_candidates if self._last_candidates is not None else torch.empty(0),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._build()
        for losses in state["told"]:
            self.ask()
            self.tell(losses)
        if len(state["told"]) and not torch.equal(self._last_candidates, state["last_candidates"]):
            raise RuntimeError(
                f"replaying {self.ng_name} did not reproduce the checkpoint's candidates (written with nevergrad "
                f"{state['nevergrad_version']}, running {ng.__version__})"
            )


@register_optimizer("TwoPointsDE")
class TwoPointsDE(NevergradOptimizer):
    """The seed's 2PDE."""

    description = "differential evolution with two-point crossover (nevergrad)"
    ng_name = "TwoPointsDE"


@register_optimizer("DE")
class DE(NevergradOptimizer):
    description = "differential evolution (nevergrad)"
    ng_name = "DE"


@register_optimizer("DiscreteDE")
class DiscreteDE(NevergradOptimizer):
    """The seed's DDE."""

    description = "differential evolution with crossover rate 1/d (nevergrad)"
    ng_name = "DiscreteDE"


@register_optimizer("DiscreteOnePlusOne")
class DiscreteOnePlusOne(NevergradOptimizer):
    """The seed's DOPO (Algorithm 1); with P workers, P mutants of the best per step."""

    description = "discrete (1+1) evolution strategy (nevergrad)"
    ng_name = "DiscreteOnePlusOne"


@register_optimizer("CMA")
class CMA(NevergradOptimizer):
    """In nevergrad 1.0.x a chooser among CMA variants (the `cma` package's among them) by dimension and budget."""

    description = "covariance matrix adaptation evolution strategy (nevergrad)"
    ng_name = "CMA"
