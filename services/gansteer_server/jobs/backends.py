"""Where a job's models run (ARCHITECTURE decision 1): in the worker (`local`) or behind the generation and scoring
services (`remote`). Both hand the algorithms the same plain callables, in the wire convention (images in [-1, 1]),
so an algorithm does not know which it runs on.

- `LocalBackend` loads models from the registry once per worker process, lazily: the first task in a process loads
  them, after any fork, so a prefork pool never touches an accelerator before forking (pytorch #68861).
- `RemoteBackend` wraps the services in `torch.autograd.Function`s: the generator's forward calls `Generate`
  (tensor output) and its backward `Backward` (the VJP); the discriminator's realism calls `ScoreGrad`, which answers
  values and image gradients in one round trip, so its backward needs no call. The feature extractor of a criterion
  is not remote: `ScoreGrad` differentiates only scalar outputs per image, and a feature-statistics criterion needs
  the VJP of whole feature maps, so the remote backend loads the (small) feature extractor in the worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import grpc
import torch
from google.protobuf import struct_pb2
from torch import Tensor, nn

from gansteer_server.config import Settings
from gansteer_server.models import ModelCard, ModelRegistry
from gansteer_server.models.conditional import ConditionalGenerator
from gansteer_server.models.store import ImageInput, LoadObserver, ModelStore
from gansteer_server.proto import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)
from gansteer_server.wire.convert import float_tensor, torch_tensor

BACKENDS = ("local", "remote")


class FeatureExtractor(Protocol):
    def features(self, images: Tensor) -> dict[str, Tensor]: ...


class GeneratorModel(Protocol):
    """`generator(z, condition) -> images` in [-1, 1]; condition: ids (N,) int64, vectors (N, E) float, or None."""

    card: ModelCard

    def __call__(self, z: Tensor, condition: Tensor | None) -> Tensor: ...

    def class_embeddings(self) -> Tensor | None:
        """The class rows (K, E) of a class-conditional generator, None for an unconditional one."""
        ...


Discriminator = Callable[..., Tensor]


class ModelBackend(Protocol):
    name: str

    def card(self, ref: str) -> ModelCard: ...

    def generator(self, ref: str) -> GeneratorModel: ...

    def discriminator(self, ref: str) -> Discriminator: ...

    def feature_extractor(self, ref: str) -> FeatureExtractor: ...

    def scorer(self, ref: str) -> nn.Module:
        """A scorer model (classifier, discriminator, PIR estimator) as a module in this process, for objectives of
        any scorer output (latent search); images in [-1, 1]."""
        ...


# --- local -----------------------------------------------------------------------------------------------------


class LocalBackend:
    """Models loaded from the registry into this process (once each), in eval mode with frozen weights."""

    name = "local"

    def __init__(
        self, registry: ModelRegistry, device: str | torch.device = "cpu", on_load: LoadObserver | None = None
    ) -> None:
        self.models = ModelStore(registry, device=device, on_load=on_load)
        self._wrapped: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def card(self, ref: str) -> ModelCard:
        return self.models.card(ref)

    def _cached(self, role: str, ref: str, build: Callable[[nn.Module, ModelCard], Any]) -> Any:
        card = self.card(ref)
        with self._lock:
            key = (role, card.ref)
            if key not in self._wrapped:
                self._wrapped[key] = build(self.models.torch_model(card), card)
            return self._wrapped[key]

    def generator(self, ref: str) -> GeneratorModel:
        return self._cached("generator", ref, ConditionalGenerator)  # type: ignore[no-any-return]

    def discriminator(self, ref: str) -> Discriminator:
        return self._cached("scorer", ref, ImageInput)  # type: ignore[no-any-return]

    def feature_extractor(self, ref: str) -> FeatureExtractor:
        return self._cached("scorer", ref, ImageInput)  # type: ignore[no-any-return]

    def scorer(self, ref: str) -> nn.Module:
        return self._cached("scorer", ref, ImageInput)  # type: ignore[no-any-return]


# --- remote ----------------------------------------------------------------------------------------------------


def _model_ref(ref: str) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=ref)


def _condition(condition: Tensor | None) -> common_pb2.ClassCondition | None:
    if condition is None:
        return None
    if condition.dtype in (torch.int64, torch.int32):
        return common_pb2.ClassCondition(class_ids=common_pb2.ClassIds(ids=condition.tolist()))
    return common_pb2.ClassCondition(embeddings=float_tensor(condition))


class _Connection:
    """Stubs of the two services and the call metadata (the API key when auth is on)."""

    def __init__(self, settings: Settings, timeout_s: float) -> None:
        options = [
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
        ]
        self.generation = generation_pb2_grpc.GenerationServiceStub(
            grpc.insecure_channel(settings.service_address("generation"), options=options)
        )
        self.scoring = scoring_pb2_grpc.ScoringServiceStub(
            grpc.insecure_channel(settings.service_address("scoring"), options=options)
        )
        key = settings.api_keys[0] if settings.auth_enabled and settings.api_keys else ""
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.timeout_s = timeout_s
        self.max_images = settings.max_images_per_request

    def call(self, method: Callable[..., Any], request: Any) -> Any:
        return method(request, timeout=self.timeout_s, metadata=self.metadata)

    def chunks(self, n: int) -> list[slice]:
        return [slice(i, min(i + self.max_images, n)) for i in range(0, n, self.max_images)]


class _RemoteGenerate(torch.autograd.Function):
    """images = G(z, e) through `Generate`; the backward asks `Backward` for dL/dz and dL/de."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, condition: Tensor, generator: RemoteGenerator) -> Tensor:  # type: ignore[override]
        ctx.generator = generator
        ctx.save_for_backward(z, condition)
        return generator.generate(z, condition if condition.numel() else None)

    @staticmethod
    def backward(ctx: Any, grad_images: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        z, condition = ctx.saved_tensors
        grad_z, grad_e = ctx.generator.vjp(z, condition if condition.numel() else None, grad_images)
        return grad_z, (grad_e if condition.is_floating_point() and condition.numel() else None), None


class RemoteGenerator:
    """A generator behind the generation service."""

    def __init__(self, connection: _Connection, card: ModelCard) -> None:
        self.connection, self.card = connection, card
        self._table: Tensor | None = None

    def __call__(self, z: Tensor, condition: Tensor | None) -> Tensor:
        empty = torch.empty(0)
        return _RemoteGenerate.apply(z, condition if condition is not None else empty, self)  # type: ignore[no-any-return]

    def generate(self, z: Tensor, condition: Tensor | None) -> Tensor:
        parts = []
        for part in self.connection.chunks(len(z)):
            request = generation_pb2.GenerateRequest(
                model=_model_ref(self.card.ref), latents=float_tensor(z[part]), format=common_pb2.IMAGE_FORMAT_TENSOR
            )
            wire_condition = _condition(condition[part] if condition is not None else None)
            if wire_condition is not None:
                request.condition.CopyFrom(wire_condition)
            reply = self.connection.call(self.connection.generation.Generate, request)
            parts.append(torch_tensor(reply.images.tensor, "images.tensor"))
        return torch.cat(parts).to(z.dtype)

    def vjp(self, z: Tensor, condition: Tensor | None, grad_images: Tensor) -> tuple[Tensor, Tensor | None]:
        grads_z, grads_e = [], []
        for part in self.connection.chunks(len(z)):
            request = generation_pb2.BackwardRequest(
                model=_model_ref(self.card.ref),
                latents=float_tensor(z[part]),
                grad_images=float_tensor(grad_images[part]),
            )
            wire_condition = _condition(condition[part] if condition is not None else None)
            if wire_condition is not None:
                request.condition.CopyFrom(wire_condition)
            reply = self.connection.call(self.connection.generation.Backward, request)
            grads_z.append(torch_tensor(reply.grad_latents, "grad_latents"))
            if reply.grad_class_embeddings.shape:
                grads_e.append(torch_tensor(reply.grad_class_embeddings, "grad_class_embeddings"))
        return torch.cat(grads_z).to(z.dtype), (torch.cat(grads_e).to(z.dtype) if grads_e else None)

    def class_embeddings(self) -> Tensor | None:
        """The class rows, asked once: a Generate of one image per class returns the embeddings it used."""
        if not self.card.num_classes or not self.card.embedding_size:
            return None
        if self._table is None:
            count = self.card.num_classes
            request = generation_pb2.GenerateRequest(
                model=_model_ref(self.card.ref),
                latents=float_tensor(torch.zeros(count, self.card.latent_size or 0)),
                condition=common_pb2.ClassCondition(class_ids=common_pb2.ClassIds(ids=list(range(count)))),
                format=common_pb2.IMAGE_FORMAT_TENSOR,
            )
            reply = self.connection.call(self.connection.generation.Generate, request)
            self._table = torch_tensor(reply.class_embeddings, "class_embeddings")
        return self._table


class _RemoteRealism(torch.autograd.Function):
    """D(x) through `ScoreGrad`: the gradient comes back with the values, so the backward is a multiplication."""

    @staticmethod
    def forward(ctx: Any, images: Tensor, scores: Tensor, grads: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(grads)
        return scores.clone()

    @staticmethod
    def backward(ctx: Any, grad_scores: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (grads,) = ctx.saved_tensors
        return grad_scores[:, None, None, None] * grads, None, None


class RemoteDiscriminator:
    """`discriminator(images, condition=None) -> realism (N,)` through the scoring service; a class condition is
    given as ids (the projection term of that class), one request per distinct id."""

    def __init__(self, connection: _Connection, card: ModelCard) -> None:
        self.connection, self.card = connection, card

    def __call__(self, images: Tensor, condition: Tensor | None = None) -> Tensor:
        if condition is not None and condition.is_floating_point():
            raise ValueError("the remote discriminator takes class ids, not class vectors")
        groups: list[tuple[Tensor, int | None]]
        if condition is None:
            groups = [(torch.arange(len(images)), None)]
        else:
            groups = [(torch.nonzero(condition == c).flatten(), int(c)) for c in condition.unique().tolist()]
        scores = images.new_empty(len(images))
        grads = torch.zeros_like(images)
        for index, class_id in groups:
            for part in self.connection.chunks(len(index)):
                rows = index[part]
                values, gradient = self._score_grad(images[rows].detach(), class_id)
                scores[rows], grads[rows] = values.to(images.dtype), gradient.to(images.dtype)
        return _RemoteRealism.apply(images, scores, grads)  # type: ignore[no-any-return]

    def _score_grad(self, images: Tensor, class_id: int | None) -> tuple[Tensor, Tensor]:
        params = struct_pb2.Struct()
        if class_id is not None:
            params.update({"class_id": class_id})
        output = scoring_pb2.OutputRequest(output="realism", model=_model_ref(self.card.ref), params=params)
        term = scoring_pb2.ObjectiveTerm(output=output, weight=1)
        request = scoring_pb2.ScoreGradRequest(images=common_pb2.ImageBatch(tensor=float_tensor(images)), terms=[term])
        reply = self.connection.call(self.connection.scoring.ScoreGrad, request)
        return torch_tensor(reply.values, "values"), torch_tensor(reply.grad_images, "grad_images")


class RemoteBackend:
    """Generator and discriminator through the services; the feature extractor in the worker (see the module)."""

    name = "remote"

    def __init__(
        self, settings: Settings, registry: ModelRegistry, timeout_s: float = 60.0, on_load: LoadObserver | None = None
    ) -> None:
        self.connection = _Connection(settings, timeout_s)
        self.local = LocalBackend(registry, on_load=on_load)
        self._cards: dict[str, ModelCard] = {}

    def card(self, ref: str) -> ModelCard:
        """The card as the generation service resolves it (the service's registry is the one that serves it)."""
        if ref not in self._cards or "@" not in ref:
            reply = self.connection.call(
                self.connection.generation.GetModel, generation_pb2.GetModelRequest(model=_model_ref(ref))
            )
            self._cards[ref] = ModelCard.from_json(reply.card.card_json)
        return self._cards[ref]

    def generator(self, ref: str) -> GeneratorModel:
        return RemoteGenerator(self.connection, self.card(ref))

    def discriminator(self, ref: str) -> Discriminator:
        return RemoteDiscriminator(self.connection, self.card(ref))

    def feature_extractor(self, ref: str) -> FeatureExtractor:
        return self.local.feature_extractor(ref)

    def scorer(self, ref: str) -> nn.Module:
        """In the worker, as the feature extractor: an objective of several outputs shares one forward per model."""
        return self.local.scorer(ref)


class Backends:
    """Both backends of a worker process, built on first use (after fork), chosen per job; `on_load` is told of
    every model they load (the worker's metrics)."""

    def __init__(self, settings: Settings, on_load: LoadObserver | None = None) -> None:
        self.settings = settings
        self.on_load = on_load
        self._built: dict[str, ModelBackend] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> ModelBackend:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
        with self._lock:
            if name not in self._built:
                registry = ModelRegistry(self.settings.registry_paths)
                local = name == "local"
                self._built[name] = (
                    LocalBackend(registry, on_load=self.on_load)
                    if local
                    else RemoteBackend(self.settings, registry, on_load=self.on_load)
                )
            return self._built[name]
