"""The SDK's conversions and error mapping, without a server: what a user passes in and what comes back out."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from gansteer import InversionResult, _convert, errors, tensors
from gansteer.kinds import inversion_spec, result_type
from gansteer.types import JobState, ModelInfo, ProgressEvent, ResultEvent, StateChanged
from gansteer.v1 import common_pb2, optimization_pb2


def _png_pixels(image: common_pb2.Image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.png)))


def test_every_image_input_becomes_the_same_png(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    pil = Image.fromarray(pixels)
    path = tmp_path / "target.png"
    pil.save(path)
    jpeg = tmp_path / "target.bmp"
    pil.save(jpeg)
    for given in (pil, path, str(path), pixels, path.read_bytes(), jpeg, pixels / 255.0):
        assert np.array_equal(_png_pixels(_convert.image_to_proto(given)), pixels), type(given)


def test_png_files_and_bytes_travel_unchanged(tmp_path: Path) -> None:
    """The server, not the SDK, judges PNG data, so its message (and pixel limit) is the one the user sees."""
    truncated = tensors.png_encode(np.zeros((4, 4, 3), np.uint8))[:30]
    assert _convert.image_to_proto(truncated).png == truncated
    path = tmp_path / "broken.png"
    path.write_bytes(truncated)
    assert _convert.image_to_proto(path).png == truncated


def test_images_that_are_no_images_are_refused_naming_the_field(tmp_path: Path) -> None:
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    cases = [
        (not_an_image, "not a decodable image file"),
        (np.zeros((4, 4, 2), np.uint8), "array shape"),
        (np.full((4, 4), 1.5), "[0, 1]"),
        (np.zeros((4, 4), np.int16), "dtype"),
        (42, "expected a PIL image"),
    ]
    for given, text in cases:
        with pytest.raises(errors.InvalidArgument, match="targets\\[3\\]") as caught:
            _convert.image_to_proto(given, field="targets[3]")  # type: ignore[arg-type]
        assert text in str(caught.value)
        assert caught.value.field == "targets[3]" and caught.value.reason == "BAD_IMAGE"
    with pytest.raises(FileNotFoundError):
        _convert.image_to_proto(tmp_path / "missing.png")


def test_wire_tensors_become_pil_images() -> None:
    chw = np.stack([np.full((2, 3), -1.0), np.zeros((2, 3)), np.ones((2, 3))]).astype(np.float32)
    batch = common_pb2.ImageBatch(tensor=tensors.to_tensor_proto(chw[None]))
    (image,) = _convert.batch_to_pil(batch)
    assert image.size == (3, 2) and image.mode == "RGB"
    assert np.asarray(image)[0, 0].tolist() == [0, 128, 255]
    grey = common_pb2.ImageBatch(
        images=[common_pb2.Image(tensor=tensors.to_tensor_proto(np.zeros((2, 2, 1), np.uint8)))]
    )
    assert _convert.batch_to_pil(grey)[0].mode == "L"


def test_error_mapping_keeps_message_and_details() -> None:
    details = common_pb2.ErrorDetails(
        details=[common_pb2.ErrorDetail(field="spec.inversion.targets[0].png", reason="BAD_PNG", message="empty")]
    )

    class FakeRpcError(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode, trailing: tuple[tuple[str, bytes], ...] = ()) -> None:
            self._code, self._trailing = code, trailing

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return "spec.inversion.targets[0].png: empty"

        def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
            return self._trailing

    error = errors.from_rpc_error(
        FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, (("gansteer-error-details-bin", details.SerializeToString()),))
    )
    assert isinstance(error, errors.InvalidArgument) and isinstance(error, ValueError)
    assert str(error) == "spec.inversion.targets[0].png: empty"
    assert error.details == (errors.ErrorDetail("spec.inversion.targets[0].png", "BAD_PNG", "empty"),)
    assert error.field == "spec.inversion.targets[0].png" and error.code == grpc.StatusCode.INVALID_ARGUMENT
    expected = {
        grpc.StatusCode.NOT_FOUND: errors.NotFound,
        grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
        grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
        grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
        grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
        grpc.StatusCode.CANCELLED: errors.Cancelled,
        grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
        grpc.StatusCode.INTERNAL: errors.Internal,
        grpc.StatusCode.UNKNOWN: errors.Internal,
    }
    for code, cls in expected.items():
        mapped = errors.from_rpc_error(FakeRpcError(code, (("gansteer-error-details-bin", b"\xff\xff"),)))
        assert type(mapped) is cls and mapped.details == ()
    assert "localhost:1 unavailable" in str(
        errors.from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE), target="localhost:1")
    )


def test_inversion_spec_sends_only_what_the_caller_set() -> None:
    spec = inversion_spec(np.zeros((4, 4, 3), np.uint8), model="scenes-gen@2")
    inversion = spec.inversion
    assert inversion.generator.name == "scenes-gen@2" and len(inversion.targets) == 1
    assert not inversion.HasField("optimizer") and inversion.budget.amount == 300  # the server requires a budget
    assert not inversion.HasField("lambda_s") and not inversion.HasField("conditioned_class")
    assert spec.idempotency_key  # makes a retried SubmitJob harmless
    full = inversion_spec(
        [np.zeros((4, 4), np.uint8)] * 2,
        model="g",
        optimizer="lbfgs",
        budget=50,
        budget_unit="generator_calls",
        lambda_r=0.0,
        conditioned_class="forest",
        card=_card(("desert", "forest")),
        optimizer_options={"momentum": 0.5},
        labels={"who": "test"},
    ).inversion
    assert full.optimizer.name == "lbfgs" and full.optimizer.options["momentum"] == 0.5
    assert full.budget.unit == optimization_pb2.BUDGET_UNIT_GENERATOR_CALLS and full.budget.amount == 50
    assert full.HasField("lambda_r") and full.lambda_r == 0.0 and full.conditioned_class == 1
    with pytest.raises(errors.InvalidArgument, match="no class named 'sea'"):
        inversion_spec(np.zeros((4, 4), np.uint8), model="g", conditioned_class="sea", card=_card(("a",)))
    with pytest.raises(errors.InvalidArgument, match="at least one target"):
        inversion_spec([], model="g")


def _card(names: tuple[str, ...]) -> ModelInfo:
    return _convert.model_info(common_pb2.ModelCard(name="g", version=1, class_names=names, num_classes=len(names)))


def test_events_and_results_decode_to_typed_values() -> None:
    progress = optimization_pb2.JobEvent(
        event_id="1-0", job_id="j", progress=optimization_pb2.Progress(step=3, total_steps=9, criterion={"total": 0.5})
    )
    event = _convert.job_event(progress)
    assert isinstance(event, ProgressEvent) and event.step == 3 and event.criterion == {"total": 0.5}
    change = _convert.job_event(
        optimization_pb2.JobEvent(
            event_id="2-0",
            state_change=optimization_pb2.StateChange(
                state=optimization_pb2.JOB_STATE_SUCCEEDED, previous=optimization_pb2.JOB_STATE_RUNNING
            ),
        )
    )
    assert isinstance(change, StateChanged) and change.state is JobState.SUCCEEDED and change.state.terminal
    result = optimization_pb2.JobResult(
        job_id="j",
        images=common_pb2.ImageBatch(images=[common_pb2.Image(png=tensors.png_encode(np.zeros((4, 4, 3), np.uint8)))]),
        latents=tensors.to_tensor_proto(np.ones((1, 8), np.float32)),
        item_metrics=[optimization_pb2.ItemMetrics(values={"criterion": 0.25, "psnr": 20.0})],
        curve=optimization_pb2.CriterionCurve(
            steps=[0, 1], values={"total": tensors.to_tensor_proto(np.ones((1, 2), np.float32))}
        ),
    )
    decoded = _convert.job_event(
        optimization_pb2.JobEvent(event_id="3-0", result=result), result_type=result_type("inversion")
    )
    assert isinstance(decoded, ResultEvent) and isinstance(decoded.result, InversionResult)
    assert decoded.result.criterion == [0.25] and decoded.result.psnr == [20.0]
    assert decoded.result.latents.shape == (1, 8) and decoded.result.class_embeddings is None
    assert decoded.result.curve.values["total"].shape == (1, 2) and decoded.result.images[0].size == (4, 4)
