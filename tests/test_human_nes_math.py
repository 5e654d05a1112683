"""Human NES's estimator and update (seed 004): the subspace score against the direct inverse where the inverse
exists, unbiasedness of antithetic pairs on a linear judgement, one backward pass against the seed's per-pixel loop,
and the bases' refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gansteer_server.algorithms import human_nes as hn


def _basis(d: int, q: int, seed: int = 0) -> hn.PCABasis:
    images = torch.randn(3 * d, 1, 1, d, generator=torch.Generator().manual_seed(seed))
    images = images * torch.linspace(2.0, 0.2, d)  # uneven variances, so D is not a multiple of I
    return hn.pca_basis(images, q)


def test_subspace_score_equals_the_direct_inverse_on_a_full_rank_case() -> None:
    basis = _basis(d=12, q=12)
    sigma = 0.3
    perturbations = hn.draw(2, 5, sigma, basis, torch.Generator().manual_seed(1))
    v = basis.components.double()
    full = sigma**2 * v @ torch.diag(basis.eigenvalues.double()) @ v.T  # Sigma = V sigma^2 D V^T, invertible at q = D
    direct = perturbations.delta.double() @ torch.linalg.inv(full).T
    torch.testing.assert_close(perturbations.score.double(), direct, rtol=1e-4, atol=1e-4)


def test_subspace_score_is_the_pseudo_inverse_when_q_is_below_the_dimension() -> None:
    basis = _basis(d=12, q=4)
    sigma = 0.5
    perturbations = hn.draw(1, 6, sigma, basis, torch.Generator().manual_seed(2))
    v = basis.components.double()
    full = sigma**2 * v @ torch.diag(basis.eigenvalues.double()) @ v.T
    direct = perturbations.delta.double() @ torch.linalg.pinv(full, hermitian=True).T
    torch.testing.assert_close(perturbations.score.double(), direct, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["even", "uneven"])
def test_antithetic_pairs_are_unbiased_on_a_linear_judgement(kind: str) -> None:
    d, q = 10, 10
    basis = None if kind == "even" else _basis(d=d, q=q)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(d, generator=g)  # D(x) = w . x: its gradient is w everywhere
    x = torch.randn(1, d, generator=g)
    n, r = 4000, 8
    p = hn.draw(n, r, 0.2, basis, g, dim=d)
    plus, minus = (x + p.delta) @ w, (x - p.delta) @ w
    estimates = hn.estimate(plus - minus, p.score)  # (n, d), each from r pairs
    mean = estimates.mean(0)
    standard_error = estimates.std(0) / n**0.5
    assert ((mean - w).abs() < 4 * standard_error + 1e-6).all(), (mean, w, standard_error)
    # and the mean is far from zero: the test could fail for a biased (or sign-flipped) estimator
    assert hn.cosine(mean[None], w[None]).item() > 0.99


def test_uneven_estimate_is_unbiased_for_the_projected_gradient() -> None:
    d, q = 10, 3
    basis = _basis(d=d, q=q)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(d, generator=g)
    p = hn.draw(6000, 4, 0.3, basis, g)
    estimates = hn.estimate(2 * p.delta @ w, p.score)
    projected = basis.components @ (basis.components.T @ w)
    standard_error = estimates.std(0) / len(estimates) ** 0.5
    assert ((estimates.mean(0) - projected).abs() < 4 * standard_error + 1e-6).all()


def test_answers_map_back_through_the_sides_shown() -> None:
    scores = torch.tensor([[0.5, -1.0, 0.0, 1.0]])
    plus_left = torch.tensor([[True, False, True, False]])
    assert hn.differences_from_answers(scores, plus_left).tolist() == [[0.5, 1.0, 0.0, -1.0]]
    sides = hn.pair_sides(10_000, torch.Generator().manual_seed(0))
    assert 0.45 < float(sides.float().mean()) < 0.55


def test_one_backward_pass_equals_the_per_pixel_sum() -> None:
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(6, 48), nn.Tanh(), nn.Linear(48, 3 * 4 * 4), nn.Tanh())
    z = torch.randn(5, 6)
    parameters = list(generator.parameters())

    def render() -> torch.Tensor:
        return generator(z).reshape(5, 3, 4, 4)

    g_hat = torch.randn(5, 3, 4, 4)
    fast = hn.parameter_gradient(render, g_hat, parameters)
    slow = hn.per_pixel_gradient(render, g_hat, parameters)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(float(a.abs().max()) > 1e-3 for a in fast)


def test_ascend_raises_a_linear_judgement_of_the_images() -> None:
    torch.manual_seed(1)
    generator = nn.Sequential(nn.Linear(4, 3 * 2 * 2))
    z = torch.randn(8, 4)
    w = torch.randn(3 * 2 * 2)

    def render() -> torch.Tensor:
        return generator(z).reshape(8, 3, 2, 2)

    with torch.no_grad():
        before = float((render().reshape(8, -1) @ w).sum())
    optimizer = hn.adam(generator.parameters(), lr=1e-2)
    for _ in range(5):
        hn.ascend(render, w.expand(8, -1), optimizer)
    with torch.no_grad():
        assert float((render().reshape(8, -1) @ w).sum()) > before
    assert optimizer.defaults["betas"] == (0.5, 0.999)


def test_basis_refuses_q_past_the_rank_and_too_few_images() -> None:
    images = torch.randn(5, 3, 4, 4)
    assert hn.max_components(images) == 4
    with pytest.raises(hn.BasisError) as raised:
        hn.pca_basis(images, 5)
    assert raised.value.field == "basis_components"
    with pytest.raises(hn.BasisError) as raised:
        hn.pca_basis(images[:1], 0)
    assert raised.value.field == "basis_images"
    basis = hn.pca_basis(images, 0)
    assert basis.q == 4 and (basis.eigenvalues[:-1] >= basis.eigenvalues[1:]).all()
    torch.testing.assert_close(basis.components.T @ basis.components, torch.eye(4), atol=1e-5, rtol=0)


def test_the_sources_formula_is_unusable_where_the_subspace_score_is_not() -> None:
    basis = hn.pca_basis(torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(5)), 8)
    p = hn.draw(1, 3, 0.5, basis, torch.Generator().manual_seed(6))
    source = hn.source_score(p.delta, basis, 0.5)
    ratio = source.norm() / p.score.norm()
    assert not torch.isfinite(ratio) or ratio > 100, ratio


def test_forking_counts_latents_that_move_toward_the_later_snapshot() -> None:
    later = torch.zeros(4, 1, 2, 2)
    before = torch.ones(4, 1, 2, 2)
    after = before.clone()
    after[:1] = 0.5  # closer
    after[1:2] = 2.0  # farther
    result = hn.forking(before, after, later)
    assert result.closer_fraction == 0.25
    assert result.relative_change[0] < 0 < result.relative_change[1]
