"""Dynamic batching: concurrent requests merge into one forward pass with the results they would get alone; a full
queue refuses at once; cancelled and expired calls never run; stopping finishes what is queued."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from service_fixtures import (
    GEN,
    LATENT,
    float_tensor,
    held,
    make_settings,
    running,
    shared_tiny_registry,
    status_of,
    wait_until,
)
from torch import Tensor

from gansteer.tensors import from_tensor_proto
from gansteer.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from gansteer_server.models import ModelRegistry
from gansteer_server.servers.batching import BatcherPool, DynamicBatcher
from gansteer_server.servers.metrics import ServiceMetrics
from gansteer_server.wire.errors import ServiceError

pytestmark = pytest.mark.service
DROPS = ("cancelled", "deadline")


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return shared_tiny_registry(tmp_path_factory)


class Recorder:
    """A batch function that doubles its input and records each batch's size; `gate` holds it until set."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, key: Hashable, inputs: Sequence[Tensor]) -> list[Tensor]:
        self.entered.set()
        self.gate.wait(10)
        self.sizes.append(int(inputs[0].shape[0]))
        return [inputs[0] * 2, torch.is_inference_mode_enabled() * torch.ones(inputs[0].shape[0])]


class FakeContext:
    """The parts of grpc.ServicerContext the batcher uses: a deadline and termination callbacks."""

    def __init__(self, seconds: float = 60.0) -> None:
        self.deadline = time.monotonic() + seconds
        self.callbacks: list[Callable[[], None]] = []

    def time_remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.callbacks.append(callback)
        return True

    def cancel(self) -> None:
        for callback in self.callbacks:
            callback()


def batcher(run: Recorder, **kwargs: float) -> DynamicBatcher:
    settings = {"max_batch": 8, "max_delay_s": 0.2, "max_queue": 64, **kwargs}
    return DynamicBatcher("test", run, metrics=ServiceMetrics("test"), **settings)  # type: ignore[arg-type]


def test_requests_queued_behind_a_batch_merge_and_split_back() -> None:
    run = Recorder()
    run.gate.clear()
    merger = batcher(run)
    with ThreadPoolExecutor(9) as pool:
        blocker = pool.submit(merger.call, "k", [torch.zeros(1, 2)])
        assert run.entered.wait(5)
        calls = [pool.submit(merger.call, "k", [torch.full((1, 2), float(i))]) for i in range(8)]
        wait_until(lambda: merger.queued_images == 8)
        run.gate.set()
        results = [call.result() for call in calls]
        blocker.result()
    merger.close()
    assert run.sizes == [1, 8]
    for i, (doubled, inference) in enumerate(results):
        assert doubled.tolist() == [[2.0 * i, 2.0 * i]]
        assert inference.item() == 1.0  # forward-only runs under torch.inference_mode()


def in_thread(merger: DynamicBatcher, *args: object) -> Future[list[Tensor]]:
    """`merger.call(*args)` on a daemon thread: a call the batcher never answers cannot hang the test run."""
    future: Future[list[Tensor]] = Future()

    def call() -> None:
        try:
            future.set_result(merger.call(*args))  # type: ignore[arg-type]
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=call, daemon=True).start()
    return future


def test_a_lone_client_never_waits_and_a_crowd_is_gathered() -> None:
    # The delay is far longer than any of these steps take even on a loaded machine: a batch that closed on the
    # delay instead of on its request count would show as a call taking 30 s, not as a few tenths of a second.
    run = Recorder()
    merger = batcher(run, max_delay_s=30.0)
    started = time.monotonic()
    merger.call("k", [torch.ones(1, 1)])
    merger.call("k", [torch.ones(1, 1)])
    assert time.monotonic() - started < 10  # the previous batch held one request: no waiting for the delay
    run.gate.clear()
    run.entered.clear()  # set by the calls above: wait for the blocker itself to reach the gate
    with ThreadPoolExecutor(4) as pool:
        blocker = pool.submit(merger.call, "k", [torch.ones(1, 1)])
        assert run.entered.wait(5)
        crowd = [pool.submit(merger.call, "k", [torch.ones(1, 1)]) for _ in range(3)]
        wait_until(lambda: merger.queued_images == 3)
        run.gate.set()
        [call.result() for call in (blocker, *crowd)]
    assert run.sizes == [1, 1, 1, 3]
    # The crowd of three comes back one by one: the first waits for the other two, then all three run at once.
    started = time.monotonic()
    first = in_thread(merger, "k", [torch.ones(1, 1)])
    wait_until(lambda: merger.queued_images == 1)
    time.sleep(0.3)  # time it would have run in, were it not waiting
    assert not first.done() and merger.queued_images == 1 and run.sizes == [1, 1, 1, 3]
    rest = [in_thread(merger, "k", [torch.ones(1, 1)]) for _ in range(2)]
    [call.result(timeout=10) for call in (first, *rest)]
    assert time.monotonic() - started < 10 and run.sizes == [1, 1, 1, 3, 3]
    # A client left alone runs after the delay (shortened here); from then on it never waits.
    merger.max_delay_s = 0.2
    merger.call("k", [torch.ones(1, 1)])
    merger.max_delay_s = 30.0
    started = time.monotonic()
    merger.call("k", [torch.ones(1, 1)])
    assert time.monotonic() - started < 10
    merger.close()
    assert run.sizes == [1, 1, 1, 3, 3, 1, 1]


