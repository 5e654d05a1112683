"""Core values to response messages: cards, model references and images."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gansteer.tensors import from_tensor_proto, png_encode, to_tensor_proto
from gansteer_server.models import ModelCard
from gansteer_server.proto import common_pb2

KIND_TO_PROTO = {
    "generator": common_pb2.MODEL_KIND_GENERATOR,
    "discriminator": common_pb2.MODEL_KIND_DISCRIMINATOR,
    "classifier": common_pb2.MODEL_KIND_CLASSIFIER,
    "pir_estimator": common_pb2.MODEL_KIND_PIR_ESTIMATOR,
    "feature_extractor": common_pb2.MODEL_KIND_FEATURE_EXTRACTOR,
}


def ref_proto(card: ModelCard) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=card.name, version=card.version)


def card_proto(
    card: ModelCard, backends: list[str], prior: tuple[Tensor, Tensor] | None = None
) -> common_pb2.ModelCard:
    """The card as its message; `prior` (mean, covariance) fills the Gaussian prior's tensors (GetModel only)."""
    message = common_pb2.ModelCard(
        name=card.name,
        version=card.version,
        kind=KIND_TO_PROTO[card.kind],
        architecture=card.architecture or card.format,
        latent_size=card.latent_size or 0,
        num_classes=card.num_classes or 0,
        class_names=list(card.class_names or ()),
        embedding_size=card.embedding_size or 0,
        resolution=card.resolution or 0,
        channels=card.channels,
        metrics={
            k: float(v) for k, v in card.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
        },
        card_json=card.to_json(),
        description=card.description,
        backends=backends,
        format=card.format,
        created=card.created or "",
    )
    if card.value_range is not None:
        message.value_range.CopyFrom(common_pb2.ValueRange(low=card.value_range[0], high=card.value_range[1]))
    if card.latent_prior is not None:
        gaussian = card.latent_prior.type == "gaussian"
        message.prior.kind = (
            common_pb2.LatentPrior.KIND_GAUSSIAN if gaussian else common_pb2.LatentPrior.KIND_STANDARD_NORMAL
        )
        if prior is not None:
            message.prior.mean.CopyFrom(to_tensor_proto(prior[0].numpy().astype(np.float32)))
            message.prior.covariance.CopyFrom(to_tensor_proto(prior[1].numpy().astype(np.float32)))
    return message


def float_tensor(values: Tensor) -> common_pb2.Tensor:
    return to_tensor_proto(values.detach().cpu().numpy().astype(np.float32, copy=False))


def torch_tensor(proto: common_pb2.Tensor, field: str) -> Tensor:
    """A tensor message as a torch tensor of its own dtype (a copy; refusals name `field`)."""
    return torch.from_numpy(from_tensor_proto(proto, field=field, copy=True))


def image_batch(images: Tensor, as_png: bool) -> common_pb2.ImageBatch:
    """Images [N, C, H, W] in [-1, 1] as PNG files, or as one float32 tensor."""
    if not as_png:
        return common_pb2.ImageBatch(tensor=float_tensor(images))
    pixels = ((images.detach().cpu().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).numpy()
    return common_pb2.ImageBatch(images=[common_pb2.Image(png=png_encode(image)) for image in array])
