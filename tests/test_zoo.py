"""The shipped model zoo: every model loads from the registry with the documented shapes and ranges, the ONNX
exports agree with torch, and the coverage metrics behave as their definitions say."""

from __future__ import annotations

import pytest
import torch

from gansteer_server.algorithms.set_metrics import precision_recall
from gansteer_server.config import BUILTIN_REGISTRY
from gansteer_server.data.scenes import render_scenes
from gansteer_server.models import ModelRegistry, OnnxModel
from gansteer_server.models.architectures.scenes import ScenesDiscriminator, ScenesGenerator
from gansteer_server.zoo.evaluate import EVAL_SEED, SNAPSHOT_PREFIX, predict
from gansteer_server.zoo.train_classifiers import CLASSIFIERS as CLASSIFIER_SPECS
from gansteer_server.zoo.train_classifiers import images_to_tensor
from gansteer_server.zoo.train_gan import GanTrainingConfig, initial_weights

CLASSIFIERS = {"scenes-clf": 10, "scenes-judge": 10, "scenes-clf-alt": 3, "scenes-judge-alt": 3}
JUDGES = {"scenes-judge": "scenes-clf", "scenes-judge-alt": "scenes-clf-alt"}  # judge: the classifier it judges


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


@pytest.mark.parametrize("judge", sorted(JUDGES))
def test_each_judge_is_another_model_of_the_labels_it_judges(zoo: ModelRegistry, judge: str) -> None:
    """A job that optimises against a classifier is judged by a model its result cannot have exploited: the same
    labels, another architecture, another training seed; on real scenes the two agree because both are right."""
    target, specs = JUDGES[judge], {spec.name: spec for spec in CLASSIFIER_SPECS}
    assert zoo.card(judge).class_names == zoo.card(target).class_names
    assert zoo.card(judge).architecture != zoo.card(target).architecture
    assert specs[judge].seed != specs[target].seed
    scenes = render_scenes(300, seed=EVAL_SEED)
    truth = torch.from_numpy(scenes.labels if specs[judge].label_set == "class" else scenes.times)
    images = images_to_tensor(scenes.images)
    judged, optimised = predict(zoo.load(judge), images), predict(zoo.load(target), images)
    assert (judged == truth).float().mean() > 0.98 and (optimised == truth).float().mean() > 0.98


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


def test_the_zoo_stays_within_its_weight_budget() -> None:
    size = sum(f.stat().st_size for f in BUILTIN_REGISTRY.rglob("*") if f.is_file())
    assert size <= 30 * 2**20


def test_training_snapshots_are_weaker_generators_with_the_same_interface(zoo: ModelRegistry) -> None:
    snapshots = sorted((c for c in zoo.list() if c.name.startswith(SNAPSHOT_PREFIX)), key=lambda c: c.extra["step"])
    assert len(snapshots) >= 3
    final = zoo.card("scenes-gen")
    z = torch.randn(4, 128, generator=torch.Generator().manual_seed(6))
    for card in snapshots:
        assert card.extra["snapshot_of"] == "scenes-gen" and card.extra["step"] < GanTrainingConfig.steps
        assert (card.latent_size, card.num_classes, card.embedding_size) == (128, 10, 128)
        with torch.no_grad():
            images = zoo.load(card.ref)(z, torch.tensor([1, 2, 3, 4]))
        assert images.shape == (4, 3, 32, 32) and images.std() > 0.1
        # The point of a snapshot: its samples are judged worse than the shipped generator's.
        accuracy = card.metrics["generated_class_accuracy"]
        assert accuracy < final.metrics["generated_class_accuracy"]


def test_training_resumes_from_the_shipped_weights_with_spectral_norm_put_back(zoo: ModelRegistry) -> None:
    """A machine without the training's checkpoints starts the polish from the zoo: the folded weights, wrapped
    in spectral norm again, give the shipped generator's images."""
    config = GanTrainingConfig()
    weights = initial_weights(None, "scenes-gen", "scenes-disc")
    generator = ScenesGenerator(widths=config.generator_widths)
    generator.load_state_dict(weights["generator"])
    ScenesDiscriminator(widths=config.discriminator_widths).load_state_dict(weights["discriminator"])
    z, ids = torch.randn(8, 128, generator=torch.Generator().manual_seed(7)), torch.arange(8)
    with torch.no_grad():
        resumed, shipped = generator.eval()(z, ids), zoo.load("scenes-gen")(z, ids)
    assert (resumed - shipped).abs().mean() < 0.02


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
