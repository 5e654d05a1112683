"""The search core (issue 11): a kind hands `SearchRun` a space and an objective and expects every optimizer to find
the optimum of a simple quadratic in every kind of space, a maximised objective to be searched as its negation,
a population to cost one batched evaluation, and a checkpoint to resume exactly where it stopped.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gansteer_server.algorithms.search import (
    OPTIMIZERS,
    Budget,
    ConditionedLatentSpace,
    EmbeddingRowSpace,
    Evaluation,
    HybridOptimizer,
    LatentClassSpace,
    Latents,
    LatentSpace,
    ParameterSpace,
    SearchRun,
    SearchSpace,
    StepSchedule,
    class_space,
    is_gradient_optimizer,
    optimizer_catalog,
)

GRADIENT = [name for name in OPTIMIZERS if is_gradient_optimizer(name)]
# Gradient-free optimizers that evaluate one population per step (a hybrid also refines it: its own tests are in
# tests/test_latent_search.py).
POPULATION = [
    name for name in OPTIMIZERS if not is_gradient_optimizer(name) and not issubclass(OPTIMIZERS[name], HybridOptimizer)
]
STEP = StepSchedule(learning_rate=0.5)


class Quadratic:
    """|x - centre_m|^2 of each point x that `read` takes from a decoded point, for search m; maximised as its
    negation when `maximize`. Records the number of points of every call."""

    term_names = ("distance",)

    def __init__(self, centre: Tensor, read: Callable[[Any], Tensor], maximize: bool = False) -> None:
        self.centre, self.read, self.maximize = centre, read, maximize
        self.calls: list[int] = []

    def __call__(self, point: Any, search_index: Tensor) -> Evaluation:
        self.calls.append(len(search_index))
        distance = (self.read(point) - self.centre[search_index]).pow(2).sum(dim=1)
        return Evaluation(-distance if self.maximize else distance, {"distance": distance})


def z_of(latents: Latents) -> Tensor:
    return latents.z


def run_to_end(run: SearchRun) -> SearchRun:
    while not run.done:
        run.step()
    return run


def first_and_last(run: SearchRun) -> tuple[Tensor, Tensor]:
    return run.curve[0], run.curve[-1]


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_every_optimizer_approaches_the_optimum_of_a_latent_quadratic(optimizer):
    space = LatentSpace(z_size=4, searches=4)
    centre = torch.full((4, 4), 0.5)
    gradient = is_gradient_optimizer(optimizer)
    run = SearchRun(
        space,
        Quadratic(centre, z_of),
        optimizer=optimizer,
        budget=Budget(30 if gradient else 25),
        schedule=STEP,
        population=8,
        restarts=2,
        seed=1,
    )
    run_to_end(run)
    first, last = first_and_last(run)
    assert run.curve.shape == (run.steps, 2) and (run.curve.diff(dim=0) <= 0).all()
    assert (last < (1e-3 if gradient else 0.5) * first).all()
    best = run.best_rows()
    assert torch.equal(run.best_terms["distance"][best], last)  # terms are reported at the best point


def test_a_conditioned_space_keeps_each_searchs_class():
    class_ids = torch.tensor([2, 2, 0, 0])
    centres = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, -1.0]])
    seen: list[Tensor] = []

    def read(latents: Latents) -> Tensor:
        seen.append(latents.condition)
        return latents.z

    objective = Quadratic(centres[class_ids], read)
    run = run_to_end(
        SearchRun(ConditionedLatentSpace(2, class_ids), objective, optimizer="adam", budget=Budget(40), schedule=STEP)
    )
    assert all(torch.equal(condition, class_ids) for condition in seen)
    torch.testing.assert_close(run.best_variables, centres[class_ids], atol=0.05, rtol=0)


@pytest.mark.parametrize("optimizer", ["adam", "CMA"])
def test_a_class_vector_moves_in_units_of_the_tables_spread_from_its_start(optimizer):
    table = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    space = LatentClassSpace.from_table(2, table, class_ids=torch.tensor([1, 2]), searches=2)
    assert space.dimension == 5 and space.class_scale == pytest.approx(float((table - table.mean(0)).std()))
    start = space.decode(space.initial(0), torch.arange(2))
    assert torch.equal(start.condition, table[[1, 2]])  # u starts at 0: each search at its class's row
    moved = space.decode(torch.ones(1, 5), torch.tensor([0])).condition
    torch.testing.assert_close(moved[0], table[1] + space.class_scale)  # u = 1 is one spread away
    wanted = torch.tensor([[0.0, 0.0, 2.0, 2.0, 2.0]]).expand(2, -1)

    def read(latents: Latents) -> Tensor:
        return torch.cat([latents.z, latents.condition], dim=1)

    run = SearchRun(space, Quadratic(wanted, read), optimizer=optimizer, budget=Budget(40), schedule=STEP)
    run_to_end(run)
    first, last = first_and_last(run)
    assert (last < 0.01 * first).all()
    assert run.best_variables.shape == (2, 5)


@pytest.mark.parametrize("optimizer", ["nesterov", "DiscreteOnePlusOne"])
def test_an_embedding_row_is_searched_from_its_row(optimizer):
    table = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    space = EmbeddingRowSpace.from_table(table, row=3, searches=2, jitter=0.1)
    assert space.dimension == 6
    start = space.decode(space.initial(0), torch.arange(2))
    assert torch.allclose(start, table[3].expand(2, -1), atol=0.5) and not torch.equal(start[0], start[1])
    wanted = table[1].expand(2, -1)
    run = SearchRun(space, Quadratic(wanted, lambda rows: rows), optimizer=optimizer, budget=Budget(30), schedule=STEP)
    run_to_end(run)
    first, last = first_and_last(run)
    assert (last < 0.5 * first).all()


class LinearFit:
    """The mean squared error of a linear model on fixed data: a generator-parameter search in miniature."""

    term_names: tuple[str, ...] = ()
    maximize = False

    def __init__(self, model: nn.Linear) -> None:
        self.model = model
        data = torch.Generator().manual_seed(3)
        self.x = torch.randn(16, 3, generator=data)
        self.y = self.x @ torch.randn(3, 2, generator=data)

    def __call__(self, parameters: list[Tensor], search_index: Tensor) -> Evaluation:
        assert all(p is q for p, q in zip(parameters, self.model.parameters(), strict=True))  # tuned in place
        return Evaluation((self.model(self.x) - self.y).pow(2).mean()[None], {})


def linear_fit_run(optimizer: str = "adam", budget: int = 60) -> tuple[SearchRun, nn.Linear]:
    torch.manual_seed(2)
    model = nn.Linear(3, 2)
    space = ParameterSpace(list(model.parameters()))
    return SearchRun(space, LinearFit(model), optimizer=optimizer, budget=Budget(budget), schedule=STEP), model


def test_generator_parameters_are_tuned_in_place_with_adam():
    run, model = linear_fit_run()
    before = [p.detach().clone() for p in model.parameters()]
    assert run.space.dimension == 3 * 2 + 2
    run_to_end(run)
    first, last = first_and_last(run)
    assert float(last[0]) < 1e-3 * float(first[0])
    assert not torch.equal(model.weight.detach(), before[0])
    assert [p.shape for p in run.best_variables] == [p.shape for p in before]
    assert run.generator_calls == 60  # one evaluation per step


def test_generator_parameters_refuse_a_gradient_free_optimizer():
    with pytest.raises(ValueError, match="needs a gradient optimizer"):
        linear_fit_run("CMA")


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs", "DE"])
def test_a_maximised_objective_is_searched_exactly_as_its_negation(optimizer):
    centre = torch.full((2, 3), -0.5)

    def run(maximize: bool) -> SearchRun:
        objective = Quadratic(centre, z_of, maximize=maximize)
        space = LatentSpace(z_size=3, searches=2)
        return run_to_end(
            SearchRun(space, objective, optimizer=optimizer, budget=Budget(12), schedule=STEP, population=4)
        )

    maximised, minimised = run(True), run(False)
    assert torch.equal(maximised.best_variables, minimised.best_variables)
    assert torch.equal(maximised.best_values, -minimised.best_values)
    assert torch.equal(maximised.curve, -minimised.curve)
    assert (maximised.curve.diff(dim=0) >= 0).all() and (maximised.curve <= 0).all()  # best so far, in its sense


@pytest.mark.parametrize("optimizer", POPULATION)
def test_a_population_is_one_batched_evaluation_and_counts_per_group(optimizer):
    objective = Quadratic(torch.zeros(6, 2), z_of)
    space = LatentSpace(z_size=2, searches=6)
    run = SearchRun(
        space, objective, optimizer=optimizer, budget=Budget(48, "generator_calls"), population=4, restarts=2
    )
    run_to_end(run)
    assert objective.calls == [6 * 4] * 6  # searches x population, once per step
    assert run.generator_calls == 48  # per group: restarts x population = 8 per step


def test_a_checkpoint_of_another_optimizer_or_space_is_refused():
    objective = Quadratic(torch.zeros(4, 2), z_of)
    run = SearchRun(LatentSpace(2, 4), objective, optimizer="adam", budget=Budget(3))
    run.step()
    with pytest.raises(ValueError, match="optimizer"):
        SearchRun(LatentSpace(2, 4), objective, optimizer="nesterov", budget=Budget(3)).load_state_dict(
            run.state_dict()
        )
    with pytest.raises(ValueError, match="searches"):
        SearchRun(LatentSpace(2, 2), objective, optimizer="adam", budget=Budget(3)).load_state_dict(run.state_dict())
    with pytest.raises(ValueError, match="groups"):
        SearchRun(LatentSpace(2, 3), objective, optimizer="adam", budget=Budget(3), restarts=2)


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def resumed_equals_uninterrupted(make: Callable[[], SearchRun], stop_after: int) -> None:
    uninterrupted = run_to_end(make())
    first = make()
    for _ in range(stop_after):
        first.step()
    resumed = make()  # as a fresh worker process would
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert resumed.steps == stop_after and resumed.generator_calls == first.generator_calls
    run_to_end(resumed)
    assert torch.equal(uninterrupted.curve, resumed.curve)
    assert torch.equal(uninterrupted.best_values, resumed.best_values)
    for expected, got in zip(uninterrupted.best_variables, resumed.best_variables, strict=True):
        assert torch.equal(expected, got)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs", "TwoPointsDE", "CMA", "random_search"])
def test_a_checkpoint_resumes_exactly_like_an_uninterrupted_run(optimizer):
    table = torch.eye(3)

    def make() -> SearchRun:
        space: SearchSpace = LatentClassSpace.from_table(2, table, None, searches=4)
        objective = Quadratic(torch.ones(4, 5), lambda p: torch.cat([p.z, p.condition], dim=1))
        return SearchRun(space, objective, optimizer=optimizer, budget=Budget(9), population=3, restarts=2, seed=4)

    resumed_equals_uninterrupted(make, stop_after=4)  # across the decay at step 6


def test_a_parameter_search_resumes_exactly_into_a_fresh_model():
    resumed_equals_uninterrupted(lambda: linear_fit_run(budget=9)[0], stop_after=4)


def test_the_catalog_lists_every_optimizer_with_its_family_and_defaults():
    catalog = {info.name: info for info in optimizer_catalog()}
    assert list(catalog) == list(OPTIMIZERS)
    assert {"adam", "lbfgs", "nesterov", "random_search", "TwoPointsDE", "DE", "DiscreteDE", "CMA"} <= set(catalog)
    for name, info in catalog.items():
        assert info.gradient == is_gradient_optimizer(name) and info.description
        assert (info.default_learning_rate is not None) == info.gradient
        assert (info.default_population is not None) != info.gradient


class Rosenbrock:
    """Rosenbrock's valley per search, scaled by `scale[m]`: searches of very different difficulty in one batch,
    with NaN where `poison[m]` (a search whose objective breaks, as a diverged generator's would)."""

    maximize = False
    term_names = ()

    def __init__(self, scale: Tensor, poison: Tensor | None = None) -> None:
        self.scale, self.poison = scale, poison

    def __call__(self, latents: Latents, search_index: Tensor) -> Evaluation:
        x, y = latents.z[:, 0], latents.z[:, 1]
        values = self.scale[search_index] * ((1 - x) ** 2 + 100 * (y - x**2) ** 2)
        if self.poison is not None:  # NaN with a zero gradient, so the other searches' gradients stay finite
            values = torch.where(self.poison[search_index], torch.full_like(values, float("nan")), values)
        return Evaluation(values, {})


def test_lbfgs_searches_each_keep_their_own_line_search_and_never_stall_the_others():
    scale = torch.tensor([1.0, 1e-3, 1e3])
    run = SearchRun(
        LatentSpace(z_size=2, searches=3),
        Rosenbrock(scale),
        optimizer="lbfgs",
        budget=Budget(2000, "generator_calls"),
        schedule=StepSchedule(learning_rate=1.0, milestones=()),
    )
    run_to_end(run)
    optimizer = run.optimizer
    # Every search reaches the valley's minimum (1, 1) although their scales differ by 10^6 ...
    assert torch.allclose(run.best_variables, torch.ones(3, 2), atol=1e-3), run.best_variables
    # ... and once all have converged the run ends, its remaining budget unspent.
    assert optimizer.finished and run.generator_calls < 2000  # type: ignore[union-attr]
    assert int(optimizer.stalled_steps.max()) <= 2  # type: ignore[union-attr]


def test_an_lbfgs_search_whose_objective_breaks_stops_alone():
    poison = torch.tensor([False, True])
    run = SearchRun(
        LatentSpace(z_size=2, searches=2),
        Rosenbrock(torch.ones(2), poison),
        optimizer="lbfgs",
        budget=Budget(600, "generator_calls"),
        schedule=StepSchedule(learning_rate=1.0, milestones=()),
    )
    run_to_end(run)
    assert bool(run.optimizer.stopped[1]) and not torch.isfinite(run.best_values[1])  # type: ignore[union-attr]
    assert torch.allclose(run.best_variables[0], torch.ones(2), atol=1e-3)


def test_a_simplex_class_vector_stays_among_the_rows_and_a_shell_latent_on_its_shell():
    table = torch.randn(5, 6, generator=torch.Generator().manual_seed(1)) * 3
    space = class_space("search", 8, 3, table, torch.tensor([0, 2, 4]), class_vector="simplex", shell=True)
    start = space.decode(space.initial(0), torch.arange(3))
    # Each search starts with 90% of the weight on its class's row.
    weights = torch.linalg.lstsq(table.T, start.condition.T).solution.T
    assert torch.allclose(weights[torch.arange(3), torch.tensor([0, 2, 4])], torch.full((3,), 0.9), atol=1e-4)
    wild = torch.randn(3, space.dimension) * 50  # anywhere the optimizer might go
    latents = space.decode(wild, torch.arange(3))
    assert torch.allclose(latents.z.norm(dim=1), torch.full((3,), 8**0.5))
    # A convex combination of the rows: inside their bounding box, with norm at most the largest row's.
    assert (latents.condition >= table.min(dim=0).values - 1e-5).all()
    assert (latents.condition <= table.max(dim=0).values + 1e-5).all()
    assert (latents.condition.norm(dim=1) <= table.norm(dim=1).max() + 1e-5).all()
