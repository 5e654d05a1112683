"""Requests to tensors: every check a client's message must pass, each failure an INVALID_ARGUMENT naming the field.

Nothing here trusts the wire: byte lengths must match dtype and shape, floats must be finite, counts stay within
the server's limits, ids within the model's classes, images decodable and of a size the server accepts. The
checks run on the gRPC thread before a request is queued, so a bad request never reaches a batch that other
clients share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from gansteer.tensors import from_tensor_proto, png_decode
from gansteer_server.models import ModelCard
from gansteer_server.proto import common_pb2
from gansteer_server.wire.errors import from_value_error, invalid_argument

FLOAT32 = (common_pb2.DTYPE_FLOAT32,)
IMAGE_FLOATS = (common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_FLOAT16, common_pb2.DTYPE_FLOAT64)
# Float images may stray this far outside [-1, 1] (rounding in a client's conversion); further is a unit mistake.
_RANGE_SLACK = 1e-3


@dataclass(frozen=True)
class Limits:
    """The per-request limits of a service (from Settings)."""

    max_images: int
    max_pixels: int


def model_ref(ref: common_pb2.ModelRef, field: str = "model") -> str:
    """The registry text form (`name` or `name@version`) of a ModelRef; refusals name `field`."""
    name = ref.name.strip()
    if not name:
        raise invalid_argument(f"{field}.name", "a model name is required", "MISSING_MODEL")
    if ref.version < 0:
        raise invalid_argument(f"{field}.version", f"must be 0 (newest) or positive, got {ref.version}")
    if "@" in name:
        if ref.version:
            raise invalid_argument(f"{field}.version", f"give the version once: {name!r} already names one")
        return name
    return f"{name}@{ref.version}" if ref.version else name


def dtype_name(dtype: int) -> str:
    try:
        return str(common_pb2.DType.Name(dtype))
    except ValueError:
        return f"unknown dtype {dtype}"


def tensor(
    proto: common_pb2.Tensor,
    field: str,
    *,
    dtypes: tuple[int, ...] = FLOAT32,
    shape: tuple[int | None, ...] | None = None,
) -> npt.NDArray[Any]:
    """Decode a Tensor field: dtype among `dtypes`, `shape` matched (None: any size), floats finite."""
    if proto.dtype not in dtypes:
        allowed = " or ".join(dtype_name(d) for d in dtypes)
        raise invalid_argument(f"{field}.dtype", f"must be {allowed}, got {dtype_name(proto.dtype)}", "BAD_DTYPE")
    try:
        array = from_tensor_proto(proto, field=field)
    except ValueError as error:
        reason = "BAD_BYTE_LENGTH" if ".data:" in str(error) else "BAD_SHAPE"
        raise from_value_error(error, reason) from None
    if shape is not None:
        matches = array.ndim == len(shape) and all(
            e is None or e == d for e, d in zip(shape, array.shape, strict=False)
        )
        if not matches:
            expected = "[" + ", ".join("N" if e is None else str(e) for e in shape) + "]"
            raise invalid_argument(f"{field}.shape", f"must be {expected}, got {list(array.shape)}", "BAD_SHAPE")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array.reshape(-1)))[0])
        raise invalid_argument(
            f"{field}.data", f"holds NaN or infinite values (first at flat index {bad})", "NOT_FINITE"
        )
    return array


def count(n: int, field: str, limits: Limits) -> int:
    if n < 1:
        raise invalid_argument(field, f"needs at least one image, got {n}", "EMPTY")
    if n > limits.max_images:
        raise invalid_argument(
            field, f"{n} images exceed this server's limit of {limits.max_images} per request", "TOO_MANY_IMAGES"
        )
    return n


def latents(proto: common_pb2.Tensor, field: str, card: ModelCard, limits: Limits) -> Tensor:
    """Given latents: float32 [N, latent_size], 1 <= N <= the per-request limit."""
    size = card.latent_size or 0
    array = tensor(proto, field, shape=(None, size))
    count(array.shape[0], f"{field}.shape", limits)
    return torch.from_numpy(array.astype(np.float32, copy=True))


@dataclass(frozen=True)
class Condition:
    """A class condition resolved for n images: embedding vectors always, class ids when the request gave ids."""

    embeddings: Tensor
    class_ids: Tensor | None


def class_ids(ids: Any, field: str, n: int, num_classes: int) -> Tensor:
    """One id per image, or one id for every image; each in [0, num_classes)."""
    values = list(ids)
    if len(values) not in (1, n):
        raise invalid_argument(field, f"give 1 or {n} class ids (one per image), got {len(values)}", "BAD_SHAPE")
    for index, value in enumerate(values):
        if not 0 <= value < num_classes:
            raise invalid_argument(
                f"{field}[{index}]", f"class id {value} is out of range [0, {num_classes})", "CLASS_OUT_OF_RANGE"
            )
    result = torch.tensor(values, dtype=torch.int64)
    return result.expand(n).clone() if len(values) == 1 else result


def embeddings(proto: common_pb2.Tensor, field: str, n: int, size: int) -> Tensor:
    """Free class embedding vectors, float32 [n, size] or [1, size] (then used for every image)."""
    array = tensor(proto, field)
    if array.ndim != 2 or array.shape[1] != size:
        raise invalid_argument(
            f"{field}.shape",
            f"must be [N, {size}] (the generator's embedding size), got {list(array.shape)}",
            "BAD_EMBEDDING_SIZE",
        )
    if array.shape[0] not in (1, n):
        raise invalid_argument(f"{field}.shape", f"give 1 or {n} embedding vectors, got {array.shape[0]}", "BAD_SHAPE")
    result = torch.from_numpy(array.astype(np.float32, copy=True))
    return result.expand(n, size).clone() if array.shape[0] == 1 else result


def float_images(proto: common_pb2.Tensor, field: str, *, batched: bool) -> npt.NDArray[np.float32]:
    """A float [N, C, H, W] (or [C, H, W]) tensor in [-1, 1], or uint8 [N, H, W, C] ([H, W, C]) in [0, 255]."""
    array = tensor(proto, field, dtypes=(*IMAGE_FLOATS, common_pb2.DTYPE_UINT8))
    rank = 4 if batched else 3
    if array.ndim != rank:
        layout = ("[N, C, H, W] for floats, [N, H, W, C] for uint8") if batched else "[C, H, W] / [H, W, C]"
        raise invalid_argument(f"{field}.shape", f"must be {layout}, got {list(array.shape)}", "BAD_SHAPE")
    if array.dtype == np.uint8:
        return np.moveaxis(array, -1, -3).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    values = array.astype(np.float32)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < -1 - _RANGE_SLACK or high > 1 + _RANGE_SLACK:
        raise invalid_argument(
            f"{field}.data",
            f"float pixels must lie in [-1, 1], got [{low:g}, {high:g}] (send uint8 [N, H, W, C] for 0-255 pixels)",
            "OUT_OF_RANGE",
        )
    return np.clip(values, -1.0, 1.0)


def images(batch: common_pb2.ImageBatch, field: str, limits: Limits, *, channels: int = 3) -> Tensor:
    """An ImageBatch as float32 [N, channels, H, W] in [-1, 1]; grey images are repeated to `channels`.

    Every image of a request must have the same size (they are scored as one batch), within the pixel limit.
    """
    has_tensor = batch.HasField("tensor")
    if has_tensor and len(batch.images):
        raise invalid_argument(field, "set either `images` or `tensor`, not both", "AMBIGUOUS_IMAGES")
    if has_tensor:
        count(int(batch.tensor.shape[0]) if batch.tensor.shape else 0, f"{field}.tensor.shape", limits)
        array = float_images(batch.tensor, f"{field}.tensor", batched=True)
        _check_size(array.shape[-2:], f"{field}.tensor.shape", limits)
        return _channels(torch.from_numpy(array), f"{field}.tensor.shape", channels)
    count(len(batch.images), f"{field}.images", limits)
    decoded = [_one_image(image, f"{field}.images[{i}]", limits) for i, image in enumerate(batch.images)]
    first = decoded[0].shape
    for index, image in enumerate(decoded):
        if image.shape[-2:] != first[-2:]:
            raise invalid_argument(
                f"{field}.images[{index}]",
                f"is {image.shape[-1]}x{image.shape[-2]} but images[0] is {first[-1]}x{first[-2]}; "
                "all images of a request must have one size",
                "BAD_IMAGE_SIZE",
            )
    converted = [_channels(image[None], f"{field}.images[{i}]", channels) for i, image in enumerate(decoded)]
    return torch.cat(converted)


def image(proto: common_pb2.Image, field: str, limits: Limits, *, channels: int = 3) -> Tensor:
    """One Image (PNG or tensor) as float32 [channels, H, W] in [-1, 1]; grey is repeated to `channels`."""
    return _channels(_one_image(proto, field, limits)[None], field, channels)[0]


def _one_image(image: common_pb2.Image, field: str, limits: Limits) -> Tensor:
    which = image.WhichOneof("content")
    if which == "png":
        try:
            pixels = png_decode(image.png, field=f"{field}.png", max_pixels=limits.max_pixels)
        except ValueError as error:
            raise from_value_error(error, "BAD_PNG") from None
        array = np.moveaxis(pixels, -1, 0).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        return torch.from_numpy(array)
    if which == "tensor":
        array = float_images(image.tensor, f"{field}.tensor", batched=False)
        _check_size(array.shape[-2:], f"{field}.tensor.shape", limits)
        return torch.from_numpy(array)
    raise invalid_argument(field, "an image needs `png` or `tensor`", "EMPTY_IMAGE")


def _check_size(size: tuple[int, ...], field: str, limits: Limits) -> None:
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise invalid_argument(field, f"an image needs at least one pixel, got {width}x{height}", "BAD_IMAGE_SIZE")
    if height * width > limits.max_pixels:
        raise invalid_argument(
            field, f"{width}x{height} exceeds this server's limit of {limits.max_pixels} pixels", "BAD_IMAGE_SIZE"
        )


def _channels(batch: Tensor, field: str, channels: int) -> Tensor:
    have = batch.shape[1]
    if have == channels:
        return batch
    if have == 1:
        return batch.expand(-1, channels, -1, -1).contiguous()
    raise invalid_argument(
        field, f"{have} channels; expected {channels}" + (" (or 1 for grey)" if channels > 1 else ""), "BAD_CHANNELS"
    )


def exact_images(proto: common_pb2.Tensor, field: str, shape: tuple[int, int, int], n: int) -> Tensor:
    """A float32 [n, C, H, W] tensor whose image shape must equal the model's (gradients with respect to images)."""
    array = tensor(proto, field)
    expected = (n, *shape)
    if array.shape != expected:
        reason = "BAD_IMAGE_SIZE" if array.ndim == 4 and array.shape[2:] != expected[2:] else "BAD_SHAPE"
        if array.ndim == 4 and array.shape[1] != shape[0]:
            reason = "BAD_CHANNELS"
        raise invalid_argument(f"{field}.shape", f"must be {list(expected)}, got {list(array.shape)}", reason)
    return torch.from_numpy(array.astype(np.float32, copy=True))
