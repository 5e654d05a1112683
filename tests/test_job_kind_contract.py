"""The job-kind contract, checked for every registered kind: its spec survives storage, bad specs are refused
naming the field, it is listed by ListJobKinds, a worker lost mid-job resumes from the checkpoint to the very
result of an uninterrupted run, cancel keeps the best result, the result has the documented shape, and a kind with
rounds waits for feedback holding no worker.

A new kind adds its case to `CASES`; the first test fails until it does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import struct_pb2
from job_fixtures import (
    CLASSES,
    CLF,
    GEN,
    PIR,
    ROUNDS,
    JobStack,
    OptimizationStub,
    RoundSpec,
    SleepSpec,
    evolution_spec,
    inversion_spec,
)

from gansteer.tensors import from_tensor_proto
from gansteer.v1 import common_pb2, scoring_pb2
from gansteer.v1 import optimization_pb2 as S
from gansteer_server.jobs.backends import Backends
from gansteer_server.jobs.celery_app import create_store
from gansteer_server.jobs.kinds import JobKind, SubmitContext, get_kind, kind_names
from gansteer_server.jobs.records import JobRecord, JobState
from gansteer_server.jobs.runner import WorkerContext, owner_is_dead, run_segment
from gansteer_server.jobs.specs import decode_spec, encode_spec
from gansteer_server.models import ModelRegistry

pytestmark = [pytest.mark.job]


@dataclass(frozen=True)
class Case:
    """How the contract drives one kind: a valid spec (a JobSpec for kinds with a proto message, else the parsed
    spec), and bad JobSpecs with the field each must be refused for."""

    spec: Callable[[], Any]
    bad: list[tuple[Callable[[S.JobSpec], None], str]] = field(default_factory=list)


def _inversion_bad_budget(spec: S.JobSpec) -> None:
    spec.inversion.budget.amount = 0


def _inversion_bad_optimizer(spec: S.JobSpec) -> None:
    spec.inversion.optimizer.name = "gradient-descent-please"


def _inversion_bad_class_vector(spec: S.JobSpec) -> None:
    spec.inversion.class_vector = "hyperbolic"


def _inversion_unknown_model(spec: S.JobSpec) -> None:
    spec.inversion.generator.name = "no-such-generator"


def _evolution_bad_mu(spec: S.JobSpec) -> None:
    spec.interactive_evolution.mu = 9  # more picks than the 1 + 7 images shown


def _evolution_bad_class(spec: S.JobSpec) -> None:
    spec.interactive_evolution.condition.class_ids.ids[:] = [99]


def _evolution_bad_rate(spec: S.JobSpec) -> None:
    spec.interactive_evolution.mutation_rate = 1.5


def _latent_search_spec() -> S.JobSpec:
    """CMA-ES over two classes x two restarts of the tiny generator, its classifier as objective and judge."""
    spec = S.LatentSearchSpec(
        generator=common_pb2.ModelRef(name=GEN),
        scorer=common_pb2.ModelRef(name=CLF),
        judge=common_pb2.ModelRef(name=CLF),
        classes=[1, 3],
        restarts=2,
        optimizer=S.Optimizer(name="cmaes", population_size=4),
        budget=S.Budget(unit=S.BUDGET_UNIT_GENERATOR_CALLS, amount=48),
        perturbations=16,
        seed=5,
    )
    return S.JobSpec(latent_search=spec)


def _search_unknown_output(spec: S.JobSpec) -> None:
    spec.latent_search.objective.add().output.output = "mountain_likeness"


def _search_bad_class(spec: S.JobSpec) -> None:
    spec.latent_search.classes[1] = CLASSES


def _search_bad_sigma(spec: S.JobSpec) -> None:
    spec.latent_search.optimizer.options.update({"sigma": 0.0})


def _search_bad_population(spec: S.JobSpec) -> None:
    spec.latent_search.optimizer.population_size = 1


def _search_bad_mutation(spec: S.JobSpec) -> None:
    spec.latent_search.optimizer.name = "ga"
    spec.latent_search.optimizer.options.update({"mutation": 1.0})


def _am_spec() -> S.JobSpec:
    """Three trials of embedding AM on the tiny generator's class 1 with the softmax diversity term."""
    spec = S.EmbeddingAMSpec(
        generator=common_pb2.ModelRef(name=GEN),
        classifier=common_pb2.ModelRef(name=CLF),
        target_class="1",
        trials=3,
        steps=6,
        latents_per_step=4,
        resample_every=2,
        diversity_weight=0.5,
        diversity_space=S.DIVERSITY_SPACE_SOFTMAX,
        diversity_pairs=2,
        eval_samples=8,
        dry_run=True,
        seed=4,
    )
    return S.JobSpec(embedding_am=spec)


