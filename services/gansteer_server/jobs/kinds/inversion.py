"""The inversion job (seed 003): `InversionSpec` -> a validated spec -> `algorithms.inversion.InversionRun`.

Targets are centre-cropped to a square (the seed's code stretches them, which distorts every photograph that is
not square) and resized to the generator's resolution (bilinear with antialiasing, as the criterion resizes); images
above the server's pixel limit, empty or undecodable ones, and other channel counts than 1 (grey, repeated) or 3 are
refused. Model versions are pinned at submission, so a version registered while the job waits does not change what
it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from google.protobuf.message import Message
from torch import Tensor

from gansteer_server.algorithms.inversion import (
    CRITERION_PRESETS,
    OPTIMIZERS,
    CriterionWeights,
    InversionConfig,
    InversionModels,
    InversionRun,
)
from gansteer_server.algorithms.inversion.criteria import centre_square, resize
from gansteer_server.algorithms.search import (
    CLASS_VECTORS,
    Budget,
    calls_per_candidate,
    is_gradient_optimizer,
    planned_steps,
)
from gansteer_server.jobs.backends import ModelBackend
from gansteer_server.jobs.kinds import JobKind, JobRun, SearchJobRun, SubmitContext, register_kind
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.models import ModelCard
from gansteer_server.proto import common_pb2
from gansteer_server.proto import optimization_pb2 as opt
from gansteer_server.wire import spec_fields
from gansteer_server.wire.convert import float_tensor
from gansteer_server.wire.errors import invalid_argument

FIELD = "spec.inversion"
# The product's defaults where the seed's own method leaves the manifold (issue 20, docs/inversion.md): a searched
# class vector among the class rows and z on its shell. InversionConfig keeps the seed's (free, no shell).
DEFAULT_CLASS_VECTOR = "simplex"
DEFAULT_LATENT_SHELL = True
# Per-search L-BFGS: first of all optimizers at 1000 calls in every case, and on the manifold closer than Adam at half
# the calls in two of three cases (bench/results/inversion.json, `table` and `half_budget`).
DEFAULT_OPTIMIZER = "lbfgs"
# Free weights of the proto -> the criterion's term names.
_WEIGHTS = {"lambda_s": "features", "lambda_l": "pixel_l2", "lambda_nu": "latent_norm", "lambda_r": "realism"}


@dataclass(frozen=True)
class InversionJobSpec:
    """A validated inversion: targets at the generator's resolution, pinned model refs, the algorithm's config."""

    targets: Tensor  # (T, 3, R, R) in [-1, 1]
    generator: str
    discriminator: str | None
    feature_extractor: str | None
    config: InversionConfig
    backend: str = ""  # "" = the deployment's default


class InversionJob(JobKind):
    name = "inversion"
    spec_type = InversionJobSpec
    spec_message = opt.InversionSpec
    description = "Find the latent (and class vector) whose image resembles each target image (seed 003)."
    defaults: ClassVar[Mapping[str, Any]] = {
        "criterion": "l2+features",
        "optimizer": {
            "name": DEFAULT_OPTIMIZER,
            "learning_rate": "the optimizer's default (ListOptimizers)",
            "population_size": 8,
        },
        "restarts": 1,
        "conditioned_class": None,
        "class_vector": DEFAULT_CLASS_VECTOR,
        "latent_shell": DEFAULT_LATENT_SHELL,
        "seed": 0,
        "backend": "deployment default",
        "feature_extractor": "the generator card's companion, else the deployment default",
        "discriminator": "the generator card's companion",
    }

    def parse(self, message: Message, context: SubmitContext) -> InversionJobSpec:
        assert isinstance(message, opt.InversionSpec)
        generator = context.model(message.generator, f"{FIELD}.generator", ("generator",))
        targets = self._targets(message, context, generator.resolution or 0, generator.channels)
        config = self._config(message, context, generator, len(targets))
        weights = config.criterion_weights
        discriminator = self._discriminator(message, context, generator) if weights.realism > 0 else None
        # Loaded even when the criterion gives it no weight: every result reports the feature distance.
        extractor = self._feature_extractor(message, context, generator)
        if extractor.resolution:  # compare the statistics at the extractor's own input size
            config = dataclasses.replace(config, feature_size=extractor.resolution)
        return InversionJobSpec(
            targets=targets,
            generator=generator.ref,
            discriminator=discriminator,
            feature_extractor=extractor.ref,
            config=config,
            backend=spec_fields.BACKENDS.get(message.backend, ""),
        )

    @staticmethod
    def _feature_extractor(message: opt.InversionSpec, context: SubmitContext, generator: ModelCard) -> ModelCard:
        """The spec's feature extractor, else the generator card's companion, else the deployment's default."""
        ref = message.feature_extractor
        if not ref.name:
            paired = generator.extra.get("feature_extractor")
            name = paired if isinstance(paired, str) and paired else context.settings.default_feature_extractor
            ref = common_pb2.ModelRef(name=name)
        return context.model(ref, f"{FIELD}.feature_extractor", ("feature_extractor", "classifier"))

    @staticmethod
    def _discriminator(message: opt.InversionSpec, context: SubmitContext, generator: ModelCard) -> str:
        """The spec's discriminator, else the one the generator's card pairs it with (`extra.discriminator`)."""
        ref = message.discriminator
        if not ref.name:
            paired = generator.extra.get("discriminator")
            if not isinstance(paired, str) or not paired:
                raise invalid_argument(
                    f"{FIELD}.discriminator",
                    f"the realism term (lambda_r > 0) needs a discriminator, and the card of {generator.ref} names "
                    "none; give one, or set lambda_r to 0",
                    "MISSING_MODEL",
                )
            ref = common_pb2.ModelRef(name=paired)
        return context.model(ref, f"{FIELD}.discriminator", ("discriminator",)).ref

    def _targets(self, message: opt.InversionSpec, context: SubmitContext, resolution: int, channels: int) -> Tensor:
        limit = context.settings.settings.max_images_per_request
        if not message.targets:
            raise invalid_argument(f"{FIELD}.targets", "at least one target image is required", "EMPTY")
        if len(message.targets) > limit:
            raise invalid_argument(
                f"{FIELD}.targets", f"{len(message.targets)} targets exceed this server's limit of {limit}", "TOO_MANY"
            )
        images = [
            resize(centre_square(context.image(image, f"{FIELD}.targets[{i}]", channels)[None]), resolution)[0]
            for i, image in enumerate(message.targets)
        ]
        return torch.stack(images).clamp(-1, 1)

    def _config(
        self, message: opt.InversionSpec, context: SubmitContext, generator: ModelCard, num_targets: int
    ) -> InversionConfig:
        limits = context.settings
        criterion = message.criterion or "l2+features"
        if criterion not in CRITERION_PRESETS:
            raise invalid_argument(
                f"{FIELD}.criterion", f"unknown preset {criterion!r}; expected one of {sorted(CRITERION_PRESETS)}"
            )
        weights = None
        given = {
            name: spec_fields.weight(getattr(message, name), f"{FIELD}.{name}")
            for name in _WEIGHTS
            if message.HasField(name)
        }
        if given:
            preset = CRITERION_PRESETS[criterion]
            weights = CriterionWeights(
                **{_WEIGHTS[name]: value for name, value in given.items()}
                | {term: getattr(preset, term) for name, term in _WEIGHTS.items() if name not in given}
            )
        choice = spec_fields.optimizer(
            message.optimizer, f"{FIELD}.optimizer", OPTIMIZERS, DEFAULT_OPTIMIZER, limits.max_population
        )
        optimizer, learning_rate, population = choice.name, choice.learning_rate, choice.population
        budget, budget_unit = spec_fields.budget(message.budget, f"{FIELD}.budget", limits.max_budget)
        restarts = message.restarts or 1
        if not 0 < restarts <= limits.max_restarts:
            raise invalid_argument(f"{FIELD}.restarts", f"must be 0 (one) to {limits.max_restarts}, got {restarts}")
        if message.HasField("initial_latents"):
            raise invalid_argument(f"{FIELD}.initial_latents", "starting latents are not supported yet", "UNSUPPORTED")
        class_mode, class_ids = ("search" if generator.num_classes else "none"), None
        if message.HasField("conditioned_class"):
            conditioned = spec_fields.class_id(
                message.conditioned_class, f"{FIELD}.conditioned_class", generator.num_classes or 0, generator.ref
            )
            class_mode, class_ids = "conditioned", (conditioned,)
        class_vector = message.class_vector or DEFAULT_CLASS_VECTOR
        if class_vector not in CLASS_VECTORS:
            raise invalid_argument(
                f"{FIELD}.class_vector", f"must be one of {', '.join(CLASS_VECTORS)}, got {class_vector[:50]!r}"
            )
        values: dict[str, Any] = {
            "class_vector": class_vector,
            "latent_shell": message.latent_shell if message.HasField("latent_shell") else DEFAULT_LATENT_SHELL,
            "optimizer": optimizer,
            "criterion": criterion,
            "weights": weights,
            "budget": budget,
            "budget_unit": budget_unit,
            "restarts": restarts,
            "class_mode": class_mode,
            "class_ids": class_ids,
            "seed": message.seed,
        }
        if learning_rate or is_gradient_optimizer(optimizer):  # unset: the optimizer's own default step
            values["learning_rate"] = learning_rate or OPTIMIZERS[optimizer].default_learning_rate  # type: ignore[union-attr]
        if population:
            values["population"] = population
        try:
            config = InversionConfig(**values)
        except ValueError as error:
            raise invalid_argument(FIELD, str(error)) from None
        per_step = num_targets * restarts * (1 if is_gradient_optimizer(optimizer) else config.population)
        if per_step > limits.max_step_batch:
            raise invalid_argument(
                FIELD,
                f"targets x restarts x population = {per_step} images per step exceeds this server's limit of "
                f"{limits.max_step_batch}",
                "BATCH_TOO_LARGE",
            )
        step_cost = restarts * (1 if config.gradient else config.population * calls_per_candidate(optimizer, {}))
        if config.budget_unit == "generator_calls" and budget < step_cost:
            raise invalid_argument(
                f"{FIELD}.budget.amount", f"{budget} generator calls is less than one step costs ({step_cost})"
            )
        return config

    def total_steps(self, spec: InversionJobSpec) -> int:
        config = spec.config
        budget = Budget(config.budget, config.budget_unit)
        return planned_steps(config.optimizer, {}, budget, config.population, config.restarts)

    def start(self, spec: InversionJobSpec, backend: ModelBackend, settings: JobSettings) -> JobRun:
        generator = backend.generator(spec.generator)
        models = InversionModels(
            generator=generator,
            z_size=generator.card.latent_size or 0,
            class_embeddings=generator.class_embeddings() if spec.config.class_mode != "none" else None,
            feature_extractor=backend.feature_extractor(spec.feature_extractor) if spec.feature_extractor else None,
            discriminator=backend.discriminator(spec.discriminator) if spec.discriminator else None,
        )
        return InversionJobRun(InversionRun(spec.config, models, spec.targets))


