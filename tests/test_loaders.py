"""Every loader on a small model the test builds and saves itself, and the refusals that keep pickles out."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import Tensor, nn

from gansteer_server.models import (
    CARD_FILE,
    ForwardOnlyError,
    ModelCard,
    ModelRegistryError,
    OnnxModel,
    load_latent_prior,
    load_model,
)
from gansteer_server.models.architectures import build_architecture, register_architecture


@register_architecture("test_loaders_tiny_generator")
class TinyGenerator(nn.Module):
    """G(z, class) -> images in [-1, 1]; small enough to build in every test."""

    def __init__(self, z_size: int = 8, num_classes: int = 3, resolution: int = 4) -> None:
        super().__init__()
        self.resolution = resolution
        self.embedding = nn.Embedding(num_classes, 4)
        self.net = nn.Linear(z_size + 4, 3 * resolution * resolution)

    def forward(self, z: Tensor, classes: Tensor) -> Tensor:
        x = self.net(torch.cat([z, self.embedding(classes)], dim=1))
        return torch.tanh(x).view(-1, 3, self.resolution, self.resolution)


@register_architecture("test_loaders_tiny_classifier")
class TinyClassifier(nn.Module):
    """A classifier with batch norm, so that a model left in training mode would give different outputs."""

    def __init__(self, width: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(torch.relu(self.norm(self.conv(images))).mean(dim=(2, 3)))


GENERATOR_CARD: dict[str, Any] = {
    "name": "tiny-gen",
    "version": 1,
    "kind": "generator",
    "format": "safetensors",
    "architecture": "test_loaders_tiny_generator",
    "architecture_kwargs": {"z_size": 8, "num_classes": 3, "resolution": 4},
    "weights": "weights.safetensors",
    "latent_size": 8,
    "num_classes": 3,
    "resolution": 4,
    "value_range": [-1, 1],
}
CLASSIFIER_CARD: dict[str, Any] = {
    "name": "tiny-clf",
    "version": 1,
    "kind": "classifier",
    "format": "safetensors",
    "architecture": "test_loaders_tiny_classifier",
    "architecture_kwargs": {"width": 4},
    "weights": "weights.safetensors",
    "num_classes": 3,
    "resolution": 8,
    "value_range": [-1, 1],
}


def trained_classifier(width: int = 4) -> TinyClassifier:
    """A classifier whose batch-norm statistics differ from their defaults, as after training."""
    torch.manual_seed(0)
    model = TinyClassifier(width=width)
    model.norm.running_mean.uniform_(-1, 1)
    model.norm.running_var.uniform_(0.5, 2)
    return model.eval()


def write_card(folder: Path, fields: dict[str, Any], **changes: Any) -> ModelCard:
    card = ModelCard.from_dict({**fields, **changes})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CARD_FILE).write_text(card.to_json())
    return card


def export_onnx(model: nn.Module, inputs: tuple[Tensor, ...], path: Path, names: list[str], output: str) -> None:
    # The dynamo exporter needs onnxscript, which is not a dependency; the TorchScript-based one is enough here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            inputs,
            str(path),
            dynamo=False,
            input_names=names,
            output_names=[output],
            dynamic_axes={name: {0: "batch"} for name in [*names, output]},
        )


def test_safetensors_weights_load_into_a_builtin_architecture_in_eval_mode(tmp_path: Path) -> None:
    source = trained_classifier()
    safetensors.torch.save_file(source.state_dict(), tmp_path / "weights.safetensors")
    card = write_card(tmp_path, CLASSIFIER_CARD)

    model = load_model(card, tmp_path)

    assert isinstance(model, TinyClassifier) and not model.training
    images = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(images), source(images))


def test_safetensors_with_a_wrong_shape_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    safetensors.torch.save_file(TinyClassifier(width=5).state_dict(), tmp_path / "weights.safetensors")
    card = write_card(tmp_path, CLASSIFIER_CARD)

    with pytest.raises(ModelRegistryError) as raised:
        load_model(card, tmp_path)

    message = str(raised.value)
    assert "weights.safetensors" in message and "conv.weight" in message
    assert "[5, 3, 3, 3] in the file, [4, 3, 3, 3] expected" in message
    assert raised.value.path == tmp_path / "weights.safetensors"


def test_safetensors_with_missing_or_extra_keys_names_them(tmp_path: Path) -> None:
    state = TinyClassifier().state_dict()
    state["extra.bias"] = torch.zeros(1)
    del state["head.bias"]
    safetensors.torch.save_file(state, tmp_path / "weights.safetensors")
    card = write_card(tmp_path, CLASSIFIER_CARD)

    with pytest.raises(ModelRegistryError, match=r"missing from the file: head\.bias"):
        load_model(card, tmp_path)
    del state["extra.bias"]
    state["head.bias"] = torch.zeros(3)
    state["extra.bias"] = torch.zeros(1)
    safetensors.torch.save_file(state, tmp_path / "weights.safetensors")
    with pytest.raises(ModelRegistryError, match=r"does not have: extra\.bias"):
        load_model(card, tmp_path)


def test_a_pickle_offered_as_safetensors_is_refused(tmp_path: Path) -> None:
    torch.save(TinyClassifier().state_dict(), tmp_path / "weights.safetensors")
    card = write_card(tmp_path, CLASSIFIER_CARD)

    with pytest.raises(ModelRegistryError, match=r"weights\.safetensors \[weights\]: not a safetensors file"):
        load_model(card, tmp_path)


def test_a_missing_weight_file_is_an_error_not_random_weights(tmp_path: Path) -> None:
    card = write_card(tmp_path, CLASSIFIER_CARD)
    with pytest.raises(ModelRegistryError, match="does not exist"):
        load_model(card, tmp_path)


def test_an_unknown_architecture_lists_the_known_ones(tmp_path: Path) -> None:
    card = write_card(tmp_path, CLASSIFIER_CARD, architecture="no_such_net")
    with pytest.raises(ModelRegistryError) as raised:
        load_model(card, tmp_path)
    assert raised.value.field == "architecture"
    assert "unknown architecture 'no_such_net'" in str(raised.value) and "test_loaders_tiny_classifier" in str(
        raised.value
    )


def test_torchscript_model_loads_and_matches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = TinyGenerator().eval()
    torch.jit.script(source).save(str(tmp_path / "generator.pt"))
    card = write_card(
        tmp_path,
        GENERATOR_CARD,
        format="torchscript",
        weights="generator.pt",
        architecture=None,
        architecture_kwargs={},
    )

    model = load_model(card, tmp_path)

    assert isinstance(model, torch.jit.ScriptModule) and not model.training
    z, classes = torch.randn(2, 8), torch.tensor([0, 2])
    torch.testing.assert_close(model(z, classes), source(z, classes))


def test_a_pickle_offered_as_torchscript_is_refused(tmp_path: Path) -> None:
    (tmp_path / "generator.pt").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    card = write_card(
        tmp_path,
        GENERATOR_CARD,
        format="torchscript",
        weights="generator.pt",
        architecture=None,
        architecture_kwargs={},
    )
    with pytest.raises(ModelRegistryError, match=r"generator\.pt \[weights\]: not a TorchScript archive"):
        load_model(card, tmp_path)


def test_onnx_model_matches_torch_and_refuses_gradients(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = TinyGenerator().eval()
    export_onnx(source, (torch.randn(2, 8), torch.tensor([0, 1])), tmp_path / "generator.onnx", ["z", "classes"], "x")
    card = write_card(
        tmp_path, GENERATOR_CARD, format="onnx", weights="generator.onnx", architecture=None, architecture_kwargs={}
    )

    model = load_model(card, tmp_path)

    assert isinstance(model, OnnxModel) and model.input_names == ["z", "classes"]
    z, classes = torch.randn(5, 8), torch.tensor([0, 1, 2, 1, 0])
    expected = source(z, classes).detach()
    torch.testing.assert_close(model(z, classes), expected, atol=1e-5, rtol=1e-5)
    # numpy float64 and Python ints are cast to the graph's input types, as a torch module's caller would expect
    torch.testing.assert_close(model(z.double().numpy(), classes=[0, 1, 2, 1, 0]), expected, atol=1e-5, rtol=1e-5)

    z.requires_grad_(True)
    with pytest.raises(ForwardOnlyError, match="ONNX Runtime, which computes no gradients"):
        model(z, classes).sum().backward()
    with pytest.raises(ForwardOnlyError):
        model.requires_grad_(True)
    with pytest.raises(ForwardOnlyError):
        model.train()


def test_prefer_onnx_serves_the_export_and_torch_stays_the_default(tmp_path: Path) -> None:
    source = trained_classifier()
    safetensors.torch.save_file(source.state_dict(), tmp_path / "weights.safetensors")
    export_onnx(source, (torch.randn(2, 3, 8, 8),), tmp_path / "classifier.onnx", ["images"], "logits")
    card = write_card(tmp_path, CLASSIFIER_CARD, onnx="classifier.onnx")

    torch_model = load_model(card, tmp_path)
    onnx_model = load_model(card, tmp_path, prefer_onnx=True)

    assert isinstance(torch_model, TinyClassifier) and isinstance(onnx_model, OnnxModel)
    images = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(onnx_model(images), torch_model(images).detach(), atol=1e-5, rtol=1e-5)


def test_a_non_onnx_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a protobuf at all" * 10)
    card = write_card(
        tmp_path, GENERATOR_CARD, format="onnx", weights="model.onnx", architecture=None, architecture_kwargs={}
    )
    with pytest.raises(ModelRegistryError, match=r"model\.onnx \[weights\]: not a loadable ONNX model"):
        load_model(card, tmp_path)


TORCHVISION_CARD: dict[str, Any] = {
    "name": "resnet18-local",
    "version": 1,
    "kind": "classifier",
    "format": "torchvision",
    "architecture": "resnet18",
    "architecture_kwargs": {"num_classes": 10},
    "weights": "resnet18.pth",
    "num_classes": 10,
    "resolution": 224,
    "value_range": [0, 1],
    "input_normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
}


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    """torchvision's resnet18 layout with random weights (no weights can be downloaded here)."""
    torch.manual_seed(0)
    return build_architecture("torchvision_resnet18", num_classes=10).eval()


