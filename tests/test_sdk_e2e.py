"""The SDK end to end, as a user drives it: real generation, scoring and optimization services on loopback, a real
Celery worker and the real Redis (a private key prefix, deleted afterwards), the built-in models.

One stack serves the whole module (starting one costs seconds); each test submits its own jobs.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gansteer import (
    AsyncClient,
    Client,
    InvalidArgument,
    InversionResult,
    JobCancelled,
    JobState,
    JobStatus,
    NotFound,
    ProgressEvent,
    ResultEvent,
    StateChanged,
    Unavailable,
    embedded,
    tensors,
)
from gansteer_server.embedded import Stack, start_stack

pytestmark = [pytest.mark.service, pytest.mark.job, pytest.mark.slow]

REDIS_URL = os.environ.get("GANSTEER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
GENERATOR, DISCRIMINATOR = "scenes-gen", "scenes-disc"


@contextmanager
def redis_stack(**overrides: object) -> Iterator[Stack]:
    """The three services and an in-thread worker on the real Redis, under a key prefix deleted on exit."""
    prefix = f"gansteer-test-sdk-{uuid.uuid4().hex[:8]}:"
    stack = start_stack(redis_url=REDIS_URL, key_prefix=prefix, torch_threads=1, **overrides)
    try:
        yield stack
    finally:
        stack.stop()
        delete_keys(prefix)


def delete_keys(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def connect(stack: Stack) -> Client:
    return Client(
        stack.optimization_address,
        generation_target=stack.generation_address,
        scoring_target=stack.scoring_address,
        timeout=60,
    )


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with redis_stack(max_image_pixels=64 * 64) as running:
        yield running


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    with connect(stack) as connected:
        yield connected


def test_models_generate_and_score(client: Client) -> None:
    generator = client.model(GENERATOR)
    assert generator.kind == "generator" and generator.resolution == 32 and len(generator.class_names) == 10
    assert {m.name for m in client.models("classifier")} >= {"scenes-clf"}
    sample = client.generate(GENERATOR, 2, seed=3, classes=generator.class_names[1])
    assert [im.size for im in sample.images] == [(32, 32)] * 2 and sample.class_ids == [1, 1]
    assert sample.latents.shape == (2, generator.latent_size)
    again = client.generate(GENERATOR, latents=sample.latents, classes=sample.class_ids)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(sample.images[0]))
    probs = client.score(sample.images, "scenes-clf")["probs"]
    assert probs.shape == (2, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    forest = client.score(sample.images, "scenes-clf", outputs={"class_prob": {"class_id": 6}})["class_prob"]
    assert forest.shape == (2,) and "log_probs" in {s.name for s in client.scorers("classifier")}


def test_reflection_lists_the_services_for_grpcurl(stack: Stack) -> None:
    """docs/grpc.md relies on server reflection: `grpcurl -plaintext HOST:PORT list` must name each service."""
    expected = {
        stack.generation_address: "gansteer.v1.GenerationService",
        stack.scoring_address: "gansteer.v1.ScoringService",
        stack.optimization_address: "gansteer.v1.OptimizationService",
    }
    for address, service in expected.items():
        with grpc.insecure_channel(address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
            names = {s.name for s in response.list_services_response.service}
        assert {service, "grpc.health.v1.Health"} <= names


def test_invert_watch_result_and_reattach(stack: Stack, client: Client, tmp_path: Path) -> None:
    """The main job: submit targets given three ways, watch its events in order, fetch the result, re-attach."""
    targets = client.generate(GENERATOR, 2, seed=11).images
    path = tmp_path / "target.png"
    targets[1].save(path)
    job = client.invert(
        [targets[0], path, np.asarray(targets[0])], model=GENERATOR, discriminator=DISCRIMINATOR, budget=12
    )
    events = list(job.watch())
    ids = [e.event_id for e in events]
    assert ids == sorted(ids, key=lambda i: tuple(int(p) for p in i.split("-"))) and len(set(ids)) == len(ids)
    assert isinstance(events[-1], StateChanged) and events[-1].state is JobState.SUCCEEDED
    assert isinstance(events[-2], ResultEvent)
    steps = [e.step for e in events if isinstance(e, ProgressEvent)]
    assert steps and steps == sorted(steps) and steps[-1] == 12
    # A watcher that resumes after an event gets exactly the events after it.
    assert [e.event_id for e in job.watch(after_event_id=ids[1])] == ids[2:]

    result = job.result()
    assert isinstance(result, InversionResult) and len(result.images) == 3
    assert result.latents.shape == (3, 128) and result.images[0].size == (32, 32)
    assert all(np.isfinite(c) for c in result.criterion) and all(p > 0 for p in result.psnr)
    assert result.curve.values["total"].shape[0] == 3
    # Targets 0 and 2 are the same image given as PIL and as an array: the same target on the server.
    assert np.array_equal(np.asarray(job.targets()[0]), np.asarray(job.targets()[2]))

    with connect(stack) as other:  # another process, knowing only the id
        attached = other.job(job.id)
        assert attached.kind == "inversion" and attached.status().state is JobState.SUCCEEDED
        again = attached.result()
        assert np.array_equal(again.latents, result.latents)
        assert job.id in [j.id for j in other.jobs(limit=20)]


def test_the_async_client_runs_jobs_side_by_side(stack: Stack) -> None:
    """Several calls on one AsyncClient at once: two inversions submitted and awaited together, listed, fetched."""
    run = uuid.uuid4().hex[:8]
    target = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)

    async def story() -> tuple[list[JobStatus], list[str], list[str], list[int]]:
        async with AsyncClient(
            stack.optimization_address,
            generation_target=stack.generation_address,
            scoring_target=stack.scoring_address,
        ) as client:
            jobs = await asyncio.gather(
                *(client.invert(target, model=GENERATOR, budget=3, seed=i, labels={"run": run}) for i in range(2))
            )
            finals = await asyncio.gather(*(job.wait() for job in jobs))
            listed = [status.id async for status in client.jobs(labels={"run": run})]
            results = await asyncio.gather(*(job.result() for job in jobs))
            return list(finals), listed, [job.id for job in jobs], [len(r.images) for r in results]

    finals, listed, submitted, counts = asyncio.run(story())
    assert [status.state for status in finals] == [JobState.SUCCEEDED] * 2
    assert sorted(listed) == sorted(submitted) and counts == [1, 1]


def test_cancel_stops_a_running_job(client: Client) -> None:
    target = client.generate(GENERATOR, 1, seed=5).images[0]
    job = client.invert(target, model=GENERATOR, criterion="l2", budget=20_000)
    for event in job.watch(previews=False):
        if isinstance(event, ProgressEvent):
            break
    started = time.monotonic()
    job.cancel("enough")
    with pytest.raises(JobCancelled) as cancelled:
        job.wait(progress=False, timeout=60)
    assert cancelled.value.status.state is JobState.CANCELLED
    assert time.monotonic() - started < 30 and cancelled.value.status.step < 20_000
    with pytest.raises(JobCancelled):
        job.result()  # waiting for a result that will not come says why
    assert len(job.result(wait=False).images) == 1  # the best point found before the cancel is kept


def test_bad_images_are_refused_with_the_servers_message(client: Client) -> None:
    truncated = tensors.png_encode(np.zeros((32, 32, 3), np.uint8))[:40]
    with pytest.raises(InvalidArgument) as broken:
        client.invert(truncated, model=GENERATOR, criterion="l2")
    assert broken.value.field.startswith("spec.inversion.targets[0]"), broken.value.details
    assert "PNG" in str(broken.value)
    too_large = np.zeros((65, 65, 3), np.uint8)  # the stack allows 64 x 64 pixels
    with pytest.raises(InvalidArgument, match="pixels"):
        client.invert(too_large, model=GENERATOR, criterion="l2")
    with pytest.raises(NotFound):
        client.invert(np.zeros((8, 8, 3), np.uint8), model="no-such-generator", criterion="l2")
    with pytest.raises(InvalidArgument, match="budget"):
        client.invert(np.zeros((8, 8, 3), np.uint8), model=GENERATOR, criterion="l2", budget=0)


def _embedded_story(**options: object) -> None:
    with embedded(torch_threads=1, **options) as client:  # type: ignore[arg-type]
        target = client.generate(GENERATOR, 1, seed=1).images[0]
        result = client.invert(target, model=GENERATOR, criterion="l2", budget=5).result()
        assert result.images[0].size == (32, 32)
        stopped = client.target
    gone = Client(stopped, generation_target=stopped, scoring_target=stopped, retries=0, timeout=5)
    with gone, pytest.raises(Unavailable):
        gone.get_job("0" * 24)


def test_embedded_mode_in_memory() -> None:
    """No Redis at all: Celery's in-memory transport, the worker in a thread of this process."""
    pytest.importorskip("fakeredis", reason="the in-memory job store needs fakeredis (a server dependency)")
    _embedded_story()


def test_embedded_mode_on_redis() -> None:
    prefix = f"gansteer-test-sdk-{uuid.uuid4().hex[:8]}:"
    try:
        _embedded_story(redis_url=REDIS_URL, key_prefix=prefix)
    finally:
        delete_keys(prefix)
