"""The shipped model zoo: every model loads from the registry with the documented shapes and ranges, the ONNX
exports agree with torch, and the coverage metrics behave as their definitions say."""

from __future__ import annotations

import pytest
import torch

from gansteer_server.algorithms.set_metrics import precision_recall
from gansteer_server.config import BUILTIN_REGISTRY
from gansteer_server.models import ModelRegistry, OnnxModel

CLASSIFIERS = {"scenes-clf": 10, "scenes-judge": 10, "scenes-clf-alt": 3}


@pytest.fixture(scope="module")
def zoo() -> ModelRegistry:
    return ModelRegistry([BUILTIN_REGISTRY])


def test_the_zoo_holds_every_built_in_model(zoo: ModelRegistry) -> None:
    names = {card.name for card in zoo.list()}
    assert {"scenes-gen", "scenes-disc", *CLASSIFIERS} <= names


def test_generator_shapes_range_and_card(zoo: ModelRegistry) -> None:
    card = zoo.card("scenes-gen")
    generator = zoo.load("scenes-gen")
    assert (card.kind, card.latent_size, card.num_classes, card.embedding_size) == ("generator", 128, 10, 128)
    z = torch.randn(4, card.latent_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = generator(z, torch.tensor([0, 3, 6, 9]))
    assert images.shape == (4, 3, card.resolution, card.resolution)
    low, high = card.value_range
    assert images.min() >= low and images.max() <= high
    assert images.std() > 0.1  # a trained generator, not a constant


def test_generator_gives_the_same_image_for_a_class_id_and_its_embedding_row(zoo: ModelRegistry) -> None:
    generator = zoo.load("scenes-gen")
    z = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([2, 5, 7])
    with torch.no_grad():
        by_id = generator(z, ids)
        by_vector = generator(z, generator.embedding.weight[ids].clone())
    torch.testing.assert_close(by_id, by_vector, rtol=0, atol=1e-6)


def test_generator_embedding_rows_are_replaceable(zoo: ModelRegistry) -> None:
    generator = zoo.load("scenes-gen")
    z = torch.randn(2, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = generator(z, torch.tensor([4, 4]))
        generator.embedding.weight[4] = generator.embedding.weight[1]
        after = generator(z, torch.tensor([4, 4]))
        reference = generator(z, torch.tensor([1, 1]))
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference, rtol=0, atol=1e-6)


def test_discriminator_scores_each_image(zoo: ModelRegistry) -> None:
    discriminator = zoo.load("scenes-disc")
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert discriminator(images).shape == (5,)
        assert discriminator(images, torch.arange(5)).shape == (5,)


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifiers_shapes_and_features(zoo: ModelRegistry, name: str) -> None:
    model = zoo.load(name)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        logits = model(images)
        features = model.features(images)
    assert logits.shape == (3, CLASSIFIERS[name])
    assert {"stage1", "stage2", "stage3", "penultimate"} <= set(features)
    assert features["penultimate"].ndim == 2


@pytest.mark.parametrize("name", ["scenes-gen", *sorted(CLASSIFIERS)])
def test_onnx_export_agrees_with_torch(zoo: ModelRegistry, name: str) -> None:
    model, exported = zoo.load(name), zoo.load(name, prefer_onnx=True)
    assert isinstance(exported, OnnxModel)
    torch.manual_seed(3)
    with torch.no_grad():
        if name == "scenes-gen":
            z, ids = torch.randn(6, 128), torch.arange(6)
            embedding = model.embedding.weight[ids]
            torch.testing.assert_close(exported(z, embedding), model(z, ids), rtol=0, atol=1e-4)
        else:
            images = torch.rand(6, 3, 32, 32) * 2 - 1
            torch.testing.assert_close(exported(images), model(images), rtol=0, atol=1e-4)


def test_precision_and_recall_are_about_one_for_two_samples_of_one_distribution() -> None:
    generator = torch.Generator().manual_seed(4)
    first, second = torch.randn(1000, 8, generator=generator), torch.randn(1000, 8, generator=generator)
    precision, recall = precision_recall(first, second)
    assert precision > 0.85 and recall > 0.85


def test_recall_is_about_zero_for_a_sample_collapsed_to_a_few_points() -> None:
    generator = torch.Generator().manual_seed(5)
    real = torch.randn(1000, 8, generator=generator)
    collapsed = real[:4].repeat(250, 1) + 1e-3 * torch.randn(1000, 8, generator=generator)
    precision, recall = precision_recall(real, collapsed)
    assert recall < 0.05 and precision > 0.9
