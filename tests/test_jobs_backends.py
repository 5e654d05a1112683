"""One algorithm code path, two placements of the models (decision 1): the same inversion on the local backend and
on the remote one (the generation and scoring services, started in this process) gives the same result.

The job path runs on the real Redis (broker and store) with an in-thread worker; the embedded mode's in-memory
transport has its own test below.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from job_fixtures import JobStack, build_registry, final_state, inversion_spec, make_settings, watch_all

from gansteer.tensors import from_tensor_proto
from gansteer.v1 import optimization_pb2
from gansteer_server.algorithms.inversion import CriterionWeights
from gansteer_server.jobs.backends import LocalBackend, RemoteBackend
from gansteer_server.jobs.kinds import SubmitContext
from gansteer_server.jobs.kinds.inversion import InversionJob
from gansteer_server.jobs.specs import decode_spec, encode_spec
from gansteer_server.jobs.worker import start_worker_thread
from gansteer_server.models import ModelRegistry
from gansteer_server.servers.app import start_generation_server, start_scoring_server

pytestmark = [pytest.mark.job, pytest.mark.service]
S = optimization_pb2


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobStack]:
    """The tiny registry behind a generation and a scoring service; job settings that reach them."""
    root = tmp_path_factory.mktemp("backends")
    registry = build_registry(root / "registry")
    settings = make_settings(root / "registry")
    services = [
        start(settings, 0, registry=registry, metrics_port=0)
        for start in (start_generation_server, start_scoring_server)
    ]
    stack = JobStack(
        root,
        env={"GANSTEER_GENERATION_ADDRESS": services[0].address, "GANSTEER_SCORING_ADDRESS": services[1].address},
    )
    try:
        yield stack
    finally:
        stack.close()
        for service in services:
            service.stop(grace=None)


@pytest.mark.parametrize(("optimizer", "conditioned_class"), [("adam", None), ("random_search", None), ("lbfgs", 2)])
def test_the_same_inversion_on_the_local_and_the_remote_backend_agrees(
    stack: JobStack, optimizer: str, conditioned_class: int | None
) -> None:
    settings = stack.settings
    registry = ModelRegistry([stack.registry_root])
    spec = inversion_spec(budget=6, targets=2, seed=11, lambda_r=0.1)
    spec.inversion.optimizer.name = optimizer
    spec.inversion.optimizer.population_size = 4
    if conditioned_class is not None:
        spec.inversion.conditioned_class = conditioned_class  # the realism term gets the class: D's projection
    kind = InversionJob()
    parsed = kind.parse(spec.inversion, SubmitContext(settings, registry))
    backends = (LocalBackend(registry), RemoteBackend(settings.settings, registry))
    runs = [kind.start(parsed, backend, settings) for backend in backends]
    for _ in range(6):
        local, remote = (run.step() for run in runs)
        for name, value in local.criterion.items():
            assert remote.criterion[name] == pytest.approx(value, rel=1e-3, abs=1e-4), name
    results = [run.result() for run in runs]
    for field in ("latents", "class_embeddings"):
        local_values, remote_values = (from_tensor_proto(getattr(r, field)) for r in results)
        np.testing.assert_allclose(remote_values, local_values, rtol=1e-3, atol=1e-4)
    local_images, remote_images = (from_tensor_proto(r.images.tensor) for r in results)
    np.testing.assert_allclose(remote_images, local_images, atol=1e-4)


def test_a_remote_backend_job_through_redis_and_a_worker_matches_a_local_one(stack: JobStack) -> None:
    stub = stack.start_server()[1]
    latents = {}
    with start_worker_thread(stack.settings):
        for backend in (S.BACKEND_LOCAL, S.BACKEND_REMOTE):
            spec = inversion_spec(budget=8, seed=2, backend=backend, preview_every=4)
            job_id = stub.SubmitJob(S.SubmitJobRequest(spec=spec), timeout=30).job_id
            assert final_state(watch_all(stub, job_id)) == S.JOB_STATE_SUCCEEDED
            result = stub.GetResult(S.GetResultRequest(job_id=job_id), timeout=10).result
            latents[backend] = from_tensor_proto(result.latents)
    np.testing.assert_allclose(latents[S.BACKEND_REMOTE], latents[S.BACKEND_LOCAL], rtol=1e-3, atol=1e-4)


def test_everything_in_this_process_without_redis(tmp_path: Path) -> None:
    """The embedded mode's store: `memory://` keeps the job store in an in-process Redis (fakeredis)."""
    pytest.importorskip("fakeredis")
    stack = JobStack(tmp_path, env={"GANSTEER_REDIS_URL": "memory://"})
    try:
        stub = stack.start_server()[1]
        with start_worker_thread(stack.settings):
            job_id = stub.SubmitJob(S.SubmitJobRequest(spec=inversion_spec(budget=6)), timeout=30).job_id
            assert final_state(watch_all(stub, job_id)) == S.JOB_STATE_SUCCEEDED
        assert stub.GetResult(S.GetResultRequest(job_id=job_id), timeout=10).result.metrics["steps"] == 6
    finally:
        stack.close()


def test_free_weights_reach_the_worker_through_the_stored_spec(stack: JobStack) -> None:
    """Weights given one by one (not a preset) survive the spec's bytes in the store and drive the worker's run."""
    registry = ModelRegistry([stack.registry_root])
    spec = inversion_spec(budget=4, lambda_s=0.25, lambda_l=7.5, lambda_nu=0.0, lambda_r=0.5, conditioned_class=1)
    kind = InversionJob()
    parsed = kind.parse(spec.inversion, SubmitContext(stack.settings, registry))
    stored = decode_spec(type(parsed), encode_spec(parsed))  # what the worker reads back
    given = CriterionWeights(features=0.25, pixel_l2=7.5, latent_norm=0.0, realism=0.5)
    assert stored.config.criterion_weights == given
    run = kind.start(stored, LocalBackend(registry), stack.settings)
    assert run.run.criterion.weights == given  # type: ignore[attr-defined]
    progress = run.step()
    assert progress.criterion["total"] > 0


def test_the_remote_generator_gradient_matches_autograd(stack: JobStack) -> None:
    registry = ModelRegistry([stack.registry_root])
    local = LocalBackend(registry).generator("tiny-gen")
    remote = RemoteBackend(stack.settings.settings, registry).generator("tiny-gen")
    z = torch.randn(3, 16, requires_grad=True)
    e = torch.randn(3, 8, requires_grad=True)
    weights = torch.randn(3, 3, 32, 32)
    grads = []
    for generator in (local, remote):
        z.grad = e.grad = None
        (generator(z, e) * weights).sum().backward()
        grads.append((z.grad.clone(), e.grad.clone()))  # type: ignore[union-attr]
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-5)
    assert remote.class_embeddings() is not None
    torch.testing.assert_close(remote.class_embeddings(), local.class_embeddings())