def _am_unknown_class(spec: S.JobSpec) -> None:
    spec.embedding_am.target_class = "99"


def _am_unknown_label(spec: S.JobSpec) -> None:
    spec.embedding_am.new_label = "sunrise"


def _am_judge_is_the_classifier(spec: S.JobSpec) -> None:
    spec.embedding_am.judge.name = CLF


def _am_negative_lambda(spec: S.JobSpec) -> None:
    spec.embedding_am.diversity_weight = -1.0


def _am_no_diversity_space(spec: S.JobSpec) -> None:
    spec.embedding_am.diversity_space = S.DIVERSITY_SPACE_UNSPECIFIED


def _nes_spec() -> S.JobSpec:
    """Two rounds of human NES on the tiny generator: 3 latents x 2 pairs, a basis of 32 scenes renders (q = 8)."""
    spec = S.HumanNESSpec(
        generator=common_pb2.ModelRef(name=GEN),
        basis_scenes=32,
        basis_components=8,
        images=3,
        pairs_per_image=2,
        rounds=2,
        register_as="tiny-gen-nes",
        seed=3,
    )
    return S.JobSpec(human_nes=spec)


def _nes_q_past_rank(spec: S.JobSpec) -> None:
    spec.human_nes.basis_components = 32  # 32 images span at most 31 directions


def _nes_bad_sigma(spec: S.JobSpec) -> None:
    spec.human_nes.sigma = 0.0


def _nes_bad_pairs(spec: S.JobSpec) -> None:
    spec.human_nes.pairs_per_image = -1


def _nes_too_few_basis_images(spec: S.JobSpec) -> None:
    spec.human_nes.basis_images.extend(common_pb2.Image(png=b"") for _ in range(3))


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


def _pir_estimator_spec() -> S.JobSpec:
    """Simulated interactions on 60 tiny-gen images (a colour objective), two 10-bin estimators for 8 epochs."""
    simulate = S.SimulatedImpressions(
        generator=common_pb2.ModelRef(name=GEN),
        objective=scoring_pb2.OutputRequest(output="colour_single", params=struct({"colour": "blue"})),
        images=60,
        impressions=200,
        seed=5,
    )
    spec = S.PIREstimatorSpec(
        dataset="contract-pir", simulate=simulate, backbone=common_pb2.ModelRef(name=CLF), bins=10, epochs=8
    )
    return S.JobSpec(pir_estimator=spec)


def _pir_too_few_images(spec: S.JobSpec) -> None:
    spec.pir_estimator.simulate.images = 15  # 7 images per half for 10 bins


def _pir_unknown_objective(spec: S.JobSpec) -> None:
    spec.pir_estimator.simulate.objective.output = "no_such_output"


def _pir_estimator_unknown_dataset(spec: S.JobSpec) -> None:
    spec.pir_estimator.ClearField("simulate")
    spec.pir_estimator.dataset = "no-such-table"


def _pir_tuning_spec() -> S.JobSpec:
    spec = S.PIRTuningSpec(
        generator=common_pb2.ModelRef(name=GEN),
        pir_estimator=common_pb2.ModelRef(name=PIR),
        steps=6,
        batch_size=4,
        check_every=2,
        eval_images=8,
        register_as="tiny-gen-pir",
        objective=scoring_pb2.OutputRequest(output="colour_single", params=struct({"colour": "red"})),
        seed=2,
    )
    return S.JobSpec(pir_tuning=spec)


def _pir_negative_weight(spec: S.JobSpec) -> None:
    spec.pir_tuning.pir_weight = -1.0


def _pir_estimator_is_a_classifier(spec: S.JobSpec) -> None:
    spec.pir_tuning.pir_estimator.name = CLF


