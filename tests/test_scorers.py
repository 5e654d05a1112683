"""The scoring core on tiny random models: every output's shape, gradients, the seed 000 objectives' definitions,
binomial noise, and clear errors naming the request field."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gansteer_server.algorithms import scorers
from gansteer_server.algorithms.objectives import COLOURS, filter_ratio
from gansteer_server.algorithms.scorers import (
    BinomialNoise,
    MissingModelError,
    ScorerInputError,
    ScoringModels,
    UnknownOutputError,
    apply_binomial_noise,
    compute_output,
    objective,
    objective_and_grad,
    validate_params,
)
from gansteer_server.models.architectures.scenes import ScenesClassifier, ScenesDiscriminator

NUM_CLASSES, BINS = 10, 10


class TinyPirEstimator(nn.Module):
    """Logits over BINS bins of [0, 1], like seed 000's estimator (appendix C.3)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, BINS)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.mean(dim=(2, 3)))


class FixedLogits(nn.Module):
    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], -1)


@pytest.fixture(scope="module")
def models() -> ScoringModels:
    torch.manual_seed(0)
    classifier = ScenesClassifier(num_classes=NUM_CLASSES, widths=(8, 16, 32), feature_size=16).eval()
    return ScoringModels(
        classifier=classifier,
        discriminator=ScenesDiscriminator(num_classes=NUM_CLASSES, widths=(8, 16, 16, 16)).eval(),
        feature_extractor=classifier,
        pir_estimator=TinyPirEstimator().eval(),
    )


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def solid(*rgb_per_band: tuple[float, float, float], size: int = 12) -> Tensor:
    """One image (1, 3, size, size) in [-1, 1] whose vertical bands, left to right, have the given [0, 1] colours."""
    bands = torch.tensor_split(torch.zeros(1, 3, size, size), len(rgb_per_band), dim=3)
    for band, rgb in zip(bands, rgb_per_band, strict=True):
        band += torch.tensor(rgb)[None, :, None, None]
    return torch.cat(bands, dim=3) * 2 - 1


RED, GREEN, BLUE, WHITE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0)

# (output, params, shape for N = 3 images)
SHAPES: list[tuple[str, dict[str, Any], tuple[int, ...]]] = [
    ("logits", {}, (3, NUM_CLASSES)),
    ("log_probs", {}, (3, NUM_CLASSES)),
    ("probs", {}, (3, NUM_CLASSES)),
    ("class_logit", {"class_id": 2}, (3,)),
    ("class_log_prob", {"class_id": 2}, (3,)),
    ("class_prob", {"class_id": 2}, (3,)),
    ("top_k_log_probs", {"k": 4}, (3, 4)),
    ("top_k_indices", {"k": 4}, (3, 4)),
    ("realism", {}, (3,)),
    ("realism", {"class_id": 3}, (3,)),
    ("features", {"layer": "stage2"}, (3, 16 * 8 * 8)),
    ("feature_stats", {"layer": "stage3"}, (3, 2 * 32)),
    ("pir", {}, (3,)),
    ("filter_norm_ratio", {"layer": "stage1", "k": 3}, (3,)),
    ("colour_single", {}, (3,)),
    ("colour_two", {"left": "green", "right": "red"}, (3,)),
    ("colour_three", {}, (3,)),
]
SCALAR_TERMS = [(name, params) for name, params, shape in SHAPES if shape == (3,)]


def test_registry_lists_every_output_with_its_parameters() -> None:
    names = scorers.output_names()
    assert {name for name, _, _ in SHAPES} <= set(names)
    described = {entry["name"]: entry for entry in scorers.describe_outputs()}
    assert set(described) == set(names)
    ratio = described["filter_norm_ratio"]
    assert ratio["model"] == "feature_extractor" and ratio["is_rate"] and ratio["differentiable"]
    assert {p["name"]: p["default"] for p in ratio["params"]} == {"layer": None, "k": 1, "seed": 0, "offset": -1}
    assert described["colour_two"]["model"] is None
    assert {p["name"]: p["default"] for p in described["colour_three"]["params"]} == {
        "left": "red",
        "middle": "green",
        "right": "blue",
    }
    assert not described["top_k_indices"]["differentiable"]
    assert described["pir"]["params"][0]["default"] == 0.01


