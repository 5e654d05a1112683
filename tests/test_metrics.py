"""The offline image metrics: each behaves as its definition says on sets whose answer is known, records how it was
measured, and runs without the network."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gansteer_server.algorithms.metrics import (
    FeatureSpace,
    MetricResult,
    accuracy,
    fid_builtin,
    kid_builtin,
    lpips_builtin,
    ms_ssim_3s_k7,
    precision_recall_builtin,
    random_pairs,
    resize_to,
)
from gansteer_server.config import BUILTIN_REGISTRY
from gansteer_server.data.scenes import render_scenes
from gansteer_server.models import ModelRegistry
from gansteer_server.zoo.train_classifiers import images_to_tensor

FIVE_SCALE_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@pytest.fixture(scope="module")
def zoo() -> ModelRegistry:
    return ModelRegistry([BUILTIN_REGISTRY])


@pytest.fixture(scope="module")
def features(zoo: ModelRegistry) -> FeatureSpace:
    return FeatureSpace.from_registry(zoo, "scenes-clf")


@pytest.fixture(scope="module")
def scenes() -> Tensor:
    return images_to_tensor(render_scenes(400, seed=11).images)


def noisy(images: Tensor, sigma: float, seed: int) -> Tensor:
    return (images + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


def test_random_pairs_are_distinct_reproducible_and_cover_every_pair() -> None:
    first, second = random_pairs(5, 2000, seed=7)
    assert first.dtype == second.dtype == torch.int64
    assert bool((first != second).all()) and int(first.min()) >= 0 and int(second.max()) < 5
    assert len({(int(a), int(b)) for a, b in zip(first, second, strict=True)}) == 5 * 4
    again = random_pairs(5, 2000, seed=7)
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])
    assert not torch.equal(first, random_pairs(5, 2000, seed=8)[0])
    with pytest.raises(ValueError, match="at least 2"):
        random_pairs(1, 10, seed=0)


def test_identical_images_give_ms_ssim_one_and_lpips_zero(scenes: Tensor, features: FeatureSpace) -> None:
    copies = scenes[3:4].repeat(8, 1, 1, 1)
    assert ms_ssim_3s_k7(copies, pairs=20).value == pytest.approx(1.0, abs=1e-5)
    assert lpips_builtin(copies, features, pairs=20).value == pytest.approx(0.0, abs=1e-9)


def test_ms_ssim_of_flat_images_is_the_luminance_term_to_the_renormalised_last_weight() -> None:
    # Flat images have no contrast or structure, so every contrast term is 1 and MS-SSIM is the last scale's
    # luminance term l = (2xy + C1) / (x^2 + y^2 + C1) to its weight. In [0, 1] (data range 1) x = 0.5, y = 0.75.
    images = torch.stack([torch.full((3, 32, 32), 0.0), torch.full((3, 32, 32), 0.5)])
    c1 = 0.01**2
    luminance = (2 * 0.5 * 0.75 + c1) / (0.5**2 + 0.75**2 + c1)
    weight = FIVE_SCALE_BETAS[2] / sum(FIVE_SCALE_BETAS[:3])
    assert ms_ssim_3s_k7(images, pairs=10).value == pytest.approx(luminance**weight, rel=1e-5)
    # What the usual mistakes would give instead, so that this test tells them apart:
    assert abs(luminance ** FIVE_SCALE_BETAS[2] - luminance**weight) > 1e-3  # weights not renormalised
    assert abs((4 * c1) / (0.5**2 + 4 * c1) - luminance) > 1e-3  # [-1, 1] taken as it is (data range 2)


def reference_ms_ssim(x: Tensor, y: Tensor, window: int = 7, sigma: float = 6 / 7) -> Tensor:
    """MS-SSIM written from its definition (Wang et al. 2003) in float64, with torchmetrics' border conventions
    (reflection padding; contrast terms over the unpadded interior, the last scale's full SSIM over the image)."""
    betas = torch.tensor(FIVE_SCALE_BETAS[:3], dtype=torch.float64) / sum(FIVE_SCALE_BETAS[:3])
    taps = torch.exp(-((torch.arange(window, dtype=torch.float64) - window // 2) ** 2) / (2 * sigma**2))
    kernel = (torch.outer(taps, taps) / taps.sum() ** 2).expand(3, 1, window, window)
    c1, c2, pad = 0.01**2, 0.03**2, window // 2
    x, y = (x.double() + 1) / 2, (y.double() + 1) / 2
    terms = []
    for scale in range(3):
        padded = [F.pad(t, (pad,) * 4, mode="reflect") for t in (x, y, x * x, y * y, x * y)]
        mu_x, mu_y, xx, yy, xy = (F.conv2d(t, kernel, groups=3) for t in padded)
        var_x, var_y = (xx - mu_x**2).clamp(min=0), (yy - mu_y**2).clamp(min=0)
        contrast = (2 * (xy - mu_x * mu_y) + c2) / (var_x + var_y + c2)
        if scale < 2:
            terms.append(contrast[..., pad:-pad, pad:-pad].flatten(1).mean(1).clamp(min=0))
        else:
            luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
            terms.append((luminance * contrast).flatten(1).mean(1).clamp(min=0))
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.stack(terms).pow(betas.view(-1, 1)).prod(0)


def test_ms_ssim_matches_a_reference_implementation_with_a_7_pixel_window(scenes: Tensor) -> None:
    # Six scenes and noisy copies of them: pairs range from near-copies to unrelated scenes.
    images = torch.cat([scenes[:6], noisy(scenes[:6], 0.15, seed=1)])
    first, second = random_pairs(len(images), 60, seed=2)
    result = ms_ssim_3s_k7(images, pairs=60, seed=2)
    per_pair = reference_ms_ssim(images[first], images[second])
    assert per_pair.min() < 0.3 and per_pair.max() > 0.6
    assert result.value == pytest.approx(float(per_pair.mean()), abs=1e-4)
    # torchmetrics ignores `kernel_size` for Gaussian windows (11 px at its default sigma 1.5): that is measurably
    # another metric, which this comparison would catch.
    eleven = float(reference_ms_ssim(images[first], images[second], window=11, sigma=1.5).mean())
    assert abs(eleven - result.value) > 1e-2


def test_permuting_images_that_no_sampled_pair_uses_changes_nothing(scenes: Tensor, features: FeatureSpace) -> None:
    # Twenty jittered copies of one scene, then twenty different scenes: a pair's distance depends on its halves.
    images = torch.cat([noisy(scenes[:1].repeat(20, 1, 1, 1), 0.05, seed=3), scenes[20:40]])
    first, second = random_pairs(len(images), 8, seed=5)
    used = sorted({int(i) for i in torch.cat([first, second])})
    unused = [i for i in range(len(images)) if i not in used]
    keeps_pairs = torch.arange(len(images))
    keeps_pairs[unused] = torch.tensor(unused[::-1])  # reorder only images that no pair uses
    assert not torch.equal(keeps_pairs, torch.arange(len(images)))
    # Swapping the halves turns copy-copy pairs into scene-scene pairs: with unequal counts the mean must move.
    swaps_halves = (torch.arange(len(images)) + 20) % len(images)
    copy_pairs, scene_pairs = int(((first < 20) & (second < 20)).sum()), int(((first >= 20) & (second >= 20)).sum())
    assert copy_pairs != scene_pairs
    for metric in (
        lambda x: ms_ssim_3s_k7(x, pairs=8, seed=5).value,
        lambda x: lpips_builtin(x, features, pairs=8, seed=5).value,
    ):
        before = metric(images)
        assert metric(images[keeps_pairs]) == pytest.approx(before, abs=1e-6)
        assert abs(metric(images[swaps_halves]) - before) > 0.05  # the same check fails when the pairs change


def test_a_set_of_jittered_copies_is_less_diverse_than_a_set_of_scenes(scenes: Tensor, features: FeatureSpace) -> None:
    copies = noisy(scenes[:1].repeat(32, 1, 1, 1), 0.05, seed=4)
    same_class_scenes = scenes[torch.from_numpy(render_scenes(400, seed=11).labels) == 2][:32]
    varied = scenes[:32]
    ms_ssims = [ms_ssim_3s_k7(s, pairs=100).value for s in (copies, same_class_scenes, varied)]
    lpips = [lpips_builtin(s, features, pairs=100).value for s in (copies, same_class_scenes, varied)]
    assert ms_ssims[0] > ms_ssims[2] + 0.3
    assert lpips[0] < lpips[1] < lpips[2]


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift(scenes: Tensor, features: FeatureSpace) -> None:
    itself = fid_builtin(scenes, scenes, features)
    other_half = fid_builtin(scenes[:200], scenes[200:], features)
    shifted = fid_builtin(scenes, (scenes + 0.3).clamp(-1, 1), features)
    assert itself.value == pytest.approx(0.0, abs=1e-6)
    assert 0 < other_half.value < shifted.value / 3
    assert (itself.n, itself.n_reference, itself.extra["feature_dim"]) == (400, 400, 128)


def test_kid_is_unbiased_near_zero_for_two_halves_of_one_distribution(scenes: Tensor, features: FeatureSpace) -> None:
    f = features.embed(scenes).double()

    def biased_mmd(a: Tensor, b: Tensor) -> float:  # the V-statistic: keeps k(x, x), so positive on average
        k = lambda u, v: (u @ v.T / u.shape[1] + 1) ** 3  # noqa: E731
        return float(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())

    kids, biased = [], []
    for split in range(6):
        order = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(split))
        half, other = order[:200], order[200:]
        kids.append(kid_builtin(scenes[half], scenes[other], features, subsets=20, subset_size=100).value)
        biased.append(biased_mmd(f[half[:100]], f[other[:100]]))
    shifted = kid_builtin(scenes[:200], (scenes[200:] + 0.3).clamp(-1, 1), features, subsets=20, subset_size=100)
    mean_kid, mean_biased = sum(kids) / len(kids), sum(biased) / len(biased)
    assert abs(mean_kid) < 0.3 * mean_biased
    assert shifted.value > 10 * abs(mean_kid) and shifted.value > shifted.extra["std"]


def test_kid_is_reproducible_by_seed_and_leaves_the_global_rng_alone(scenes: Tensor, features: FeatureSpace) -> None:
    state = torch.get_rng_state()
    one = kid_builtin(scenes[:100], scenes[100:200], features, subsets=5, subset_size=50, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert kid_builtin(scenes[:100], scenes[100:200], features, subsets=5, subset_size=50, seed=3) == one
    assert one.extra["subsets"] == 5 and one.extra["subset_size"] == 50 and one.extra["std"] > 0


def test_precision_and_recall_of_a_set_against_itself_are_one(scenes: Tensor, features: FeatureSpace) -> None:
    precision, recall = precision_recall_builtin(scenes[:200], scenes[:200], features, k=3)
    assert (precision.name, recall.name) == ("precision_builtin", "recall_builtin")
    assert precision.value == recall.value == 1.0
    shifted_precision, _ = precision_recall_builtin(scenes[:200], (scenes[200:] + 0.6).clamp(-1, 1), features)
    assert shifted_precision.value < 0.5


def test_a_judge_finds_real_scenes_in_their_class(zoo: ModelRegistry, scenes: Tensor) -> None:
    labels = torch.from_numpy(render_scenes(400, seed=11).labels)
    coasts = scenes[labels == 2]
    judge_ref = zoo.card("scenes-judge").ref
    judge = zoo.load(judge_ref)
    right = accuracy(coasts, judge, 2, judge_ref)
    wrong = accuracy(coasts, judge, 5, judge_ref)
    assert right.value > 0.9 and wrong.value < 0.1
    assert (right.n, right.resize, right.models) == (len(coasts), "none", ("scenes-judge@1",))


def test_every_result_records_n_resize_and_models(scenes: Tensor, features: FeatureSpace) -> None:
    large = F.interpolate(scenes[:150], scale_factor=2, mode="bilinear", align_corners=False)  # 64 px
    resized, mode = resize_to(large, 32)
    assert resized.shape[-2:] == (32, 32) and mode == "bilinear-antialias-to-32"
    assert resize_to(scenes, 32) == (scenes, "none")
    precision, recall = precision_recall_builtin(scenes[:150], large, features)
    results: list[MetricResult] = [
        ms_ssim_3s_k7(large, pairs=30),
        lpips_builtin(large, features, pairs=30),
        fid_builtin(scenes[:150], large, features),
        kid_builtin(scenes[:150], large, features, subsets=5, subset_size=50),
        precision,
        recall,
    ]
    assert [(r.n, r.n_reference) for r in results] == [(30, None), (30, None)] + [(150, 150)] * 4
    mixed = "generated: bilinear-antialias-to-32; reference: none"  # each set's resize when the sets differ
    assert [r.resize for r in results] == ["none", "bilinear-antialias-to-32"] + [mixed] * 4
    assert [r.models for r in results] == [()] + [("scenes-clf@1",)] * 5
    assert results[3].extra["std"] > 0 and precision.extra["k"] == 3
    for result in results:
        assert json.loads(json.dumps(result.to_dict())) == result.to_dict()
    # The resize round trip blurs (FID 1.7 against the originals, more than another real set's 0.7 at this N), yet
    # the 64 px set stays far nearer its 32 px originals than a brightness shift does.
    shifted = fid_builtin(scenes[:150], (scenes[:150] + 0.3).clamp(-1, 1), features)
    assert results[2].value < 0.5 * shifted.value


def test_nothing_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zoo: ModelRegistry, scenes: Tensor) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("the metrics must not use the network")

    torch_home = tmp_path / "torch"
    torch_home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert Path(torch.hub.get_dir()).is_relative_to(torch_home)
    features = FeatureSpace.from_registry(zoo, "scenes-clf")
    real, generated = scenes[:150], noisy(scenes[150:300], 0.1, seed=6)
    ms_ssim_3s_k7(generated, pairs=20)
    lpips_builtin(generated, features, pairs=20)
    fid_builtin(real, generated, features)
    kid_builtin(real, generated, features, subsets=3, subset_size=50)
    precision_recall_builtin(real, generated, features)
    accuracy(generated, zoo.load("scenes-judge"), 0, "scenes-judge@1")
    assert list(torch_home.rglob("*")) == []