def _pir_check_is_the_estimator(spec: S.JobSpec) -> None:
    spec.pir_tuning.check_estimator.name = PIR


CASES: dict[str, Case] = {
    "human_nes": Case(
        spec=_nes_spec,
        bad=[
            (_nes_q_past_rank, "spec.human_nes.basis_components"),
            (_nes_bad_sigma, "spec.human_nes.sigma"),
            (_nes_bad_pairs, "spec.human_nes.pairs_per_image"),
            (_nes_too_few_basis_images, "spec.human_nes.basis_images"),
        ],
    ),
    "embedding_am": Case(
        spec=_am_spec,
        bad=[
            (_am_unknown_class, "spec.embedding_am.target_class"),
            (_am_unknown_label, "spec.embedding_am.new_label"),
            (_am_judge_is_the_classifier, "spec.embedding_am.judge"),
            (_am_negative_lambda, "spec.embedding_am.diversity_weight"),
            (_am_no_diversity_space, "spec.embedding_am.diversity_space"),
        ],
    ),
    "inversion": Case(
        spec=lambda: inversion_spec(budget=12, targets=2, seed=3),
        bad=[
            (_inversion_bad_budget, "spec.inversion.budget.amount"),
            (_inversion_bad_optimizer, "spec.inversion.optimizer.name"),
            (_inversion_unknown_model, "spec.inversion.generator"),
            (_inversion_bad_class_vector, "spec.inversion.class_vector"),
        ],
    ),
    "interactive_evolution": Case(
        spec=lambda: evolution_spec(rounds=3, mu=3, offspring=7, seed=5),
        bad=[
            (_evolution_bad_mu, "spec.interactive_evolution.mu"),
            (_evolution_bad_class, "spec.interactive_evolution.condition.class_ids.ids[0]"),
            (_evolution_bad_rate, "spec.interactive_evolution.mutation_rate"),
        ],
    ),
    "latent_search": Case(
        spec=_latent_search_spec,
        bad=[
            (_search_unknown_output, "spec.latent_search.objective[0].output.output"),
            (_search_bad_class, "spec.latent_search.classes[1]"),
            (_search_bad_sigma, "spec.latent_search.optimizer.options.sigma"),
            (_search_bad_population, "spec.latent_search.optimizer.population_size"),
            (_search_bad_mutation, "spec.latent_search.optimizer.options.mutation"),
        ],
    ),
    "pir_estimator": Case(
        spec=_pir_estimator_spec,
        bad=[
            (_pir_too_few_images, "spec.pir_estimator.simulate.images"),
            (_pir_unknown_objective, "spec.pir_estimator.simulate.objective.output"),
            (_pir_estimator_unknown_dataset, "spec.pir_estimator.dataset"),
        ],
    ),
    "pir_tuning": Case(
        spec=_pir_tuning_spec,
        bad=[
            (_pir_negative_weight, "spec.pir_tuning.pir_weight"),
            (_pir_estimator_is_a_classifier, "spec.pir_tuning.pir_estimator"),
            (_pir_check_is_the_estimator, "spec.pir_tuning.check_estimator"),
        ],
    ),
    "test_sleep": Case(spec=lambda: SleepSpec(steps=12, sleep_s=0.0)),
    "test_rounds": Case(spec=lambda: RoundSpec(rounds=2, items=4, choose=2, work_steps=6)),
}
#: Kinds the contract leaves out, and why.
EXEMPT = {"test_crash": "kills its own worker at every step, by design (the delivery-cap test)"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[JobStack, OptimizationStub]]:
    stack = JobStack(tmp_path_factory.mktemp("contract"))
    try:
        yield stack, stack.start_server()[1]
    finally:
        stack.close()


def test_every_registered_kind_has_a_contract_case() -> None:
    assert sorted(set(kind_names()) - set(EXEMPT)) == sorted(CASES)


def _parsed(kind: JobKind, stack: JobStack) -> Any:
    spec = CASES[kind.name].spec()
    if not isinstance(spec, S.JobSpec):
        return spec
    context = SubmitContext(stack.settings, ModelRegistry([stack.registry_root]))
    return kind.parse(getattr(spec, kind.name), context)