@pytest.mark.parametrize(("name", "params", "shape"), SHAPES, ids=[f"{n}{sorted(p)}" for n, p, _ in SHAPES])
def test_each_output_has_one_row_per_image(
    name: str, params: dict[str, Any], shape: tuple[int, ...], models: ScoringModels, images: Tensor
) -> None:
    with torch.no_grad():
        values = compute_output(name, images, models, params)
    assert values.shape == shape
    if scorers.get_output(name).is_rate:
        assert ((values >= 0) & (values <= 1)).all()


def test_outputs_do_not_depend_on_the_rest_of_the_batch(models: ScoringModels, images: Tensor) -> None:
    with torch.no_grad():
        together = compute_output("log_probs", images, models)
        alone = torch.cat([compute_output("log_probs", image[None], models) for image in images])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_top_k_is_the_sorted_head_of_log_probs(models: ScoringModels, images: Tensor) -> None:
    with torch.no_grad():
        log_probs = compute_output("log_probs", images, models)
        top = compute_output("top_k_log_probs", images, models, {"k": 3})
        indices = compute_output("top_k_indices", images, models, {"k": 3})
    torch.testing.assert_close(top, log_probs.gather(1, indices))
    assert (top[:, :-1] >= top[:, 1:]).all()
    assert (top[:, 0] == log_probs.max(dim=1).values).all()


def test_realism_with_a_class_adds_the_projection_term(models: ScoringModels, images: Tensor) -> None:
    with torch.no_grad():
        conditional = compute_output("realism", images, models, {"class_id": 4})
        expected = models.discriminator(images, torch.full((3,), 4))  # type: ignore[misc]
    torch.testing.assert_close(conditional, expected)


def test_pir_is_the_expected_bin_centre_at_the_seed_temperature(images: Tensor) -> None:
    logits = torch.zeros(1, BINS)
    logits[0, 7] = 1.0  # at T = 0.01 the softmax is all but one-hot on bin 7, whose centre is 0.75
    estimator_models = ScoringModels(pir_estimator=FixedLogits(logits).eval())
    torch.testing.assert_close(compute_output("pir", images, estimator_models), torch.full((3,), 0.75))
    flat = ScoringModels(pir_estimator=FixedLogits(torch.zeros(1, BINS)).eval())
    torch.testing.assert_close(compute_output("pir", images, flat, {"temperature": 1.0}), torch.full((3,), 0.5))


@pytest.mark.parametrize(("name", "params"), SCALAR_TERMS, ids=[n + str(sorted(p)) for n, p in SCALAR_TERMS])
def test_gradients_reach_the_images(name: str, params: dict[str, Any], models: ScoringModels, images: Tensor) -> None:
    values, grad, terms = objective_and_grad(images, models, [(name, params, 1.0)])
    assert values.shape == (3,) and grad.shape == images.shape
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(terms[0], values)
    assert all(p.grad is None for p in models.classifier.parameters())  # type: ignore[union-attr]


def test_objective_is_the_weighted_sum_of_its_terms(models: ScoringModels, images: Tensor) -> None:
    terms = [("class_log_prob", {"class_id": 1}, 2.0), ("realism", {}, -0.5), ("colour_single", {}, 3)]
    with torch.no_grad():
        expected = sum(weight * compute_output(name, images, models, params) for name, params, weight in terms)
        torch.testing.assert_close(objective(images, models, terms), expected)


def test_one_classifier_forward_serves_every_term(models: ScoringModels, images: Tensor) -> None:
    calls = []
    handle = models.classifier.register_forward_hook(lambda *_: calls.append(1))  # type: ignore[union-attr]
    try:
        objective_and_grad(
            images, models, [("class_logit", {"class_id": 0}, 1.0), ("class_prob", {"class_id": 1}, 1.0)]
        )
    finally:
        handle.remove()
    assert len(calls) == 1


def pure(colour: str) -> tuple[float, float, float]:
    rgb = [0.0, 0.0, 0.0]
    rgb[COLOURS[colour]] = 1.0
    return (rgb[0], rgb[1], rgb[2])


