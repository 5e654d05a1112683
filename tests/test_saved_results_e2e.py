"""A saved result regenerates its images exactly: an inversion on the tiny stack (the real optimization and
generation services, a worker subprocess on the real Redis) is saved as a user saves it (`result.save`, `gansteer
invert --out`), then rendered again (`client.regenerate`, `gansteer generate --from`): the float images are bitwise
those the job produced and the PNG files byte for byte the saved ones, whether the job searched a free class vector
or held a class, and whether the worker ran the generator itself or through the generation service.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
import pytest
from job_fixtures import CLASSES, CLF, EMBEDDING, GEN, LATENT, JobStack, make_settings, target_png
from PIL import Image

from gansteer import Client, InversionOptions, SavedResult, load_result, tensors
from gansteer.v1 import common_pb2, generation_pb2, generation_pb2_grpc, optimization_pb2, optimization_pb2_grpc
from gansteer_server.servers.app import RunningService, start_generation_server, start_scoring_server

pytestmark = [pytest.mark.service, pytest.mark.job, pytest.mark.slow]


@dataclass
class Stack:
    jobs: JobStack
    generation: RunningService
    optimization_address: str

    def client(self) -> Client:
        return Client(self.optimization_address, generation_target=self.generation.address, timeout=60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    jobs = JobStack(tmp_path_factory.mktemp("stack"))
    generation = start_generation_server(make_settings(jobs.registry_root), port=0, metrics_port=0)
    scoring = start_scoring_server(make_settings(jobs.registry_root), port=0, metrics_port=0)
    try:  # where the remote backend's worker reaches the generator and the discriminator
        jobs.env |= {"GANSTEER_GENERATION_ADDRESS": generation.address, "GANSTEER_SCORING_ADDRESS": scoring.address}
        optimization, _ = jobs.start_server()
        jobs.start_worker()
        yield Stack(jobs, generation, optimization.address)
    finally:
        jobs.close()
        generation.stop(grace=None)
        scoring.stop(grace=None)


OPTIONS: InversionOptions = {"feature_extractor": CLF, "budget": 6, "learning_rate": 0.1, "seed": 7}


def float_images_of_the_job(stack: Stack, job_id: str) -> bytes:
    """The images exactly as the job produced them: float32 [N, 3, H, W], not quantised to PNG."""
    request = optimization_pb2.GetResultRequest(job_id=job_id, image_format=common_pb2.IMAGE_FORMAT_TENSOR)
    with grpc.insecure_channel(stack.optimization_address) as channel:
        result = optimization_pb2_grpc.OptimizationServiceStub(channel).GetResult(request, timeout=30).result
    return tensors.from_tensor_proto(result.images.tensor).tobytes()


def float_images_regenerated(stack: Stack, saved: SavedResult) -> bytes:
    """The saved latents and conditions through the generation service, as float32 [N, 3, H, W]."""
    request = generation_pb2.GenerateRequest(
        model=common_pb2.ModelRef(name=saved.generator),
        latents=tensors.to_tensor_proto(saved.latents),
        format=common_pb2.IMAGE_FORMAT_TENSOR,
    )
    if saved.class_ids:
        request.condition.class_ids.ids.extend(saved.class_ids)
    elif saved.class_embeddings is not None:
        request.condition.embeddings.CopyFrom(tensors.to_tensor_proto(saved.class_embeddings))
    with grpc.insecure_channel(stack.generation.address) as channel:
        reply = generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=30)
    return tensors.from_tensor_proto(reply.images.tensor).tobytes()


def png_bytes(images: list[Image.Image], folder: Path) -> list[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    return [(folder / f"{i}.png").read_bytes() for i in range(len(images))]


@pytest.mark.parametrize("backend", ["local", "remote"])
@pytest.mark.parametrize("mode", ["search_class", "conditioned"])
def test_an_inversion_saved_by_the_sdk_regenerates_exactly(
    stack: Stack, tmp_path: Path, mode: str, backend: Literal["local", "remote"]
) -> None:
    targets = [target_png(seed) for seed in (1, 2)]
    with stack.client() as client:
        if mode == "conditioned":
            job = client.invert(targets, model=GEN, conditioned_class=CLASSES - 1, **OPTIONS, backend=backend)
        else:
            job = client.invert(targets, model=GEN, **OPTIONS, backend=backend)
        result = job.result()
        saved = result.save(tmp_path / "saved", spec=job.spec())

        assert saved.generator == result.generator == f"{GEN}@1" and saved.seed == 7 and saved.kind == "inversion"
        if mode == "conditioned":
            assert saved.class_ids == (CLASSES - 1,) * 2 and saved.class_embeddings is None
        else:  # the searched vectors, which no class id names
            assert saved.class_ids == () and saved.class_embeddings is not None
            assert saved.class_embeddings.shape == (2, EMBEDDING)
        assert saved.latents.shape == (2, LATENT)

        regenerated = client.regenerate(tmp_path / "saved")
        assert regenerated.model == saved.generator
        assert png_bytes(regenerated.images, tmp_path / "again") == [p.read_bytes() for p in saved.images]
    assert float_images_regenerated(stack, saved) == float_images_of_the_job(stack, job.id)


def gansteer(stack: Stack, *args: str) -> dict[str, object]:
    command = [
        sys.executable,
        "-m",
        "gansteer.cli",
        *args,
        "--target",
        stack.optimization_address,
        "--generation-target",
        stack.generation.address,
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr + stack.jobs.workers[0].output()[-3000:]
    document: dict[str, object] = json.loads(done.stdout)
    return document


def test_gansteer_invert_out_then_generate_from_reproduces_the_images(stack: Stack, tmp_path: Path) -> None:
    paths = []
    for seed in (3, 4):
        paths.append(tmp_path / f"target_{seed}.png")
        paths[-1].write_bytes(target_png(seed))
    out, again = tmp_path / "out", tmp_path / "again"
    inverted = gansteer(stack, "invert", *map(str, paths), "--model", GEN, "--budget", "6", "--out", str(out))
    saved = load_result(out)
    assert inverted["result"] == str(out / "result.json") and saved.class_embeddings is not None

    generated = gansteer(stack, "generate", "--from", str(out / "result.json"), "--out", str(again))
    assert generated["identical"] == [True, True] and generated["model"] == f"{GEN}@1"
    assert [(again / f"image_{i}.png").read_bytes() for i in range(2)] == [p.read_bytes() for p in saved.images]
    assert float_images_regenerated(stack, saved) == float_images_of_the_job(stack, saved.job_id)


@pytest.mark.parametrize("search_class", [False, True])
def test_a_latent_search_saved_by_the_sdk_regenerates_exactly(stack: Stack, tmp_path: Path, search_class: bool) -> None:
    """The other searching kind carries the same: a held class comes back as its id, a searched vector as itself."""
    with stack.client() as client:
        job = client.latent_search(
            model=GEN,
            classes=[1, 2],
            scorer=CLF,
            budget=4,
            budget_unit="iterations",
            perturbations=4,
            search_class_embedding=search_class,
            seed=3,
        )
        saved = job.result().save(tmp_path, spec=job.spec())
        assert (saved.class_ids, saved.class_embeddings is not None) == (() if search_class else (1, 2), search_class)
        regenerated = client.regenerate(saved)
        assert png_bytes(regenerated.images, tmp_path / "again") == [p.read_bytes() for p in saved.images]
    assert float_images_regenerated(stack, saved) == float_images_of_the_job(stack, job.id)