@pytest.mark.parametrize("weights", ["resnet18.pth", "resnet18.safetensors"])
def test_torchvision_classifier_loads_from_a_local_weights_file(
    tmp_path: Path, resnet18: nn.Module, weights: str
) -> None:
    state = resnet18.state_dict()
    if weights.endswith(".pth"):
        torch.save(state, tmp_path / weights)  # what torchvision's published .pth files are: a plain state dict
    else:
        safetensors.torch.save_file(state, tmp_path / weights)
    card = write_card(tmp_path, TORCHVISION_CARD, weights=weights)

    model = load_model(card, tmp_path)

    assert not model.training
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), resnet18(images))


class Payload:
    """An arbitrary object: a weights file that holds one is a code-execution risk, not weights."""


class OpensAFile:
    """Unpickling this would create a file: proof of whether a loader ran pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", ["custom class", "code"])
def test_a_torchvision_pth_holding_arbitrary_objects_is_refused_unexecuted(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pickled-code-ran"
    value = Payload() if payload == "custom class" else OpensAFile(marker)
    torch.save({"fc.weight": value}, tmp_path / "resnet18.pth")
    card = write_card(tmp_path, TORCHVISION_CARD)

    with pytest.raises(ModelRegistryError) as raised:
        load_model(card, tmp_path)

    message = str(raised.value)
    assert "resnet18.pth [weights]: refused" in message and "Unsupported global" in message
    assert not marker.exists()


def test_gaussian_latent_prior_loads_and_is_checked(tmp_path: Path) -> None:
    mean, covariance = torch.zeros(8), torch.eye(8) * 0.5
    safetensors.torch.save_file({"mean": mean, "covariance": covariance}, tmp_path / "prior.safetensors")
    card = write_card(tmp_path, GENERATOR_CARD, latent_prior={"type": "gaussian", "mean_cov": "prior.safetensors"})

    loaded = load_latent_prior(card, tmp_path)

    assert loaded is not None
    torch.testing.assert_close(loaded[1], covariance)
    safetensors.torch.save_file({"mean": mean, "covariance": torch.eye(7)}, tmp_path / "prior.safetensors")
    with pytest.raises(
        ModelRegistryError, match=r"prior\.safetensors \[covariance\]: expected finite floats of shape \[8, 8\]"
    ):
        load_latent_prior(card, tmp_path)
    assert load_latent_prior(write_card(tmp_path, GENERATOR_CARD), tmp_path) is None
