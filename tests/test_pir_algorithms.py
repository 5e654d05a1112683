"""The PIR core on tiny models: simulated interactions, the estimator's training, and the tuning loop's guards and
checkpoints (seed 000)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from gansteer_server.algorithms.pir.estimator import EstimatorConfig, EstimatorTraining, expected_rate
from gansteer_server.algorithms.pir.interactions import half_of, rate_bins, seed_latent, simulate_interactions
from gansteer_server.algorithms.pir.tuning import PIRTuning, TuningConfig, TuningModels
from gansteer_server.models.architectures import build_architecture
from gansteer_server.models.architectures.scenes import ScenesDiscriminator, ScenesGenerator
from gansteer_server.servers.sampling import draw_latents, seeded_generator

CLF = {"num_classes": 2, "widths": (4, 8, 8), "feature_size": 8}


def test_a_seed_names_the_latent_the_generation_service_draws() -> None:
    for seed in (0, 7, 2**40):
        expected = draw_latents(seeded_generator(seed), 1, 16)[0]
        torch.testing.assert_close(seed_latent(seed, 16), expected, rtol=0, atol=0)
    mean, covariance = torch.arange(4.0), torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(
        seed_latent(3, 4, (mean, covariance)), draw_latents(seeded_generator(3), 1, 4, (mean, covariance))[0]
    )


def test_simulated_interactions_are_binomial_and_reproducible() -> None:
    rates = torch.full((4000,), 0.3)
    counts = simulate_interactions(rates, 1000, seed=1)
    assert torch.equal(counts, simulate_interactions(rates, 1000, seed=1))
    assert counts.dtype == torch.int64 and int(counts.min()) >= 0 and int(counts.max()) <= 1000
    observed = counts.double() / 1000
    assert abs(float(observed.mean()) - 0.3) < 0.002  # sd of the mean: sqrt(0.21 / 1000 / 4000) = 0.00023
    assert abs(float(observed.std()) - (0.21 / 1000) ** 0.5) < 0.002
    assert torch.equal(simulate_interactions(torch.tensor([1.5, -0.2]), 10, seed=0), torch.tensor([10, 0]))


def test_halves_are_disjoint_stable_and_balanced() -> None:
    keys = [f"gen@1|{seed}||{seed % 10}" for seed in range(2000)]
    halves = [half_of(key) for key in keys]
    assert halves == [half_of(key) for key in keys] and set(halves) == {0, 1}
    assert 0.45 < sum(halves) / len(halves) < 0.55
    assert rate_bins(torch.tensor([0.0, 0.005, 0.5, 1.0]), 100).tolist() == [0, 0, 50, 99]


def _colour_images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Flat images whose red share is the rate: 0.2 for half, 0.8 for the other half."""
    generator = torch.Generator().manual_seed(seed)
    high = torch.rand(n, generator=generator) < 0.5
    rates = torch.where(high, 0.8, 0.2)
    images = torch.zeros(n, 3, 32, 32)
    images[:, 0] = (rates * 2 - 1)[:, None, None]
    images[:, 2] = (1 - 2 * rates)[:, None, None]
    return images, rates


def _estimator(bins: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return build_architecture("pir_estimator", backbone="scenes_classifier", backbone_kwargs=CLF, bins=bins)


def test_the_estimator_learns_a_rate_it_can_see_and_reports_a_held_out_loss() -> None:
    images, rates = _colour_images(200, seed=0)
    training = EstimatorTraining(_estimator(), images, rates, EstimatorConfig(bins=10, epochs=15, batch_size=32))
    first = training.step()
    while not training.done:
        training.step()
    assert training.best_loss < first["held_out_loss"] and len(training.held_index) == 20
    estimator = training.finish()
    held_images, held_rates = _colour_images(50, seed=1)
    with torch.no_grad():
        estimate = expected_rate(estimator(held_images), 0.01)
    assert float((estimate - held_rates).abs().mean()) < 0.1
    assert not any(p.requires_grad for p in estimator.parameters()) and not estimator.training


def test_fewer_images_than_bins_are_refused() -> None:
    images, rates = _colour_images(50, seed=0)
    with pytest.raises(ValueError, match="fewer than the estimator's 100 bins"):
        EstimatorTraining(_estimator(100), images, rates, EstimatorConfig(bins=100))


class Constant(nn.Module):
    """An estimator that rates every image the same: a check that never sees an improvement."""

    def __init__(self, bins: int = 10) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.linspace(0, 1, bins), requires_grad=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.logits.expand(len(images), -1) + 0 * images.mean()


def _tuning(check: nn.Module | None, **config: object) -> PIRTuning:
    torch.manual_seed(0)
    generator = ScenesGenerator(z_size=16, num_classes=2, embedding_size=8, widths=(16, 8, 8, 8), spectral_norm=False)
    generator.eval()
    discriminator = ScenesDiscriminator(num_classes=2, widths=(8, 8, 8, 8), spectral_norm=False)
    estimator = _estimator().eval()
    for module in (estimator, *(m for m in (check,) if m is not None)):
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    real, _ = _colour_images(64, seed=2)
    models = TuningModels(
        generator=copy.deepcopy(generator),
        frozen=generator,
        discriminator=discriminator,
        estimator=estimator,
        real_images=real,
        real_labels=torch.zeros(64, dtype=torch.int64),
        latent_size=16,
        num_classes=2,
        check_estimator=check,
    )
    defaults = {"pir_weight": 10.0, "learning_rate": 1e-3, "steps": 8, "batch_size": 4, "check_images": 8}
    return PIRTuning(models, TuningConfig(**(defaults | config)))  # type: ignore[arg-type]


def test_a_check_that_never_improves_stops_the_run_and_returns_the_untuned_weights() -> None:
    run = _tuning(Constant(), check_every=2, patience=2, steps=50, anchor_weight=1.0)
    original = copy.deepcopy(run.models.frozen.state_dict())
    run.start()
    while not run.done:
        run.step()
    assert run.stopped_early and run.step_count == 4 and run.best_step == 0
    for name, value in run.models.generator.state_dict().items():
        torch.testing.assert_close(value, original[name], rtol=0, atol=0)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does() -> None:
    whole = _tuning(_estimator().eval(), check_every=2, patience=10, anchor_weight=1.0)
    whole.start()
    while not whole.done:
        whole.step()
    first = _tuning(_estimator().eval(), check_every=2, patience=10, anchor_weight=1.0)
    first.start()
    for _ in range(3):
        first.step()
    state = copy.deepcopy(first.state_dict())
    resumed = _tuning(_estimator().eval(), check_every=2, patience=10, anchor_weight=1.0)
    resumed.load_state_dict(state)
    while not resumed.done:
        resumed.step()
    for name, value in whole.models.generator.state_dict().items():
        torch.testing.assert_close(resumed.models.generator.state_dict()[name], value, rtol=0, atol=0)
    assert resumed.checks == whole.checks


def test_negative_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="pir_weight"):
        TuningConfig(pir_weight=-1.0)
