"""The generation service over real gRPC: what a client sends, what it gets back, and that it matches the model run
locally (images, the vector-Jacobian product) and its ONNX export."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from service_fixtures import (
    CLF,
    EMBEDDING,
    GEN,
    LATENT,
    PRIOR_MEAN,
    PRIOR_STD,
    UNCOND,
    float_tensor,
    make_settings,
    running,
    shared_tiny_registry,
    status_of,
)

from gansteer.tensors import from_tensor_proto
from gansteer.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from gansteer_server.config import BUILTIN_REGISTRY
from gansteer_server.models import ModelRegistry

pytestmark = pytest.mark.service


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return shared_tiny_registry(tmp_path_factory)


@pytest.fixture(scope="module")
def stub(tiny_registry: ModelRegistry) -> Iterator[generation_pb2_grpc.GenerationServiceStub]:
    with running("generation", make_settings(tiny_registry, max_batch=8)) as (_, channel):
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def ref(name: str) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=name)


def seeded(name: str, seed: int, count: int, **kwargs: object) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        model=ref(name),
        seeded=generation_pb2.SeededLatents(seed=seed, count=count),
        format=common_pb2.IMAGE_FORMAT_TENSOR,
        **kwargs,
    )


def images_of(response: generation_pb2.GenerateResponse) -> np.ndarray:
    return from_tensor_proto(response.images.tensor)


def test_list_models_shows_every_kind_and_filters(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    names = [m.name for m in stub.ListModels(generation_pb2.ListModelsRequest()).models]
    assert {GEN, CLF, UNCOND} <= set(names)
    assert names == sorted(names)
    generators = stub.ListModels(generation_pb2.ListModelsRequest(kind=common_pb2.MODEL_KIND_GENERATOR)).models
    assert all(m.kind == common_pb2.MODEL_KIND_GENERATOR for m in generators)
    tiny = stub.ListModels(generation_pb2.ListModelsRequest(name_contains="tiny-", all_versions=True)).models
    assert sorted(m.name for m in tiny) == ["tiny-clf", "tiny-clf-b", "tiny-disc", "tiny-gen", "tiny-uncond"]


def test_get_model_gives_the_card(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    card = stub.GetModel(generation_pb2.GetModelRequest(model=ref(GEN))).card
    assert (card.name, card.version, card.kind) == (GEN, 1, common_pb2.MODEL_KIND_GENERATOR)
    assert (card.latent_size, card.embedding_size, card.num_classes, card.resolution) == (LATENT, EMBEDDING, 10, 32)
    assert card.prior.kind == common_pb2.LatentPrior.KIND_STANDARD_NORMAL
    assert list(card.backends) == ["onnx"]
    assert json.loads(card.card_json)["architecture"] == "scenes_generator"
    assert stub.GetModel(generation_pb2.GetModelRequest(model=ref(f"{GEN}@1"))).card.version == 1


def test_generate_is_reproducible_from_the_returned_latents(
    stub: generation_pb2_grpc.GenerationServiceStub, tiny_registry: ModelRegistry
) -> None:
    first = stub.Generate(seeded(GEN, seed=7, count=4))
    again = stub.Generate(seeded(GEN, seed=7, count=4))
    np.testing.assert_array_equal(from_tensor_proto(first.latents), from_tensor_proto(again.latents))
    assert len(first.class_ids) == 4 and list(first.class_ids) == list(again.class_ids)

    replay = stub.Generate(
        generation_pb2.GenerateRequest(
            model=ref(GEN),
            latents=first.latents,
            condition=common_pb2.ClassCondition(class_ids=common_pb2.ClassIds(ids=first.class_ids)),
            format=common_pb2.IMAGE_FORMAT_TENSOR,
        )
    )
    np.testing.assert_allclose(images_of(replay), images_of(first), atol=1e-5)

    generator = tiny_registry.load(GEN)
    with torch.no_grad():
        local = generator(torch.from_numpy(from_tensor_proto(first.latents, copy=True)), torch.tensor(first.class_ids))
    np.testing.assert_allclose(images_of(first), local.numpy(), atol=1e-5)
    embeddings = from_tensor_proto(first.class_embeddings)
    np.testing.assert_allclose(embeddings, generator.embedding.weight[list(first.class_ids)].detach().numpy())


def test_png_output_matches_the_tensor_output(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    as_tensor = images_of(stub.Generate(seeded(GEN, seed=3, count=2)))
    as_png = stub.Generate(
        generation_pb2.GenerateRequest(model=ref(GEN), seeded=generation_pb2.SeededLatents(seed=3, count=2))
    )
    assert len(as_png.images.images) == 2
    for png, expected in zip(as_png.images.images, as_tensor, strict=True):
        pixels = np.asarray(Image.open(io.BytesIO(png.png)).convert("RGB"), dtype=np.float32)
        np.testing.assert_allclose(pixels / 127.5 - 1, expected.transpose(1, 2, 0), atol=1 / 127.5 + 1e-6)


def test_truncation_redraws_large_components(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    response = stub.Generate(seeded(GEN, seed=1, count=8, truncation=0.5))
    latents = from_tensor_proto(response.latents)
    assert np.abs(latents).max() <= 0.5
    np.testing.assert_array_equal(latents, from_tensor_proto(stub.Generate(seeded(GEN, 1, 8, truncation=0.5)).latents))


def test_free_embeddings_are_used_as_given(
    stub: generation_pb2_grpc.GenerationServiceStub, tiny_registry: ModelRegistry
) -> None:
    z = torch.randn(3, LATENT, generator=torch.Generator().manual_seed(0))
    embedding = torch.randn(1, EMBEDDING, generator=torch.Generator().manual_seed(1))
    response = stub.Generate(
        generation_pb2.GenerateRequest(
            model=ref(GEN),
            latents=float_tensor(z),
            condition=common_pb2.ClassCondition(embeddings=float_tensor(embedding)),
            format=common_pb2.IMAGE_FORMAT_TENSOR,
        )
    )
    assert list(response.class_ids) == []
    np.testing.assert_allclose(from_tensor_proto(response.class_embeddings), embedding.expand(3, -1).numpy())
    with torch.no_grad():
        local = tiny_registry.load(GEN)(z, embedding.expand(3, -1))
    np.testing.assert_allclose(images_of(response), local.numpy(), atol=1e-5)


def test_unconditional_generator_maps_its_value_range_to_the_wire(
    stub: generation_pb2_grpc.GenerationServiceStub, tiny_registry: ModelRegistry
) -> None:
    response = stub.Generate(seeded(UNCOND, seed=2, count=3))
    assert list(response.class_ids) == [] and not response.HasField("class_embeddings")
    with torch.no_grad():
        local = tiny_registry.load(UNCOND)(torch.from_numpy(from_tensor_proto(response.latents, copy=True)))
    np.testing.assert_allclose(images_of(response), local.numpy() * 2 - 1, atol=1e-5)


def test_a_gaussian_prior_is_served_and_sampled(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    prior = stub.GetModel(generation_pb2.GetModelRequest(model=ref(UNCOND))).card.prior
    assert prior.kind == common_pb2.LatentPrior.KIND_GAUSSIAN
    np.testing.assert_array_equal(from_tensor_proto(prior.mean), np.full(LATENT, PRIOR_MEAN, np.float32))
    np.testing.assert_allclose(from_tensor_proto(prior.covariance), np.eye(LATENT) * PRIOR_STD**2)
    listed = stub.ListModels(generation_pb2.ListModelsRequest(name_contains=UNCOND)).models[0].prior
    assert listed.kind == common_pb2.LatentPrior.KIND_GAUSSIAN and not listed.mean.data  # kept small in listings
    latents = from_tensor_proto(stub.Generate(seeded(UNCOND, seed=0, count=16)).latents)
    assert abs(latents.mean() - PRIOR_MEAN) < 0.1 and abs(latents.std() - PRIOR_STD) < 0.1


def test_generate_stream_answers_in_chunks(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    request = seeded(GEN, seed=11, count=10, chunk_size=4)
    chunks = list(stub.GenerateStream(request))
    assert [(c.offset, c.total, images_of(c).shape[0]) for c in chunks] == [(0, 10, 4), (4, 10, 4), (8, 10, 2)]
    whole = stub.Generate(seeded(GEN, seed=11, count=10))
    np.testing.assert_array_equal(
        np.concatenate([from_tensor_proto(c.latents) for c in chunks]), from_tensor_proto(whole.latents)
    )
    np.testing.assert_allclose(np.concatenate([images_of(c) for c in chunks]), images_of(whole), atol=1e-5)
    assert [i for c in chunks for i in c.class_ids] == list(whole.class_ids)


@pytest.mark.parametrize("condition", ["class_ids", "embeddings"])
def test_backward_agrees_with_autograd(
    stub: generation_pb2_grpc.GenerationServiceStub, tiny_registry: ModelRegistry, condition: str
) -> None:
    seed = torch.Generator().manual_seed(5)
    z = torch.randn(3, LATENT, generator=seed)
    grad_images = torch.randn(3, 3, 32, 32, generator=seed)
    generator = tiny_registry.load(GEN)
    ids = torch.tensor([0, 4, 9])
    e = generator.embedding.weight[ids].detach().clone()
    if condition == "class_ids":
        message = common_pb2.ClassCondition(class_ids=common_pb2.ClassIds(ids=ids.tolist()))
    else:
        e = torch.randn(3, EMBEDDING, generator=seed)
        message = common_pb2.ClassCondition(embeddings=float_tensor(e))
    response = stub.Backward(
        generation_pb2.BackwardRequest(
            model=ref(GEN), latents=float_tensor(z), condition=message, grad_images=float_tensor(grad_images)
        )
    )
    z_leaf, e_leaf = z.clone().requires_grad_(True), e.clone().requires_grad_(True)
    dz, de = torch.autograd.grad(generator(z_leaf, e_leaf), (z_leaf, e_leaf), grad_outputs=grad_images)
    np.testing.assert_allclose(from_tensor_proto(response.grad_latents), dz.numpy(), atol=1e-5)
    np.testing.assert_allclose(from_tensor_proto(response.grad_class_embeddings), de.numpy(), atol=1e-5)
    assert response.model.name == GEN and response.model.version == 1


def test_backward_of_an_unconditional_generator_uses_the_wire_range(
    stub: generation_pb2_grpc.GenerationServiceStub, tiny_registry: ModelRegistry
) -> None:
    z = torch.randn(2, LATENT)
    grad_images = torch.randn(2, 3, 8, 8)
    response = stub.Backward(
        generation_pb2.BackwardRequest(
            model=ref(UNCOND), latents=float_tensor(z), grad_images=float_tensor(grad_images)
        )
    )
    leaf = z.clone().requires_grad_(True)
    (dz,) = torch.autograd.grad(tiny_registry.load(UNCOND)(leaf) * 2 - 1, leaf, grad_outputs=grad_images)
    np.testing.assert_allclose(from_tensor_proto(response.grad_latents), dz.numpy(), atol=1e-5)
    assert not response.HasField("grad_class_embeddings")


def _onnx_and_torch_images(settings_registry: ModelRegistry, model: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    results = []
    for onnx in ((), (model,)):
        settings = make_settings(settings_registry, onnx_models=onnx)
        with running("generation", settings) as (server, channel):
            response = generation_pb2_grpc.GenerationServiceStub(channel).Generate(seeded(model, seed=4, count=count))
            results.append(images_of(response))
            card = server.store.card(model)
            assert server.store.backend_name(card) == ("onnx" if onnx else "torch")
    return results[0], results[1]


def test_onnx_and_torch_generators_agree(tiny_registry: ModelRegistry) -> None:
    torch_images, onnx_images = _onnx_and_torch_images(tiny_registry, GEN, count=6)
    np.testing.assert_allclose(onnx_images, torch_images, atol=1e-4)


@pytest.mark.skipif(not any(BUILTIN_REGISTRY.glob("scenes-gen@*")), reason="the built-in zoo is not trained yet")
def test_onnx_and_torch_agree_on_the_builtin_generator(tiny_registry: ModelRegistry) -> None:
    torch_images, onnx_images = _onnx_and_torch_images(tiny_registry, "scenes-gen", count=4)
    np.testing.assert_allclose(onnx_images, torch_images, atol=1e-4)


def test_the_console_script_serves_and_stops_on_sigterm(tiny_registry: ModelRegistry, unused_tcp_port: int) -> None:
    env = {
        **os.environ,
        "GANSTEER_REGISTRY": str(tiny_registry.writable_root),
        "GANSTEER_GENERATION_PORT": str(unused_tcp_port),
        "GANSTEER_GENERATION_METRICS_PORT": "0",
        "GANSTEER_TORCH_THREADS": "1",
    }
    script = os.path.join(os.path.dirname(sys.executable), "gansteer-generation")
    process = subprocess.Popen([script], env=env, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{unused_tcp_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            assert images_of(stub.Generate(seeded(GEN, seed=0, count=2), timeout=30)).shape == (2, 3, 32, 32)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    logs = [json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")]
    assert any(entry["message"].startswith("serving generation") for entry in logs)
    assert any(entry.get("torch_threads") == 1 for entry in logs)
    assert any("stopped" in entry["message"] for entry in logs)


def test_metrics_are_served_over_http(tiny_registry: ModelRegistry, unused_tcp_port: int) -> None:
    settings = make_settings(tiny_registry)
    with running("generation", settings, metrics_port=unused_tcp_port) as (server, channel):
        generation_pb2_grpc.GenerationServiceStub(channel).Generate(seeded(GEN, seed=0, count=2))
        deadline = time.monotonic() + 5
        while server.metrics.value("gansteer_requests_total", method="Generate", code="OK") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        page = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    for name in ("gansteer_requests_total", "gansteer_request_seconds_bucket", "gansteer_batch_images_bucket"):
        assert name in page
    assert "gansteer_queue_images" in page


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_unknown_model_is_not_found(stub: generation_pb2_grpc.GenerationServiceStub) -> None:
    code, details = status_of(lambda: stub.GetModel(generation_pb2.GetModelRequest(model=ref("no-such-model"))))
    assert code == grpc.StatusCode.NOT_FOUND and details.startswith("model:")
