"""The latent_search kind on the shipped zoo: what a spec means when fields are left unset, and bad specs refused
naming the field (an unknown scorer output, a class outside the generator's or the classifier's labels, an optimizer
option out of range, a population below two), checked at submission without running a model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from google.protobuf import struct_pb2

from gansteer_server.jobs.backends import LocalBackend
from gansteer_server.jobs.kinds import SubmitContext, get_kind
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.models import ModelRegistry
from gansteer_server.proto import common_pb2, scoring_pb2
from gansteer_server.proto import optimization_pb2 as opt
from gansteer_server.wire.errors import ServiceError

ZOO = Path(__file__).resolve().parents[1] / "services" / "gansteer_server" / "zoo" / "registry"
FIELD = "spec.latent_search"


@pytest.fixture(scope="module")
def context() -> SubmitContext:
    return SubmitContext(JobSettings.create(), ModelRegistry([ZOO]))


def spec(**fields: object) -> opt.LatentSearchSpec:
    message = opt.LatentSearchSpec(
        generator=common_pb2.ModelRef(name="scenes-gen"),
        classes=[0, 9],
        budget=opt.Budget(unit=opt.BUDGET_UNIT_GENERATOR_CALLS, amount=150),
    )
    for name, value in fields.items():
        if isinstance(value, list):
            del getattr(message, name)[:]
            getattr(message, name).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def term(output: str, weight: float = 1.0, model: str = "", **params: object) -> scoring_pb2.ObjectiveTerm:
    struct = struct_pb2.Struct()
    struct.update(params)
    request = scoring_pb2.OutputRequest(output=output, params=struct, model=common_pb2.ModelRef(name=model))
    return scoring_pb2.ObjectiveTerm(output=request, weight=weight)


def test_unset_fields_take_the_seeds_defaults_and_the_cards_companions(context: SubmitContext) -> None:
    parsed = get_kind("latent_search").parse(spec(), context)
    assert [(t.output, t.model, t.fills_class) for t in parsed.terms] == [("class_logit", "scenes-clf@1", True)]
    assert (parsed.judge, parsed.classifier, parsed.discriminator) == (
        "scenes-judge@1",
        "scenes-clf@1",
        "scenes-disc@1",
    )
    config = parsed.config
    assert (config.optimizer, config.class_mode, config.class_ids, config.restarts) == (
        "adam",
        "conditioned",
        (0, 9),
        1,
    )
    assert (config.perturbations, config.perturbation_sigma, config.percentile) == (200, 0.1, 10.0)
    cmaes = get_kind("latent_search").parse(spec(optimizer=opt.Optimizer(name="cmaes")), context).config
    assert cmaes.population == 15 and dict(cmaes.options) == {"sigma": 0.5}


def _options(name: str, **values: float) -> opt.Optimizer:
    optimizer = opt.Optimizer(name=name)
    optimizer.options.update(values)
    return optimizer


BAD: list[tuple[Callable[[], opt.LatentSearchSpec], str]] = [
    (lambda: spec(objective=[term("mountainness")]), f"{FIELD}.objective[0].output.output"),
    (lambda: spec(objective=[term("class_logits")]), f"{FIELD}.objective[0].output.output"),
    (lambda: spec(objective=[term("logits")]), f"{FIELD}.objective[0].output.output"),  # (N, classes), not (N,)
    (lambda: spec(classes=[3, 10]), f"{FIELD}.classes[1]"),  # outside the generator's 10 classes
    # scenes-clf-alt knows 3 time-of-day labels: class 9 of the generator is not one of them
    (lambda: spec(objective=[term("class_logit", model="scenes-clf-alt")]), f"{FIELD}.classes[1]"),
    (lambda: spec(objective=[term("class_prob", class_id=12)]), f"{FIELD}.objective[0].output.params.class_id"),
    (lambda: spec(optimizer=_options("cmaes", sigma=0.0)), f"{FIELD}.optimizer.options.sigma"),
    (lambda: spec(optimizer=_options("cmaes", sigma=-0.5)), f"{FIELD}.optimizer.options.sigma"),
    (lambda: spec(optimizer=_options("ga", mutation=0.0)), f"{FIELD}.optimizer.options.mutation"),
    (lambda: spec(optimizer=_options("ga", mutation=1.5)), f"{FIELD}.optimizer.options.mutation"),
    (lambda: spec(optimizer=_options("adam", sigma=0.5)), f"{FIELD}.optimizer.options.sigma"),
    (lambda: spec(optimizer=opt.Optimizer(name="ga", population_size=1)), f"{FIELD}.optimizer.population_size"),
    (lambda: spec(optimizer=opt.Optimizer(name="cmaes", population_size=1)), f"{FIELD}.optimizer.population_size"),
    (lambda: spec(perturbation_sigma=-0.1), f"{FIELD}.perturbation_sigma"),
    (lambda: spec(percentile=101.0), f"{FIELD}.percentile"),
    (lambda: spec(classes=[], objective=[term("class_logit")]), f"{FIELD}.classes"),
    (lambda: spec(budget=opt.Budget(unit=opt.BUDGET_UNIT_GENERATOR_CALLS, amount=0)), f"{FIELD}.budget.amount"),
]


@pytest.mark.parametrize(("make", "field"), BAD, ids=[field.split(".", 2)[-1] for _, field in BAD])
def test_a_bad_spec_is_refused_naming_the_field(
    context: SubmitContext, make: Callable[[], opt.LatentSearchSpec], field: str
) -> None:
    message = make()
    with pytest.raises(ServiceError) as caught:
        get_kind("latent_search").parse(message, context)
    assert caught.value.field == field, caught.value


def test_a_weighted_colour_objective_runs_without_a_classifier_term(context: SubmitContext) -> None:
    """A model-free output with a prior penalty, z and a class vector searched from the table's mean (no classes)."""
    kind = get_kind("latent_search")
    message = spec(
        classes=[],
        objective=[term("colour_single", 2.0, colour="blue")],
        optimizer=opt.Optimizer(name="cmaes", population_size=4),
        budget=opt.Budget(unit=opt.BUDGET_UNIT_GENERATOR_CALLS, amount=16),
        perturbations=8,
        prior_weight=0.5,
    )
    parsed = kind.parse(message, context)
    assert parsed.config.class_mode == "search" and parsed.judge is None
    torch.set_num_threads(1)
    run = kind.start(parsed, LocalBackend(ModelRegistry([ZOO])), context.settings)
    while not run.done:
        progress = run.step()
    assert set(progress.criterion) == {"total", "colour_single", "latent_norm"}
    result = run.result()
    values = dict(result.item_metrics[0].values)
    assert values["objective"] == pytest.approx(2 * values["colour_single"] - 0.5 * values["latent_norm"], abs=1e-5)
    assert "judge_prob" not in values and "realism" in values and result.class_embeddings.shape == [1, 128]