def _equal(a: Any, b: Any) -> bool:
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(_equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_validated_spec_survives_storage(name: str, stack: tuple[JobStack, OptimizationStub]) -> None:
    kind = get_kind(name)
    parsed = _parsed(kind, stack[0])
    assert _equal(decode_spec(kind.spec_type, encode_spec(parsed)), parsed)


@pytest.mark.parametrize(("name", "index"), [(n, i) for n in sorted(CASES) for i in range(len(CASES[n].bad))])
def test_a_bad_spec_is_refused_naming_the_field(
    name: str, index: int, stack: tuple[JobStack, OptimizationStub]
) -> None:
    spec = CASES[name].spec()
    mutate, field_name = CASES[name].bad[index]
    mutate(spec)
    with pytest.raises(grpc.RpcError) as caught:
        stack[1].SubmitJob(S.SubmitJobRequest(spec=spec), timeout=30)
    assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert caught.value.details().startswith(f"{field_name}:"), caught.value.details()


def test_list_job_kinds_describes_every_kind(stack: tuple[JobStack, OptimizationStub]) -> None:
    kinds = {info.name: info for info in stack[1].ListJobKinds(S.ListJobKindsRequest(), timeout=10).kinds}
    assert set(kinds) == set(kind_names())
    inversion = kinds["inversion"]
    assert inversion.spec_message == "gansteer.v1.InversionSpec" and inversion.description and not inversion.has_rounds
    options = {option.name: option for option in inversion.options}
    assert options["budget"].type == "gansteer.v1.Budget" and options["targets"].type == "repeated gansteer.v1.Image"
    assert options["criterion"].default_json == '"l2+features"'
    assert kinds["test_rounds"].has_rounds
    optimizers = {o.name: o for o in stack[1].ListOptimizers(S.ListOptimizersRequest(), timeout=10).optimizers}
    assert optimizers["adam"].gradient and not optimizers["CMA"].gradient and optimizers["lbfgs"].description
    assert optimizers["adam"].default_learning_rate > 0 and optimizers["DE"].default_population > 0
    assert {"nesterov", "random_search", "TwoPointsDE", "DE", "DiscreteDE", "DiscreteOnePlusOne"} <= set(optimizers)


# --- running, inline: the test drives the segments a worker would run -----------------------------------------------


class Inline:
    """Segments run in this thread, the messages they would send recorded, answers given through the service."""

    def __init__(self, stack: JobStack, stub: OptimizationStub, owner: str = "") -> None:
        self.sent: list[tuple[str, int]] = []
        self.stack, self.stub, self.store = stack, stub, create_store(stack.settings)

        def enqueue(record: JobRecord, segment: int, countdown: float) -> None:
            self.sent.append((record.id, segment))

        self.context = WorkerContext(
            stack.settings, self.store, Backends(stack.settings.settings), enqueue, owner=owner
        )

    def submit(self, kind: JobKind, parsed: Any) -> str:
        record, _ = self.store.create(
            kind=kind.name,
            owner="",
            queue=kind.queue,
            spec_proto=b"",
            spec_state=encode_spec(parsed),
            total_steps=kind.total_steps(parsed),
        )
        return record.id

    def run(self, job_id: str, segment: int = 0, *, until: Callable[[JobRecord], bool] | None = None) -> int:
        """Run segments until the job ends (or `until` holds); answers every round like a simulated rater."""
        while True:
            outcome = run_segment(self.context, job_id, segment)
            record = self.store.get(job_id)
            assert record is not None
            if record.state.terminal or (until is not None and until(record)):
                return segment
            if outcome == JobState.WAITING.value:
                assert record.lease_owner == "" and not [s for s in self.sent if s == (job_id, segment + 1)]
                self.answer(job_id)
                answered = self.store.get(job_id)
                if until is not None and answered is not None and until(answered):
                    return segment
            segment += 1

    def answer(self, job_id: str) -> None:
        job = self.stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=10).job
        assert job.state == S.JOB_STATE_WAITING_FOR_FEEDBACK
        pending = job.pending_round
        request = S.SubmitFeedbackRequest(job_id=job_id, round_id=pending.round_id, rater="contract")
        if pending.answer == S.ANSWER_KIND_CHOICE:
            request.choice.indices.extend(i % len(pending.items) for i in range(pending.choose))
        elif pending.answer == S.ANSWER_KIND_PAIRWISE:
            request.pairwise.judgements.extend(S.PairwiseJudgement(pair=i, score=0.0) for i in range(pending.num_pairs))
        else:
            request.ratings.values.extend([pending.rating_min] * len(pending.items))
        self.stub.SubmitFeedback(request, timeout=10)