@pytest.mark.parametrize("colour", list(COLOURS))
def test_single_colour_peaks_on_an_image_of_that_colour(colour: str) -> None:
    others = [pure(other) for other in COLOURS if other != colour]
    pictures = torch.cat([solid(pure(colour)), solid(WHITE), solid((0.5, 0.5, 0.5)), *map(solid, others)])
    values = compute_output("colour_single", pictures, ScoringModels(), {"colour": colour})
    torch.testing.assert_close(values[0], torch.tensor(1.0))
    torch.testing.assert_close(values[1:3], torch.full((2,), 3**-0.5))  # grey of any level: 1/sqrt(3)
    assert (values[3:] < 1e-3).all()


def test_two_colour_wants_its_colours_in_its_halves() -> None:
    pictures = torch.cat([solid(RED, BLUE), solid(BLUE, RED), solid(RED, RED), solid(WHITE, WHITE)])
    values = compute_output("colour_two", pictures, ScoringModels())  # defaults: red left, blue right
    torch.testing.assert_close(values[0], torch.tensor(1.0))
    assert values[1] < 1e-3  # both colours on the wrong side
    torch.testing.assert_close(values[2], torch.tensor(0.5**0.5))  # only the left half counts
    assert values[3] < values[2] < values[0]


def test_three_colour_wants_its_colours_in_its_thirds() -> None:
    pictures = torch.cat([solid(RED, GREEN, BLUE), solid(GREEN, BLUE, RED), solid(WHITE, WHITE, WHITE)])
    values = compute_output("colour_three", pictures, ScoringModels())  # defaults: red, green, blue
    torch.testing.assert_close(values[0], torch.tensor(1.0))
    assert values[1] < 1e-3  # every third holds a wrong colour
    torch.testing.assert_close(values[2], torch.tensor(3**-0.5))
    black = compute_output("colour_three", solid((0.0, 0.0, 0.0)), ScoringModels())
    assert torch.isfinite(black).all() and black.item() < 1e-3


def test_filter_norm_ratio_follows_the_seed_formula(models: ScoringModels, images: Tensor) -> None:
    with torch.no_grad():
        stage1 = models.feature_extractor.features(images)["stage1"]  # type: ignore[union-attr]
        everything = compute_output("filter_norm_ratio", images, models, {"layer": "stage1", "k": 8})
        one = compute_output("filter_norm_ratio", images, models, {"layer": "stage1", "k": 1, "offset": 5})
        sampled = [
            compute_output("filter_norm_ratio", images, models, {"layer": "stage1", "k": 3, "seed": s})
            for s in (0, 0, 1)
        ]
    torch.testing.assert_close(everything, torch.ones(3))
    per_filter = stage1.square().sum(dim=(2, 3))
    torch.testing.assert_close(one, (per_filter[:, 5] / per_filter.sum(dim=1)).sqrt())  # appendix C.4.1
    torch.testing.assert_close(sampled[0], sampled[1])
    assert not torch.equal(sampled[0], sampled[2])
    assert ((sampled[0] > 0) & (sampled[0] < 1)).all()
    dead = filter_ratio(torch.zeros(2, 4, 3, 3), torch.tensor([0, 1]))
    assert torch.isfinite(dead).all()


def test_binomial_noise_is_deterministic_per_seed_and_unbiased() -> None:
    rates = torch.full((4000,), 0.3)
    first = apply_binomial_noise(rates, impressions=100, seed=7)
    assert torch.equal(first, apply_binomial_noise(rates, impressions=100, seed=7))
    assert not torch.equal(first, apply_binomial_noise(rates, impressions=100, seed=8))
    assert abs(first.mean().item() - 0.3) < 0.005  # standard error 0.3 * 0.7 / sqrt(100 * 4000) ~ 0.0007
    torch.testing.assert_close(first * 100, (first * 100).round())
    edges = apply_binomial_noise(torch.tensor([0.0, 1.0, -0.2, 1.3]), impressions=1000, seed=0)
    assert edges.tolist() == [0.0, 1.0, 0.0, 1.0]


