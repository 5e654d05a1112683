"""Fixtures for the service tests: a registry of tiny random-weight models of the built-in architectures (with ONNX
exports), settings that point at it, and real servers on free loopback ports.

Each test module declares `tiny_registry` as a session fixture calling `shared_tiny_registry`, which builds the
registry once per session however many modules use it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gansteer.tensors import to_tensor_proto
from gansteer.v1 import common_pb2
from gansteer_server.config import Settings
from gansteer_server.models import ModelRegistry
from gansteer_server.models.architectures.scenes import ScenesClassifier, ScenesDiscriminator, ScenesGenerator
from gansteer_server.servers.app import RunningService, start_generation_server, start_scoring_server
from gansteer_server.servers.batching import RunBatch

GEN, DISC, CLF, CLF_B, UNCOND = "tiny-gen", "tiny-disc", "tiny-clf", "tiny-clf-b", "tiny-uncond"
LATENT, EMBEDDING, CLASSES, RESOLUTION = 16, 8, 10, 32
GEN_KWARGS = {
    "z_size": LATENT,
    "num_classes": CLASSES,
    "embedding_size": EMBEDDING,
    "widths": [16, 8, 8, 8],
    "spectral_norm": False,
}
DISC_KWARGS = {"num_classes": CLASSES, "widths": [8, 8, 8, 8], "spectral_norm": False}
CLF_KWARGS = {"num_classes": CLASSES, "widths": [4, 8, 8], "feature_size": 8}
IMAGES = {"resolution": RESOLUTION, "channels": 3, "value_range": [-1.0, 1.0]}
CLASS_NAMES = [f"class{i}" for i in range(CLASSES)]
PRIOR_MEAN, PRIOR_STD = 2.0, 0.5  # tiny-uncond's Gaussian latent prior: N(2, 0.25 I)


class _GeneratorForOnnx(nn.Module):
    def __init__(self, generator: ScenesGenerator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.generator(z, embedding)


class _Unconditional(nn.Module):
    """G(z) -> images in [0, 1]: an unconditional generator with a value range other than the wire's."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(LATENT, 3 * 8 * 8)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(z)).view(-1, 3, 8, 8)


