"""Turn a card and its folder into a ready model, one loader per weight format.

Weights are never unpickled (decision 2): safetensors are plain tensors, TorchScript archives hold compiled code
and tensors, and torchvision `.pth` files go through `torch.load(weights_only=True)`, which refuses any global
that is not a tensor type. Every failure is a ModelRegistryError naming the file and the field or key at fault.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
from safetensors import SafetensorError
from torch import Tensor, nn

from gansteer_server.models.architectures import architecture_names, build_architecture
from gansteer_server.models.card import CARD_FILE, ModelCard
from gansteer_server.models.errors import ModelRegistryError
from gansteer_server.models.onnx_model import OnnxModel

LoadedModel = nn.Module | OnnxModel
TORCHVISION_PREFIX = "torchvision_"
_ORT_LOAD_ERRORS = (
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.InvalidGraph,
    ort_errors.InvalidProtobuf,
    ort_errors.NoSuchFile,
    ort_errors.NotImplemented,
    ort_errors.RuntimeException,
)
_KEYS_SHOWN = 5


def load_model(
    card: ModelCard, folder: Path | str, *, device: str | torch.device = "cpu", prefer_onnx: bool = False
) -> LoadedModel:
    """The card's model in eval mode on `device`; its ONNX export instead when `prefer_onnx` and the card has one
    (forward-only serving)."""
    folder = Path(folder)
    device = torch.device(device)
    if card.format == "onnx":
        return load_onnx(folder / card.weights, device, field="weights")
    if prefer_onnx and card.onnx is not None:
        return load_onnx(folder / card.onnx, device, field="onnx")
    if card.format == "torchscript":
        model = load_torchscript(folder / card.weights, device)
    else:
        model = build_module(card, folder)
        path = folder / card.weights
        # torchvision weights may be converted to .safetensors or be torchvision's own .pth state dicts.
        is_safetensors = card.format == "safetensors" or path.suffix == ".safetensors"
        state = read_safetensors(path) if is_safetensors else read_torch_state_dict(path)
        load_state(model, state, path, card.architecture or "")
    return model.to(device).eval()


def verify_model_files(card: ModelCard, folder: Path | str) -> None:
    """Load everything the card names once (weights, ONNX export, latent prior), so a bad version is refused
    before it becomes visible in the registry."""
    folder = Path(folder)
    fields = {card.weights: "weights", card.onnx: "onnx"}
    for name in card.files:
        _require_file(folder / name, fields.get(name, "latent_prior.mean_cov"))
    load_model(card, folder)
    if card.onnx is not None:
        load_onnx(folder / card.onnx, torch.device("cpu"), field="onnx")
    load_latent_prior(card, folder)


def build_module(card: ModelCard, folder: Path) -> nn.Module:
    """The card's architecture with its keyword arguments and fresh weights (the caller loads the real ones)."""
    assert card.architecture is not None  # the card guarantees it for the safetensors and torchvision formats
    name = TORCHVISION_PREFIX + card.architecture if card.format == "torchvision" else card.architecture
    known = architecture_names()
    if name not in known:
        if card.format == "torchvision":
            choices = [n.removeprefix(TORCHVISION_PREFIX) for n in known if n.startswith(TORCHVISION_PREFIX)]
        else:
            choices = known
        raise ModelRegistryError(
            f"unknown architecture {card.architecture!r} (known: {', '.join(choices) or 'none'})",
            path=folder / CARD_FILE,
            field="architecture",
        )
    try:
        return build_architecture(name, **card.architecture_kwargs)
    except TypeError as error:
        raise ModelRegistryError(
            f"architecture {name!r} does not accept {card.architecture_kwargs}: {error}",
            path=folder / CARD_FILE,
            field="architecture_kwargs",
        ) from None


def read_safetensors(path: Path, field: str = "weights") -> dict[str, Tensor]:
    _require_file(path, field)
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except SafetensorError as error:
        raise ModelRegistryError(f"not a safetensors file ({error})", path=path, field=field) from None


