"""Our torchvision-compatible classifiers must have torchvision's exact state_dict layout and run at small sizes.

The fixture `torchvision_state_dict_shapes.json` was generated from the real torchvision 0.29.1 (key -> shape, in
state_dict order, `num_batches_tracked` included); outputs were checked against torchvision separately, bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from gansteer_server.models.architectures import torchvision_nets as tn

FIXTURE = Path(__file__).parent / "fixtures" / "torchvision_state_dict_shapes.json"

CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {
    "torchvision_alexnet": tn.alexnet,
    "torchvision_vgg16": tn.vgg16,
    "torchvision_vgg19": tn.vgg19,
    "torchvision_resnet18": tn.resnet18,
    "torchvision_resnet50": tn.resnet50,
    "torchvision_inception_v3": tn.inception_v3,
}
# Smallest comfortable input per architecture (Inception v3 needs at least 75x75).
INPUT_SIZE = {
    "torchvision_alexnet": 64,
    "torchvision_vgg16": 32,
    "torchvision_vgg19": 32,
    "torchvision_resnet18": 32,
    "torchvision_resnet50": 32,
    "torchvision_inception_v3": 80,
}
_built: dict[str, nn.Module] = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def built(name: str) -> nn.Module:
    """Each real model is built once per test run (the VGGs take a second or two to initialise)."""
    if name not in _built:
        torch.manual_seed(0)
        _built[name] = CONSTRUCTORS[name]().eval()
    return _built[name]


def test_fixture_covers_every_architecture() -> None:
    assert set(json.loads(FIXTURE.read_text())) == set(CONSTRUCTORS)


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_state_dict_keys_and_shapes_match_torchvision(name: str) -> None:
    expected = json.loads(FIXTURE.read_text())[name]
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = CONSTRUCTORS[name]()
    ours = [(key, list(value.shape)) for key, value in model.state_dict().items()]
    assert ours == list(expected.items())


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_eval_forward_returns_logits(name: str) -> None:
    size = INPUT_SIZE[name]
    with torch.no_grad():
        out = built(name)(torch.randn(1, 3, size, size))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()


def test_num_classes_and_inception_options() -> None:
    with torch.device("meta"):
        assert tn.resnet18(num_classes=10).fc.out_features == 10
        assert tn.vgg16(num_classes=7).classifier[-1].out_features == 7
        inception = tn.inception_v3(num_classes=5, aux_logits=False, transform_input=True)
    assert inception.AuxLogits is None
    assert not any(key.startswith("AuxLogits.") for key in inception.state_dict())
    assert inception.transform_input and inception.fc.out_features == 5


def test_resnet_features_are_named_layers_and_differentiable() -> None:
    model = built("torchvision_resnet18")
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    feats = tn.intermediate_features(model, x)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "layer1": (1, 64, 16, 16),
        "layer2": (1, 128, 8, 8),
        "layer3": (1, 256, 4, 4),
        "layer4": (1, 512, 2, 2),
    }
    sum(f.square().mean() for f in feats.values()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        logits = tn.intermediate_features(model, x, ["logits"])["logits"]
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)


def test_vgg_features_follow_the_vgg_naming() -> None:
    model = built("torchvision_vgg16")
    names = tn.feature_layer_names(model)
    assert names[:5] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1"]
    assert "relu5_3" in names and "pool5" in names and names[-1] == "logits"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = tn.intermediate_features(model, x, ["relu5_1", "relu3_1", "relu4_1"])
    assert list(feats) == ["relu5_1", "relu3_1", "relu4_1"]  # the caller's order
    assert [tuple(f.shape) for f in feats.values()] == [(1, 512, 2, 2), (1, 256, 8, 8), (1, 512, 4, 4)]
    assert list(tn.intermediate_features(model, x)) == ["relu3_1", "relu4_1", "relu5_1"]
    assert (feats["relu3_1"] >= 0).all()


def test_alexnet_and_inception_feature_names() -> None:
    with torch.no_grad():
        alex = tn.intermediate_features(built("torchvision_alexnet"), torch.randn(1, 3, 64, 64), ["pool5", "relu1"])
        inc = tn.intermediate_features(built("torchvision_inception_v3"), torch.randn(1, 3, 80, 80))
    assert tuple(alex["relu1"].shape) == (1, 64, 15, 15) and tuple(alex["pool5"].shape) == (1, 256, 1, 1)
    assert [f.shape[1] for f in inc.values()] == [288, 768, 2048]


def test_unknown_feature_layer_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="relu9_9"):
        tn.intermediate_features(built("torchvision_resnet18"), torch.randn(1, 3, 32, 32), ["relu9_9"])


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_registered_under_its_card_name(name: str) -> None:
    pytest.importorskip("gansteer_server.models.architectures.scenes")  # the package imports it alongside this one
    from gansteer_server.models.architectures import architecture_names

    assert name in architecture_names()
