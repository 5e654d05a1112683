"""The saved-result format as a user meets it: `result.save(folder)` writes `result.json` beside the images,
`load_result` reads back the latents and class vectors bit for bit, the condition saved is the one the generator
was given (a held class as its id, a searched vector as itself), and `regenerate` asks the generation service for
exactly that. No service runs here; tests/test_saved_results_e2e.py regenerates a real job's images.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from job_fixtures import EMBEDDING, GEN, LATENT
from PIL import Image

from gansteer import InvalidArgument, JobResult, SavedResult, load_result, tensors
from gansteer._core import Core
from gansteer._steps import Call
from gansteer.kinds import inversion_spec
from gansteer.types import CriterionCurve
from gansteer.v1 import generation_pb2


def a_result(*, class_ids: tuple[int, ...] = (), vectors: bool = False) -> JobResult:
    """Two items with awkward float32 values (a subnormal, -0.0, the extremes) in their latents and vectors."""
    rng = np.random.default_rng(5)
    latents = rng.standard_normal((2, LATENT)).astype(np.float32)
    latents[0, :4] = [np.float32(1e-45), np.float32(-0.0), np.finfo(np.float32).max, np.float32(1) / 3]
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(2)]
    return JobResult(
        job_id="job-1",
        images=images,
        latents=latents,
        class_embeddings=rng.standard_normal((2, EMBEDDING)).astype(np.float32) if vectors or class_ids else None,
        metrics={"psnr": 20.5},
        item_metrics=[{"criterion": 1.5}, {"criterion": 2.5}],
        curve=CriterionCurve(steps=np.zeros(0, np.int64), values={}),
        models=[],
        tensors={},
        generator=f"{GEN}@1",
        class_ids=class_ids,
        kind="inversion",
    )


def test_a_free_class_vector_is_saved_and_read_back_bit_for_bit(tmp_path: Path) -> None:
    result = a_result(vectors=True)
    spec = inversion_spec([np.zeros((8, 8, 3), np.uint8)], model=GEN, seed=42)
    saved = result.save(tmp_path, spec=spec)
    document = json.loads((tmp_path / "result.json").read_text())
    assert document["format"] == "gansteer.result/1" and document["generator"] == f"{GEN}@1"
    assert (document["kind"], document["seed"], document["job_id"]) == ("inversion", 42, "job-1")
    assert set(document["items"][0]) == {"image", "latent", "class_embedding", "metrics"}
    assert document["spec"]["inversion"]["seed"] == "42"  # protobuf JSON writes uint64 as a string

    again = load_result(tmp_path)  # the folder, or its result.json, read the same
    assert load_result(tmp_path / "result.json").path == again.path and isinstance(again, SavedResult)
    assert again.latents.dtype == np.float32 and again.latents.tobytes() == result.latents.tobytes()
    assert again.class_embeddings is not None and result.class_embeddings is not None
    assert again.class_embeddings.tobytes() == result.class_embeddings.tobytes()
    assert again.class_ids == () and again.spec == spec and saved.path == again.path
    assert [np.asarray(im).tobytes() for im in again.load_images()] == [
        np.asarray(im).tobytes() for im in result.images
    ]
    assert again.item_metrics == ({"criterion": 1.5}, {"criterion": 2.5}) and again.metrics == {"psnr": 20.5}


def test_a_held_class_is_saved_as_its_id_and_regenerated_with_it(tmp_path: Path) -> None:
    """The condition saved is what the generator was given: the class id, not its row."""
    saved = a_result(class_ids=(3, 3)).save(tmp_path)
    item = json.loads(saved.path.read_text())["items"][1]
    assert item["class_id"] == 3 and "class_embedding" not in item
    assert saved.class_ids == (3, 3) and saved.class_embeddings is None and saved.spec is None and saved.seed is None

    request = first_call(saved).request
    assert isinstance(request, generation_pb2.GenerateRequest) and request.model.name == f"{GEN}@1"
    assert tensors.from_tensor_proto(request.latents).tobytes() == saved.latents.tobytes()
    assert list(request.condition.class_ids.ids) == [3, 3]


def test_a_free_vector_is_regenerated_as_an_embedding(tmp_path: Path) -> None:
    saved = a_result(vectors=True).save(tmp_path)
    request = first_call(tmp_path).request
    assert saved.class_embeddings is not None
    assert tensors.from_tensor_proto(request.condition.embeddings).tobytes() == saved.class_embeddings.tobytes()


def test_what_cannot_be_regenerated_is_refused(tmp_path: Path) -> None:
    (tmp_path / "result.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(InvalidArgument, match="not a saved gansteer result"):
        load_result(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_result(tmp_path / "nowhere")
    unpinned = JobResult(**{**a_result().__dict__, "generator": GEN}).save(tmp_path / "old")
    with pytest.raises(InvalidArgument, match="lacks the pinned generator or the latents"):
        first_call(unpinned)
    no_latents = JobResult(**{**a_result().__dict__, "latents": np.zeros((0, 0), np.float32)}).save(tmp_path / "none")
    with pytest.raises(InvalidArgument, match="lacks the pinned generator or the latents"):
        first_call(no_latents)


def first_call(saved: SavedResult | Path) -> Call:
    @dataclass
    class Settings:
        retries: int = 0
        watch_window: float = 1.0
        outage_patience: float = 0.0

    step = next(Core(Settings()).regenerate(saved, timeout=None))
    assert isinstance(step, Call) and step.method == "Generate"
    return step


def test_generate_from_takes_no_model_of_its_own(tmp_path: Path) -> None:
    a_result(vectors=True).save(tmp_path)
    command = [sys.executable, "-m", "gansteer.cli", "generate", GEN, "--from", str(tmp_path), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "--from takes everything from the saved result; drop MODEL" in done.stdout