def test_different_keys_and_gradient_requests_do_not_merge() -> None:
    run = Recorder()
    merger = batcher(run, max_delay_s=0.05)
    with ThreadPoolExecutor(4) as pool:
        calls = [
            pool.submit(merger.call, "a", [torch.ones(1, 1)]),
            pool.submit(merger.call, "b", [torch.ones(2, 1)]),
            pool.submit(merger.call, "a", [torch.ones(1, 1)], grad=True),
        ]
        grad_flags = [c.result()[1] for c in calls]
    merger.close()
    assert sorted(run.sizes) == [1, 1, 2]
    assert grad_flags[2].item() == 0.0  # gradient requests run outside inference mode


def test_a_request_larger_than_max_batch_runs_in_slices() -> None:
    run = Recorder()
    merger = batcher(run, max_batch=4, max_delay_s=0.0)
    (doubled, _) = merger.call("k", [torch.arange(10.0).view(10, 1)])
    merger.close()
    assert run.sizes == [4, 4, 2]
    assert doubled.view(-1).tolist() == [2.0 * i for i in range(10)]


class OneRow(Recorder):
    """A broken model: its first output has one row whatever the batch size (an export with a fixed batch of 1)."""

    def __call__(self, key: Hashable, inputs: Sequence[Tensor]) -> list[Tensor]:
        doubled, inference = super().__call__(key, inputs)
        return [doubled[:1], inference]


def test_outputs_without_a_row_per_image_fail_their_batch_and_the_batcher_goes_on() -> None:
    run = OneRow()
    run.gate.clear()
    merger = batcher(run)
    blocker = in_thread(merger, "k", [torch.ones(1, 1)])
    assert run.entered.wait(5)
    merged = [in_thread(merger, "k", [torch.ones(1, 1)]) for _ in range(2)]
    wait_until(lambda: merger.queued_images == 2)
    run.gate.set()
    assert blocker.result(timeout=10)[0].tolist() == [[2.0]]
    for call in merged:
        error = call.exception(timeout=10)
        assert isinstance(error, ServiceError)
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "BROKEN_MODEL"
        assert error.field == "model" and "test returned output 0 of shape (1, 1) for a batch of 2" in error.message
    assert in_thread(merger, "k", [torch.full((1, 1), 4.0)]).result(timeout=10)[0].tolist() == [[8.0]]
    merger.close()
    assert run.sizes == [1, 2, 1]


class FailingMetrics(ServiceMetrics):
    def observe_batch(self, model: str, images: int, requests: int, seconds: float) -> None:
        raise RuntimeError("metrics broke")


def test_an_unexpected_error_after_the_forward_pass_does_not_stop_the_batcher() -> None:
    run = Recorder()
    merger = DynamicBatcher("test", run, max_batch=8, max_delay_s=0.2, max_queue=64, metrics=FailingMetrics("test"))
    for value in (1.0, 2.0):  # each batch's results are set before the metrics fail
        assert in_thread(merger, "k", [torch.full((1, 1), value)]).result(timeout=10)[0].tolist() == [[2 * value]]
    merger.close()
    assert run.sizes == [1, 1]