class InversionJobRun(SearchJobRun):
    """The runner's view of an InversionRun: criterion values as means over the targets, results as a JobResult."""

    run: InversionRun

    def best(self, report: Any) -> Tensor:
        return report.best_criterion  # type: ignore[no-any-return]

    def preview(self) -> Tensor:
        return torch.stack([item.image for item in self.run.result()])

    def result(self) -> opt.JobResult:
        items = self.run.result()
        result = opt.JobResult()
        result.images.tensor.CopyFrom(float_tensor(torch.stack([item.image for item in items])))
        result.latents.CopyFrom(float_tensor(torch.stack([item.z for item in items])))
        if all(item.class_vector is not None for item in items):
            result.class_embeddings.CopyFrom(float_tensor(torch.stack([item.class_vector for item in items])))  # type: ignore[misc]
        card = self.run.models.generator.card  # type: ignore[attr-defined]
        result.generator.name, result.generator.version = card.name, card.version
        if all(item.class_id is not None for item in items):  # a held class: the generator was given its id
            result.class_ids.extend(item.class_id for item in items)  # type: ignore[misc]
        for item in items:
            values = {"criterion": item.criterion, "psnr": item.psnr, "ssim": item.ssim, **item.terms}
            if item.feature_distance is not None:
                values["feature_distance"] = item.feature_distance
            if item.class_id is not None:
                values["class_id"] = float(item.class_id)
            result.item_metrics.add(values=values)
        for name in ("criterion", "psnr", "ssim", "feature_distance"):
            present = [m.values[name] for m in result.item_metrics if name in m.values]
            if present:
                result.metrics[name] = sum(present) / len(present)
        result.metrics["steps"] = float(self.run.steps)
        result.metrics["generator_calls"] = float(self.run.generator_calls)
        curve = torch.stack([item.curve for item in items])  # (T, steps): best-so-far criterion after each step
        result.curve.steps.extend(range(1, curve.shape[1] + 1))
        result.curve.values["total"].CopyFrom(float_tensor(curve))
        restarts = torch.stack([item.restart_criteria for item in items])
        result.tensors["restart_criteria"].CopyFrom(float_tensor(restarts))
        return result


register_kind(InversionJob())
