"""Numpy arrays and images to and from gansteer's wire messages.

A `Tensor` travels as raw little-endian bytes with a dtype and a shape, as in the Open Inference Protocol: no
per-element encoding, so a batch of images costs one buffer copy. The receiving side trusts nothing: the byte
length must match the dtype and shape exactly, and every error names the request field it came from, so a server
can pass the message on to the client unchanged.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage

from gansteer.v1 import common_pb2

_WIRE_DTYPES: dict[common_pb2.DType, np.dtype[Any]] = {
    common_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    common_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    common_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    common_pb2.DTYPE_INT64: np.dtype("<i8"),
    common_pb2.DTYPE_INT32: np.dtype("<i4"),
    common_pb2.DTYPE_UINT8: np.dtype("u1"),
    common_pb2.DTYPE_BOOL: np.dtype("?"),
}
# numpy (kind, itemsize) -> wire dtype; byte order is deliberately not part of the key.
_BY_KIND: dict[tuple[str, int], common_pb2.DType] = {(dt.kind, dt.itemsize): wire for wire, dt in _WIRE_DTYPES.items()}
_SUPPORTED = ", ".join(str(dt.newbyteorder("=")) for dt in _WIRE_DTYPES.values())


def to_tensor_proto(array: npt.ArrayLike, *, field: str = "tensor") -> common_pb2.Tensor:
    """Encode an array (any byte order, any memory layout) as a `Tensor` in C order, little-endian.

    Raises ValueError naming `field` for dtypes the wire does not carry (e.g. int16, complex, objects): converting
    them silently would change values or their meaning, so the caller chooses the conversion.
    """
    values = np.asarray(array)
    wire = _BY_KIND.get((values.dtype.kind, values.dtype.itemsize))
    if wire is None:
        raise ValueError(f"{field}: dtype {values.dtype} cannot be sent; use one of {_SUPPORTED}")
    data = values.astype(_WIRE_DTYPES[wire], copy=False).tobytes(order="C")
    return common_pb2.Tensor(dtype=wire, shape=values.shape, data=data)


def from_tensor_proto(tensor: common_pb2.Tensor, *, field: str = "tensor", copy: bool = False) -> npt.NDArray[Any]:
    """Decode a `Tensor` into an array in native byte order.

    Without `copy` the array is a read-only view of the message's bytes (no copy for large batches); pass
    `copy=True` for a writable array. Raises ValueError naming `field` (e.g. `field="latents"` gives messages about
    `latents.data`) for an unknown dtype, a negative dimension, a byte length that does not match dtype and shape,
    or bool elements other than 0 and 1.
    """
    dtype = _WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"{field}.dtype: {_dtype_name(tensor.dtype)} is not a tensor dtype; use one of {_SUPPORTED}")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{field}.shape: dimensions must not be negative, got {list(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(
            f"{field}.data: has {len(tensor.data)} bytes, but dtype {_dtype_name(tensor.dtype)} "
            f"and shape {list(shape)} need {expected}"
        )
    values = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    if dtype.kind == "b" and values.size and values.view(np.uint8).max() > 1:
        raise ValueError(f"{field}.data: bool elements must be the bytes 0 or 1")
    if not dtype.isnative:
        values = values.astype(dtype.newbyteorder("="))
    return values.copy() if copy else values


def _dtype_name(wire: common_pb2.DType) -> str:
    try:
        return str(common_pb2.DType.Name(wire))
    except ValueError:
        return f"unknown dtype {wire}"


def png_encode(image: PILImage.Image | npt.NDArray[np.uint8]) -> bytes:
    """PNG bytes of a PIL image or of a uint8 array shaped [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]."""
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _array_to_pil(array: npt.NDArray[Any]) -> PILImage.Image:
    if array.dtype != np.uint8:
        raise ValueError(f"png_encode: array dtype must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"png_encode: array shape must be [H, W] or [H, W, 1|3|4], got {list(array.shape)}")
    return PILImage.fromarray(np.ascontiguousarray(array))


# PIL modes decoded as grey; every other 8-bit mode is decoded as RGB.
_GREY_MODES = frozenset({"1", "L", "LA"})
_COLOUR_MODES = frozenset({"P", "PA", "RGB", "RGBA"})


def png_decode(data: bytes, *, field: str = "png", max_pixels: int | None = None) -> npt.NDArray[np.uint8]:
    """Decode PNG bytes into a uint8 array [H, W, C]: C = 1 for grey images, 3 for colour; alpha is dropped.

    Raises ValueError naming `field` for empty or undecodable data, a file that is not a PNG, a 16-bit image, or
    more than `max_pixels` pixels (checked from the header, before decompressing anything).
    """
    if not data:
        raise ValueError(f"{field}: empty image data")
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise ValueError(f"{field}: expected a PNG file, got {image.format}")
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ValueError(f"{field}: {width}x{height} image has more than {max_pixels} pixels")
            if image.mode in _GREY_MODES:
                return np.asarray(image.convert("L"))[:, :, None]
            if image.mode in _COLOUR_MODES:
                return np.asarray(image.convert("RGB"))
            raise ValueError(f"{field}: PNG mode {image.mode} is not supported; send 8-bit grey or colour")
    except (OSError, SyntaxError, PILImage.DecompressionBombError) as error:
        detail = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(error))  # no object reprs in messages
        raise ValueError(f"{field}: not a decodable PNG ({detail})") from error
