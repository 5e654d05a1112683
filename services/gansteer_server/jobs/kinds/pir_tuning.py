"""The PIR-tuning job (seed 000, section 2.4): a generator tuned against a frozen PIR estimator, guarded.

One step is one discriminator and one generator update of `algorithms.pir.tuning.PIRTuning`; the guards (the anchor
to the frozen generator, early stopping on the disjoint-half check estimator) are on unless `no_guards`. The real
images of the GAN loss are rendered by the `scenes` renderer (the built-in zoo) or read from a folder on the worker.
When the job succeeds the tuned generator is registered as the next version of the generator (or `register_as`)
with a lineage naming both estimators, their table and the guard settings; the services serve it without a
restart. With `objective`, the result also judges before against after by the true rate (Welch, Cohen's d).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from google.protobuf.message import Message
from PIL import Image
from torch import Tensor, nn

from gansteer_server.algorithms.metrics.stats import compare
from gansteer_server.algorithms.pir.estimator import expected_rate
from gansteer_server.algorithms.pir.tuning import PIRTuning, TuningConfig, TuningModels
from gansteer_server.data.scenes import CLASS_NAMES, render_scenes
from gansteer_server.jobs.backends import ModelBackend
from gansteer_server.jobs.kinds import JobKind, StepProgress, SubmitContext, register_kind
from gansteer_server.jobs.kinds.pir_estimator import Objective, objective_rates, parse_objective
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.models import ModelRegistry
from gansteer_server.models.card import NAME_PATTERN
from gansteer_server.models.lineage import Lineage, register_derived
from gansteer_server.proto import common_pb2
from gansteer_server.proto import optimization_pb2 as opt
from gansteer_server.wire.convert import float_tensor
from gansteer_server.wire.errors import invalid_argument

KIND = "pir_tuning"
FIELD = f"spec.{KIND}"
#: Real images of the GAN loss: enough that a run rarely draws one twice, at most 2000 (rendering them is per segment).
MAX_REAL_IMAGES, MIN_REAL_IMAGES = 2000, 256
_REAL_SEED = 321
_EVAL_SEEDS = (10_000, 20_000)


@dataclass(frozen=True)
class PIRTuningJobSpec:
    generator: str
    discriminator: str
    estimator: str
    check_estimator: str | None
    dataset: str
    real_data: str
    pir_weight: float
    learning_rate: float
    steps: int
    batch_size: int
    anchor_weight: float
    check_every: int
    patience: int
    guards: bool
    temperature: float
    register_as: str
    seed: int
    objective: Objective | None
    eval_images: int


class PIRTuningJob(JobKind):
    name = KIND
    spec_type = PIRTuningJobSpec
    spec_message = opt.PIRTuningSpec
    description = (
        "Tune a generator's weights against a PIR estimator with its GAN loss kept (seed 000), guarded by an anchor "
        "and early stopping on a disjoint-half estimator; registers the tuned generator as a new version."
    )
    defaults: ClassVar[Mapping[str, Any]] = {
        "real_data": "scenes",
        "pir_weight": 10.0,
        "learning_rate": 5e-5,
        "steps": 100,
        "batch_size": 16,
        "anchor_weight": 20.0,
        "check_every": 25,
        "patience": 2,
        "temperature": 0.01,
        "eval_images": 1000,
    }

    def parse(self, message: Message, context: SubmitContext) -> PIRTuningJobSpec:
        assert isinstance(message, opt.PIRTuningSpec)
        generator = context.model(message.generator, f"{FIELD}.generator", ("generator",))
        if generator.format != "safetensors":
            raise invalid_argument(f"{FIELD}.generator", f"{generator.ref} is not a built-in architecture to tune")
        if message.discriminator.name:
            discriminator = context.model(message.discriminator, f"{FIELD}.discriminator", ("discriminator",))
        elif generator.extra.get("discriminator"):
            ref = common_pb2.ModelRef(name=str(generator.extra["discriminator"]))
            discriminator = context.model(ref, f"{FIELD}.discriminator", ("discriminator",))
        else:
            raise invalid_argument(f"{FIELD}.discriminator", f"{generator.ref} names no discriminator; give one")
        estimator = context.model(message.pir_estimator, f"{FIELD}.pir_estimator", ("pir_estimator",))
        guards = not message.no_guards
        check = None
        if message.check_estimator.name:
            check = context.model(message.check_estimator, f"{FIELD}.check_estimator", ("pir_estimator",)).ref
        elif estimator.extra.get("check_estimator"):
            ref = common_pb2.ModelRef(name=str(estimator.extra["check_estimator"]))
            check = context.model(ref, f"{FIELD}.check_estimator", ("pir_estimator",)).ref
        if guards and check is None:
            raise invalid_argument(
                f"{FIELD}.check_estimator", f"{estimator.ref} names no check estimator; give one or set no_guards"
            )
        if check == estimator.ref:
            raise invalid_argument(f"{FIELD}.check_estimator", "must be another estimator than the one optimised")
        real_data = message.real_data or "scenes"
        if real_data != "scenes" and not Path(real_data).is_absolute():
            raise invalid_argument(
                f"{FIELD}.real_data", f"must be 'scenes' or an absolute folder path, got {real_data!r}"
            )
        pir_weight = message.pir_weight if message.HasField("pir_weight") else 10.0
        if not (math.isfinite(pir_weight) and pir_weight >= 0):
            raise invalid_argument(f"{FIELD}.pir_weight", f"must be a finite number >= 0, got {pir_weight}")
        anchor_weight = message.anchor_weight if message.HasField("anchor_weight") else 20.0
        if not (math.isfinite(anchor_weight) and anchor_weight >= 0):
            raise invalid_argument(f"{FIELD}.anchor_weight", f"must be a finite number >= 0, got {anchor_weight}")
        learning_rate = message.learning_rate or 5e-5
        if not (math.isfinite(learning_rate) and 0 < learning_rate <= 0.1):
            raise invalid_argument(f"{FIELD}.learning_rate", f"must lie in (0, 0.1], got {learning_rate}")
        steps = message.steps or 100
        if not 1 <= steps <= context.settings.max_budget:
            raise invalid_argument(f"{FIELD}.steps", f"must be 0 (100) or 1 to {context.settings.max_budget}")
        batch_size = message.batch_size or 16
        if not 2 <= batch_size <= 512:
            raise invalid_argument(f"{FIELD}.batch_size", f"must be 0 (16) or 2 to 512, got {batch_size}")
        check_every, patience = message.check_every or 25, message.patience or 2
        if check_every < 1 or patience < 1:
            raise invalid_argument(f"{FIELD}.check_every", "check_every and patience must be positive")
        temperature = message.temperature or 0.01
        if not 1e-4 <= temperature <= 100:
            raise invalid_argument(f"{FIELD}.temperature", f"must lie in [1e-4, 100], got {temperature}")
        name = message.register_as or generator.name
        if not re.fullmatch(NAME_PATTERN, name):
            raise invalid_argument(f"{FIELD}.register_as", f"{name!r} is not a valid model name")
        objective = None
        if message.objective.output:
            objective = parse_objective(message.objective, f"{FIELD}.objective", context)
        eval_images = message.eval_images or 1000
        if not 2 <= eval_images <= 10_000:
            raise invalid_argument(f"{FIELD}.eval_images", f"must be 0 (1000) or 2 to 10000, got {eval_images}")
        return PIRTuningJobSpec(
            generator=generator.ref,
            discriminator=discriminator.ref,
            estimator=estimator.ref,
            check_estimator=check,
            dataset=str(estimator.extra.get("dataset", "")),
            real_data=real_data,
            pir_weight=pir_weight,
            learning_rate=learning_rate,
            steps=steps,
            batch_size=batch_size,
            anchor_weight=anchor_weight if guards else 0.0,
            check_every=check_every if guards else 0,
            patience=patience,
            guards=guards,
            temperature=temperature,
            register_as=name,
            seed=message.seed,
            objective=objective,
            eval_images=eval_images,
        )

    def total_steps(self, spec: PIRTuningJobSpec) -> int:
        return spec.steps

    def backend_name(self, spec: Any, settings: JobSettings) -> str:
        return "local"  # it changes weights

    def start(self, spec: PIRTuningJobSpec, backend: ModelBackend, settings: JobSettings) -> PIRTuningRun:
        return PIRTuningRun(spec, backend, ModelRegistry(settings.settings.registry_paths))


def real_images(source: str, count: int, resolution: int, seed: int) -> tuple[Tensor, Tensor | None]:
    """Real images in [-1, 1] and their class labels (None for a folder): rendered scenes or a folder's images."""
    if source == "scenes":
        scenes = render_scenes(count, seed=seed, resolution=resolution)
        images = torch.from_numpy(scenes.images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        return images, torch.from_numpy(scenes.labels).long()
    files = sorted(p for p in Path(source).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:count]
    if not files:
        raise ValueError(f"real_data {source!r} holds no .png or .jpg images")
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((resolution, resolution))) for p in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1), None


