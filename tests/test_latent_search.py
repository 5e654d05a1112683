"""Latent search (seed 002) and the evolutionary optimizers of the search core: the GA's binary genes, robustness
as a percentile over perturbations computed in one batch, every optimizer improving a known toy objective, BasinCMA
counting Adam's generator calls, bad options refused by name, and a resumed run that ends where an uninterrupted
one does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from gansteer_server.algorithms.latent_search import (
    LatentSearchConfig,
    LatentSearchModels,
    LatentSearchRun,
    perturbation_values,
    robustness,
)
from gansteer_server.algorithms.search import (
    OPTIMIZERS,
    Budget,
    Evaluation,
    Latents,
    LatentSpace,
    OptionError,
    SearchRun,
    StepSchedule,
    optimizer_options,
    planned_steps,
)
from gansteer_server.algorithms.search.evolution import decode, encode

TARGET = 0.7


class Sphere:
    """-(|z - 0.7|^2): maximised at z = 0.7 everywhere, its best value 0."""

    maximize = True
    term_names = ("distance",)

    def __call__(self, latents: Latents, search_index: Tensor) -> Evaluation:
        distance = (latents.z - TARGET).pow(2).sum(dim=1)
        return Evaluation(-distance, {"distance": distance})


def test_the_ga_encoding_round_trips_a_latent() -> None:
    z = torch.randn(5, 128, generator=torch.Generator().manual_seed(0)).clamp(-3.9, 3.9)
    genes = encode(z, bits=16, bound=4.0)
    assert genes.shape == (5, 128 * 16) and genes.dtype == torch.uint8 and set(genes.unique().tolist()) <= {0, 1}
    step = 8.0 / (2**16 - 1)
    assert (decode(genes, 16, 4.0) - z).abs().max() <= step / 2 + 1e-6
    assert torch.equal(encode(decode(genes, 16, 4.0), 16, 4.0), genes)
    # most significant bit first: flipping bit 0 of a coordinate moves it by half the range
    flipped = genes.clone()
    flipped[0, 0] ^= 1
    assert abs(float(decode(flipped, 16, 4.0)[0, 0] - decode(genes, 16, 4.0)[0, 0])) == pytest.approx(4.0, abs=1e-3)


def test_p10_over_one_batch_equals_a_loop_over_the_perturbations() -> None:
    weights = torch.randn(16, generator=torch.Generator().manual_seed(1))
    calls: list[int] = []

    def value(points: Tensor, condition: Tensor | None) -> Tensor:
        calls.append(len(points))
        return torch.tanh(points @ weights) + points.pow(2).mean(dim=1)

    z = torch.randn(16, generator=torch.Generator().manual_seed(2))
    batched = perturbation_values(value, z, None, perturbations=200, sigma=0.1, seed=3)
    assert calls == [200]  # all 200 perturbations in one call
    noise = torch.randn(200, 16, generator=torch.Generator().manual_seed(3))
    looped = torch.stack([value((z + 0.1 * noise[i])[None], None)[0] for i in range(200)])
    assert torch.allclose(batched, looped, atol=1e-6)
    assert float(robustness(batched, 10.0)) == pytest.approx(float(np.percentile(looped.numpy(), 10)), abs=1e-5)


@pytest.mark.parametrize("name", ["adam", "cmaes", "ga", "basincma", "random_search", "TwoPointsDE"])
def test_each_optimizer_improves_a_known_toy_objective(name: str) -> None:
    population = {"adam": 1, "basincma": 4}.get(name, 12)
    run = SearchRun(
        LatentSpace(8, 2),
        Sphere(),
        optimizer=name,
        budget=Budget(600, "generator_calls"),
        schedule=StepSchedule(0.1),
        population=population,
        seed=0,
    )
    first = run.step().best_value.clone()
    while not run.done:
        last = run.step().best_value
    assert run.generator_calls <= 600
    assert run.steps == planned_steps(name, {}, Budget(600, "generator_calls"), population, 1)
    assert (last > first).all() and (last > -2.0).all(), (name, first, last)  # start: about -8 (8 dims of ~1)


def test_basincma_counts_every_adam_step_as_generator_calls() -> None:
    options = {"refine_steps": 5, "refine_lr": 0.1, "final_fraction": 0.0}
    run = SearchRun(
        LatentSpace(8, 3),
        Sphere(),
        optimizer="basincma",
        budget=Budget(100, "generator_calls"),
        population=4,
        seed=0,
        options=options,
    )
    assert run.step_cost == 4 * 5
    run.step()
    assert run.generator_calls == 20  # 4 candidates x 5 Adam evaluations, per search
    while not run.done:
        run.step()
    assert run.steps == 5 and run.generator_calls == 100


def test_basincma_ends_with_adam_from_its_best_points_within_the_budget() -> None:
    run = SearchRun(
        LatentSpace(8, 3),
        Sphere(),
        optimizer="basincma",
        budget=Budget(100, "generator_calls"),
        population=4,
        seed=0,
        options={"refine_steps": 5, "final_fraction": 0.5},
    )
    while run.generator_calls < 60:  # three BasinCMA steps of 20 calls: the third starts below half the budget
        run.step()
    assert run.steps == 3 and run._final is None
    before = run.best_values.clone()
    while not run.done:
        run.step()
    assert run.steps == 3 + 40 and run.generator_calls == 100  # then one call per Adam step
    options = {"refine_steps": 5, "final_fraction": 0.5}
    assert planned_steps("basincma", options, Budget(100, "generator_calls"), 4, 1) == 43
    assert (run.best_values >= before).all()


@pytest.mark.parametrize(
    ("name", "options", "key"),
    [
        ("cmaes", {"sigma": 0.0}, "sigma"),
        ("cmaes", {"sigma": -1.0}, "sigma"),
        ("ga", {"mutation": 1.0}, "mutation"),
        ("ga", {"mutation": 0.0}, "mutation"),
        ("ga", {"bits": 2.5}, "bits"),
        ("adam", {"sigma": 0.5}, "sigma"),
        ("cmaes", {"sigmaa": 0.5}, "sigmaa"),
    ],
)
def test_bad_optimizer_options_are_refused_by_name(name: str, options: dict[str, float], key: str) -> None:
    with pytest.raises(OptionError) as caught:
        optimizer_options(name, options)
    assert caught.value.name == key


def test_the_evolutionary_optimizers_are_registered_with_their_defaults() -> None:
    assert OPTIMIZERS["cmaes"].default_population == 15 and OPTIMIZERS["ga"].default_population == 16
    assert optimizer_options("cmaes", {}) == {"sigma": 0.5}
    assert optimizer_options("ga", {})["mutation"] == 0.01


def _toy_models() -> LatentSearchModels:
    torch.manual_seed(0)
    generator = torch.nn.Sequential(torch.nn.Linear(8, 3 * 4 * 4), torch.nn.Tanh()).eval()
    classifier = torch.nn.Linear(3 * 4 * 4, 3).eval()

    def generate(z: Tensor, condition: Tensor | None) -> Tensor:
        return generator(z).view(-1, 3, 4, 4)

    def objective(images: Tensor, classes: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        logits = classifier(images.flatten(1))
        assert classes is not None
        value = logits.gather(1, classes[:, None])[:, 0]
        return value, {"class_logit": value}

    def logits(images: Tensor) -> Tensor:
        return classifier(images.flatten(1))

    return LatentSearchModels(
        generator=generate,
        z_size=8,
        objective=objective,
        term_names=("class_logit",),
        class_embeddings=torch.randn(3, 4),
        judge=logits,
        classifier=logits,
    )


@pytest.mark.parametrize(("optimizer", "checkpoint_at"), [("adam", 3), ("cmaes", 3), ("ga", 3), ("basincma", 9)])
def test_a_resumed_latent_search_ends_where_an_uninterrupted_one_does(optimizer: str, checkpoint_at: int) -> None:
    config = LatentSearchConfig(
        optimizer=optimizer,
        options=(("refine_steps", 3),) if optimizer == "basincma" else (),
        budget=90,
        population={"adam": 1, "basincma": 4}.get(optimizer, 6),
        restarts=2,
        class_mode="conditioned",
        class_ids=(0, 2),
        perturbations=20,
        seed=4,
    )
    whole = LatentSearchRun(config, _toy_models())
    while not whole.done:
        whole.step()
    part = LatentSearchRun(config, _toy_models())
    for _ in range(checkpoint_at):  # basincma: past its BasinCMA steps, into the final Adam phase
        part.step()
    resumed = LatentSearchRun(config, _toy_models())
    resumed.load_state_dict(part.state_dict())
    while not resumed.done:
        resumed.step()
    expected, got = whole.result(), resumed.result()
    assert len(got) == 4 and [r.class_id for r in got] == [0, 0, 2, 2] and [r.restart for r in got] == [0, 1, 0, 1]
    for a, b in zip(expected, got, strict=True):
        assert a.objective == b.objective and torch.equal(a.z, b.z) and a.robustness == b.robustness
        assert a.robustness <= max(a.perturbed.tolist()) and a.judge_prob is not None
        assert a.objective > float(a.curve[0]) or a.objective == pytest.approx(float(a.curve[0]))
