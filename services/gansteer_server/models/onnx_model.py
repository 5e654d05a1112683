"""Forward-only serving through ONNX Runtime (decision 3): the services may sample and score with an ONNX export,
but anything that needs a gradient must load the torch model, so asking this wrapper for one fails loudly."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

# ONNX Runtime reports input types as strings; inputs are cast to them so that callers may pass float64 numpy or
# Python ints the way they would to a torch module.
_NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class ForwardOnlyError(RuntimeError):
    """A gradient or training was asked of a model served by ONNX Runtime; load it with `prefer_onnx=False`."""


class _ForwardOnly(torch.autograd.Function):
    """Ties ONNX outputs to inputs that require grad, so that a backward pass reaching them raises a clear error
    instead of silently treating the model as constant."""

    @staticmethod
    def forward(ctx: Any, name: str, run: Callable[[], tuple[Tensor, ...]], *inputs: Tensor) -> tuple[Tensor, ...]:
        ctx.model_name = name
        return run()

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> None:
        raise ForwardOnlyError(
            f"{ctx.model_name} is served by ONNX Runtime, which computes no gradients; "
            "load the model with prefer_onnx=False to differentiate through it"
        )


class OnnxModel:
    """An ONNX export behind the calling convention of a torch module: torch tensors or numpy arrays in (positional
    in the graph's input order, or by input name), torch tensors on `device` out."""

    def __init__(
        self,
        path: Path | str,
        device: str | torch.device = "cpu",
        *,
        providers: list[Any] | None = None,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.label = f"{self.path.parent.name}/{self.path.name}"  # the model's folder (`name@version`) and file
        self.device = torch.device(device)
        self._threads = threads
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.path), sess_options=options, providers=providers or _providers_for(self.device)
        )
        self._inputs = self.session.get_inputs()
        self.input_names = [i.name for i in self._inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor | tuple[Tensor, ...]:
        feeds = self._feeds(args, kwargs)
        tracked = [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and v.requires_grad]

        def run() -> tuple[Tensor, ...]:
            outputs = self.session.run(self.output_names, feeds)
            return tuple(torch.from_numpy(np.ascontiguousarray(o)).to(self.device) for o in outputs)

        outputs = _ForwardOnly.apply(self.label, run, *tracked) if tracked and torch.is_grad_enabled() else run()
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    forward = __call__

    def _feeds(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
        if len(args) > len(self._inputs):
            raise TypeError(f"{self.label} takes {len(self._inputs)} inputs ({self.input_names}), got {len(args)}")
        named = dict(zip(self.input_names, args, strict=False))
        for key, value in kwargs.items():
            if key not in self.input_names:
                raise TypeError(f"{self.label} has no input {key!r} (inputs: {self.input_names})")
            if key in named:
                raise TypeError(f"input {key!r} given twice")
            named[key] = value
        missing = [name for name in self.input_names if name not in named]
        if missing:
            raise TypeError(f"{self.label} is missing input(s) {missing}")
        feeds = {}
        for spec in self._inputs:
            value = named[spec.name]
            array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
            dtype = _NUMPY_DTYPES.get(spec.type)
            feeds[spec.name] = array.astype(dtype, copy=False) if dtype is not None else array
        return feeds

    def eval(self) -> OnnxModel:
        return self

    def train(self, mode: bool = True) -> OnnxModel:
        if mode:
            raise ForwardOnlyError(f"{self.label} is an ONNX export for inference; it cannot be trained")
        return self

    def requires_grad_(self, requires_grad: bool = True) -> OnnxModel:
        if requires_grad:
            raise ForwardOnlyError(f"{self.label} is served by ONNX Runtime and has no trainable parameters")
        return self

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return iter(())

    def to(self, device: str | torch.device) -> OnnxModel:
        """A model serving on `device`; a new session when the execution provider must change."""
        device = torch.device(device)
        if device.type == self.device.type and device.index == self.device.index:
            return self
        return OnnxModel(self.path, device, threads=self._threads)

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, device={str(self.device)!r}, providers={self.session.get_providers()})"


def _providers_for(device: torch.device) -> list[Any]:
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        warnings.warn(
            "CUDA was asked for an ONNX model but this onnxruntime has no CUDA provider (install the onnxruntime-gpu "
            "extra); running it on the CPU and moving its outputs to the GPU",
            RuntimeWarning,
            stacklevel=3,
        )
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