def _result(stub: OptimizationStub, job_id: str) -> S.JobResult:
    request = S.GetResultRequest(job_id=job_id, image_format=2)  # IMAGE_FORMAT_TENSOR
    return stub.GetResult(request, timeout=10).result


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_lost_worker_resumes_to_the_result_of_an_uninterrupted_run(
    name: str, stack: tuple[JobStack, OptimizationStub]
) -> None:
    job_stack, stub = stack
    kind = get_kind(name)
    parsed = _parsed(kind, job_stack)
    inline = Inline(job_stack, stub)
    whole = inline.submit(kind, parsed)
    inline.run(whole)

    interrupted = inline.submit(kind, parsed)
    # One segment checkpointed (or a round answered), then the next one's worker died holding the lease.
    between = (JobState.RUNNING, JobState.QUEUED)
    segment = inline.run(interrupted, until=lambda record: record.step > 0 and record.state in between)
    dead = f"{inline.context.owner.split(':')[0]}:999999999:dead"
    assert owner_is_dead(dead)
    claim = inline.store.claim(interrupted, segment + 1, dead, 30.0, 3, owner_is_dead)
    assert claim.outcome.value == "run"
    inline.run(interrupted, segment + 1)
    events = [event for _, event in inline.store.read_events(interrupted)]
    assert any("after a lost worker" in e.state_change.message for e in events)

    expected, got = _result(stub, whole), _result(stub, interrupted)
    assert inline.store.get(interrupted).state is JobState.SUCCEEDED
    images = from_tensor_proto(got.images.tensor)
    assert images.ndim == 4 and images.shape[1] == 3 and len(got.item_metrics) in (0, len(images))
    assert np.array_equal(images, from_tensor_proto(expected.images.tensor))
    assert dict(got.metrics) == dict(expected.metrics)
    assert [dict(m.values) for m in got.item_metrics] == [dict(m.values) for m in expected.item_metrics]
    if got.HasField("latents"):
        assert len(from_tensor_proto(got.latents)) == len(images)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cancel_ends_the_job_keeping_its_best_result(name: str, stack: tuple[JobStack, OptimizationStub]) -> None:
    job_stack, stub = stack
    kind = get_kind(name)
    inline = Inline(job_stack, stub)
    job_id = inline.submit(kind, _parsed(kind, job_stack))
    stop = {"waiting": kind.has_rounds}

    def started(record: JobRecord) -> bool:
        return record.state is JobState.WAITING if stop["waiting"] else record.step > 0

    segment = inline.run(job_id, until=started)
    stub.CancelJob(S.CancelJobRequest(job_id=job_id, reason="enough"), timeout=10)
    if kind.has_rounds:  # a waiting job goes back to the queue (the service sent its segment), which ends it
        queued = inline.store.get(job_id)
        assert queued.state is JobState.QUEUED and queued.cancel_requested and queued.segment == segment + 1
    run_segment(inline.context, job_id, segment + 1)
    final = inline.store.get(job_id)
    assert final.state is JobState.CANCELLED and final.has_result
    assert _result(stub, job_id).images.HasField("tensor")


def test_rounds_wait_in_the_waiting_state(stack: tuple[JobStack, OptimizationStub]) -> None:
    job_stack, stub = stack
    for name in sorted(CASES):
        kind = get_kind(name)
        if not kind.has_rounds:
            continue
        inline = Inline(job_stack, stub)
        job_id = inline.submit(kind, _parsed(kind, job_stack))
        assert run_segment(inline.context, job_id, 0) == JobState.WAITING.value
        job = stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=10).job
        assert job.state == S.JOB_STATE_WAITING_FOR_FEEDBACK and job.pending_round.items
        assert inline.sent == []  # nothing queued: the answer sends the next segment
        assert ROUNDS.name == "test_rounds"
