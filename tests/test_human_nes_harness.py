"""The known-gradient harness: the simulated pairwise person's scale, and cosines that grow with the queries on a
judgement whose gradient is known."""

from __future__ import annotations

import torch

from gansteer_server.algorithms import human_nes as hn
from gansteer_server.algorithms.human_nes.harness import PairwisePerson, measure, quantise


def test_quantise_to_a_five_point_scale_with_a_tie() -> None:
    values = torch.tensor([-1.0, -0.8, -0.2, 0.1, 0.3, 0.74, 2.0])
    assert quantise(values, 5).tolist() == [-1.0, -1.0, 0.0, 0.0, 0.5, 0.5, 1.0]
    assert quantise(values, 2).tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]


def _linear_person(w: torch.Tensor, **kwargs: float) -> PairwisePerson:
    return PairwisePerson(judgement=lambda x: x.reshape(len(x), -1) @ w, **kwargs)  # type: ignore[arg-type]


def test_cosine_grows_with_queries_and_position_bias_cancels_with_random_sides() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 4, 4, generator=g) * 0.5 - 0.25
    w = torch.randn(16, generator=g)
    few = measure(images, _linear_person(w), queries=8, estimator="even", sigma=0.05, basis=None, trials=5)
    many = measure(images, _linear_person(w), queries=800, estimator="even", sigma=0.05, basis=None, trials=5)
    assert many.mean > few.mean + 0.2 and many.mean > 0.8, (few.mean, many.mean)
    biased = measure(
        images, _linear_person(w, position_bias=0.7), queries=800, estimator="even", sigma=0.05, basis=None, trials=5
    )
    assert biased.mean > 0.6, biased.mean
    assert many.ci95[0] <= many.mean <= many.ci95[1]


def test_uneven_subspace_score_finds_a_gradient_inside_the_basis() -> None:
    g = torch.Generator().manual_seed(1)
    basis = hn.pca_basis(torch.randn(60, 1, 4, 4, generator=g) * torch.linspace(1, 0.1, 16).reshape(1, 1, 4, 4), 6)
    w = basis.components @ torch.randn(6, generator=g)  # a judgement whose gradient lies in span(V)
    images = torch.zeros(4, 1, 4, 4)
    exact = measure(images, _linear_person(w), queries=400, estimator="uneven", sigma=0.2, basis=basis, trials=3)
    assert exact.mean > 0.7, exact.mean
