"""Latent search (seed 002): find latents whose images maximise a scorer's output, e.g. the most mountain-like image
a generator can make. Its options, its spec builder and the type its results come back as; `Client.latent_search`
submits it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, Unpack

from gansteer._convert import model_ref
from gansteer._specs import ClassSpec, _invalid, class_id
from gansteer.kinds._common import (
    Backend,
    BudgetOptions,
    JobOptions,
    Kind,
    OptimizerOptions,
    _struct,
    backend,
    budget,
    job_spec,
    optimizer,
    option_names,
)
from gansteer.types import JobResult, ModelInfo
from gansteer.v1 import optimization_pb2, scoring_pb2

# The server requires a budget: 600 generator calls per search (40 CMA-ES generations of 15) take seconds per class
# on the built-in generator on a laptop CPU.
DEFAULT_BUDGET = 600

#: One objective term: an output name (weight 1), or a mapping {"output": name, "params": {...}, "weight": w,
#: "model": ref}.
ObjectiveTerm: TypeAlias = str | Mapping[str, Any]


class LatentSearchOptions(JobOptions, OptimizerOptions, BudgetOptions, total=False):
    """The settings of a latent search (optimization.proto, LatentSearchSpec) besides its generator.

    Every one is optional; an unset one takes the server's default, except the budget, which the SDK sends as 600
    generator calls per search unless given (optimizers compare at equal generator calls).
    """

    classes: Sequence[ClassSpec]  # target classes (ids or names), one group of `restarts` results each
    objective: Sequence[ObjectiveTerm]  # weighted scorer outputs; default: `class_logit` (the pre-softmax logit)
    scorer: str  # model of terms naming none; default: the generator card's classifier
    judge: str  # independent classifier judging the results; default: the generator card's judge
    discriminator: str  # scores realism; default: the generator card's pair
    restarts: int  # independent starts per class, each its own result
    search_class_embedding: bool  # search a continuous class vector with z (default: hold the class)
    prior_weight: float  # latent-prior penalty weight (0: none)
    perturbations: int  # robustness: perturbations per result (200)
    perturbation_sigma: float  # their standard deviation (0.1)
    percentile: float  # the percentile reported (10)
    seed: int
    backend: Backend


@dataclass(frozen=True)
class LatentSearchResult(JobResult):
    """A latent search's result: one item per class x restart (class-major), each with `objective`, `robustness`
    (the percentile over perturbations), `judge_prob`, `realism` and more in `item_metrics`."""

    @property
    def objective(self) -> list[float]:
        return [m.get("objective", float("nan")) for m in self.item_metrics]

    @property
    def robustness(self) -> list[float]:
        """The `percentile` (10th by default) of the objective over perturbations of each result's latent."""
        return [m.get("robustness", float("nan")) for m in self.item_metrics]

    @property
    def judge_accuracy(self) -> float:
        """The fraction of results the independent judge assigns to their target class (nan without a judge)."""
        return float(self.metrics.get("judge_accuracy", float("nan")))


LATENT_SEARCH = Kind(
    "latent_search", method="latent_search", options=option_names(LatentSearchOptions), result=LatentSearchResult
)


def _term(term: ObjectiveTerm, index: int) -> scoring_pb2.ObjectiveTerm:
    field = f"objective[{index}]"
    if isinstance(term, str):
        term = {"output": term}
    if not isinstance(term, Mapping) or not isinstance(term.get("output"), str):
        raise _invalid(field, "give an output name or a mapping with an `output` name")
    unknown = set(term) - {"output", "params", "weight", "model"}
    if unknown:
        raise _invalid(field, f"unknown keys {sorted(unknown)}; a term takes output, params, weight, model")
    request = scoring_pb2.OutputRequest(output=term["output"], params=_struct(term.get("params", {})))
    if term.get("model"):
        request.model.CopyFrom(model_ref(term["model"]))
    return scoring_pb2.ObjectiveTerm(output=request, weight=float(term.get("weight", 1.0)))


def latent_search_spec(
    *, model: str, card: ModelInfo | None = None, **options: Unpack[LatentSearchOptions]
) -> optimization_pb2.JobSpec:
    """The JobSpec of a latent search; `card` (the generator's) is needed only for classes given by name."""
    LATENT_SEARCH.check(options)
    spec = optimization_pb2.LatentSearchSpec(
        generator=model_ref(model),
        objective=[_term(term, i) for i, term in enumerate(options.get("objective", ()))],
        budget=budget(
            BudgetOptions(budget_unit=options.get("budget_unit", "generator_calls"), budget=options.get("budget", 0))
            if "budget" in options
            else BudgetOptions(budget_unit=options.get("budget_unit", "generator_calls")),
            default=DEFAULT_BUDGET,
        ),
        optimizer=optimizer(options),
        restarts=options.get("restarts", 0),
        search_class_embedding=options.get("search_class_embedding", False),
        perturbations=options.get("perturbations", 0),
        perturbation_sigma=options.get("perturbation_sigma", 0.0),
        percentile=options.get("percentile", 0.0),
        seed=options.get("seed", 0),
        prior_weight=options.get("prior_weight", 0.0),
        classes=[class_id(c, card, field=f"classes[{i}]") for i, c in enumerate(options.get("classes", ()))],
    )
    for name in ("scorer", "judge", "discriminator"):
        if options.get(name):
            getattr(spec, name).CopyFrom(model_ref(options[name]))
    if "backend" in options:
        spec.backend = backend(options["backend"])
    return job_spec("latent_search", spec, options)
