"""Embedding AM through the SDK, without a worker: the spec a user's options become, the refusals before anything is
sent (the target's exclusivity, ranges, a misspelled option), the typed result read from a JobResult as the server
kind lays it out, and `gansteer am` against a stand-in optimization service that serves such a result."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from gansteer import AsyncClient, Client, EmbeddingAMResult, InvalidArgument, cli, tensors
from gansteer._convert import job_result
from gansteer.kinds import KINDS, embedding_am_spec, result_type
from gansteer.v1 import common_pb2, optimization_pb2, optimization_pb2_grpc

opt = optimization_pb2
TRIALS, SAMPLES, EMBEDDING, SIDE = 3, 8, 6, 4


def test_every_option_reaches_its_spec_field() -> None:
    spec = embedding_am_spec(
        model="scenes-gen@1",
        target_class="forest",
        classifier="scenes-clf",
        init="top-k",
        top_k=3,
        top_k_samples=4,
        init_sigma=0.0,
        optimizer="adam",
        learning_rate=0.05,
        optimizer_options={"beta1": 0.5},
        steps=40,
        latents_per_step=8,
        resample_every=10,
        clamp_min=-0.5,
        clamp_max=0.6,
        trials=4,
        diversity_weight=2.0,
        diversity_space="softmax",
        diversity_pairs=3,
        judge="scenes-judge",
        feature_extractor="scenes-clf",
        eval_samples=50,
        accuracy_tolerance=0.1,
        register_as="scenes-gen-forest",
        dry_run=True,
        seed=7,
        backend="local",
        priority=3,
        labels={"study": "am"},
        idempotency_key="am-1",
    )
    assert spec.WhichOneof("kind") == "embedding_am"
    assert (spec.priority, dict(spec.labels), spec.idempotency_key) == (3, {"study": "am"}, "am-1")
    am = spec.embedding_am
    assert am.generator.name == "scenes-gen@1" and am.WhichOneof("target") == "target_class"
    assert am.target_class == "forest"
    assert (am.classifier.name, am.judge.name, am.feature_extractor.name) == (
        "scenes-clf",
        "scenes-judge",
        "scenes-clf",
    )
    assert (am.init, am.top_k, am.top_k_samples, am.steps, am.latents_per_step, am.resample_every) == (
        "top-k",
        3,
        4,
        40,
        8,
        10,
    )
    assert am.HasField("init_sigma") and am.init_sigma == 0.0  # an explicit 0 is sent, not the server's 0.1
    assert (am.optimizer.name, am.optimizer.learning_rate, dict(am.optimizer.options)) == ("adam", 0.05, {"beta1": 0.5})
    assert (am.clamp_min, am.clamp_max, am.trials) == (-0.5, 0.6, 4)
    assert (am.diversity_weight, am.diversity_space, am.diversity_pairs) == (2.0, opt.DIVERSITY_SPACE_SOFTMAX, 3)
    assert (am.eval_samples, am.accuracy_tolerance, am.register_as, am.dry_run, am.seed) == (
        50,
        0.1,
        "scenes-gen-forest",
        True,
        7,
    )
    assert am.backend == opt.BACKEND_LOCAL


def test_unset_options_take_the_server_defaults() -> None:
    am = embedding_am_spec(model="scenes-gen", new_label="dusk").embedding_am
    assert am.WhichOneof("target") == "new_label" and am.new_label == "dusk"
    assert not any(am.HasField(name) for name in ("init_sigma", "clamp_min", "clamp_max", "accuracy_tolerance"))
    assert not any(am.HasField(name) for name in ("optimizer", "classifier", "judge", "feature_extractor"))
    assert (am.init, am.steps, am.trials, am.diversity_space, am.dry_run) == ("", 0, 0, 0, False)
    assert embedding_am_spec(model="scenes-gen", target_class=6).embedding_am.target_class == "6"  # ids as text


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({}, "target_class"),
        ({"target_class": "forest", "new_label": "dusk"}, "new_label"),
        ({"target_class": -1}, "target_class"),
        ({"new_label": ""}, "new_label"),
        ({"target_class": True}, "target_class"),
        ({"target_class": "forest", "trials": -1}, "trials"),
        ({"target_class": "forest", "steps": 2.5}, "steps"),
        ({"target_class": "forest", "init_sigma": -0.1}, "init_sigma"),
        ({"target_class": "forest", "learning_rate": float("nan")}, "learning_rate"),
        ({"target_class": "forest", "diversity_weight": -2.0, "diversity_space": "softmax"}, "diversity_weight"),
        ({"target_class": "forest", "diversity_weight": 2.0}, "diversity_space"),
        ({"target_class": "forest", "diversity_space": "conv5"}, "diversity_space"),
        ({"target_class": "forest", "init": "original"}, "init"),
        ({"target_class": "forest", "accuracy_tolerance": 1.5}, "accuracy_tolerance"),
        ({"target_class": "forest", "clamp_min": 0.5, "clamp_max": 0.5}, "clamp_max"),
        ({"target_class": "forest", "clamp_min": float("inf")}, "clamp_min"),
        ({"target_class": "forest", "clamp_max": "high"}, "clamp_max"),
        ({"target_class": "forest", "backend": "gpu"}, "backend"),
    ],
)
def test_a_bad_option_is_refused_naming_it(options: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        embedding_am_spec(model="scenes-gen", **options)
    assert refused.value.field == field and field in str(refused.value)
    assert isinstance(refused.value, ValueError)


def test_the_clients_refuse_before_any_call() -> None:
    """No service listens at port 1: each refusal comes from the SDK, before a round trip."""
    with Client("127.0.0.1:1", retries=0, timeout=1) as client:
        with pytest.raises(TypeError, match=r"embedding_am\(\) got .* 'trails'; did you mean 'trials'\?"):
            client.embedding_am(model="scenes-gen", target_class="forest", trails=3)  # type: ignore[call-arg]
        with pytest.raises(InvalidArgument, match="target_class or new_label, not both"):
            client.embedding_am(model="scenes-gen", target_class="forest", new_label="dusk")

    async def story() -> None:
        async with AsyncClient("127.0.0.1:1", retries=0, timeout=1) as client:
            await client.embedding_am(model="scenes-gen")

    with pytest.raises(InvalidArgument, match="target_class: give target_class or new_label, one is required"):
        asyncio.run(story())
    assert KINDS["embedding_am"].method == "embedding_am" and result_type("embedding_am") is EmbeddingAMResult


def _float(array: np.ndarray) -> common_pb2.Tensor:
    return tensors.to_tensor_proto(np.asarray(array, np.float32), field="test")


def am_result(*, registered: bool = True) -> opt.JobResult:
    """A JobResult laid out as the server kind lays it out: one image per trial, each trial's row, its metrics, the
    chosen trial, before/after metrics and the before/after grid (row 0: the starting embedding)."""
    rng = np.random.default_rng(0)
    grid = rng.uniform(-1, 1, (1 + TRIALS, SAMPLES, 3, SIDE, SIDE))
    grid[0, 0] = -1.0  # the starting embedding's first sample: black
    result = opt.JobResult(job_id="job-am")
    result.images.tensor.CopyFrom(_float(grid[1:, 0]))
    result.class_embeddings.CopyFrom(_float(np.arange(TRIALS * EMBEDDING).reshape(TRIALS, EMBEDDING)))
    for trial in range(TRIALS):
        values = {
            "classifier_accuracy": 0.8 + 0.05 * trial,
            "classifier_log_prob": -0.5,
            "judge_accuracy": 0.7,
            "ms_ssim_3s_k7": 0.3 - 0.01 * trial,
            "lpips_builtin": 0.2,
            "trial": float(trial),
            "chosen": float(trial == 1),
        }
        result.item_metrics.add(values=values)
    before = {"classifier_accuracy": 0.6, "judge_accuracy": 0.5, "ms_ssim_3s_k7": 0.25, "lpips_builtin": 0.3}
    after = {"classifier_accuracy": 0.85, "judge_accuracy": 0.7, "ms_ssim_3s_k7": 0.29, "lpips_builtin": 0.2}
    result.metrics.update({f"before_{k}": v for k, v in before.items()})
    result.metrics.update({f"after_{k}": v for k, v in after.items()})
    result.metrics.update(chosen_trial=1.0, steps=40.0)
    result.tensors["grid"].CopyFrom(_float(grid))
    result.tensors["grid_latents"].CopyFrom(_float(rng.normal(size=(SAMPLES, 16))))
    result.tensors["start_embedding"].CopyFrom(_float(np.full((1, EMBEDDING), 0.5)))
    if registered:
        result.models.add(name="scenes-gen", version=2)
    return result


def test_the_result_reads_as_trials_before_after_grid_and_version() -> None:
    result = job_result(am_result(), result_type=result_type("embedding_am"))
    assert isinstance(result, EmbeddingAMResult) and result.job_id == "job-am"
    trials = result.trials
    assert len(trials) == TRIALS and [t.chosen for t in trials] == [False, True, False]
    assert result.chosen == 1 and trials[result.chosen].chosen
    np.testing.assert_array_equal(trials[2].embedding, np.arange(12, 18, dtype=np.float32))
    assert trials[0].metrics == pytest.approx(
        {
            "classifier_accuracy": 0.8,
            "classifier_log_prob": -0.5,
            "judge_accuracy": 0.7,
            "ms_ssim_3s_k7": 0.3,
            "lpips_builtin": 0.2,
        }
    )
    assert trials[0].image.size == (SIDE, SIDE)
    assert result.before == pytest.approx(
        {"classifier_accuracy": 0.6, "judge_accuracy": 0.5, "ms_ssim_3s_k7": 0.25, "lpips_builtin": 0.3}
    )
    assert result.after["classifier_accuracy"] == pytest.approx(0.85) and "chosen_trial" not in result.after
    grid = result.grid
    assert [len(row) for row in grid] == [SAMPLES] * (1 + TRIALS)
    assert np.asarray(grid[0][0]).max() == 0  # row 0 is the starting embedding
    np.testing.assert_array_equal(np.asarray(grid[2][0]), np.asarray(trials[1].image))  # the same z, trial 1
    np.testing.assert_array_equal(result.start_embedding, np.full(EMBEDDING, 0.5, np.float32))
    assert result.registered == "scenes-gen@2"
    assert job_result(am_result(registered=False), result_type=EmbeddingAMResult).registered is None  # type: ignore[attr-defined]


class FinishedAM(optimization_pb2_grpc.OptimizationServiceServicer):
    """An optimization service whose every job has already succeeded with `result`; it keeps the specs sent."""

    def __init__(self, result: opt.JobResult) -> None:
        self.result, self.specs = result, list[opt.JobSpec]()

    def _job(self) -> opt.Job:
        return opt.Job(id="job-am", kind="embedding_am", state=opt.JOB_STATE_SUCCEEDED, step=40, total_steps=40)

    def SubmitJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.specs.append(request.spec)
        return opt.SubmitJobResponse(job_id="job-am", job=self._job())

    def GetJob(self, request: Any, context: grpc.ServicerContext) -> Any:
        return opt.GetJobResponse(job=self._job())

    def WatchJob(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        change = opt.StateChange(state=opt.JOB_STATE_SUCCEEDED, previous=opt.JOB_STATE_RUNNING)
        yield opt.JobEvent(event_id="1-0", job_id="job-am", state_change=change)

    def GetResult(self, request: Any, context: grpc.ServicerContext) -> Any:
        return opt.GetResultResponse(result=self.result)


@pytest.fixture
def service() -> Iterator[tuple[str, FinishedAM]]:
    servicer = FinishedAM(am_result())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    optimization_pb2_grpc.add_OptimizationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


@pytest.mark.service
def test_gansteer_am_prints_the_trials_and_saves_grid_and_embedding(
    service: tuple[str, FinishedAM], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, servicer = service
    args = ["am", "scenes-gen", "--class", "forest", "--trials", "3", "--steps", "40", "--target", target, "-q"]
    spaced = ["--diversity-weight", "2", "--diversity-space", "softmax", "--judge", "scenes-judge"]
    assert cli.main([*args, *spaced, "--register-as", "scenes-gen-am", "--out", str(tmp_path)]) == 0
    am = servicer.specs[0].embedding_am
    assert (am.target_class, am.trials, am.steps, am.diversity_weight) == ("forest", 3, 40, 2.0)
    assert (am.diversity_space, am.judge.name, am.register_as, am.dry_run) == (
        opt.DIVERSITY_SPACE_SOFTMAX,
        "scenes-judge",
        "scenes-gen-am",
        False,
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["trial", "classifier", "judge", "ms_ssim_3s_k7", "lpips_builtin"]
    assert lines[3].split() == ["1", "0.8500", "0.7000", "0.2900", "0.2000", "*"]  # the chosen trial is marked
    assert lines[2].split()[-1] != "*" and lines[4].split()[-1] != "*"
    assert (
        lines[5].startswith("before: accuracy 0.6000, judge 0.5000") and "-> after (trial 1): accuracy 0.85" in lines[5]
    )
    assert lines[6] == "registered: scenes-gen@2"
    np.testing.assert_array_equal(np.load(tmp_path / "embedding.npy"), np.arange(6, 12, dtype=np.float32))
    assert (tmp_path / "grid.png").is_file()

    servicer.result = am_result(registered=False)
    assert cli.main(["am", "scenes-gen", "--new-label", "dusk", "--dry-run", "--target", target, "--json"]) == 0
    assert servicer.specs[1].embedding_am.new_label == "dusk" and servicer.specs[1].embedding_am.dry_run
    document = json.loads(capsys.readouterr().out)
    assert document["chosen"] == 1 and document["registered"] is None and len(document["trials"]) == TRIALS


@pytest.mark.service
def test_gansteer_am_refuses_a_bad_option_in_one_line_before_sending(
    service: tuple[str, FinishedAM], capsys: pytest.CaptureFixture[str]
) -> None:
    target, servicer = service
    assert cli.main(["am", "scenes-gen", "--class", "forest", "--diversity-weight", "2", "--target", target]) == 3
    assert capsys.readouterr().err == (
        "gansteer: diversity_space: a diversity term needs its space: pixel, features or softmax\n"
    )
    assert not servicer.specs
