"""The scoring service over real gRPC: the outputs of the scorer registry, computed by the models a request names,
equal to the same computation run locally; ScoreGrad's gradient equal to torch.autograd's; ONNX parity."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import struct_pb2
from service_fixtures import CLF, DISC, float_tensor, make_settings, running, shared_tiny_registry

from gansteer.tensors import from_tensor_proto, png_encode, to_tensor_proto
from gansteer.v1 import common_pb2, scoring_pb2, scoring_pb2_grpc
from gansteer_server.algorithms import scorers
from gansteer_server.config import BUILTIN_REGISTRY
from gansteer_server.models import ModelRegistry

pytestmark = pytest.mark.service


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return shared_tiny_registry(tmp_path_factory)


@pytest.fixture(scope="module")
def stub(tiny_registry: ModelRegistry) -> Iterator[scoring_pb2_grpc.ScoringServiceStub]:
    with running("scoring", make_settings(tiny_registry, max_batch=8)) as (_, channel):
        yield scoring_pb2_grpc.ScoringServiceStub(channel)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def ref(name: str) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=name)


def params(**values: Any) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


def output(name: str, **kwargs: Any) -> scoring_pb2.OutputRequest:
    return scoring_pb2.OutputRequest(output=name, **kwargs)


def batch(images: torch.Tensor) -> common_pb2.ImageBatch:
    return common_pb2.ImageBatch(tensor=float_tensor(images))


def values_of(response: scoring_pb2.ScoreResponse) -> dict[str, np.ndarray]:
    return {o.key: from_tensor_proto(o.values) for o in response.outputs}


def test_list_scorers_names_outputs_models_and_params(stub: scoring_pb2_grpc.ScoringServiceStub) -> None:
    listed = {s.name: s for s in stub.ListScorers(scoring_pb2.ListScorersRequest()).scorers}
    assert set(listed) == set(scorers.output_names())
    assert listed["log_probs"].model_kind == common_pb2.MODEL_KIND_CLASSIFIER
    assert f"{CLF}@1" in listed["log_probs"].models and f"{DISC}@1" in listed["realism"].models
    assert f"{CLF}@1" in listed["feature_stats"].models  # a classifier serves as feature extractor
    assert listed["colour_single"].model_kind == common_pb2.MODEL_KIND_UNSPECIFIED
    assert not listed["top_k_indices"].differentiable and listed["class_log_prob"].differentiable
    class_id = {p.name: p for p in listed["class_log_prob"].params}["class_id"]
    assert (class_id.type, class_id.default_json) == ("int", "")  # required
    assert {p.name: p.default_json for p in listed["top_k_log_probs"].params}["k"] == "5"
    discriminators = stub.ListScorers(
        scoring_pb2.ListScorersRequest(model_kind=common_pb2.MODEL_KIND_DISCRIMINATOR)
    ).scorers
    assert [s.name for s in discriminators] == ["realism"]


def test_score_matches_the_local_models(
    stub: scoring_pb2_grpc.ScoringServiceStub, tiny_registry: ModelRegistry, images: torch.Tensor
) -> None:
    response = stub.Score(
        scoring_pb2.ScoreRequest(
            images=batch(images),
            model=ref(CLF),
            outputs=[
                output("log_probs"),
                output("class_logit", params=params(class_id=2)),
                output("top_k_indices", params=params(k=3)),
                output("feature_stats", params=params(layer="stage2")),
                output("realism", model=ref(DISC), key="realism_uncond"),
                output("realism", model=ref(DISC), params=params(class_id=1), key="realism_class1"),
                output("colour_three"),
            ],
        )
    )
    got = values_of(response)
    classifier, discriminator = tiny_registry.load(CLF), tiny_registry.load(DISC)
    with torch.no_grad():
        logits = classifier(images)
        stage2 = classifier.features(images)["stage2"].flatten(2)
        np.testing.assert_allclose(got["log_probs"], F.log_softmax(logits, 1).numpy(), atol=1e-5)
        np.testing.assert_allclose(got["class_logit"], logits[:, 2].numpy(), atol=1e-5)
        np.testing.assert_array_equal(got["top_k_indices"], logits.topk(3, dim=1).indices.numpy())
        np.testing.assert_allclose(got["feature_stats"][:, :8], stage2.mean(2).numpy(), atol=1e-5)
        np.testing.assert_allclose(got["realism_uncond"], discriminator(images).numpy(), atol=1e-4)
        np.testing.assert_allclose(got["realism_class1"], discriminator(images, torch.full((3,), 1)).numpy(), atol=1e-4)
    expected_colour = scorers.compute_output("colour_three", images, scorers.ScoringModels())
    np.testing.assert_allclose(got["colour_three"], expected_colour.numpy(), atol=1e-6)
    assert got["top_k_indices"].dtype == np.int64 and got["log_probs"].dtype == np.float32
    models = {o.key: o.model.name for o in response.outputs}
    assert models["log_probs"] == CLF and models["realism_uncond"] == DISC and models["colour_three"] == ""


def test_png_uint8_and_grey_images_are_converted(stub: scoring_pb2_grpc.ScoringServiceStub) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    as_float = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    request = [output("logits", model=ref(CLF))]
    from_png = stub.Score(
        scoring_pb2.ScoreRequest(
            images=common_pb2.ImageBatch(images=[common_pb2.Image(png=png_encode(p)) for p in pixels]),
            outputs=request,
        )
    )
    from_uint8 = stub.Score(
        scoring_pb2.ScoreRequest(images=common_pb2.ImageBatch(tensor=to_tensor_proto(pixels)), outputs=request)
    )
    from_float = stub.Score(scoring_pb2.ScoreRequest(images=batch(as_float), outputs=request))
    np.testing.assert_allclose(values_of(from_png)["logits"], values_of(from_float)["logits"], atol=1e-5)
    np.testing.assert_allclose(values_of(from_uint8)["logits"], values_of(from_float)["logits"], atol=1e-5)
    grey = stub.Score(scoring_pb2.ScoreRequest(images=batch(as_float[:, :1]), outputs=request))
    repeated = stub.Score(
        scoring_pb2.ScoreRequest(images=batch(as_float[:, :1].expand(-1, 3, -1, -1)), outputs=request)
    )
    np.testing.assert_allclose(values_of(grey)["logits"], values_of(repeated)["logits"], atol=1e-6)


def test_binomial_noise_is_reproducible_per_request(
    stub: scoring_pb2_grpc.ScoringServiceStub, images: torch.Tensor
) -> None:
    def noisy(seed: int) -> np.ndarray:
        request = scoring_pb2.ScoreRequest(
            images=batch(images),
            outputs=[output("colour_single", noise=scoring_pb2.BinomialNoise(impressions=50, seed=seed))],
        )
        return values_of(stub.Score(request))["colour_single"]

    first = noisy(1)
    np.testing.assert_array_equal(first, noisy(1))
    np.testing.assert_allclose(first * 50, np.round(first * 50), atol=1e-4)  # counts out of 50 impressions
    assert not np.array_equal(first, noisy(2))


def test_score_grad_agrees_with_autograd(
    stub: scoring_pb2_grpc.ScoringServiceStub, tiny_registry: ModelRegistry, images: torch.Tensor
) -> None:
    response = stub.ScoreGrad(
        scoring_pb2.ScoreGradRequest(
            images=batch(images),
            model=ref(CLF),
            terms=[
                scoring_pb2.ObjectiveTerm(output=output("class_log_prob", params=params(class_id=3)), weight=1.0),
                scoring_pb2.ObjectiveTerm(output=output("realism", model=ref(DISC)), weight=0.1),
                scoring_pb2.ObjectiveTerm(output=output("colour_two"), weight=-0.5),
            ],
        )
    )
    classifier, discriminator = tiny_registry.load(CLF), tiny_registry.load(DISC)
    leaf = images.clone().requires_grad_(True)
    colour = scorers.compute_output("colour_two", leaf, scorers.ScoringModels())
    objective = F.log_softmax(classifier(leaf), 1)[:, 3] + 0.1 * discriminator(leaf) - 0.5 * colour
    (grad,) = torch.autograd.grad(objective.sum(), leaf)
    np.testing.assert_allclose(from_tensor_proto(response.values), objective.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(from_tensor_proto(response.grad_images), grad.numpy(), atol=1e-5)
    assert [t.key for t in response.terms] == ["class_log_prob", "realism", "colour_two"]
    np.testing.assert_allclose(from_tensor_proto(response.terms[2].values), colour.detach().numpy(), atol=1e-6)


def test_images_of_another_size_are_resized_for_the_model_and_keep_their_gradient(
    stub: scoring_pb2_grpc.ScoringServiceStub, tiny_registry: ModelRegistry
) -> None:
    small = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    term = scoring_pb2.ObjectiveTerm(output=output("class_logit", params=params(class_id=0)), weight=1.0)
    response = stub.ScoreGrad(scoring_pb2.ScoreGradRequest(images=batch(small), model=ref(CLF), terms=[term]))
    leaf = small.clone().requires_grad_(True)
    resized = F.interpolate(leaf, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    logit = tiny_registry.load(CLF)(resized)[:, 0]
    (grad,) = torch.autograd.grad(logit.sum(), leaf)
    assert from_tensor_proto(response.grad_images).shape == (2, 3, 16, 16)
    np.testing.assert_allclose(from_tensor_proto(response.grad_images), grad.numpy(), atol=1e-5)


def _onnx_and_torch_logits(registry: ModelRegistry, model: str, images: torch.Tensor) -> tuple[np.ndarray, ...]:
    results = []
    for onnx in ((), (model,)):
        with running("scoring", make_settings(registry, onnx_models=onnx)) as (server, channel):
            request = scoring_pb2.ScoreRequest(images=batch(images), model=ref(model), outputs=[output("logits")])
            results.append(values_of(scoring_pb2_grpc.ScoringServiceStub(channel).Score(request))["logits"])
            assert server.store.backend_name(server.store.card(model)) == ("onnx" if onnx else "torch")
    return tuple(results)


def test_onnx_and_torch_classifiers_agree(tiny_registry: ModelRegistry, images: torch.Tensor) -> None:
    torch_logits, onnx_logits = _onnx_and_torch_logits(tiny_registry, CLF, images)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)


@pytest.mark.skipif(not any(BUILTIN_REGISTRY.glob("scenes-clf@*")), reason="the built-in zoo is not trained yet")
def test_onnx_and_torch_agree_on_the_builtin_classifier(tiny_registry: ModelRegistry, images: torch.Tensor) -> None:
    torch_logits, onnx_logits = _onnx_and_torch_logits(tiny_registry, "scenes-clf", images)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
