"""The PIR-estimator job (seed 000, appendix C.3): an impressions table -> two estimators on its disjoint halves.

With `simulate`, the job first collects the table itself, as a product would report it: images of a generator from
seeded latents, interactions ~ Binomial(impressions, objective(image)), appended to the table in chunks of
`COLLECT_CHUNK` images (source `job:<id>`, one idempotency key per chunk, so a lost worker's repeat records nothing
twice). It then trains on the records present at submission plus its own, rendering each image again from its
generator version, seed or latent and class. The estimators are registered when the job succeeds: the check
estimator as `<name>-check`, the main one as `<name>` with `check_estimator` on its card (what `pir_tuning` reads).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from google.protobuf import json_format
from google.protobuf.message import Message
from torch import Tensor, nn

from gansteer.tensors import from_tensor_proto
from gansteer_server.algorithms import scorers
from gansteer_server.algorithms.pir.estimator import EstimatorConfig, EstimatorTraining, expected_rate
from gansteer_server.algorithms.pir.interactions import half_of, near_zero_share, seed_latent, simulate_interactions
from gansteer_server.jobs.backends import ModelBackend
from gansteer_server.jobs.impressions import DATASET, ImpressionStore, now_timestamp
from gansteer_server.jobs.kinds import JobKind, StepProgress, SubmitContext, register_kind
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.models import ModelCard, ModelRegistry
from gansteer_server.models.architectures import build_architecture
from gansteer_server.models.card import NAME_PATTERN
from gansteer_server.models.lineage import Lineage, register_trained
from gansteer_server.proto import common_pb2
from gansteer_server.proto import optimization_pb2 as opt
from gansteer_server.wire.convert import float_tensor
from gansteer_server.wire.errors import invalid_argument, not_found

KIND = "pir_estimator"
FIELD = f"spec.{KIND}"
COLLECT_CHUNK = 100
DEFAULT_BACKBONE = "scenes-clf-alt"
MAX_IMAGES = 20_000
_ROLE_KINDS = {"feature_extractor": ("feature_extractor", "classifier"), "classifier": ("classifier",)}


@dataclass(frozen=True)
class Objective:
    """A validated scorer output in [0, 1]: the true rate of simulated interactions or of the final judging."""

    output: str
    params: tuple[tuple[str, Any], ...]
    model: str | None  # pinned ref, None for a model-free output
    model_role: str | None


def parse_objective(request: Any, field: str, context: SubmitContext) -> Objective:
    """An OutputRequest naming a rate output; errors name `field.output`, `field.params.<p>`, `field.model`."""
    try:
        spec = scorers.get_output(request.output, field=field)
    except scorers.UnknownOutputError as error:
        raise not_found(error.field, error.message, "UNKNOWN_OUTPUT") from None
    if not spec.is_rate:
        raise invalid_argument(f"{field}.output", f"{request.output!r} is not a rate in [0, 1]")
    params = json_format.MessageToDict(request.params)
    try:
        typed = scorers.validate_params(request.output, params, field=field)
    except scorers.ScorerInputError as error:
        raise invalid_argument(error.field, error.message) from None
    model = None
    if spec.model is not None:
        if spec.model not in _ROLE_KINDS:
            raise invalid_argument(f"{field}.output", f"{request.output!r} needs a {spec.model}; not offered here")
        ref = request.model if request.model.name else common_pb2.ModelRef(name="scenes-clf")
        model = context.model(ref, f"{field}.model", _ROLE_KINDS[spec.model]).ref
    return Objective(request.output, tuple(sorted(typed.items())), model, spec.model)


def objective_rates(objective: Objective, images: Tensor, backend: ModelBackend) -> Tensor:
    """The objective on `images` (N,), in batches of 500, without gradients."""
    models = scorers.ScoringModels()
    if objective.model is not None and objective.model_role is not None:
        models = scorers.ScoringModels(**{objective.model_role: backend.scorer(objective.model)})
    with torch.no_grad():
        return torch.cat(
            [
                scorers.compute_output(objective.output, images[i : i + 500], models, dict(objective.params))
                for i in range(0, len(images), 500)
            ]
        )


@dataclass(frozen=True)
class Simulation:
    generator: str  # pinned
    objective: Objective
    images: int
    impressions: int
    seed: int


@dataclass(frozen=True)
class PIREstimatorJobSpec:
    dataset: str
    records: int  # the table's records present at submission, trained on beside the job's own
    simulate: Simulation | None
    backbone: str
    bins: int
    learning_rate: float
    epochs: int
    held_out: float
    temperature: float
    single: bool
    init_estimator: str | None
    init_check: str | None
    register_as: str
    seed: int


class PIREstimatorJob(JobKind):
    name = KIND
    spec_type = PIREstimatorJobSpec
    spec_message = opt.PIREstimatorSpec
    description = (
        "Train a PIR estimator (a classifier backbone with a binned softmax head, seed 000) on an impressions table, "
        "optionally collecting simulated interactions first; registers it and its disjoint-half check estimator."
    )
    defaults: ClassVar[Mapping[str, Any]] = {
        "backbone": DEFAULT_BACKBONE,
        "bins": 100,
        "learning_rate": 5e-4,
        "epochs": 30,
        "held_out": 0.1,
        "temperature": 0.01,
        "register_as": "pir-<dataset>",
    }

    def parse(self, message: Message, context: SubmitContext) -> PIREstimatorJobSpec:
        assert isinstance(message, opt.PIREstimatorSpec)
        if not DATASET.fullmatch(message.dataset):
            raise invalid_argument(
                f"{FIELD}.dataset", f"{message.dataset!r} is not 1-64 letters, digits, '-', '_', '.'"
            )
        records = ImpressionStore.open(context.settings).count(message.dataset)
        simulate = self._simulation(message, context) if message.HasField("simulate") else None
        if simulate is None and records == 0:
            raise not_found(f"{FIELD}.dataset", f"no impressions table {message.dataset!r}", "UNKNOWN_DATASET")
        bins = message.bins or 100
        if not 2 <= bins <= 1000:
            raise invalid_argument(f"{FIELD}.bins", f"must be 0 (100) or 2 to 1000, got {bins}")
        images = records + (simulate.images if simulate else 0)
        per_estimator = images if message.single else images // 2
        if per_estimator < bins:
            where = f"{FIELD}.simulate.images" if simulate else f"{FIELD}.dataset"
            split = "" if message.single else " (each of the two estimators trains on one half)"
            raise invalid_argument(
                where, f"{per_estimator} images per estimator{split} are fewer than the {bins} bins", "TOO_FEW_IMAGES"
            )
        learning_rate = message.learning_rate or 5e-4
        if not (math.isfinite(learning_rate) and 0 < learning_rate <= 1):
            raise invalid_argument(f"{FIELD}.learning_rate", f"must lie in (0, 1], got {learning_rate}")
        epochs = message.epochs or 30
        if not 1 <= epochs <= 1000:
            raise invalid_argument(f"{FIELD}.epochs", f"must be 0 (30) or 1 to 1000, got {epochs}")
        held_out = message.held_out or 0.1
        if not 0 < held_out < 0.5:
            raise invalid_argument(f"{FIELD}.held_out", f"must lie in (0, 0.5), got {held_out}")
        temperature = message.temperature or 0.01
        if not 1e-4 <= temperature <= 100:
            raise invalid_argument(f"{FIELD}.temperature", f"must lie in [1e-4, 100], got {temperature}")
        backbone_ref = message.backbone if message.backbone.name else common_pb2.ModelRef(name=DEFAULT_BACKBONE)
        backbone = context.model(backbone_ref, f"{FIELD}.backbone", ("classifier",))
        if backbone.format != "safetensors" or not backbone.architecture:
            raise invalid_argument(
                f"{FIELD}.backbone", f"{backbone.ref} is not a built-in architecture with features()"
            )
        init, init_check = None, None
        if message.HasField("init_estimator"):
            card = context.model(message.init_estimator, f"{FIELD}.init_estimator", ("pir_estimator",))
            kwargs = card.architecture_kwargs
            if kwargs.get("bins") != bins or kwargs.get("backbone") != backbone.architecture:
                raise invalid_argument(
                    f"{FIELD}.init_estimator", f"{card.ref} has another backbone or bin count than this job's"
                )
            init = card.ref
            check = card.extra.get("check_estimator")
            if not message.single:
                if not check:
                    raise invalid_argument(f"{FIELD}.init_estimator", f"{card.ref} names no check estimator")
                init_check = context.model(common_pb2.ModelRef(name=str(check)), f"{FIELD}.init_estimator", (KIND,)).ref
        name = message.register_as or f"pir-{message.dataset}"
        if not re.fullmatch(NAME_PATTERN, name):
            raise invalid_argument(f"{FIELD}.register_as", f"{name!r} is not a valid model name")
        return PIREstimatorJobSpec(
            dataset=message.dataset,
            records=records,
            simulate=simulate,
            backbone=backbone.ref,
            bins=bins,
            learning_rate=learning_rate,
            epochs=epochs,
            held_out=held_out,
            temperature=temperature,
            single=message.single,
            init_estimator=init,
            init_check=init_check,
            register_as=name,
            seed=message.seed,
        )

    @staticmethod
    def _simulation(message: opt.PIREstimatorSpec, context: SubmitContext) -> Simulation:
        field = f"{FIELD}.simulate"
        simulate = message.simulate
        generator = context.model(simulate.generator, f"{field}.generator", ("generator",))
        if not simulate.objective.output:
            raise invalid_argument(f"{field}.objective.output", "the simulated rate's scorer output is required")
        objective = parse_objective(simulate.objective, f"{field}.objective", context)
        images = simulate.images or 1000
        if not 1 <= images <= MAX_IMAGES:
            raise invalid_argument(f"{field}.images", f"must be 0 (1000) or 1 to {MAX_IMAGES}, got {images}")
        impressions = simulate.impressions or 1000
        if not 1 <= impressions <= 10**9:
            raise invalid_argument(f"{field}.impressions", f"must be 0 (1000) or 1 to 1e9, got {impressions}")
        return Simulation(generator.ref, objective, images, impressions, simulate.seed)

    def total_steps(self, spec: PIREstimatorJobSpec) -> int:
        chunks = math.ceil(spec.simulate.images / COLLECT_CHUNK) if spec.simulate else 0
        return chunks + spec.epochs

    def start(self, spec: PIREstimatorJobSpec, backend: ModelBackend, settings: JobSettings) -> PIREstimatorRun:
        registry = ModelRegistry(settings.settings.registry_paths)
        return PIREstimatorRun(spec, backend, registry, ImpressionStore.open(settings))


def render_records(
    records: list[opt.ImpressionRecord], backend: ModelBackend, registry: ModelRegistry
) -> tuple[Tensor, Tensor, list[str]]:
    """Images (N, 3, H, W) of the records, their observed rates (N,) and image keys; records shown 0 times are
    skipped. Each image is rendered again from its generator version, latent (or seed) and class."""
    shown = [record for record in records if record.impressions > 0]
    images = torch.empty(0)
    by_generator: dict[str, list[int]] = {}
    for index, record in enumerate(shown):
        by_generator.setdefault(f"{record.generator.name}@{record.generator.version}", []).append(index)
    parts: dict[int, Tensor] = {}
    for ref, indices in by_generator.items():
        generator = backend.generator(ref)
        card = generator.card  # type: ignore[attr-defined]
        prior = registry.latent_prior(ref)
        latents = []
        for index in indices:
            record = shown[index]
            if record.HasField("latent"):
                latents.append(torch.from_numpy(from_tensor_proto(record.latent, copy=True)).float().reshape(-1))
            else:
                latents.append(seed_latent(record.seed, card.latent_size or 0, prior))
        z = torch.stack(latents)
        classes = torch.tensor([shown[i].class_id for i in indices], dtype=torch.int64) if card.num_classes else None
        with torch.no_grad():
            rendered = torch.cat(
                [
                    generator(z[i : i + 250], None if classes is None else classes[i : i + 250])
                    for i in range(0, len(z), 250)
                ]
            )
        for position, index in enumerate(indices):
            parts[index] = rendered[position]
    if shown:
        images = torch.stack([parts[i] for i in range(len(shown))])
    rates = torch.tensor([r.interactions / r.impressions for r in shown], dtype=torch.float32)
    keys = [f"{r.generator.name}@{r.generator.version}|{r.seed}|{r.latent.data.hex()}|{r.class_id}" for r in shown]
    return images, rates, keys


class PIREstimatorRun:
    """Collection steps (simulated records appended), then one epoch of both estimators per step."""

    def __init__(
        self, spec: PIREstimatorJobSpec, backend: ModelBackend, registry: ModelRegistry, store: ImpressionStore
    ) -> None:
        self.spec, self.backend, self.registry, self.store = spec, backend, registry, store
        self.job_id = ""  # learned from the runner's first `bind`; simulated records need it as their source
        self.chunks = math.ceil(spec.simulate.images / COLLECT_CHUNK) if spec.simulate else 0
        self.collected = 0
        self.trainings: list[EstimatorTraining] | None = None
        self._pending_state: Mapping[str, Any] | None = None
        self.data: tuple[Tensor, Tensor, list[str]] | None = None
        self.last: dict[str, float] = {}

    def bind(self, job_id: str) -> None:
        self.job_id = job_id

    @property
    def done(self) -> bool:
        return self.collected >= self.chunks and self.trainings is not None and all(t.done for t in self.trainings)

    @property
    def steps(self) -> int:
        return self.collected + (self.trainings[0].epoch if self.trainings else 0)

    # --- collection --------------------------------------------------------------------------------------------

    def _collect(self, chunk: int) -> None:
        simulation = self.spec.simulate
        assert simulation is not None
        first = chunk * COLLECT_CHUNK
        count = min(COLLECT_CHUNK, simulation.images - first)
        generator = self.backend.generator(simulation.generator)
        card: ModelCard = generator.card  # type: ignore[attr-defined]
        prior = self.registry.latent_prior(simulation.generator)
        seeds = [simulation.seed + first + i for i in range(count)]
        z = torch.stack([seed_latent(seed, card.latent_size or 0, prior) for seed in seeds])
        classes = None
        if card.num_classes:
            classes = torch.randint(card.num_classes, (count,), generator=torch.Generator().manual_seed(seeds[0]))
        with torch.no_grad():
            images = generator(z, classes)
        rates = objective_rates(simulation.objective, images, self.backend)
        interactions = simulate_interactions(rates, simulation.impressions, simulation.seed * 1_000_003 + chunk)
        seconds, nanos = now_timestamp()
        records = []
        for i, seed in enumerate(seeds):
            record = opt.ImpressionRecord(
                dataset=self.spec.dataset,
                generator=common_pb2.ModelRef(name=card.name, version=card.version),
                seed=seed,
                image_id=f"{self.job_id}/{first + i}",
                impressions=simulation.impressions,
                interactions=int(interactions[i]),
                cohort=f"simulated:{simulation.objective.output}",
                reporter=f"job:{self.job_id}",
                source=f"job:{self.job_id}",
            )
            if classes is not None:
                record.class_id = int(classes[i])
            record.received_at.seconds, record.received_at.nanos = seconds, nanos
            record.time.CopyFrom(record.received_at)
            records.append(record)
        self.store.append(self.spec.dataset, records, f"job:{self.job_id}:chunk:{chunk}")

    # --- training ----------------------------------------------------------------------------------------------

    def _records(self) -> list[opt.ImpressionRecord]:
        """The table's first `records` records, then this job's own (whatever else arrived meanwhile is left out)."""
        every = self.store.read(self.spec.dataset)
        own = [r for r in every[self.spec.records :] if r.source == f"job:{self.job_id}"] if self.spec.simulate else []
        return every[: self.spec.records] + own

    def _new_estimator(self, init: str | None) -> nn.Module:
        if init is not None:
            module = self.registry.load(init)
            assert isinstance(module, nn.Module)
            module = module.train()
        else:
            backbone_card = self.registry.card(self.spec.backbone)
            module = build_architecture(
                "pir_estimator",
                backbone=backbone_card.architecture,
                backbone_kwargs=backbone_card.architecture_kwargs,
                bins=self.spec.bins,
                resolution=backbone_card.resolution or 32,
            )
            backbone = self.registry.load(self.spec.backbone)
            assert isinstance(backbone, nn.Module)
            module.backbone.load_state_dict(backbone.state_dict())
        for parameter in module.parameters():
            parameter.requires_grad_(True)
        return module

    def _start_training(self) -> None:
        images, rates, keys = render_records(self._records(), self.backend, self.registry)
        self.data = (images, rates, keys)
        halves = (
            [torch.arange(len(keys))]
            if self.spec.single
            else [
                torch.tensor([i for i, key in enumerate(keys) if half_of(key) == h], dtype=torch.int64) for h in (0, 1)
            ]
        )
        inits = [self.spec.init_estimator, self.spec.init_check]
        torch.manual_seed(self.spec.seed)
        self.trainings = []
        for index, rows in enumerate(halves):
            if len(rows) < self.spec.bins:
                raise ValueError(f"half {index} holds {len(rows)} images, fewer than the {self.spec.bins} bins")
            config = EstimatorConfig(
                bins=self.spec.bins,
                learning_rate=self.spec.learning_rate,
                epochs=self.spec.epochs,
                held_out=self.spec.held_out,
                temperature=self.spec.temperature,
                seed=self.spec.seed * 2 + index,
            )
            estimator = self._new_estimator(inits[index])
            self.trainings.append(EstimatorTraining(estimator, images[rows], rates[rows], config))
        if self._pending_state is not None:
            for training, state in zip(self.trainings, self._pending_state["trainings"], strict=True):
                training.load_state_dict(state)
            self._pending_state = None

    def step(self) -> StepProgress:
        if self.collected < self.chunks:
            self._collect(self.collected)
            self.collected += 1
            self.last = {"collected_images": float(min(self.collected * COLLECT_CHUNK, self.spec.simulate.images))}  # type: ignore[union-attr]
        else:
            if self.trainings is None:
                self._start_training()
            assert self.trainings is not None
            reports = [training.step() for training in self.trainings]
            self.last = {"train_loss": reports[0]["train_loss"], "held_out_loss": reports[0]["held_out_loss"]}
            if len(reports) > 1:
                self.last["check_held_out_loss"] = reports[1]["held_out_loss"]
        return StepProgress(step=self.steps, generator_calls=0, criterion=dict(self.last))

    def _ensure_training(self) -> list[EstimatorTraining]:
        if self.trainings is None:
            self._start_training()
        assert self.trainings is not None
        return self.trainings

    def preview(self) -> Tensor:
        if self.data is None:
            return torch.zeros(1, 3, 32, 32)
        return self.data[0][:8]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"collected": self.collected}
        if self.trainings is not None:
            state["trainings"] = [training.state_dict() for training in self.trainings]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.collected = int(state["collected"])
        if "trainings" in state:
            self.trainings, self._pending_state = None, state
            self._start_training()

    def estimators(self) -> list[nn.Module]:
        """The trained estimators at their best held-out loss, frozen (copies: training may go on)."""
        finished = []
        for training in self._ensure_training():
            module = copy.deepcopy(training.estimator)
            module.load_state_dict(training.best_state)
            for parameter in module.parameters():
                parameter.requires_grad_(False)
            finished.append(module.eval())
        return finished

    def result(self) -> opt.JobResult:
        trainings = self._ensure_training()
        assert self.data is not None
        images, rates, _ = self.data
        estimators = self.estimators()
        rows = torch.argsort(rates, descending=True, stable=True)[:8]
        with torch.no_grad():
            estimated = expected_rate(estimators[0](images[rows]), self.spec.temperature)
        result = opt.JobResult()
        result.images.tensor.CopyFrom(float_tensor(images[rows]))
        for rate, estimate in zip(rates[rows].tolist(), estimated.tolist(), strict=True):
            result.item_metrics.add(values={"observed_pir": rate, "estimated_pir": estimate})
        result.metrics["images"] = float(len(rates))
        result.metrics["near_zero_share"] = near_zero_share(rates, self.spec.bins)
        result.metrics["observed_mean"] = float(rates.mean())
        result.metrics["observed_std"] = float(rates.std())
        result.metrics["epochs"] = float(trainings[0].epoch)
        for name, training in zip(("", "check_"), trainings, strict=False):
            result.metrics[f"{name}held_out_loss"] = training.best_loss
            result.metrics[f"{name}held_out_mae"] = training.held_out_error()
            result.metrics[f"{name}train_images"] = float(len(training.train_index))
        return result

    def publish(self, job_id: str) -> list[common_pb2.ModelRef]:
        """The check estimator as `<name>-check`, then the main one naming it; idempotent by job id."""
        spec = self.spec
        backbone = self.registry.card(spec.backbone)
        trainings = self._ensure_training()
        estimators = self.estimators()
        card: dict[str, Any] = {
            "kind": KIND,
            "architecture": "pir_estimator",
            "architecture_kwargs": {
                "backbone": backbone.architecture,
                "backbone_kwargs": backbone.architecture_kwargs,
                "bins": spec.bins,
                "resolution": backbone.resolution or 32,
            },
            "resolution": backbone.resolution,
            "channels": 3,
            "value_range": [-1.0, 1.0],
            "metrics": {"held_out_loss": trainings[0].best_loss, "images": len(trainings[0].images)},
        }
        lineage_spec = {key: value for key, value in asdict(spec).items() if key != "simulate"}
        if spec.simulate is not None:
            lineage_spec["simulate"] = asdict(spec.simulate) | {"objective": asdict(spec.simulate.objective)}
        lineage_spec = _json(lineage_spec)
        published = []
        check_ref = None
        if len(estimators) > 1:
            check = register_trained(
                self.registry,
                f"{spec.register_as}-check",
                card
                | {
                    "description": f"check estimator (second half) of {spec.register_as}, table {spec.dataset!r}",
                    "extra": {"temperature": spec.temperature, "dataset": spec.dataset, "half": 1},
                },
                estimators[1],
                Lineage(base=backbone.ref, job_id=job_id, kind=KIND, seed=spec.seed, spec=lineage_spec),
            )
            check_ref = check.card.ref
            published.append(common_pb2.ModelRef(name=check.card.name, version=check.card.version))
        extra: dict[str, Any] = {"temperature": spec.temperature, "dataset": spec.dataset, "half": 0}
        if check_ref is not None:
            extra["check_estimator"] = check_ref
        main = register_trained(
            self.registry,
            spec.register_as,
            card | {"description": f"PIR estimator of table {spec.dataset!r} (seed 000, C.3)", "extra": extra},
            estimators[0],
            Lineage(base=backbone.ref, job_id=job_id, kind=KIND, seed=spec.seed, spec=lineage_spec),
        )
        return [common_pb2.ModelRef(name=main.card.name, version=main.card.version), *published]


def _json(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    return value


register_kind(PIREstimatorJob())
