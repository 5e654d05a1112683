"""The latent-search job (seed 002): `LatentSearchSpec` -> a validated spec -> `algorithms.latent_search`.

The objective is a weighted sum of scorer outputs, any the scoring service offers that give one number per image;
a term whose output takes a `class_id` and sets none gets each search's target class. The objective's models (one
per role: classifier, discriminator, feature extractor, PIR estimator) run in the worker on either backend; the
generator and the realism discriminator follow the backend. Model versions are pinned at submission.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from google.protobuf import json_format
from google.protobuf.message import Message
from torch import Tensor

from gansteer_server.algorithms import scorers
from gansteer_server.algorithms.latent_search import (
    LatentSearchConfig,
    LatentSearchModels,
    LatentSearchRun,
    ScoreFn,
)
from gansteer_server.algorithms.search import (
    OPTIMIZERS,
    Budget,
    OptionError,
    calls_per_candidate,
    is_gradient_optimizer,
    optimizer_options,
    planned_steps,
    population_floor,
)
from gansteer_server.jobs.backends import ModelBackend
from gansteer_server.jobs.kinds import JobKind, JobRun, SearchJobRun, SubmitContext, register_kind
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.models import ModelCard
from gansteer_server.proto import common_pb2, scoring_pb2
from gansteer_server.proto import optimization_pb2 as opt
from gansteer_server.wire import spec_fields
from gansteer_server.wire.convert import float_tensor
from gansteer_server.wire.errors import invalid_argument

FIELD = "spec.latent_search"
DEFAULT_OUTPUT = "class_logit"  # seed 002: "we try to maximize the pre-softmax zero score"
DEFAULT_LEARNING_RATE = 0.05
MAX_PERTURBATIONS = 10_000
# The model kinds that may fill each ScoringModels role.
_ROLE_KINDS = {
    "classifier": ("classifier",),
    "feature_extractor": ("feature_extractor", "classifier"),
    "discriminator": ("discriminator",),
    "pir_estimator": ("pir_estimator",),
}


@dataclass(frozen=True)
class ObjectiveTermSpec:
    """One validated term: a scorer output, its parameters (without the filled-in class), weight and model."""

    output: str
    params: tuple[tuple[str, Any], ...]
    weight: float
    name: str  # the term's name in progress and results: the output's, numbered when repeated
    model: str | None = None  # pinned ref; None for a model-free output
    role: str | None = None  # the ScoringModels field it fills
    fills_class: bool = False  # the output takes a class_id the term left unset: each search's target class


@dataclass(frozen=True)
class LatentSearchJobSpec:
    generator: str
    terms: tuple[ObjectiveTermSpec, ...]
    config: LatentSearchConfig
    judge: str | None
    classifier: str | None  # the optimised classifier, for its accuracy beside the judge's
    discriminator: str | None
    backend: str = ""


class LatentSearchJob(JobKind):
    name = "latent_search"
    spec_type = LatentSearchJobSpec
    spec_message = opt.LatentSearchSpec
    description = (
        "Search the latent space for a scorer objective (a class's logit, an estimator, a colour) with gradient "
        "ascent, CMA-ES or a genetic algorithm; robustness p10, judge and realism per result (seed 002)."
    )
    defaults: ClassVar[Mapping[str, Any]] = {
        "objective": [{"output": {"output": DEFAULT_OUTPUT}, "weight": 1.0}],
        "optimizer": {"name": "adam", "learning_rate": DEFAULT_LEARNING_RATE},
        "restarts": 1,
        "perturbations": 200,
        "perturbation_sigma": 0.1,
        "percentile": 10.0,
        "scorer": "the generator card's feature_extractor, else the deployment default",
        "judge": "the generator card's judge, else none",
        "discriminator": "the generator card's pair, else none",
        "prior_weight": 0.0,
        "seed": 0,
        "backend": "deployment default",
    }

    def parse(self, message: Message, context: SubmitContext) -> LatentSearchJobSpec:
        assert isinstance(message, opt.LatentSearchSpec)
        generator = context.model(message.generator, f"{FIELD}.generator", ("generator",))
        classes = self._classes(message, generator)
        scorer_ref = self._default_scorer(message, context, generator)
        discriminator = self._paired(message.discriminator, context, generator, "discriminator", ("discriminator",))
        defaults = {"discriminator": common_pb2.ModelRef(name=discriminator)} if discriminator else {}
        terms = self._terms(message, context, generator, scorer_ref, classes, defaults)
        config = self._config(message, context, generator, classes, terms)
        judge = classifier = None
        if classes:
            judge = self._paired(message.judge, context, generator, "judge", ("classifier",))
            classifier = next((t.model for t in terms if t.role == "classifier" and t.fills_class), None)
        return LatentSearchJobSpec(
            generator=generator.ref,
            terms=terms,
            config=config,
            judge=judge,
            classifier=classifier,
            discriminator=discriminator,
            backend=spec_fields.BACKENDS.get(message.backend, ""),
        )

    @staticmethod
    def _classes(message: opt.LatentSearchSpec, generator: ModelCard) -> tuple[int, ...]:
        return tuple(
            spec_fields.class_id(value, f"{FIELD}.classes[{i}]", generator.num_classes or 0, generator.ref)
            for i, value in enumerate(message.classes)
        )

    @staticmethod
    def _default_scorer(message: opt.LatentSearchSpec, context: SubmitContext, generator: ModelCard) -> Any:
        if message.scorer.name:
            return message.scorer
        paired = generator.extra.get("feature_extractor")
        name = paired if isinstance(paired, str) and paired else context.settings.default_feature_extractor
        return common_pb2.ModelRef(name=name)

    @staticmethod
    def _paired(
        ref: common_pb2.ModelRef, context: SubmitContext, generator: ModelCard, role: str, kinds: tuple[str, ...]
    ) -> str | None:
        """The spec's model, else the one the generator's card pairs with it (`extra.<role>`), else None."""
        if not ref.name:
            paired = generator.extra.get(role)
            if not isinstance(paired, str) or not paired:
                return None
            ref = common_pb2.ModelRef(name=paired)
        return context.model(ref, f"{FIELD}.{role}", kinds).ref

    def _terms(
        self,
        message: opt.LatentSearchSpec,
        context: SubmitContext,
        generator: ModelCard,
        scorer_ref: common_pb2.ModelRef,
        classes: tuple[int, ...],
        role_defaults: dict[str, common_pb2.ModelRef],
    ) -> tuple[ObjectiveTermSpec, ...]:
        """The objective's terms; a term naming no model takes its role's default (`realism`: the job's
        discriminator, the spec's or the generator card's pair), else the job's scorer."""
        given = list(message.objective)
        if not given:
            given = [scoring_pb2.ObjectiveTerm(output=scoring_pb2.OutputRequest(output=DEFAULT_OUTPUT), weight=1.0)]
        terms: list[ObjectiveTermSpec] = []
        roles: dict[str, str] = {}
        for index, term in enumerate(given):
            field = f"{FIELD}.objective[{index}]"
            name = term.output.output
            try:
                spec = scorers.get_output(name, field=f"{field}.output")
            except scorers.ScorerInputError as error:
                raise invalid_argument(error.field, error.message, "UNKNOWN_OUTPUT") from None
            if spec.shape != "(N,)":
                raise invalid_argument(
                    f"{field}.output.output",
                    f"{name!r} gives {spec.shape}; a term needs one number per image (e.g. class_logit)",
                )
            if term.output.HasField("noise"):
                raise invalid_argument(f"{field}.output.noise", "an objective term takes no simulated noise")
            if not math.isfinite(term.weight):
                raise invalid_argument(f"{field}.weight", f"must be a finite number, got {term.weight}")
            params = json_format.MessageToDict(term.output.params)
            fills_class = "class_id" in spec.params and "class_id" not in params
            if fills_class and not classes and spec.params["class_id"].required:
                raise invalid_argument(
                    f"{FIELD}.classes", f"objective[{index}] ({name}) needs a class: give target classes", "NO_CLASS"
                )
            card = None
            if spec.model is not None:
                ref = term.output.model if term.output.model.name else role_defaults.get(spec.model, scorer_ref)
                card = context.model(ref, f"{field}.output.model", _ROLE_KINDS[spec.model])
                if roles.setdefault(spec.model, card.ref) != card.ref:
                    raise invalid_argument(
                        f"{field}.output.model",
                        f"the objective already uses {roles[spec.model]} as its {spec.model}; one model per role",
                    )
            self._check_params(name, params, f"{field}.output", card, classes if fills_class else ())
            count = sum(t.output == name for t in terms)
            terms.append(
                ObjectiveTermSpec(
                    output=name,
                    params=tuple(sorted(params.items())),
                    weight=float(term.weight),
                    name=name if count == 0 else f"{name}#{count + 1}",
                    model=None if card is None else card.ref,
                    role=spec.model,
                    fills_class=fills_class and bool(classes),
                )
            )
        return tuple(terms)

    @staticmethod
    def _check_params(
        name: str, params: dict[str, Any], field: str, card: ModelCard | None, classes: tuple[int, ...]
    ) -> None:
        """The output's parameters, and each target class it will be given, against the model's labels."""
        filled = params | ({"class_id": classes[0]} if classes else {})  # the class each search will give it
        try:
            typed = scorers.validate_params(name, filled, field=field)
        except scorers.ScorerInputError as error:
            raise invalid_argument(error.field, error.message) from None
        labels = card.num_classes if card is not None else None
        if labels and "class_id" in params and typed["class_id"] is not None and typed["class_id"] >= labels:
            raise invalid_argument(
                f"{field}.params.class_id", f"{typed['class_id']} is outside {card.ref}'s {labels} labels"
            )
        for i, value in enumerate(classes):
            if labels and value >= labels:
                assert card is not None
                raise invalid_argument(
                    f"{FIELD}.classes[{i}]",
                    f"class {value} is outside {card.ref}'s {labels} labels (the objective's {name} takes it)",
                    "CLASS_OUT_OF_RANGE",
                )

    def _config(
        self,
        message: opt.LatentSearchSpec,
        context: SubmitContext,
        generator: ModelCard,
        classes: tuple[int, ...],
        terms: tuple[ObjectiveTermSpec, ...],
    ) -> LatentSearchConfig:
        limits = context.settings
        bare = opt.Optimizer()
        bare.CopyFrom(message.optimizer)
        bare.ClearField("options")
        choice = spec_fields.optimizer(bare, f"{FIELD}.optimizer", OPTIMIZERS, "adam", limits.max_population)
        try:
            options = optimizer_options(choice.name, json_format.MessageToDict(message.optimizer.options))
        except OptionError as error:
            raise invalid_argument(f"{FIELD}.optimizer.options.{error.name}", error.message) from None
        gradient = is_gradient_optimizer(choice.name)
        population = choice.population or (1 if gradient else OPTIMIZERS[choice.name].default_population)
        floor = population_floor(choice.name)
        if population < floor:
            raise invalid_argument(
                f"{FIELD}.optimizer.population_size", f"{choice.name} needs a population of at least {floor}"
            )
        if gradient or calls_per_candidate(choice.name, options) > 1:
            for term in terms:
                if not scorers.get_output(term.output).differentiable:
                    raise invalid_argument(
                        f"{FIELD}.optimizer.name", f"{choice.name} needs gradients; {term.output!r} has none"
                    )
        budget, budget_unit = spec_fields.budget(message.budget, f"{FIELD}.budget", limits.max_budget)
        restarts = message.restarts or 1
        if not 0 < restarts <= limits.max_restarts:
            raise invalid_argument(f"{FIELD}.restarts", f"must be 0 (one) to {limits.max_restarts}, got {restarts}")
        class_mode = "conditioned" if classes else ("search" if generator.num_classes else "none")
        if message.search_class_embedding:
            if not generator.num_classes:
                raise invalid_argument(f"{FIELD}.search_class_embedding", f"{generator.ref} is not class-conditional")
            class_mode = "search"
        perturbations = message.perturbations or 200
        if not 0 < perturbations <= MAX_PERTURBATIONS:
            raise invalid_argument(f"{FIELD}.perturbations", f"must be 0 (200) to {MAX_PERTURBATIONS}")
        sigma = message.perturbation_sigma or 0.1
        if not (math.isfinite(sigma) and sigma > 0):
            raise invalid_argument(f"{FIELD}.perturbation_sigma", f"must be > 0 (0: 0.1), got {sigma}")
        percentile = message.percentile or 10.0
        if not 0 < percentile <= 100:
            raise invalid_argument(f"{FIELD}.percentile", f"must be in (0, 100] (0: 10), got {percentile}")
        if not (math.isfinite(message.prior_weight) and message.prior_weight >= 0):
            raise invalid_argument(f"{FIELD}.prior_weight", f"must be a finite number >= 0, got {message.prior_weight}")
        searches = max(1, len(classes)) * restarts
        per_step = searches * (1 if gradient else population)
        if max(per_step, perturbations) > limits.max_step_batch:
            raise invalid_argument(
                FIELD,
                f"{per_step} images per step (classes x restarts x population) or {perturbations} perturbations "
                f"exceed this server's limit of {limits.max_step_batch}",
                "BATCH_TOO_LARGE",
            )
        step_cost = 1 if gradient else population * calls_per_candidate(choice.name, options)
        if budget_unit == "generator_calls" and budget < step_cost:
            raise invalid_argument(
                f"{FIELD}.budget.amount", f"{budget} generator calls is less than one step costs ({step_cost})"
            )
        try:
            return LatentSearchConfig(
                optimizer=choice.name,
                options=tuple(sorted(options.items())),
                budget=budget,
                budget_unit=budget_unit,  # type: ignore[arg-type]
                learning_rate=choice.learning_rate or DEFAULT_LEARNING_RATE,
                population=population,
                restarts=restarts,
                class_mode=class_mode,  # type: ignore[arg-type]
                class_ids=classes,
                prior_weight=message.prior_weight,
                perturbations=perturbations,
                perturbation_sigma=sigma,
                percentile=percentile,
                seed=message.seed,
            )
        except ValueError as error:
            raise invalid_argument(FIELD, str(error)) from None

    def total_steps(self, spec: LatentSearchJobSpec) -> int:
        config = spec.config
        budget = Budget(config.budget, config.budget_unit)
        return planned_steps(config.optimizer, dict(config.options), budget, config.population, 1)

    def start(self, spec: LatentSearchJobSpec, backend: ModelBackend, settings: JobSettings) -> JobRun:
        generator = backend.generator(spec.generator)
        scoring = scorers.ScoringModels(**{t.role: backend.scorer(t.model) for t in spec.terms if t.role and t.model})
        models = LatentSearchModels(
            generator=generator,
            z_size=generator.card.latent_size or 0,
            objective=_objective(spec.terms, scoring),
            term_names=tuple(term.name for term in spec.terms),
            class_embeddings=generator.class_embeddings() if spec.config.class_mode == "search" else None,
            judge=backend.scorer(spec.judge) if spec.judge else None,
            classifier=backend.scorer(spec.classifier) if spec.classifier else None,
            discriminator=backend.discriminator(spec.discriminator) if spec.discriminator else None,
        )
        return LatentSearchJobRun(LatentSearchRun(spec.config, models))


