"""The procedural `scenes` data set: deterministic, varied, and learnable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gansteer_server.data.scenes import CLASS_NAMES, TIME_NAMES, render_scenes


def test_same_seed_same_images_other_seed_other_images() -> None:
    first, again, other = render_scenes(64, seed=3), render_scenes(64, seed=3), render_scenes(64, seed=4)
    assert np.array_equal(first.images, again.images)
    assert np.array_equal(first.labels, again.labels) and np.array_equal(first.times, again.times)
    assert not np.array_equal(first.images, other.images)


@pytest.mark.parametrize("resolution", [8, 16, 32, 64, 128])
def test_renders_every_power_of_two_up_to_128(resolution: int) -> None:
    scenes = render_scenes(20, seed=0, resolution=resolution)
    assert scenes.images.shape == (20, resolution, resolution, 3) and scenes.images.dtype == np.uint8


@pytest.mark.parametrize("resolution", [4, 48, 256])
def test_refuses_other_resolutions(resolution: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        render_scenes(1, resolution=resolution)


def test_layout_does_not_depend_on_resolution() -> None:
    small = render_scenes(40, seed=5, resolution=32).images.astype(float)
    large = render_scenes(40, seed=5, resolution=128).images.astype(float)
    pooled = large.reshape(40, 32, 4, 32, 4, 3).mean(axis=(2, 4))
    assert np.abs(pooled - small).mean() < 12  # grain and per-pixel details differ, the scene does not


def test_every_class_and_time_appears_and_the_labels_are_independent() -> None:
    scenes = render_scenes(6000, seed=1)
    counts = np.zeros((len(CLASS_NAMES), len(TIME_NAMES)))
    np.add.at(counts, (scenes.labels, scenes.times), 1)
    expected = counts.sum(1, keepdims=True) * counts.sum(0, keepdims=True) / counts.sum()
    assert counts.min() > 0
    chi_square = ((counts - expected) ** 2 / expected).sum()
    assert chi_square < 60  # 18 degrees of freedom: independent labels stay far below this


def test_images_of_one_class_vary() -> None:
    scenes = render_scenes(2000, seed=2)
    for class_id in range(len(CLASS_NAMES)):
        images = scenes.images[scenes.labels == class_id].astype(float)
        assert images.std(axis=0).mean() > 10, CLASS_NAMES[class_id]


def test_classes_are_separable_by_a_tiny_model_in_a_few_steps() -> None:
    torch.manual_seed(0)
    train, test = render_scenes(3000, seed=10), render_scenes(500, seed=11)

    def tensor(images: np.ndarray) -> torch.Tensor:
        return F.avg_pool2d(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, 4)

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 64, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    x, y = tensor(train.images), torch.from_numpy(train.labels)
    for _ in range(300):
        index = torch.randint(0, len(x), (128,))
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (model(tensor(test.images)).argmax(1) == torch.from_numpy(test.labels)).float().mean()
    assert accuracy > 0.8
