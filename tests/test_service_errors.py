"""Bad input gets a clear error and harms nothing: each bad request gets its status code and a message naming the
field (also in the ErrorDetails trailer), while another client keeps being served. Plus auth, health, reflection,
message size and internal errors."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from service_fixtures import (
    CLF,
    CLF_B,
    EMBEDDING,
    GEN,
    LATENT,
    UNCOND,
    float_tensor,
    held,
    make_settings,
    running,
    shared_tiny_registry,
    wait_until,
)

from gansteer.tensors import png_encode, to_tensor_proto
from gansteer.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from gansteer_server.models import ModelRegistry
from gansteer_server.servers.errors import error_details
from gansteer_server.wire import convert

pytestmark = pytest.mark.service
MAX_IMAGES, MAX_PIXELS = 16, 64 * 64


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return shared_tiny_registry(tmp_path_factory)


@dataclass
class GoodClient:
    """Another client generating images in a loop on its own channel; records every failure."""

    address: str
    calls: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            request = generation_pb2.GenerateRequest(
                model=ref(GEN), seeded=generation_pb2.SeededLatents(seed=1, count=2)
            )
            while not self._stop.is_set():
                try:
                    assert len(stub.Generate(request, timeout=10).images.images) == 2
                    self.calls += 1
                except (grpc.RpcError, AssertionError) as error:
                    self.failures.append(repr(error))

    def served_after(self, count: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.calls <= count and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.calls > count


@dataclass
class Services:
    generation: generation_pb2_grpc.GenerationServiceStub
    scoring: scoring_pb2_grpc.ScoringServiceStub
    good: GoodClient


@pytest.fixture(scope="module")
def services(tiny_registry: ModelRegistry) -> Iterator[Services]:
    settings = make_settings(tiny_registry, max_images_per_request=MAX_IMAGES, max_image_pixels=MAX_PIXELS)
    with running("generation", settings) as (gen_server, gen_channel), running("scoring", settings) as (_, channel):
        good = GoodClient(gen_server.address)
        thread = threading.Thread(target=good.run, daemon=True)
        thread.start()
        yield Services(
            generation_pb2_grpc.GenerationServiceStub(gen_channel), scoring_pb2_grpc.ScoringServiceStub(channel), good
        )
        good._stop.set()
        thread.join(10)
    assert good.failures == []


def ref(name: str) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=name)


def tensor(array: Any, dtype: Any = np.float32) -> common_pb2.Tensor:
    return to_tensor_proto(np.asarray(array, dtype=dtype))


def images(array: Any) -> common_pb2.ImageBatch:
    return common_pb2.ImageBatch(tensor=float_tensor(array))


def ids(*values: int) -> common_pb2.ClassCondition:
    return common_pb2.ClassCondition(class_ids=common_pb2.ClassIds(ids=list(values)))


def latents(n: int = 2) -> common_pb2.Tensor:
    return float_tensor(np.zeros((n, LATENT)))


def generate(**kwargs: Any) -> generation_pb2.GenerateRequest:
    kwargs.setdefault("model", ref(GEN))
    return generation_pb2.GenerateRequest(**kwargs)


def backward(**kwargs: Any) -> generation_pb2.BackwardRequest:
    defaults = {
        "model": ref(GEN),
        "latents": latents(),
        "condition": ids(1),
        "grad_images": float_tensor(np.zeros((2, 3, 32, 32))),
    }
    return generation_pb2.BackwardRequest(**{**defaults, **kwargs})


def score(*outputs: scoring_pb2.OutputRequest, batch: common_pb2.ImageBatch | None = None) -> scoring_pb2.ScoreRequest:
    return scoring_pb2.ScoreRequest(
        images=batch or images(np.zeros((2, 3, 32, 32))), model=ref(CLF), outputs=list(outputs)
    )


def output(name: str, **kwargs: Any) -> scoring_pb2.OutputRequest:
    return scoring_pb2.OutputRequest(output=name, **kwargs)


def params(**values: Any) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


def nan_latents() -> common_pb2.Tensor:
    values = np.zeros((2, LATENT), dtype=np.float32)
    values[1, 3] = np.nan
    return float_tensor(values)


def short_bytes() -> common_pb2.Tensor:
    message = latents()
    message.data = message.data[:-4]
    return message


def mixed_sizes() -> common_pb2.ImageBatch:
    return common_pb2.ImageBatch(
        images=[
            common_pb2.Image(png=png_encode(np.zeros((32, 32, 3), np.uint8))),
            common_pb2.Image(png=png_encode(np.zeros((16, 16, 3), np.uint8))),
        ]
    )


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
# (service, method, request, expected code, the field the message must name), with the case as the test id
CASES = [
    pytest.param(
        "generation",
        "Generate",
        lambda: generate(model=ref("nope"), latents=latents()),
        NOT_FOUND,
        "model",
        id="unknown model",
    ),
    pytest.param(
        "generation",
        "GetModel",
        lambda: generation_pb2.GetModelRequest(model=ref(f"{GEN}@9")),
        NOT_FOUND,
        "model",
        id="unknown version",
    ),
    pytest.param(
        "scoring", "Score", lambda: score(output("no_such_output")), NOT_FOUND, "outputs[0].output", id="unknown scorer"
    ),
    pytest.param(
        "scoring",
        "Score",
        lambda: score(output("logits", model=ref("nope"))),
        NOT_FOUND,
        "outputs[0].model",
        id="unknown scorer model",
    ),
    pytest.param(
        "generation",
        "Generate",
        lambda: generate(model=ref(CLF), latents=latents()),
        INVALID,
        "model",
        id="not a generator",
    ),
    pytest.param(
        "generation",
        "Generate",
        lambda: generate(latents=tensor(np.zeros((2, LATENT)), np.float64)),
        INVALID,
        "latents.dtype",
        id="wrong dtype",
    ),
    pytest.param(
        "generation",
        "Generate",
        lambda: generate(latents=float_tensor(np.zeros((2, 5)))),
        INVALID,
        "latents.shape",
        id="wrong shape",
    ),
    pytest.param(
        "generation",
        "Generate",
        lambda: generate(latents=short_bytes()),
        INVALID,
        "latents.data",
        id="wrong byte length",
    ),
    pytest.param("generation", "Generate", lambda: generate(latents=nan_latents()), INVALID, "latents.data", id="NaN"),
    pytest.param(
        "scoring",
        "Score",
        lambda: score(output("logits"), batch=images(np.full((1, 3, 32, 32), np.inf))),
        INVALID,
        "images.tensor.data",
        id="infinite pixels",
    ),
    pytest.param(
        "generation",
        "Generate",
        lambda: generate(latents=latents(), condition=ids(1, 10)),
        INVALID,
        "condition.class_ids.ids[1]",
        id="class id out of range",
    ),
    pytest.param(
        "generation",
        "Backward",
        lambda: backward(condition=ids(-1)),
        INVALID,
        "condition.class_ids.ids[0]",
        id="negative class id",
    ),
    pytest.param(
        "generation",
        "Generate",
        lambda: generate(
            latents=latents(),
            condition=common_pb2.ClassCondition(embeddings=float_tensor(np.zeros((2, EMBEDDING + 1)))),
        ),
        INVALID,
        "condition.embeddings.shape",
        id="embedding of wrong size",
    ),
    pytest.param(
        "generation",
        "Generate",
        lambda: generate(seeded=generation_pb2.SeededLatents(count=MAX_IMAGES + 1)),
        INVALID,
        "seeded.count",
        id="too many images drawn",
    ),
    pytest.param(
        "scoring",
        "Score",
        lambda: score(output("logits"), batch=images(np.zeros((MAX_IMAGES + 1, 3, 8, 8)))),
        INVALID,
        "images.tensor.shape",
        id="too many images sent",
    ),
    pytest.param(
        "scoring",
        "Score",
        lambda: score(
            output("logits"), batch=common_pb2.ImageBatch(images=[common_pb2.Image(png=b"\x89PNG not really")])
        ),
        INVALID,
        "images.images[0].png",
        id="undecodable PNG",
    ),
    pytest.param(
        "scoring",
        "Score",
        lambda: score(output("logits"), batch=mixed_sizes()),
        INVALID,
        "images.images[1]",
        id="images of two sizes",
    ),
    pytest.param(
        "scoring",
        "Score",
        lambda: score(output("logits"), batch=images(np.zeros((1, 3, 65, 64)))),
        INVALID,
        "images.tensor.shape",
        id="image too large",
    ),
    pytest.param(
        "scoring",
        "ScoreGrad",
        lambda: scoring_pb2.ScoreGradRequest(
            images=images(np.zeros((1, 4, 32, 32))),
            model=ref(CLF),
            terms=[scoring_pb2.ObjectiveTerm(output=output("class_logit", params=params(class_id=0)), weight=1)],
        ),
        INVALID,
        "images.tensor.shape",
        id="wrong channel count",
    ),
    pytest.param(
        "generation",
        "Backward",
        lambda: backward(condition=common_pb2.ClassCondition()),
        INVALID,
        "condition",
        id="no condition for a conditional generator",
    ),
    pytest.param(
        "generation",
        "Backward",
        lambda: backward(grad_images=float_tensor(np.zeros((2, 3, 16, 16)))),
        INVALID,
        "grad_images.shape",
        id="gradient of wrong image size",
    ),
    pytest.param(
        "generation",
        "Backward",
        lambda: backward(grad_images=float_tensor(np.zeros((2, 1, 32, 32)))),
        INVALID,
        "grad_images.shape",
        id="gradient of wrong channel count",
    ),
    pytest.param(
        "scoring",
        "Score",
        lambda: score(output("logits"), batch=images(np.full((1, 3, 32, 32), 255.0))),
        INVALID,
        "images.tensor.data",
        id="float pixels out of range",
    ),
    pytest.param(
        "scoring",
        "Score",
        lambda: score(output("class_logit", params=params(class_id="three"))),
        INVALID,
        "outputs[0].params.class_id",
        id="bad scorer parameter",
    ),
    pytest.param(
        "scoring",
        "Score",
        lambda: score(output("logits", params=params(temperature=2))),
        INVALID,
        "outputs[0].params.temperature",
        id="unknown scorer parameter",
    ),
    pytest.param(
        "scoring",
        "Score",
        lambda: score(output("class_logit", params=params(class_id=10))),
        INVALID,
        "outputs[0].params.class_id",
        id="class id beyond the classifier",
    ),
    pytest.param("scoring", "Score", lambda: score(output("realism")), INVALID, "model", id="model of the wrong kind"),
    pytest.param(
        "scoring",
        "Score",
        lambda: score(output("logits", noise=scoring_pb2.BinomialNoise(impressions=10))),
        INVALID,
        "outputs[0].noise",
        id="noise on a non-rate",
    ),
    pytest.param(
        "scoring",
        "Score",
        lambda: score(output("logits"), output("logits")),
        INVALID,
        "outputs[1].key",
        id="duplicate output keys",
    ),
    pytest.param(
        "scoring",
        "ScoreGrad",
        lambda: scoring_pb2.ScoreGradRequest(
            images=images(np.zeros((1, 3, 32, 32))),
            model=ref(CLF),
            terms=[scoring_pb2.ObjectiveTerm(output=output("log_probs"), weight=1)],
        ),
        INVALID,
        "terms[0].output.output",
        id="non-scalar objective term",
    ),
    pytest.param(
        "generation",
        "Generate",
        lambda: generate(seeded=generation_pb2.SeededLatents(count=1), truncation=0.0),
        INVALID,
        "truncation",
        id="truncation too small",
    ),
    pytest.param(
        "generation",
        "Generate",
        lambda: generate(model=ref(UNCOND), latents=latents(), condition=ids(1)),
        INVALID,
        "condition",
        id="condition on an unconditional generator",
    ),
    pytest.param("generation", "Generate", lambda: generate(), INVALID, "latent_source", id="no latent source"),
    pytest.param(
        "generation",
        "GenerateStream",
        lambda: generate(seeded=generation_pb2.SeededLatents(count=2), chunk_size=-1),
        INVALID,
        "chunk_size",
        id="negative chunk size",
    ),
]


@pytest.mark.parametrize(("service", "method", "request_of", "code", "field"), CASES)
def test_bad_input_is_refused_naming_the_field_while_others_are_served(
    services: Services,
    service: str,
    method: str,
    request_of: Callable[[], Any],
    code: grpc.StatusCode,
    field: str,
) -> None:
    stub = services.generation if service == "generation" else services.scoring
    before = services.good.calls
    with pytest.raises(grpc.RpcError) as refused:
        answer = getattr(stub, method)(request_of(), timeout=10)
        if method == "GenerateStream":
            list(answer)
    assert refused.value.code() == code, refused.value.details()
    assert refused.value.details().startswith(f"{field}: "), refused.value.details()
    (detail,) = error_details(refused.value)
    assert detail.field == field and detail.reason and detail.message
    assert services.good.served_after(before)
    assert services.good.failures == []


def test_one_objective_uses_one_model_per_kind(services: Services) -> None:
    def term(model: str) -> scoring_pb2.ObjectiveTerm:
        return scoring_pb2.ObjectiveTerm(output=output("class_logit", model=ref(model), params=params(class_id=0)))

    def request(*models: str) -> scoring_pb2.ScoreGradRequest:
        return scoring_pb2.ScoreGradRequest(images=images(np.zeros((1, 3, 32, 32))), terms=[term(m) for m in models])

    services.scoring.ScoreGrad(request(CLF, f"{CLF}@1"))  # one classifier, named twice
    with pytest.raises(grpc.RpcError) as refused:
        services.scoring.ScoreGrad(request(CLF, CLF_B))
    assert refused.value.code() == INVALID and refused.value.details().startswith("terms[1].output.model: ")


def test_an_internal_error_is_reported_and_the_server_keeps_serving(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = convert.image_batch

    def broken_for_three(images: torch.Tensor, as_png: bool) -> common_pb2.ImageBatch:
        if images.shape[0] == 3:  # only this test's request; the good client asks for two
            raise RuntimeError("a bug")
        return original(images, as_png)

    request = generate(latents=latents(3))
    with monkeypatch.context() as patch:
        patch.setattr(convert, "image_batch", broken_for_three)
        with pytest.raises(grpc.RpcError) as failed:
            services.generation.Generate(request)
    assert failed.value.code() == grpc.StatusCode.INTERNAL and "incident" in failed.value.details()
    assert "a bug" not in failed.value.details()  # internals stay in the server's log
    assert len(services.generation.Generate(request).images.images) == 3


def test_messages_above_the_size_limit_are_refused(tiny_registry: ModelRegistry) -> None:
    with running("generation", make_settings(tiny_registry, max_message_mb=1)) as (_, channel):
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        big = generate(latents=float_tensor(np.zeros((20_000, LATENT))))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(big)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(stub.Generate(generate(latents=latents())).images.images) == 2


def test_a_call_its_client_gave_up_on_logs_no_error(
    tiny_registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A request cancelled in the batch queue by its deadline ends quietly: no "Exception serializing message!"."""
    request = generate(latents=latents())
    with running("generation", make_settings(tiny_registry)) as (server, channel):
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        stub.Generate(request)  # the batcher exists
        with caplog.at_level(logging.DEBUG), held(server, f"{GEN}@1") as hold:
            first = threading.Thread(target=stub.Generate, args=(request,))
            first.start()
            assert hold.entered.wait(10)  # the first batch runs (held): the next request waits in the queue
            with pytest.raises(grpc.RpcError) as expired:
                stub.Generate(request, timeout=0.3)
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            hold.release.set()
            first.join(30)
            assert len(stub.Generate(request).images.images) == 2
            wait_until(lambda: any("ended by the client" in record.getMessage() for record in caplog.records))
    # the server has stopped (its calls finished) before the log is read
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


