"""Embedding activation maximisation (seed 001): the diversity term, batched trials against sequential ones,
reproducibility, the clamp, the initialisations, bad specs on the shipped zoo, and a learned embedding served by a
running generation service without a restart."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from job_fixtures import JobStack, OptimizationStub, final_state, make_settings, watch_all

from gansteer.tensors import from_tensor_proto
from gansteer.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from gansteer.v1 import optimization_pb2 as S
from gansteer_server.algorithms.embedding_am import AMConfig, AMModels, AMRun, diversity_ratio, initial_rows
from gansteer_server.config import Settings
from gansteer_server.jobs.backends import LocalBackend
from gansteer_server.models import ModelRegistry
from gansteer_server.servers.app import start_generation_server

GEN, CLF, ALT, JUDGE = "scenes-gen@1", "scenes-clf@1", "scenes-clf-alt@1", "scenes-judge@1"


@pytest.fixture(scope="module")
def zoo() -> LocalBackend:
    return LocalBackend(ModelRegistry(Settings().registry_paths))


def _models(zoo: LocalBackend, classifier: str = CLF) -> AMModels:
    generator = zoo.generator(GEN)
    table = generator.class_embeddings()
    assert table is not None
    return AMModels(generator=generator, table=table, z_size=128, classifier=zoo.scorer(classifier))


def _config(models: AMModels, **fields: object) -> AMConfig:
    table = models.table
    values: dict[str, object] = {
        "target": 2,
        "row": 2,
        "steps": 4,
        "latents": 4,
        "resample_every": 2,
        "diversity_pairs": 2,
        "bounds": (float(table.min()), float(table.max())),
        "trial_ids": (0, 1, 2),
        "eval_samples": 16,
        "seed": 11,
    }
    return AMConfig(**(values | fields))  # type: ignore[arg-type]


def _run(config: AMConfig, models: AMModels) -> AMRun:
    run = AMRun(config, models)
    while not run.done:
        run.step()
    return run


def test_the_diversity_term_is_the_mean_pair_ratio_of_eq_2_1() -> None:
    phi = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 2.0]]])  # pair distances 5 and 1
    z = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0], [1.0, 4.0, 0.0]]])  # 2 and 4
    assert torch.allclose(diversity_ratio(phi, z, pairs=2), torch.tensor([(5 / 2 + 1 / 4) / 2]))
    assert torch.allclose(diversity_ratio(phi, z, pairs=1), torch.tensor([5 / 2]))


@pytest.mark.parametrize("space", ["softmax", "pixel", "features"])
def test_batched_trials_equal_trials_run_one_at_a_time(zoo: LocalBackend, space: str) -> None:
    models = _models(zoo)
    config = _config(models, diversity_weight=2.0, diversity_space=space)
    run = _run(config, models)
    batched, moved = run.rows(), float((run.rows() - initial_rows(config, models)).abs().max())
    for trial in (0, 1, 2):
        alone = _run(_config(models, diversity_weight=2.0, diversity_space=space, trial_ids=(trial,)), models)
        # Equal up to float summation order (a batched convolution sums in another order, and Adam's normalised
        # step carries such differences on): well under 1% of how far the rows moved.
        gap = float((alone.rows()[0] - batched[trial]).abs().max())
        assert gap < 0.01 * moved, (space, trial, gap, moved)
    assert float((batched[0] - batched[1]).abs().max()) > 0.5 * moved  # each trial its own start and latents


def test_the_same_seed_gives_the_same_embedding_bit_for_bit(zoo: LocalBackend) -> None:
    models = _models(zoo)
    first, second = (_run(_config(models, init="mean", learning_rate=0.1), models).rows() for _ in range(2))
    assert torch.equal(first, second)
    other = _run(_config(models, init="mean", learning_rate=0.1, seed=12), models).rows()
    assert not torch.equal(first, other)


def test_every_step_clamps_the_rows_into_the_bounds(zoo: LocalBackend) -> None:
    models = _models(zoo)
    run = _run(_config(models, init="random", learning_rate=5.0, bounds=(-0.3, 0.25)), models)
    rows = run.rows()
    assert float(rows.min()) >= -0.3 - 1e-6 and float(rows.max()) <= 0.25 + 1e-6  # e0 + u rounds in float32
    assert float(rows.max()) == pytest.approx(0.25) or float(rows.min()) == pytest.approx(-0.3)


def test_initialisations_start_where_the_thesis_says(zoo: LocalBackend) -> None:
    models = _models(zoo)
    table = models.table
    near_row = initial_rows(_config(models, init="target", init_sigma=0.01), models)
    assert (near_row - table[2]).abs().max() < 0.1
    near_mean = initial_rows(_config(models, init="mean", init_sigma=0.01), models)
    assert (near_mean - table.mean(dim=0)).abs().max() < 0.1
    top = initial_rows(_config(models, init="top-k", init_sigma=0.0, top_k=3, target=2), models)
    assert torch.equal(top[0], table[2])  # the classifier scores the class's own samples highest for it


def test_the_result_judges_every_trial_and_chooses_by_the_stated_rule(zoo: LocalBackend) -> None:
    models = _models(zoo)
    run = _run(_config(models, eval_samples=24), models)
    evaluation = run.evaluate()
    assert len(evaluation.trials) == 3 and evaluation.grid.shape[:2] == (4, 8)
    floor = evaluation.before.classifier_accuracy - 0.05
    eligible = [i for i, m in enumerate(evaluation.trials) if m.classifier_accuracy >= floor]
    if eligible:
        assert evaluation.chosen == min(eligible, key=lambda i: evaluation.trials[i].ms_ssim)
    records = evaluation.trials[0].records
    assert {r["name"] for r in records} >= {"accuracy", "ms_ssim_3s_k7"} and all(r["n"] > 0 for r in records)


# --- the job through the service ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[JobStack, OptimizationStub]]:
    """A private registry root in front of the zoo (new versions land there), the optimization service."""
    stack = JobStack(tmp_path_factory.mktemp("am"))
    try:
        yield stack, stack.start_server()[1]
    finally:
        stack.close()


def _spec(**fields: object) -> S.JobSpec:
    values: dict[str, object] = {
        "generator": common_pb2.ModelRef(name="scenes-gen"),
        "classifier": common_pb2.ModelRef(name="scenes-clf-alt"),
        "new_label": "dusk",
        "trials": 2,
        "steps": 4,
        "latents_per_step": 4,
        "resample_every": 2,
        "eval_samples": 16,
        "seed": 3,
    }
    return S.JobSpec(embedding_am=S.EmbeddingAMSpec(**(values | fields)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "field", "code"),
    [
        ({"new_label": "", "target_class": "mountains"}, "spec.embedding_am.classifier", "INVALID_ARGUMENT"),
        ({"new_label": "sunrise"}, "spec.embedding_am.new_label", "INVALID_ARGUMENT"),
        ({"judge": common_pb2.ModelRef(name=JUDGE)}, "spec.embedding_am.judge", "INVALID_ARGUMENT"),
        ({"init": "target"}, "spec.embedding_am.init", "INVALID_ARGUMENT"),
        ({"diversity_weight": 1.0}, "spec.embedding_am.diversity_space", "INVALID_ARGUMENT"),
        ({"register_as": "no/such name"}, "spec.embedding_am.register_as", "INVALID_ARGUMENT"),
        ({"latents_per_step": 1}, "spec.embedding_am.latents_per_step", "INVALID_ARGUMENT"),
        ({"classifier": common_pb2.ModelRef(name="no-such-clf")}, "spec.embedding_am.classifier", "NOT_FOUND"),
    ],
)
def test_bad_specs_on_the_zoo_are_refused_naming_the_field(
    stack: tuple[JobStack, OptimizationStub], fields: dict[str, object], field: str, code: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stack[1].SubmitJob(S.SubmitJobRequest(spec=_spec(**fields)), timeout=30)
    assert caught.value.code() == getattr(grpc.StatusCode, code)
    assert caught.value.details().startswith(f"{field}:"), caught.value.details()


@pytest.mark.slow
def test_a_learned_label_is_served_by_a_running_generation_service_without_a_restart(
    stack: tuple[JobStack, OptimizationStub],
) -> None:
    job_stack, stub = stack
    settings = make_settings(job_stack.registry_root)
    generation = start_generation_server(settings, port=0, metrics_port=0)
    try:
        channel = grpc.insecure_channel(generation.address)
        gen_stub = generation_pb2_grpc.GenerationServiceStub(channel)
        ref = common_pb2.ModelRef(name="scenes-gen")
        before = gen_stub.GetModel(generation_pb2.GetModelRequest(model=ref), timeout=10).card
        assert "dusk" not in before.class_names

        job_stack.start_worker()
        job = stub.SubmitJob(S.SubmitJobRequest(spec=_spec()), timeout=30)
        events = watch_all(stub, job.job_id, timeout=300)
        assert final_state(events) == S.JOB_STATE_SUCCEEDED, [e for e in events if e.HasField("state_change")]
        result = stub.GetResult(S.GetResultRequest(job_id=job.job_id, image_format=2), timeout=30).result
        [registered] = result.models
        assert registered.name == "scenes-gen" and registered.version == before.version + 1

        card = gen_stub.GetModel(generation_pb2.GetModelRequest(model=ref), timeout=10).card
        assert card.version == registered.version and list(card.class_names)[-1] == "dusk"  # no restart
        dusk = len(card.class_names) - 1

        # The served images of class `dusk` are the chosen trial's embedding, as the job reported it.
        chosen = int(result.metrics["chosen_trial"])
        row = torch.from_numpy(from_tensor_proto(result.class_embeddings, copy=True))[chosen]
        request = generation_pb2.GenerateRequest(
            model=common_pb2.ModelRef(name="scenes-gen", version=registered.version),
            seeded=generation_pb2.SeededLatents(seed=5, count=3),
            condition=common_pb2.ClassCondition(class_ids=common_pb2.ClassIds(ids=[dusk])),
            format=common_pb2.IMAGE_FORMAT_TENSOR,
        )
        served = from_tensor_proto(gen_stub.Generate(request, timeout=30).images.tensor)
        request.condition.CopyFrom(common_pb2.ClassCondition(embeddings=_tensor(row[None])))
        request.model.version = before.version
        expected = from_tensor_proto(gen_stub.Generate(request, timeout=30).images.tensor)
        assert served.shape == (3, 3, 32, 32) and abs(served - expected).max() < 1e-5

        lineage = ModelRegistry(settings.registry_paths).card(f"scenes-gen@{registered.version}").extra["lineage"]
        assert lineage["base"] == "scenes-gen@1" and lineage["job_id"] == job.job_id and lineage["seed"] == 3
        assert lineage["spec"]["classifier"] == ALT and lineage["spec"]["target_name"] == "dusk"
        served_card = LocalBackend(ModelRegistry(settings.registry_paths)).generator(card.name).card
        assert served_card.num_classes == 11 and served_card.class_names[-1] == "dusk"
    finally:
        generation.stop(grace=None)


def _tensor(values: torch.Tensor) -> common_pb2.Tensor:
    from gansteer_server.wire.convert import float_tensor

    return float_tensor(values)