def test_a_model_loading_holds_up_only_its_own_callers() -> None:
    pool = BatcherPool(max_batch=8, max_delay_s=0.2, max_queue=64, metrics=None)
    loading, release = threading.Event(), threading.Event()
    loads: list[str] = []

    def slow_load() -> Recorder:
        loads.append("a")
        loading.set()
        release.wait(10)
        return Recorder()

    with ThreadPoolExecutor(3) as threads:
        first = threads.submit(pool.get, "a", slow_load)
        assert loading.wait(5)
        second = threads.submit(pool.get, "a", slow_load)
        other = threads.submit(pool.get, "b", Recorder)
        assert other.result(timeout=5).call("k", [torch.ones(1, 1)])[0].item() == 2.0  # while "a" still loads
        assert not first.done() and not second.done()
        release.set()
        assert first.result(timeout=10) is second.result(timeout=10)
    assert loads == ["a"]  # one load, one batcher per model
    pool.close()


def test_a_full_queue_refuses_with_resource_exhausted() -> None:
    run = Recorder()
    run.gate.clear()
    merger = batcher(run, max_queue=4, max_delay_s=0.0, max_batch=2)
    with ThreadPoolExecutor(4) as pool:
        running_call = pool.submit(merger.call, "k", [torch.ones(2, 1)])
        assert run.entered.wait(5)  # taken by the worker, held at the gate
        queued = pool.submit(merger.call, "k", [torch.ones(4, 1)])  # fills the queue
        while merger.queued_images < 4:
            time.sleep(0.001)
        with pytest.raises(ServiceError) as refused:
            merger.call("k", [torch.ones(1, 1)])
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.value.reason == "QUEUE_FULL"
        run.gate.set()
        assert running_call.result()[0].shape == (2, 1) and queued.result()[0].shape == (4, 1)
    merger.close()


def test_cancelled_and_expired_requests_never_run() -> None:
    run = Recorder()
    run.gate.clear()
    merger = batcher(run)
    metrics = merger._metrics
    assert metrics is not None
    cancelled, expired = FakeContext(), FakeContext(seconds=0.05)
    with ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(merger.call, "k", [torch.ones(1, 1)])
        assert run.entered.wait(5)
        first = pool.submit(merger.call, "k", [torch.ones(3, 1)], cancelled)
        second = pool.submit(merger.call, "k", [torch.ones(5, 1)], expired)
        wait_until(lambda: merger.queued_images == 8)
        cancelled.cancel()
        with pytest.raises(ServiceError) as stopped:
            first.result()
        assert stopped.value.code == grpc.StatusCode.CANCELLED and merger.queued_images == 5
        wait_until(lambda: expired.time_remaining() == 0)
        run.gate.set()
        with pytest.raises(ServiceError) as late:
            second.result()
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        blocker.result()
    merger.close()
    assert run.sizes == [1]
    assert metrics.value("gansteer_dropped_requests_total", model="test", reason="cancelled") == 1
    assert metrics.value("gansteer_dropped_requests_total", model="test", reason="deadline") == 1


def test_closing_runs_what_is_queued_then_refuses() -> None:
    run = Recorder()
    run.gate.clear()
    merger = batcher(run, max_delay_s=10.0)
    with ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(merger.call, "k", [torch.ones(1, 1)])
        assert run.entered.wait(5)
        waiting = pool.submit(merger.call, "k", [torch.full((2, 1), 3.0)])
        wait_until(lambda: merger.queued_images == 2)
        closing = pool.submit(merger.close)
        wait_until(lambda: merger._closing)
        with pytest.raises(ServiceError) as refused:
            merger.call("k", [torch.ones(1, 1)])
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        run.gate.set()
        closing.result(timeout=5)  # did not wait the 10 s delay for the queued batch to fill
        assert blocker.result()[0].item() == 2.0 and waiting.result()[0].view(-1).tolist() == [6.0, 6.0]
    assert run.sizes == [1, 2]


# --- through gRPC ---------------------------------------------------------------------------------------------------


def generate(stub: generation_pb2_grpc.GenerationServiceStub, z: Tensor, **kwargs: float) -> np.ndarray:
    request = generation_pb2.GenerateRequest(
        model=common_pb2.ModelRef(name=GEN),
        latents=float_tensor(z),
        condition=common_pb2.ClassCondition(class_ids=common_pb2.ClassIds(ids=[3])),
        format=common_pb2.IMAGE_FORMAT_TENSOR,
    )
    return from_tensor_proto(stub.Generate(request, **kwargs).images.tensor)


