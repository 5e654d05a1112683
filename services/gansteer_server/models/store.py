"""Which runtime serves a model: torch for everything, ONNX Runtime for forward-only requests where configured.

`GANSTEER_ONNX_MODELS` lists models (`name` or `name@version`) whose forward-only requests (Generate, Score) run
on their ONNX export (decision 3); Backward and ScoreGrad always use torch. A listed model without an export is
refused with FAILED_PRECONDITION rather than silently served by torch.

`ImageInput` adapts a scorer model to the wire convention: images arrive in [-1, 1] at any size and are mapped to
the model's value range, input normalisation and resolution inside the graph, so gradients reach the images as
sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gansteer_server.models.card import ModelCard
from gansteer_server.models.errors import ModelUnavailable
from gansteer_server.models.onnx_model import OnnxModel
from gansteer_server.models.registry import ModelRegistry

# How long `name` (newest version) stays resolved before the registry folders are read again; a new version
# registered by a tuning job is served within this time. `name@version` never changes and is cached for good.
RESOLVE_TTL_S = 1.0
#: Told of every model a store loads: (model ref, runtime `torch` or `onnx`, seconds the load took); the services'
#: and workers' metrics observe load times and loaded models through it.
LoadObserver = Callable[[str, str, float], None]


class ModelStore:
    """Resolves references against the registry and keeps each loaded model for the service's lifetime."""

    def __init__(
        self,
        registry: ModelRegistry,
        onnx_models: tuple[str, ...] = (),
        *,
        device: str | torch.device = "cpu",
        onnx_threads: int | None = None,
        on_load: LoadObserver | None = None,
    ) -> None:
        self.registry = registry
        self.on_load = on_load
        self.onnx_models = frozenset(onnx_models)
        self.device = torch.device(device)
        self._onnx_threads = onnx_threads
        self._resolved: dict[str, tuple[float, ModelCard]] = {}
        self._torch: dict[str, nn.Module] = {}
        self._onnx: dict[str, OnnxModel] = {}
        self._priors: dict[str, tuple[Tensor, Tensor] | None] = {}
        self._lock = threading.Lock()

    def card(self, ref: str) -> ModelCard:
        """The card `ref` names now (ModelNotFound for an unknown name or version)."""
        now = time.monotonic()
        cached = self._resolved.get(ref)
        if cached is not None and (cached[0] == float("inf") or now - cached[0] < RESOLVE_TTL_S):
            return cached[1]
        card = self.registry.card(ref)
        self._resolved[ref] = (float("inf") if "@" in ref else now, card)
        return card

    def latent_prior(self, card: ModelCard) -> tuple[Tensor, Tensor] | None:
        """(mean, covariance) of a generator's Gaussian prior, None for N(0, I); read once per version."""
        if card.ref not in self._priors:
            self._priors[card.ref] = self.registry.latent_prior(card.ref)
        return self._priors[card.ref]

    def uses_onnx(self, card: ModelCard) -> bool:
        """Whether forward-only requests for this model run on ONNX Runtime."""
        listed = card.name in self.onnx_models or card.ref in self.onnx_models
        if listed and card.onnx is None and card.format != "onnx":
            raise ModelUnavailable(
                f"GANSTEER_ONNX_MODELS lists {card.ref}, but its card has no ONNX export", "NO_ONNX_EXPORT"
            )
        return listed or card.format == "onnx"

    def torch_model(self, card: ModelCard) -> nn.Module:
        """The torch module in eval mode (loaded once; never as inference tensors, so gradients can use it)."""
        with self._lock, torch.inference_mode(False):
            module = self._torch.get(card.ref)
            if module is None:
                if card.format == "onnx":
                    raise ModelUnavailable(
                        f"{card.ref} is stored as ONNX only and cannot compute gradients", "FORWARD_ONLY"
                    )
                started = time.perf_counter()
                loaded = self.registry.load(card.ref, self.device)
                assert isinstance(loaded, nn.Module)
                for parameter in loaded.parameters():  # gradients flow to inputs only (safe to share)
                    parameter.requires_grad_(False)
                module = self._torch[card.ref] = loaded.eval()
                self._loaded(card.ref, "torch", started)
            return module

    def onnx_model(self, card: ModelCard) -> OnnxModel:
        """The ONNX Runtime session of the card's export (loaded once)."""
        self.uses_onnx(card)
        with self._lock:
            model = self._onnx.get(card.ref)
            if model is None:
                started = time.perf_counter()
                folder = self.registry.resolve(card.ref).folder
                path = folder / (card.weights if card.format == "onnx" else str(card.onnx))
                model = self._onnx[card.ref] = OnnxModel(path, self.device, threads=self._onnx_threads)
                self._loaded(card.ref, "onnx", started)
            return model

    def _loaded(self, ref: str, runtime: str, started: float) -> None:
        if self.on_load is not None:
            self.on_load(ref, runtime, time.perf_counter() - started)

    def forward_model(self, card: ModelCard) -> Callable[..., Any]:
        """What forward-only requests call: the ONNX session where configured, else the torch module."""
        return self.onnx_model(card) if self.uses_onnx(card) else self.torch_model(card)

    def backend_name(self, card: ModelCard) -> str:
        return "onnx" if self.uses_onnx(card) else "torch"


def wire_to_model(images: Tensor, card: ModelCard) -> Tensor:
    """Images in [-1, 1] to the card's value range (identity for the built-in models)."""
    low, high = card.value_range or (-1.0, 1.0)
    if (low, high) == (-1.0, 1.0):
        return images
    return (images + 1) * ((high - low) / 2) + low


def model_to_wire(images: Tensor, card: ModelCard) -> Tensor:
    """Images in the card's value range to [-1, 1]."""
    low, high = card.value_range or (-1.0, 1.0)
    if (low, high) == (-1.0, 1.0):
        return images
    return (images - low) * (2 / (high - low)) - 1


class ImageInput(nn.Module):
    """A scorer model behind the wire convention: resize to the card's resolution, map [-1, 1] to its value range,
    normalise as its card says, then call it. Forwards `features()`, `feature_names` and `num_classes`."""

    def __init__(self, model: nn.Module | OnnxModel, card: ModelCard) -> None:
        super().__init__()
        self.card = card
        self._model = model  # an nn.Module is registered as a submodule, so .eval() reaches it
        for name in ("feature_names", "num_classes"):
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))
        norm = card.input_normalization
        self._mean = torch.tensor(norm.mean).view(1, -1, 1, 1) if norm is not None else None
        self._std = torch.tensor(norm.std).view(1, -1, 1, 1) if norm is not None else None
        self.eval()

    def adapt(self, images: Tensor) -> Tensor:
        size = self.card.resolution
        if size is not None and tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        images = wire_to_model(images, self.card)
        if self._mean is not None and self._std is not None:
            images = (images - self._mean.to(images)) / self._std.to(images)
        return images

    def forward(self, images: Tensor, *args: Any) -> Tensor:
        output = self._model(self.adapt(images), *args)
        assert isinstance(output, Tensor), "a scorer model returns one tensor"
        return output

    def features(self, images: Tensor) -> dict[str, Tensor]:
        return self._model.features(self.adapt(images))  # type: ignore[union-attr,operator]