def _objective(terms: tuple[ObjectiveTermSpec, ...], models: scorers.ScoringModels) -> ScoreFn:
    """sum_t weight_t * output_t per image, each term given each image's target class where it fills one; the
    images of one class share one forward per model."""

    def score(images: Tensor, classes: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        groups = [(None, None)] if classes is None else [(c, classes == c) for c in classes.unique().tolist()]
        total = images.new_zeros(len(images))
        values = {term.name: images.new_zeros(len(images)) for term in terms}
        for target, rows in groups:
            part = images if rows is None else images[rows]
            request = [
                (t.output, dict(t.params) | ({"class_id": target} if t.fills_class else {}), t.weight) for t in terms
            ]
            part_total, part_values = scorers.objective_terms(part, models, request)
            if rows is None:
                total, values = part_total, {t.name: v for t, v in zip(terms, part_values, strict=True)}
            else:
                total = total.index_put((rows,), part_total)
                for term, value in zip(terms, part_values, strict=True):
                    values[term.name] = values[term.name].index_put((rows,), value)
        return total, values

    return score


class LatentSearchJobRun(SearchJobRun):
    """The runner's view of a LatentSearchRun: progress as means over the searches, results as a JobResult."""

    run: LatentSearchRun

    def preview(self) -> Tensor:
        return self.run.best_images()

    def result(self) -> opt.JobResult:
        items = self.run.result()
        result = opt.JobResult()
        result.images.tensor.CopyFrom(float_tensor(torch.stack([item.image for item in items])))
        result.latents.CopyFrom(float_tensor(torch.stack([item.z for item in items])))
        if all(item.class_vector is not None for item in items):
            result.class_embeddings.CopyFrom(float_tensor(torch.stack([item.class_vector for item in items])))  # type: ignore[misc]
        elif all(item.class_id is not None for item in items):  # each search's class held: given as its id
            result.class_ids.extend(item.class_id for item in items)  # type: ignore[misc]
        card = self.run.models.generator.card  # type: ignore[attr-defined]
        result.generator.name, result.generator.version = card.name, card.version
        for item in items:
            values = {"objective": item.objective, "robustness": item.robustness, "restart": float(item.restart)}
            values |= item.terms
            optional = {
                "class_id": item.class_id,
                "judge_prob": item.judge_prob,
                "judge_correct": None if item.judge_class is None else float(item.judge_class == item.class_id),
                "classifier_prob": item.classifier_prob,
                "classifier_correct": None
                if item.classifier_class is None
                else float(item.classifier_class == item.class_id),
                "realism": item.realism,
            }
            values |= {name: float(value) for name, value in optional.items() if value is not None}
            result.item_metrics.add(values=values)
        means = {
            "objective": "objective",
            "robustness": "robustness",
            "judge_prob": "judge_prob",
            "judge_accuracy": "judge_correct",
            "classifier_accuracy": "classifier_correct",
            "realism": "realism",
        }
        for name, key in means.items():
            present = [m.values[key] for m in result.item_metrics if key in m.values]
            if present:
                result.metrics[name] = sum(present) / len(present)
        result.metrics["steps"] = float(self.run.steps)
        result.metrics["generator_calls"] = float(self.run.generator_calls)
        curve = torch.stack([item.curve for item in items])  # (M, steps): best-so-far objective after each step
        result.curve.steps.extend(range(1, curve.shape[1] + 1))
        result.curve.values["total"].CopyFrom(float_tensor(curve))
        result.tensors["robustness"].CopyFrom(float_tensor(torch.stack([item.perturbed for item in items])))
        return result


register_kind(LatentSearchJob())
