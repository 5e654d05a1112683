"""A validated spec as bytes, stored with its job and decoded by the worker: tensors and plain values only, read
back with `torch.load(weights_only=True)`, so a stored spec can never run code."""

from __future__ import annotations

import dataclasses
import io
import types
import typing
from typing import Any

import torch
from torch import Tensor


def encode_spec(spec: Any) -> bytes:
    """A frozen dataclass of plain values, tuples, tensors and nested dataclasses, as torch.save bytes."""
    buffer = io.BytesIO()
    torch.save(_to_plain(spec), buffer)
    return buffer.getvalue()


def decode_spec(spec_type: type[Any], data: bytes) -> Any:
    plain = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return _from_plain(spec_type, plain)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return tuple(_to_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str, Tensor)):
        return value
    raise TypeError(f"a spec may hold plain values, tuples, dicts, tensors and dataclasses, not {type(value)}")


def _from_plain(annotation: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        nested = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        return _from_plain(nested[0], value) if nested and isinstance(value, dict) else value
    if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        hints = typing.get_type_hints(annotation)
        return annotation(**{name: _from_plain(hints[name], item) for name, item in value.items()})
    if origin is tuple and isinstance(value, (tuple, list)):
        args = typing.get_args(annotation)
        inner = args[0] if args else Any
        return tuple(_from_plain(inner, v) for v in value)
    return value