def read_torch_state_dict(path: Path, field: str = "weights") -> dict[str, Tensor]:
    """A state dict saved with `torch.save` (torchvision's `.pth`), read without running any pickled code."""
    _require_file(path, field)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ModelRegistryError(
            f"refused: not a plain tensor file that torch.load(weights_only=True) accepts ({_reason(error)})",
            path=path,
            field=field,
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelRegistryError(
            "expected a flat state dict of tensors (name -> tensor), as torchvision's .pth files are",
            path=path,
            field=field,
        )
    return dict(state)


def load_state(model: nn.Module, state: Mapping[str, Any], path: Path, architecture: str) -> None:
    """`load_state_dict(strict=True)`, with each kind of mismatch reported by key before torch sees it."""
    check_state(model, state, path, architecture)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelRegistryError(f"cannot load the weights: {error}", path=path, field="weights") from None


def check_state(model: nn.Module, state: Mapping[str, Any], path: Path, architecture: str) -> None:
    """Refuse a state dict whose keys or shapes differ from `model`'s, naming the keys (`model` may be on the meta
    device: only its shapes are read)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelRegistryError(
            f"{len(missing)} key(s) that architecture {architecture!r} expects are missing from the file: "
            + _keys(missing),
            path=path,
            field=_keys(missing),
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ModelRegistryError(
            f"the file holds {len(unexpected)} key(s) that architecture {architecture!r} does not have: "
            + _keys(unexpected),
            path=path,
            field=_keys(unexpected),
        )
    wrong = [key for key in expected if tuple(state[key].shape) != tuple(expected[key].shape)]
    if wrong:
        shapes = "; ".join(
            f"{key}: {list(state[key].shape)} in the file, {list(expected[key].shape)} expected"
            for key in wrong[:_KEYS_SHOWN]
        )
        raise ModelRegistryError(
            f"wrong shape for architecture {architecture!r}: {shapes}", path=path, field=_keys(wrong)
        )


def load_torchscript(path: Path, device: torch.device) -> nn.Module:
    _require_file(path, "weights")
    try:
        return torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as error:
        raise ModelRegistryError(f"not a TorchScript archive ({_reason(error)})", path=path, field="weights") from None


def load_onnx(path: Path, device: torch.device, *, field: str) -> OnnxModel:
    _require_file(path, field)
    try:
        return OnnxModel(path, device)
    except _ORT_LOAD_ERRORS as error:
        raise ModelRegistryError(f"not a loadable ONNX model ({_reason(error)})", path=path, field=field) from None


def load_latent_prior(card: ModelCard, folder: Path | str) -> tuple[Tensor, Tensor] | None:
    """(mean, covariance) of a Gaussian latent prior, or None for a standard normal one."""
    prior = card.latent_prior
    if prior is None or prior.mean_cov is None:
        return None
    assert card.latent_size is not None  # the card guarantees it whenever there is a prior
    path = Path(folder) / prior.mean_cov
    tensors = read_safetensors(path, field="latent_prior.mean_cov")
    size = card.latent_size
    for key, shape in (("mean", (size,)), ("covariance", (size, size))):
        if key not in tensors:
            raise ModelRegistryError(f"missing tensor {key!r}", path=path, field=key)
        tensor = tensors[key]
        if tuple(tensor.shape) != shape or not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ModelRegistryError(
                f"expected finite floats of shape {list(shape)} (latent_size {size}), got {tensor.dtype} "
                f"{list(tensor.shape)}",
                path=path,
                field=key,
            )
    covariance = tensors["covariance"]
    if not torch.allclose(covariance, covariance.T, atol=1e-5, rtol=1e-4):
        raise ModelRegistryError("the covariance is not symmetric", path=path, field="covariance")
    return tensors["mean"], covariance


def _require_file(path: Path, field: str) -> None:
    if not path.is_file():
        raise ModelRegistryError("the file named by the card does not exist", path=path, field=field)


def _keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    return shown if len(keys) <= _KEYS_SHOWN else f"{shown} (+{len(keys) - _KEYS_SHOWN} more)"


def _reason(error: BaseException) -> str:
    """The informative line of a library error (torch's weights-only refusal hides it in a long paragraph)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", text, re.DOTALL)
    return found.group(1).strip() if found else text.strip().splitlines()[0] if text.strip() else type(error).__name__