def test_concurrent_clients_share_batches_with_unbatched_results(tiny_registry: ModelRegistry) -> None:
    latents = torch.randn(12, LATENT, generator=torch.Generator().manual_seed(0))
    model = f"{GEN}@1"
    with running("generation", make_settings(tiny_registry, max_batch=12)) as (server, channel):
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        generate(stub, torch.zeros(1, LATENT))  # loads the model: batch 1
        with held(server, model) as hold, ThreadPoolExecutor(12) as pool:
            first = pool.submit(generate, stub, latents[:1])
            assert hold.entered.wait(10)  # batch 2 runs (held); the others queue behind it
            rest = [pool.submit(generate, stub, latents[i : i + 1]) for i in range(1, 12)]
            wait_until(lambda: server.metrics.value("gansteer_queue_images", model=model) == 11)
            hold.release.set()
            batched = [call.result() for call in (first, *rest)]
        assert server.metrics.value("gansteer_batch_requests_count", model=model) == 3
        assert server.metrics.value("gansteer_batch_requests_sum", model=model) == 13
    with running("generation", make_settings(tiny_registry, max_batch=1)) as (server, channel):
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        alone = [generate(stub, latents[i : i + 1]) for i in range(12)]
        assert server.metrics.value("gansteer_batch_images_sum", model=model) == 12
    np.testing.assert_allclose(np.concatenate(batched), np.concatenate(alone), atol=1e-5)


def test_a_full_queue_answers_resource_exhausted_over_grpc(tiny_registry: ModelRegistry) -> None:
    model = f"{GEN}@1"
    with running("generation", make_settings(tiny_registry, max_queue=4)) as (server, channel):
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        generate(stub, torch.zeros(1, LATENT))
        with held(server, model) as hold, ThreadPoolExecutor(2) as pool:
            running_call = pool.submit(generate, stub, torch.zeros(1, LATENT))
            assert hold.entered.wait(10)
            filling = pool.submit(generate, stub, torch.zeros(4, LATENT))
            wait_until(lambda: server.metrics.value("gansteer_queue_images", model=model) == 4)
            code, details = status_of(lambda: generate(stub, torch.zeros(1, LATENT)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in details
            hold.release.set()
            assert running_call.result().shape == (1, 3, 32, 32) and filling.result().shape == (4, 3, 32, 32)


def test_an_expired_deadline_does_not_run_the_work(tiny_registry: ModelRegistry) -> None:
    model = f"{GEN}@1"
    with running("generation", make_settings(tiny_registry)) as (server, channel):
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        generate(stub, torch.zeros(1, LATENT))
        metrics = server.metrics
        with held(server, model) as hold, ThreadPoolExecutor(1) as pool:
            blocker = pool.submit(generate, stub, torch.zeros(1, LATENT))
            assert hold.entered.wait(10)
            code, _ = status_of(lambda: generate(stub, torch.zeros(2, LATENT), timeout=0.1))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_until(
                lambda: sum(metrics.value("gansteer_dropped_requests_total", model=model, reason=r) for r in DROPS) == 1
            )
            hold.release.set()
            blocker.result()
        assert metrics.value("gansteer_batch_images_sum", model=model) == 2  # the warm-up and the blocker only
        assert metrics.value("gansteer_queue_images", model=model) == 0


def test_stopping_the_server_finishes_in_flight_batches(tiny_registry: ModelRegistry) -> None:
    model = f"{GEN}@1"
    with running("generation", make_settings(tiny_registry)) as (server, channel):
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        generate(stub, torch.zeros(1, LATENT))
        with held(server, model) as hold, ThreadPoolExecutor(3) as pool:
            running_call = pool.submit(generate, stub, torch.zeros(1, LATENT))
            assert hold.entered.wait(10)
            queued = pool.submit(generate, stub, torch.zeros(3, LATENT))
            wait_until(lambda: server.metrics.value("gansteer_queue_images", model=model) == 3)
            stopping = pool.submit(server.stop, 10)
            time.sleep(0.1)
            hold.release.set()
            assert running_call.result().shape == (1, 3, 32, 32) and queued.result().shape == (3, 3, 32, 32)
            stopping.result()