class PIRTuningRun:
    """The runner's view of a PIRTuning: progress as the step's losses, the result as samples and the judging."""

    def __init__(self, spec: PIRTuningJobSpec, backend: ModelBackend, registry: ModelRegistry) -> None:
        self.spec, self.backend, self.registry = spec, backend, registry
        self.card = registry.card(spec.generator)
        frozen = self._module(spec.generator)
        count = min(MAX_REAL_IMAGES, max(MIN_REAL_IMAGES, spec.steps * spec.batch_size))
        images, labels = real_images(spec.real_data, count, self.card.resolution or 32, _REAL_SEED + spec.seed)
        num_classes = self.card.num_classes or 0
        if tuple(self.card.class_names or ()) != CLASS_NAMES:  # the scenes' labels are not this generator's classes
            labels = None
        if labels is None or not num_classes:
            labels = torch.randint(max(num_classes, 1), (len(images),), generator=torch.Generator().manual_seed(0))
        generator, discriminator = copy.deepcopy(frozen), self._module(spec.discriminator)
        for module in (generator, discriminator):
            for parameter in module.parameters():
                parameter.requires_grad_(True)
        self.frozen = frozen
        models = TuningModels(
            generator=generator,
            frozen=frozen,
            discriminator=discriminator,
            estimator=self._module(spec.estimator),
            real_images=images,
            real_labels=labels,
            latent_size=self.card.latent_size or 0,
            num_classes=max(num_classes, 1),
            check_estimator=self._module(spec.check_estimator) if spec.check_estimator else None,
        )
        config = TuningConfig(
            pir_weight=spec.pir_weight,
            learning_rate=spec.learning_rate,
            steps=spec.steps,
            batch_size=spec.batch_size,
            temperature=spec.temperature,
            anchor_weight=spec.anchor_weight,
            check_every=spec.check_every,
            patience=spec.patience,
            seed=spec.seed,
        )
        self.run = PIRTuning(models, config)
        self._evaluation: tuple[int, dict[str, float], Tensor] | None = None

    def _module(self, ref: str) -> nn.Module:
        module = self.registry.load(ref)
        assert isinstance(module, nn.Module), f"{ref} must load as a torch module"
        module.eval()
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        return module

    @property
    def done(self) -> bool:
        return self.run.done

    @property
    def steps(self) -> int:
        return self.run.step_count

    def step(self) -> StepProgress:
        if self.run.step_count == 0:
            self.run.start()
        values = self.run.step()
        return StepProgress(
            step=self.run.step_count, generator_calls=self.run.step_count * self.spec.batch_size, criterion=values
        )

    def preview(self) -> Tensor:
        with torch.no_grad():
            return self.run.models.generator(self.run.probe_z[:8], self.run.probe_c[:8])

    def state_dict(self) -> dict[str, Any]:
        return self.run.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run.load_state_dict(state)
        self._evaluation = None

    def _sample(self, generator: nn.Module, seed: int, n: int) -> tuple[Tensor, Tensor]:
        stream = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.card.latent_size or 0, generator=stream)
        c = torch.randint(max(self.card.num_classes or 0, 1), (n,), generator=stream)
        with torch.no_grad():
            return torch.cat([generator(z[i : i + 250], c[i : i + 250]) for i in range(0, n, 250)]), c

    def evaluation(self) -> tuple[dict[str, float], Tensor]:
        """Both estimators before and after on fresh latents and, with an objective, the true rate's comparison."""
        if self._evaluation is not None and self._evaluation[0] == self.run.step_count:
            return self._evaluation[1], self._evaluation[2]
        n = self.spec.eval_images
        pre, _ = self._sample(self.frozen, _EVAL_SEEDS[0] + self.spec.seed, n)
        post, _ = self._sample(self.run.models.generator, _EVAL_SEEDS[1] + self.spec.seed, n)
        metrics: dict[str, float] = {
            "steps_run": float(self.run.step_count),
            "stopped_early": float(self.run.stopped_early),
            "kept_step": float(self.run.best_step if self.spec.guards else self.run.step_count),
        }
        estimators = {"estimated_pir": self.run.models.estimator, "check_pir": self.run.models.check_estimator}
        with torch.no_grad():
            for name, estimator in estimators.items():
                if estimator is None:
                    continue
                for side, images in (("before", pre), ("after", post)):
                    metrics[f"{name}_{side}"] = float(expected_rate(estimator(images), self.spec.temperature).mean())
        if self.spec.objective is not None:
            true_pre = objective_rates(self.spec.objective, pre, self.backend)
            true_post = objective_rates(self.spec.objective, post, self.backend)
            comparison = compare(true_pre.double().numpy(), true_post.double().numpy())
            metrics |= {
                "true_pir_before": comparison.mean_pre,
                "true_pir_after": comparison.mean_post,
                "p_value": comparison.p_value,
                "cohens_d": comparison.cohens_d,
                "ci_999_low": comparison.ci[0],
                "ci_999_high": comparison.ci[1],
                "significant": float(comparison.significant),
            }
        self._evaluation = (self.run.step_count, metrics, torch.cat([pre[:8], post[:8]]))
        return metrics, self._evaluation[2]

    def result(self) -> opt.JobResult:
        metrics, grid = self.evaluation()
        result = opt.JobResult()
        result.images.tensor.CopyFrom(float_tensor(grid[8:]))
        result.tensors["before"].CopyFrom(float_tensor(grid[:8]))
        for key, value in metrics.items():
            result.metrics[key] = value
        result.generator.name, result.generator.version = self.card.name, self.card.version
        return result

    def publish(self, job_id: str) -> list[common_pb2.ModelRef]:
        """The tuned weights as the next version of `register_as`, lineage naming estimators, table and guards."""
        spec = self.spec
        metrics, _ = self.evaluation()
        settings = {key: value for key, value in asdict(spec).items() if key != "objective"}
        if spec.objective is not None:
            settings["objective"] = {
                "output": spec.objective.output,
                "params": dict(spec.objective.params),
                "model": spec.objective.model,
            }
        lineage = Lineage(
            base=self.card.ref,
            job_id=job_id,
            kind=KIND,
            seed=spec.seed,
            spec=settings
            | {
                "guards": {
                    "anchor_weight": spec.anchor_weight,
                    "check_every": spec.check_every,
                    "patience": spec.patience,
                    "check_estimator": spec.check_estimator,
                    "enabled": spec.guards,
                },
                "metrics": metrics,
            },
        )
        entry = register_derived(
            self.registry,
            self.card,
            self.run.models.generator,
            lineage,
            name=spec.register_as,
            description=f"PIR tuning of {self.card.ref} against {spec.estimator} (table {spec.dataset!r})",
        )
        return [common_pb2.ModelRef(name=entry.card.name, version=entry.card.version)]


register_kind(PIRTuningJob())
