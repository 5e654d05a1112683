"""The embedding-AM job (seed 001): `EmbeddingAMSpec` -> a validated spec -> `algorithms.embedding_am`.

Targets are resolved by name across the two models' label sets: a generator class is maximised as the classifier's
label of the same name (by id when either model has no names); a new label is one of the classifier's labels, and
is added to the generator as a new row under its name (or replaces the generator's class of that name). The judge
must not be the classifier the job optimises (the thesis's warning, NOTES.md). The chosen trial is registered as
the next version of the generator when the job succeeds (`publish`), with its lineage.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from google.protobuf import json_format
from google.protobuf.message import Message
from torch import Tensor

from gansteer_server.algorithms.embedding_am import (
    ADAM_OPTIONS,
    DEFAULT_LEARNING_RATES,
    INITS,
    AMConfig,
    AMEvaluation,
    AMModels,
    AMRun,
)
from gansteer_server.algorithms.search import OPTIMIZERS, OptionError, is_gradient_optimizer, optimizer_options
from gansteer_server.jobs.backends import LocalBackend, ModelBackend
from gansteer_server.jobs.kinds import JobKind, StepProgress, SubmitContext, register_kind
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.models import ModelCard, ModelRegistry
from gansteer_server.models.card import NAME_PATTERN
from gansteer_server.models.conditional import ConditionalGenerator
from gansteer_server.models.lineage import Lineage, register_derived
from gansteer_server.proto import common_pb2
from gansteer_server.proto import optimization_pb2 as opt
from gansteer_server.wire import spec_fields
from gansteer_server.wire.convert import float_tensor
from gansteer_server.wire.errors import invalid_argument

KIND = "embedding_am"
FIELD = f"spec.{KIND}"
MAX_EVAL_SAMPLES = 10_000
_SPACES = {
    opt.DIVERSITY_SPACE_PIXEL: "pixel",
    opt.DIVERSITY_SPACE_FEATURES: "features",
    opt.DIVERSITY_SPACE_SOFTMAX: "softmax",
}


@dataclass(frozen=True)
class EmbeddingAMJobSpec:
    generator: str
    classifier: str
    target: int  # the classifier's label id
    target_name: str
    row: int | None  # the generator row replaced; None: a new row is added
    judge: str | None
    judge_target: int | None
    feature_extractor: str | None
    init: str
    top_k: int
    top_k_samples: int
    init_sigma: float
    optimizer: str
    options: tuple[tuple[str, float], ...]
    learning_rate: float
    steps: int
    latents: int
    resample_every: int
    clamp: tuple[float | None, float | None]  # None: the table's own minimum or maximum
    trials: int
    diversity_weight: float
    diversity_space: str
    diversity_pairs: int
    eval_samples: int
    accuracy_tolerance: float
    register_as: str
    dry_run: bool
    seed: int
    backend: str = ""


def _label(value: str, card: ModelCard, field: str) -> int:
    """A label of `card` by name or decimal id, INVALID_ARGUMENT naming `field` when it has none such."""
    names = list(card.class_names or ())
    count = card.num_classes or 0
    if value in names:
        return names.index(value)
    if re.fullmatch(r"[0-9]+", value) and int(value) < count:
        return int(value)
    known = f"its labels: {', '.join(names)}" if names else f"ids 0 to {count - 1}"
    raise invalid_argument(field, f"{card.ref} has no class {value[:100]!r} ({known})", "UNKNOWN_CLASS")


def _name_of(card: ModelCard, index: int) -> str:
    names = card.class_names or ()
    return names[index] if index < len(names) else str(index)


def _same_label(name: str, index: int, source: ModelCard, card: ModelCard) -> int | None:
    """`card`'s label for `source`'s class (`name`, `index`): by name, or by id when either has no names."""
    if source.class_names and card.class_names:
        return list(card.class_names).index(name) if name in card.class_names else None
    return index if index < (card.num_classes or 0) else None


class EmbeddingAMJob(JobKind):
    name = KIND
    spec_type = EmbeddingAMJobSpec
    spec_message = opt.EmbeddingAMSpec
    description = (
        "Learn one class embedding of a frozen generator so a classifier recognises its samples (and, with the "
        "diversity term, they vary more), or a new label's embedding; registered as a new version (seed 001)."
    )
    defaults: ClassVar[Mapping[str, Any]] = {
        "classifier": "the generator card's classifier or feature_extractor, else the deployment default",
        "init": "target for target_class, mean for new_label",
        "top_k": 5,
        "top_k_samples": 10,
        "init_sigma": 0.1,
        "optimizer": {"name": "adam", "learning_rate": "0.01 (target), 0.1 (otherwise)", "options": ADAM_OPTIONS},
        "steps": 200,
        "latents_per_step": 20,
        "resample_every": 20,
        "clamp_min": "the table's minimum",
        "clamp_max": "the table's maximum",
        "trials": 5,
        "diversity_weight": 0.0,
        "diversity_pairs": 10,
        "judge": "the classifier card's judge, else (target_class) the generator card's",
        "feature_extractor": "the generator card's feature_extractor, else the deployment default",
        "eval_samples": 200,
        "accuracy_tolerance": 0.05,
        "register_as": "the generator's name",
        "seed": 0,
        "backend": "deployment default",
    }

    def parse(self, message: Message, context: SubmitContext) -> EmbeddingAMJobSpec:
        assert isinstance(message, opt.EmbeddingAMSpec)
        limits = context.settings
        generator = context.model(message.generator, f"{FIELD}.generator", ("generator",))
        if not (generator.num_classes and generator.embedding_size):
            raise invalid_argument(f"{FIELD}.generator", f"{generator.ref} has no class embedding to learn")
        classifier = context.model(
            self._classifier_ref(message, context, generator), f"{FIELD}.classifier", ("classifier",)
        )
        target, target_name, row = self._target(message, generator, classifier)
        judge, judge_target = self._judge(message, context, generator, classifier, target_name, target)
        feature_ref = message.feature_extractor
        if not feature_ref.name:
            paired = generator.extra.get("feature_extractor")
            name = paired if isinstance(paired, str) and paired else limits.default_feature_extractor
            feature_ref = common_pb2.ModelRef(name=name)
        features = context.model(feature_ref, f"{FIELD}.feature_extractor", ("feature_extractor", "classifier"))

        init = message.init or ("target" if row is not None else "mean")
        if init not in INITS:
            raise invalid_argument(f"{FIELD}.init", f"must be one of {', '.join(INITS)}, got {init[:50]!r}")
        if init == "target" and row is None:
            raise invalid_argument(f"{FIELD}.init", f"{target_name!r} has no row in {generator.ref} to start from")
        top_k = _count(message.top_k, min(5, generator.num_classes), generator.num_classes, f"{FIELD}.top_k")
        top_k_samples = _count(message.top_k_samples, 10, 1000, f"{FIELD}.top_k_samples")
        init_sigma = message.init_sigma if message.HasField("init_sigma") else 0.1
        if not (math.isfinite(init_sigma) and init_sigma >= 0):
            raise invalid_argument(f"{FIELD}.init_sigma", f"must be a finite number >= 0, got {init_sigma}")

        optimizer, options, learning_rate = self._optimizer(message, context, init)
        steps = _count(message.steps, 200, limits.max_budget, f"{FIELD}.steps")
        latents = _count(message.latents_per_step, 20, limits.max_step_batch, f"{FIELD}.latents_per_step")
        if latents < 2:
            raise invalid_argument(f"{FIELD}.latents_per_step", "needs at least 2 latents (one pair) per step")
        resample_every = _count(message.resample_every, min(20, steps), steps, f"{FIELD}.resample_every")
        trials = _count(message.trials, 5, limits.max_restarts, f"{FIELD}.trials")
        if trials * latents > limits.max_step_batch:
            raise invalid_argument(
                FIELD,
                f"{trials} trials x {latents} latents per step exceed this server's limit of {limits.max_step_batch}",
                "BATCH_TOO_LARGE",
            )
        clamp = self._clamp(message)

        weight = message.diversity_weight
        if not (math.isfinite(weight) and weight >= 0):
            raise invalid_argument(f"{FIELD}.diversity_weight", f"lambda must be a finite number >= 0, got {weight}")
        space = _SPACES.get(message.diversity_space, "")
        if weight > 0 and not space:
            raise invalid_argument(
                f"{FIELD}.diversity_space", "a diversity term needs its space: pixel, features or softmax"
            )
        pairs = _count(message.diversity_pairs, min(10, latents // 2), latents // 2, f"{FIELD}.diversity_pairs")
        eval_samples = _count(message.eval_samples, 200, MAX_EVAL_SAMPLES, f"{FIELD}.eval_samples")
        if eval_samples < 2:
            raise invalid_argument(f"{FIELD}.eval_samples", "needs at least 2 samples to measure diversity")
        tolerance = message.accuracy_tolerance if message.HasField("accuracy_tolerance") else 0.05
        if not 0 <= tolerance <= 1:
            raise invalid_argument(f"{FIELD}.accuracy_tolerance", f"must be in [0, 1], got {tolerance}")
        register_as = message.register_as or generator.name
        if not re.fullmatch(NAME_PATTERN, register_as):
            raise invalid_argument(f"{FIELD}.register_as", f"{register_as[:100]!r} is not a model name")
        return EmbeddingAMJobSpec(
            generator=generator.ref,
            classifier=classifier.ref,
            target=target,
            target_name=target_name,
            row=row,
            judge=judge,
            judge_target=judge_target,
            feature_extractor=features.ref,
            init=init,
            top_k=top_k,
            top_k_samples=top_k_samples,
            init_sigma=float(init_sigma),
            optimizer=optimizer,
            options=options,
            learning_rate=learning_rate,
            steps=steps,
            latents=latents,
            resample_every=resample_every,
            clamp=clamp,
            trials=trials,
            diversity_weight=float(weight),
            diversity_space=space,
            diversity_pairs=pairs,
            eval_samples=eval_samples,
            accuracy_tolerance=float(tolerance),
            register_as=register_as,
            dry_run=message.dry_run,
            seed=message.seed,
            backend=spec_fields.BACKENDS.get(message.backend, ""),
        )

    @staticmethod
    def _classifier_ref(
        message: opt.EmbeddingAMSpec, context: SubmitContext, generator: ModelCard
    ) -> common_pb2.ModelRef:
        if message.classifier.name:
            return message.classifier
        for role in ("classifier", "feature_extractor"):
            paired = generator.extra.get(role)
            if isinstance(paired, str) and paired:
                return common_pb2.ModelRef(name=paired)
        return common_pb2.ModelRef(name=context.settings.default_feature_extractor)

    @staticmethod
    def _target(
        message: opt.EmbeddingAMSpec, generator: ModelCard, classifier: ModelCard
    ) -> tuple[int, str, int | None]:
        """(the classifier's label id, its name, the generator row replaced or None for a new one)."""
        which = message.WhichOneof("target")
        if which is None:
            raise invalid_argument(f"{FIELD}.target_class", "give target_class (a generator class) or new_label")
        if which == "target_class":
            row = _label(message.target_class, generator, f"{FIELD}.target_class")
            name = _name_of(generator, row)
            target = _same_label(name, row, generator, classifier)
            if target is None:
                raise invalid_argument(
                    f"{FIELD}.classifier",
                    f"{classifier.ref}'s labels do not include the target {name!r}",
                    "LABEL_MISSING",
                )
            return target, name, row
        target = _label(message.new_label, classifier, f"{FIELD}.new_label")
        name = _name_of(classifier, target)
        names = list(generator.class_names or ())
        return target, name, names.index(name) if name in names else None

    @staticmethod
    def _judge(
        message: opt.EmbeddingAMSpec,
        context: SubmitContext,
        generator: ModelCard,
        classifier: ModelCard,
        target_name: str,
        target: int,
    ) -> tuple[str | None, int | None]:
        """The judge and its id of the target; a judge equal to the optimised classifier is refused when given and
        passed over when it is only a card's default."""
        ref = message.judge
        if not ref.name:
            paired = classifier.extra.get("judge")
            if not (isinstance(paired, str) and paired) and message.WhichOneof("target") == "target_class":
                paired = generator.extra.get("judge")
            if not (isinstance(paired, str) and paired):
                return None, None
            ref = common_pb2.ModelRef(name=paired)
        judge = context.model(ref, f"{FIELD}.judge", ("classifier",))
        if judge.ref == classifier.ref:
            if not message.judge.name:
                return None, None
            raise invalid_argument(
                f"{FIELD}.judge",
                f"{judge.ref} is the optimised classifier; judge with another one",
                "JUDGE_IS_OPTIMISED",
            )
        judge_target = _same_label(target_name, target, classifier, judge)
        if judge_target is None:
            raise invalid_argument(f"{FIELD}.judge", f"{judge.ref}'s labels do not include the target {target_name!r}")
        return judge.ref, judge_target

    @staticmethod
    def _optimizer(
        message: opt.EmbeddingAMSpec, context: SubmitContext, init: str
    ) -> tuple[str, tuple[tuple[str, float], ...], float]:
        bare = opt.Optimizer()
        bare.CopyFrom(message.optimizer)
        bare.ClearField("options")
        field = f"{FIELD}.optimizer"
        choice = spec_fields.optimizer(bare, field, OPTIMIZERS, "adam", context.settings.max_population)
        if not is_gradient_optimizer(choice.name):
            raise invalid_argument(f"{field}.name", f"embedding AM needs a gradient optimizer, not {choice.name!r}")
        given = json_format.MessageToDict(message.optimizer.options)
        if choice.name == "adam":
            given = ADAM_OPTIONS | given
        try:
            options = optimizer_options(choice.name, given)
        except OptionError as error:
            raise invalid_argument(f"{field}.options.{error.name}", error.message) from None
        return choice.name, tuple(sorted(options.items())), choice.learning_rate or DEFAULT_LEARNING_RATES[init]

    @staticmethod
    def _clamp(message: opt.EmbeddingAMSpec) -> tuple[float | None, float | None]:
        low = message.clamp_min if message.HasField("clamp_min") else None
        high = message.clamp_max if message.HasField("clamp_max") else None
        for value, name in ((low, "clamp_min"), (high, "clamp_max")):
            if value is not None and not math.isfinite(value):
                raise invalid_argument(f"{FIELD}.{name}", f"must be a finite number, got {value}")
        if low is not None and high is not None and not low < high:
            raise invalid_argument(f"{FIELD}.clamp_max", f"must be above clamp_min ({low}), got {high}")
        return low, high

    def total_steps(self, spec: EmbeddingAMJobSpec) -> int:
        return spec.steps

    def start(self, spec: EmbeddingAMJobSpec, backend: ModelBackend, settings: JobSettings) -> AMJobRun:
        generator = backend.generator(spec.generator)
        table = generator.class_embeddings()
        assert table is not None, f"{spec.generator} has no class embeddings"
        table = table.float()
        low, high = spec.clamp
        bounds = (float(table.min()) if low is None else low, float(table.max()) if high is None else high)
        if not bounds[0] < bounds[1]:
            raise ValueError(f"clamp range {bounds} is empty for {spec.generator}'s table")
        extractor = backend.feature_extractor(spec.feature_extractor) if spec.feature_extractor else None
        refs = {"classifier": spec.classifier, "judge": spec.judge or "", "features": spec.feature_extractor or ""}
        models = AMModels(
            generator=generator,
            table=table,
            z_size=generator.card.latent_size or 0,
            classifier=backend.scorer(spec.classifier),
            judge=backend.scorer(spec.judge) if spec.judge else None,
            judge_target=spec.judge_target,
            features=None
            if extractor is None or not spec.feature_extractor
            else _Penultimate(extractor, spec.feature_extractor),
            model_refs=refs,
        )
        config = AMConfig(
            target=spec.target,
            row=spec.row,
            init=spec.init,
            top_k=spec.top_k,
            top_k_samples=spec.top_k_samples,
            init_sigma=spec.init_sigma,
            optimizer=spec.optimizer,
            options=spec.options,
            learning_rate=spec.learning_rate,
            steps=spec.steps,
            latents=spec.latents,
            resample_every=spec.resample_every,
            bounds=bounds,
            trial_ids=tuple(range(spec.trials)),
            diversity_weight=spec.diversity_weight,
            diversity_space=spec.diversity_space,
            diversity_pairs=spec.diversity_pairs,
            eval_samples=spec.eval_samples,
            accuracy_tolerance=spec.accuracy_tolerance,
            seed=spec.seed,
        )
        return AMJobRun(spec, AMRun(config, models), ModelRegistry(settings.settings.registry_paths))


def _count(value: int, default: int, maximum: int | None, field: str) -> int:
    """A count option: 0 means `default`; otherwise from 1 to `maximum`."""
    value = value or default
    if not 0 < value <= (maximum or value):
        raise invalid_argument(field, f"must be 0 (default {default}) to {maximum}, got {value}")
    return int(value)


class _Penultimate:
    """A feature extractor's penultimate features (N, F), named by its ref (the metrics record it)."""

    def __init__(self, extractor: Any, ref: str) -> None:
        self.extractor, self.ref = extractor, ref

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.extractor.features(images)["penultimate"].flatten(1)  # type: ignore[no-any-return]


class AMJobRun:
    """The runner's view of an AMRun: progress as the step's mean terms, the result as every trial's metrics and the
    before/after grid, and the chosen trial published as a new generator version."""

    def __init__(self, spec: EmbeddingAMJobSpec, run: AMRun, registry: ModelRegistry) -> None:
        self.spec, self.run, self.registry = spec, run, registry
        self._evaluation: tuple[int, AMEvaluation] | None = None

    @property
    def done(self) -> bool:
        return self.run.done

    @property
    def steps(self) -> int:
        return self.run.steps

    def step(self) -> StepProgress:
        terms = self.run.step()
        log_prob, diversity = terms["log_prob"], terms["diversity"]
        criterion = {
            "total": float((log_prob + self.spec.diversity_weight * diversity).mean()),
            "log_prob": float(log_prob.mean()),
            "diversity": float(diversity.mean()),
        }
        calls = self.run.search.generator_calls * self.spec.latents
        return StepProgress(step=self.run.steps, generator_calls=calls, criterion=criterion)

    def preview(self) -> Tensor:
        """Each trial's row now, at the first four evaluation latents."""
        z = self.run.evaluation_latents()[:4]
        rows = self.run.rows()
        with torch.no_grad():
            return self.run.models.generator(z.repeat(len(rows), 1), rows.repeat_interleave(len(z), dim=0))

    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run.load_state_dict(state)
        self._evaluation = None

    def evaluation(self) -> AMEvaluation:
        if self._evaluation is None or self._evaluation[0] != self.run.steps:
            self._evaluation = (self.run.steps, self.run.evaluate())
        return self._evaluation[1]

    def result(self) -> opt.JobResult:
        evaluation = self.evaluation()
        rows = self.run.rows()
        result = opt.JobResult()
        result.images.tensor.CopyFrom(float_tensor(evaluation.grid[1:, 0]))  # each trial's first sample
        result.latents.CopyFrom(float_tensor(evaluation.grid_latents[:1].expand(len(rows), -1)))  # its latent
        result.class_embeddings.CopyFrom(float_tensor(rows))
        card = self.run.models.generator.card  # type: ignore[attr-defined]
        result.generator.name, result.generator.version = card.name, card.version
        for index, trial in enumerate(evaluation.trials):
            values = trial.values() | {"trial": float(index), "chosen": float(index == evaluation.chosen)}
            result.item_metrics.add(values=values)
        chosen = evaluation.trials[evaluation.chosen]
        result.metrics["chosen_trial"] = float(evaluation.chosen)
        for name, value in evaluation.before.values().items():
            result.metrics[f"before_{name}"] = value
        for name, value in chosen.values().items():
            result.metrics[f"after_{name}"] = value
        result.metrics["steps"] = float(self.run.steps)
        result.tensors["grid"].CopyFrom(float_tensor(evaluation.grid))
        result.tensors["grid_latents"].CopyFrom(float_tensor(evaluation.grid_latents))
        result.tensors["start_embedding"].CopyFrom(float_tensor(self.run.start_row()[None]))
        return result

    def publish(self, job_id: str) -> list[common_pb2.ModelRef]:
        """The chosen trial's row as the next version of the generator (or `register_as`), unless a dry run."""
        spec = self.spec
        if spec.dry_run:
            return []
        evaluation = self.evaluation()
        row = self.run.rows()[evaluation.chosen]
        base = self.registry.card(spec.generator)
        local = LocalBackend(self.registry).generator(spec.generator)
        assert isinstance(local, ConditionalGenerator)
        index = spec.row if spec.row is not None else (base.num_classes or 0)
        tuned = local.with_class_rows({index: row})
        names = list(tuned.card.class_names or ())
        if names and spec.row is None:
            names[index] = spec.target_name
        chosen = evaluation.trials[evaluation.chosen]
        lineage = Lineage(
            base=base.ref,
            job_id=job_id,
            kind=KIND,
            seed=spec.seed,
            spec=_lineage_spec(spec) | {"chosen_trial": evaluation.chosen, "metrics": chosen.values()},
        )
        entry = register_derived(
            self.registry,
            base,
            tuned.module,
            lineage,
            name=spec.register_as,
            card_changes={
                "num_classes": tuned.card.num_classes,
                "class_names": names or None,
                "architecture_kwargs": tuned.card.architecture_kwargs,
            },
            description=f"embedding AM of {base.ref}: class {spec.target_name!r} against {spec.classifier}",
        )
        return [common_pb2.ModelRef(name=entry.card.name, version=entry.card.version)]


def _lineage_spec(spec: EmbeddingAMJobSpec) -> dict[str, Any]:
    """The spec's settings as JSON values (the lineage records them with the classifier and judge)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(spec).items()}


register_kind(EmbeddingAMJob())