def _randomise_batch_norm(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics, so that eval-mode batch norm is not the identity."""
    for child in module.modules():
        if isinstance(child, nn.BatchNorm2d):
            child.running_mean.copy_(torch.randn(child.num_features, generator=generator) * 0.1)
            child.running_var.copy_(torch.rand(child.num_features, generator=generator) + 0.5)


def _export_onnx(module: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], path: Path) -> None:
    torch.onnx.export(
        module,
        inputs,
        str(path),
        dynamo=False,
        input_names=names,
        output_names=["out"],
        dynamic_axes={name: {0: "batch"} for name in [*names, "out"]},
        opset_version=17,
    )


def build_tiny_registry(root: Path) -> ModelRegistry:
    """Register tiny-gen (with ONNX), tiny-disc, tiny-clf and tiny-clf-b (the same classifier under a second
    name; with ONNX) and tiny-uncond (TorchScript, values in [0, 1], a Gaussian latent prior) under root."""
    torch.manual_seed(0)
    seed = torch.Generator().manual_seed(0)
    registry = ModelRegistry([root / "registry"])
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)

    generator = ScenesGenerator(**{**GEN_KWARGS, "widths": tuple(GEN_KWARGS["widths"])}).eval()
    discriminator = ScenesDiscriminator(**{**DISC_KWARGS, "widths": tuple(DISC_KWARGS["widths"])}).eval()
    classifier = ScenesClassifier(**{**CLF_KWARGS, "widths": tuple(CLF_KWARGS["widths"])}).eval()
    for module in (generator, discriminator, classifier):
        _randomise_batch_norm(module, seed)

    _export_onnx(
        _GeneratorForOnnx(generator),
        (torch.randn(2, LATENT), torch.randn(2, EMBEDDING)),
        ["z", "embedding"],
        work / "gen.onnx",
    )
    _export_onnx(classifier, (torch.zeros(2, 3, RESOLUTION, RESOLUTION),), ["images"], work / "clf.onnx")
    for name, module in (("gen", generator), ("disc", discriminator), ("clf", classifier)):
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(work / f"{name}.safetensors"))

    registry.register(
        GEN,
        {
            "kind": "generator",
            "format": "safetensors",
            "weights": "weights.safetensors",
            "onnx": "model.onnx",
            "architecture": "scenes_generator",
            "architecture_kwargs": GEN_KWARGS,
            "latent_size": LATENT,
            "num_classes": CLASSES,
            "class_names": CLASS_NAMES,
            "embedding_size": EMBEDDING,
            **IMAGES,
            "description": "tiny random-weight generator for tests",
        },
        {"weights.safetensors": work / "gen.safetensors", "model.onnx": work / "gen.onnx"},
    )
    registry.register(
        DISC,
        {
            "kind": "discriminator",
            "format": "safetensors",
            "weights": "weights.safetensors",
            "architecture": "scenes_discriminator",
            "architecture_kwargs": DISC_KWARGS,
            "num_classes": CLASSES,
            **IMAGES,
        },
        {"weights.safetensors": work / "disc.safetensors"},
    )
    for name in (CLF, CLF_B):
        _register_classifier(registry, name, work)
    traced = torch.jit.trace(_Unconditional().eval(), torch.randn(2, LATENT))
    traced.save(str(work / "uncond.pt"))
    save_file(
        {"mean": torch.full((LATENT,), PRIOR_MEAN), "covariance": torch.eye(LATENT) * PRIOR_STD**2},
        str(work / "prior.safetensors"),
    )
    registry.register(
        UNCOND,
        {
            "kind": "generator",
            "format": "torchscript",
            "weights": "model.pt",
            "latent_size": LATENT,
            "latent_prior": {"type": "gaussian", "mean_cov": "prior.safetensors"},
            "resolution": 8,
            "channels": 3,
            "value_range": [0.0, 1.0],
        },
        {"model.pt": work / "uncond.pt", "prior.safetensors": work / "prior.safetensors"},
    )
    return registry


def _register_classifier(registry: ModelRegistry, name: str, work: Path) -> None:
    registry.register(
        name,
        {
            "kind": "classifier",
            "format": "safetensors",
            "weights": "weights.safetensors",
            "onnx": "model.onnx",
            "architecture": "scenes_classifier",
            "architecture_kwargs": CLF_KWARGS,
            "num_classes": CLASSES,
            "class_names": CLASS_NAMES,
            **IMAGES,
        },
        {"weights.safetensors": work / "clf.safetensors", "model.onnx": work / "clf.onnx"},
    )


_SHARED: dict[str, ModelRegistry] = {}


def shared_tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    """The session's tiny registry, built on first use."""
    if "registry" not in _SHARED:
        _SHARED["registry"] = build_tiny_registry(tmp_path_factory.mktemp("tiny-zoo"))
    return _SHARED["registry"]


def make_settings(registry: ModelRegistry, **overrides: Any) -> Settings:
    """Settings for a test server: the tiny registry, free ports, metrics endpoints off; `max_batch=4` style
    keyword overrides become `GANSTEER_MAX_BATCH=4` (tuples are joined with commas)."""
    env = {
        "GANSTEER_REGISTRY": str(registry.writable_root),
        "GANSTEER_GENERATION_PORT": "0",
        "GANSTEER_SCORING_PORT": "0",
        "GANSTEER_GENERATION_METRICS_PORT": "0",
        "GANSTEER_SCORING_METRICS_PORT": "0",
        "GANSTEER_MAX_DELAY_MS": "2",
    }
    for key, value in overrides.items():
        env["GANSTEER_" + key.upper()] = ",".join(value) if isinstance(value, tuple | list) else str(value)
    return Settings.from_env(env)


@contextmanager
def running(service: str, settings: Settings, **kwargs: Any) -> Iterator[tuple[RunningService, grpc.Channel]]:
    """A real server of `service` on a free loopback port and a channel to it; stopped on exit."""
    start = start_generation_server if service == "generation" else start_scoring_server
    server = start(settings, **kwargs)
    channel = grpc.insecure_channel(server.address)
    try:
        yield server, channel
    finally:
        channel.close()
        server.stop(grace=1.0)


@dataclass
class Hold:
    """A batcher held at its next batch: `entered` is set once a batch waits, `release` lets every batch run."""

    entered: threading.Event
    release: threading.Event


@contextmanager
def held(server: RunningService, model: str) -> Iterator[Hold]:
    """Hold the batches of `model` (`name@version`, whose batcher exists: send it one request first) until
    `release` is set, so that tests can queue requests behind a running batch without relying on timing."""
    batcher = server.batchers.get(model, _no_batcher)
    original = batcher._run
    hold = Hold(threading.Event(), threading.Event())

    def run(key: Hashable, inputs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        hold.entered.set()
        hold.release.wait(30)
        return original(key, inputs)

    batcher._run = run
    try:
        yield hold
    finally:
        hold.release.set()
        batcher._run = original


def _no_batcher() -> RunBatch:
    raise AssertionError("send the model one request before holding its batcher")


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.002)


def float_tensor(array: Any) -> common_pb2.Tensor:
    return to_tensor_proto(np.asarray(array, dtype=np.float32))


def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """Run `call()`, expecting it to fail; (code, details)."""
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()
