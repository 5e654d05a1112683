"""Arrays and images through the SDK's wire codec: exact round trips, and refusals that name the field."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gansteer.tensors import from_tensor_proto, png_decode, png_encode, to_tensor_proto
from gansteer.v1 import common_pb2

WIRE_DTYPES = {
    np.float32: common_pb2.DTYPE_FLOAT32,
    np.float16: common_pb2.DTYPE_FLOAT16,
    np.float64: common_pb2.DTYPE_FLOAT64,
    np.int64: common_pb2.DTYPE_INT64,
    np.int32: common_pb2.DTYPE_INT32,
    np.uint8: common_pb2.DTYPE_UINT8,
    np.bool_: common_pb2.DTYPE_BOOL,
}


@pytest.mark.parametrize("dtype", list(WIRE_DTYPES))
def test_every_dtype_round_trips_exactly(dtype: type) -> None:
    values = (np.random.default_rng(1).standard_normal((2, 3, 4)) * 50).astype(dtype)
    tensor = common_pb2.Tensor.FromString(to_tensor_proto(values).SerializeToString())
    assert tensor.dtype == WIRE_DTYPES[dtype]
    assert list(tensor.shape) == [2, 3, 4]
    decoded = from_tensor_proto(tensor)
    assert decoded.dtype == values.dtype
    np.testing.assert_array_equal(decoded, values)


def test_scalars_empty_and_strided_arrays_round_trip() -> None:
    for values in (np.float32(2.5), np.zeros((0, 7), np.int64), np.arange(24, dtype=np.int32).reshape(4, 6).T[::2]):
        decoded = from_tensor_proto(to_tensor_proto(values))
        assert decoded.shape == np.shape(values)
        np.testing.assert_array_equal(decoded, values)


def test_big_endian_input_goes_out_little_endian() -> None:
    values = np.array([1.0, -2.0, 3.5], dtype=">f4")
    tensor = to_tensor_proto(values)
    assert tensor.data == np.array([1.0, -2.0, 3.5], dtype="<f4").tobytes()
    decoded = from_tensor_proto(tensor)
    assert decoded.dtype.isnative
    np.testing.assert_array_equal(decoded, values)


def test_decoded_arrays_are_read_only_views_unless_copied() -> None:
    tensor = to_tensor_proto(np.ones(3, np.float32))
    assert not from_tensor_proto(tensor).flags.writeable
    copied = from_tensor_proto(tensor, copy=True)
    copied[0] = 5
    assert from_tensor_proto(tensor)[0] == 1


def test_wrong_byte_length_is_refused_naming_the_field() -> None:
    tensor = common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(
        ValueError, match=r"latents\.data: has 20 bytes, but dtype DTYPE_FLOAT32 and shape \[2, 3\] need 24"
    ):
        from_tensor_proto(tensor, field="latents")


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (common_pb2.Tensor(shape=[1], data=b"\0" * 4), r"grad_images\.dtype: DTYPE_UNSPECIFIED"),
        (common_pb2.Tensor(dtype=99, shape=[1], data=b"\0"), r"grad_images\.dtype: unknown dtype 99"),
        (common_pb2.Tensor(dtype=common_pb2.DTYPE_UINT8, shape=[-1, 2], data=b""), r"grad_images\.shape"),
        (common_pb2.Tensor(dtype=common_pb2.DTYPE_BOOL, shape=[2], data=b"\x01\x02"), r"grad_images\.data: bool"),
    ],
)
def test_malformed_tensors_are_refused_naming_the_field(tensor: common_pb2.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_tensor_proto(tensor, field="grad_images")


def test_dtypes_the_wire_does_not_carry_are_refused() -> None:
    with pytest.raises(ValueError, match="class_ids: dtype int16 cannot be sent"):
        to_tensor_proto(np.zeros(3, np.int16), field="class_ids")


def test_png_round_trip_keeps_pixels() -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(png_decode(png_encode(rgb)), rgb)
    grey = rgb[:, :, 0]
    np.testing.assert_array_equal(png_decode(png_encode(grey)), grey[:, :, None])
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 128, np.uint8)], axis=2)
    np.testing.assert_array_equal(png_decode(png_encode(Image.fromarray(rgba))), rgb)


def test_png_decode_refuses_bad_input_naming_the_field() -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    big = png_encode(np.zeros((40, 50), np.uint8))
    cases = [
        (b"", "targets\\[0\\].png: empty"),
        (b"not an image", "targets\\[0\\].png: not a decodable PNG"),
        (big[: len(big) // 2], "targets\\[0\\].png: not a decodable PNG"),
        (jpeg.getvalue(), "targets\\[0\\].png: expected a PNG file, got JPEG"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=message):
            png_decode(data, field="targets[0].png")
    with pytest.raises(ValueError, match="50x40 image has more than 1000 pixels"):
        png_decode(big, field="targets[0].png", max_pixels=1000)


def test_png_encode_refuses_arrays_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="dtype must be uint8"):
        png_encode(np.zeros((4, 4, 3), np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape must be"):
        png_encode(np.zeros((4, 4, 2), np.uint8))