# --- auth, health, reflection -----------------------------------------------------------------------------------------


def test_api_keys_are_required_when_configured(tiny_registry: ModelRegistry) -> None:
    settings = make_settings(tiny_registry, api_keys="k1,k2", auth="on")
    request = generation_pb2.ListModelsRequest()
    with running("generation", settings) as (_, channel):
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "k1"),)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListModels(request, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert refused.value.details().startswith("authorization: ")
        assert stub.ListModels(request, metadata=(("authorization", "Bearer k2"),)).models
        stream = stub.GenerateStream(generate(seeded=generation_pb2.SeededLatents(count=1)))
        with pytest.raises(grpc.RpcError) as refused:
            list(stream)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no key


def test_auth_off_by_explicit_setting_accepts_calls_without_a_key(tiny_registry: ModelRegistry) -> None:
    settings = make_settings(tiny_registry, api_keys="k1", auth="off")
    assert settings.auth_disabled
    with running("scoring", settings) as (_, channel):
        assert scoring_pb2_grpc.ScoringServiceStub(channel).ListScorers(scoring_pb2.ListScorersRequest()).scorers


@pytest.mark.parametrize("service", ["generation", "scoring"])
def test_health_and_reflection_answer(tiny_registry: ModelRegistry, service: str) -> None:
    name = f"gansteer.v1.{service.capitalize()}Service"
    with running(service, make_settings(tiny_registry)) as (server, channel):
        health = health_pb2_grpc.HealthStub(channel)
        for served in ("", name):
            assert health.Check(health_pb2.HealthCheckRequest(service=served)).status == 1  # SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) >= {name, "grpc.health.v1.Health"}
        assert database.FindFileContainingSymbol(name).package == "gansteer.v1"
        assert {name, "grpc.reflection.v1.ServerReflection"} <= reflection_v1_services(channel)
        server.health.enter_graceful_shutdown()  # what stop() does first, so balancers drain the replica
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING


def reflection_v1_services(channel: grpc.Channel) -> set[str]:
    """ListServices through `grpc.reflection.v1` (the name grpcurl tries first); its messages are v1alpha's."""
    info = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (response,) = info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    return {service.name for service in response.list_services_response.service}