def test_noise_applies_to_rates_only(models: ScoringModels, images: Tensor) -> None:
    noisy = compute_output("colour_single", images, models, noise=BinomialNoise(impressions=1000, seed=3))
    assert noisy.shape == (3,) and torch.equal(noisy * 1000, (noisy * 1000).round())
    with pytest.raises(ScorerInputError) as error:
        compute_output("logits", images, models, noise=BinomialNoise(), field="outputs[1]")
    assert error.value.field == "outputs[1].noise"
    with pytest.raises(ScorerInputError) as error:
        compute_output("pir", images, models, noise=BinomialNoise(impressions=0), field="outputs[0]")
    assert error.value.field == "outputs[0].noise.impressions"


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("log_probs", {"k": 3}, "outputs[0].params.k"),
        ("top_k_log_probs", {"k": 0}, "outputs[0].params.k"),
        ("top_k_log_probs", {"k": 2.5}, "outputs[0].params.k"),
        ("top_k_log_probs", {"k": "3"}, "outputs[0].params.k"),
        ("top_k_log_probs", {"k": True}, "outputs[0].params.k"),
        ("class_log_prob", {}, "outputs[0].params.class_id"),
        ("colour_single", {"colour": "purple"}, "outputs[0].params.colour"),
        ("pir", {"temperature": float("nan")}, "outputs[0].params.temperature"),
    ],
)
def test_bad_params_name_their_field(name: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(ScorerInputError) as error:
        validate_params(name, params, field="outputs[0]")
    assert error.value.field == field
    assert field in str(error.value)


def test_params_are_typed_and_defaulted() -> None:
    # protobuf Struct carries every number as a double
    assert validate_params("filter_norm_ratio", {"layer": "stage1", "k": 20.0}) == {
        "layer": "stage1",
        "k": 20,
        "seed": 0,
        "offset": -1,
    }
    assert validate_params("realism", None) == {"class_id": None}


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("top_k_indices", {"k": NUM_CLASSES + 1}, "outputs[2].params.k"),
        ("class_logit", {"class_id": NUM_CLASSES}, "outputs[2].params.class_id"),
        ("realism", {"class_id": NUM_CLASSES}, "outputs[2].params.class_id"),
        ("filter_norm_ratio", {"layer": "stage1", "k": 9}, "outputs[2].params.k"),
        ("filter_norm_ratio", {"layer": "stage1", "k": 2, "offset": 7}, "outputs[2].params.offset"),
        ("feature_stats", {"layer": "conv5"}, "outputs[2].params.layer"),
        ("feature_stats", {"layer": "penultimate"}, "outputs[2].params.layer"),
    ],
)
def test_params_out_of_the_models_range_name_their_field(
    name: str, params: dict[str, Any], field: str, models: ScoringModels, images: Tensor
) -> None:
    with pytest.raises(ScorerInputError) as error:
        compute_output(name, images, models, params, field="outputs[2]")
    assert error.value.field == field


def test_unknown_output_and_missing_model_name_their_field(images: Tensor) -> None:
    with pytest.raises(UnknownOutputError) as unknown:
        compute_output("beauty", images, ScoringModels(), field="outputs[0]")
    assert unknown.value.field == "outputs[0].output"
    with pytest.raises(MissingModelError) as missing:
        compute_output("log_probs", images, ScoringModels(), field="outputs[1]")
    assert missing.value.field == "outputs[1].model" and missing.value.model_field == "classifier"
    assert "classifier" in str(missing.value)


def test_objective_terms_must_be_one_differentiable_number_per_image(models: ScoringModels, images: Tensor) -> None:
    with pytest.raises(ScorerInputError) as error:
        objective(images, models, [("realism", {}, 1.0), ("log_probs", {}, 1.0)])
    assert error.value.field == "terms[1].output.output"
    with pytest.raises(ScorerInputError) as error:
        objective(images, models, [("top_k_indices", {"k": 1}, 1.0)])
    assert error.value.field == "terms[0].output.output"
    with pytest.raises(ScorerInputError) as error:
        objective(images, models, [("realism", {"class_id": -1}, 1.0)])
    assert error.value.field == "terms[0].output.params.class_id"
    with pytest.raises(ScorerInputError) as error:
        objective(images, models, [("realism", {}, float("inf"))])
    assert error.value.field == "terms[0].weight"
    with pytest.raises(ScorerInputError):
        objective(images, models, [])


def test_colour_objectives_need_rgb_images() -> None:
    with pytest.raises(ScorerInputError) as error:
        compute_output("colour_single", torch.zeros(1, 1, 8, 8), ScoringModels(), field="outputs[0]")
    assert error.value.field == "images"


def test_models_in_training_mode_are_refused() -> None:
    with pytest.raises(ValueError, match="training mode"):
        ScoringModels(classifier=ScenesClassifier(widths=(8, 16, 32)))
