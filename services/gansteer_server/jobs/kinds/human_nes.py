"""Human NES (seed 004): `HumanNESSpec` -> a validated spec -> `algorithms.human_nes.NESRun`, one round per step.

Each step opens a pairwise round: for each of N fixed latents, R pairs x + Delta and x - Delta of the generator's
current images, on sides drawn at random and recorded (item 2k is pair k's left, 2k + 1 its right; each item's id
says which of x + Delta and x - Delta it is). The pixels are stored in the round (they are not the generator's
output alone), the items carry the latents, and the perturbations follow from the job's seed and the round number.
`receive` averages the raters' scores per pair, turns them into the image-space estimate and takes one Adam step
through one backward pass. Once the job succeeds, the tuned weights are registered as a new version of the
generator (or `register_as`) whose lineage names the job, its rounds and every answer's rater, so the interaction
log shows which answers made it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from google.protobuf.message import Message
from torch import Tensor

from gansteer_server.algorithms import human_nes as hn
from gansteer_server.jobs.backends import FeatureExtractor, GeneratorModel, ModelBackend
from gansteer_server.jobs.kinds import JobKind, StepProgress, SubmitContext, register_kind
from gansteer_server.jobs.rounds import Answer, Round, RoundItem
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

KIND = "human_nes"
FIELD = f"spec.{KIND}"
BASES = ("uneven", "even")
DEFAULT_SIGMA = {"uneven": 0.5, "even": 0.05}
MIN_BASIS_IMAGES = 10
MAX_BASIS_IMAGES = 4096
MAX_PAIRS_PER_ROUND = 1000  # each pair is two PNGs in the round and its event
MAX_RATERS = 100
MAX_COMPONENTS = 512  # q; the components travel in the stored spec


@dataclass(frozen=True)
class HumanNESJobSpec:
    generator: str  # pinned `name@version`
    z_size: int
    num_classes: int
    resolution: int
    basis: str  # uneven | even
    # The PCA of the user's basis images, made at submission (the images themselves are not stored): components
    # (D, q), eigenvalues (q,) and mean (D,). None: the scenes renders' PCA, made when the run starts.
    basis_vectors: Tensor | None
    basis_scenes: int
    basis_components: int  # q (uneven)
    basis_eigenvalues: Tensor | None
    basis_mean: Tensor | None
    sigma: float
    images: int  # N
    pairs_per_image: int  # R
    rounds: int
    raters: int
    answer_levels: int
    learning_rate: float
    class_id: int | None  # every latent's class; None: drawn per latent (conditional generators)
    register_as: str
    round_expiry_s: float = 0.0
    seed: int = 0
    forking_reference: str = ""  # a later snapshot G_j (pinned); empty: no forking analysis
    feature_extractor: str = ""  # the analysis's features (pinned)
    backend: str = "local"  # the weights move: they live in the worker


def _count(value: int, default: int, maximum: int, field: str) -> int:
    """A count option: 0 means `default`; otherwise 1 to `maximum`."""
    value = value or default
    if not 0 < value <= maximum:
        raise invalid_argument(field, f"must be >= 1 (0: {default}) and at most {maximum}, got {value}")
    return int(value)


class HumanNESJob(JobKind):
    name = KIND
    spec_type = HumanNESJobSpec
    spec_message = opt.HumanNESSpec
    description = (
        "People compare x + Delta with x - Delta for fixed latents; NES turns their graded answers into a gradient in "
        "image space that one backward pass carries into the generator (seed 004, HumanGAN); the tuned generator is "
        "registered as a new version."
    )
    has_rounds = True
    defaults: ClassVar[Mapping[str, Any]] = {
        "basis": "uneven",
        "basis_images": "scenes renders",
        "basis_components": "100 (or the basis images' rank when lower)",
        "basis_scenes": 512,
        "sigma": DEFAULT_SIGMA,
        "images": 25,
        "pairs_per_image": 10,
        "rounds": 1,
        "raters_per_pair": 1,
        "answer_levels": 5,
        "learning_rate": hn.LEARNING_RATE,
        "condition": "a class per latent drawn from the seed",
        "register_as": "the generator's name",
        "round_expiry_s": "deployment default",
        "seed": 0,
        "forking_reference": "none: no iterations-forking analysis",
        "feature_extractor": "the generator's paired extractor, or the deployment's default",
    }

    def parse(self, message: Message, context: SubmitContext) -> HumanNESJobSpec:
        assert isinstance(message, opt.HumanNESSpec)
        card = context.model(message.generator, f"{FIELD}.generator", ("generator",))
        if card.format != "safetensors":
            raise invalid_argument(
                f"{FIELD}.generator", f"{card.ref} is stored as {card.format}; only built-in architectures are tuned"
            )
        basis = message.basis or "uneven"
        if basis not in BASES:
            raise invalid_argument(f"{FIELD}.basis", f"must be one of {', '.join(BASES)}, got {basis[:50]!r}")
        resolution, channels = int(card.resolution or 32), int(card.channels or 3)
        pca, scenes, q = self._basis(message, context, basis, resolution, channels)
        sigma = message.sigma if message.HasField("sigma") else DEFAULT_SIGMA[basis]
        if not (math.isfinite(sigma) and sigma > 0):
            raise invalid_argument(f"{FIELD}.sigma", f"must be a finite number > 0, got {sigma}")
        limits = context.settings
        n = _count(message.images, 25, limits.max_step_batch, f"{FIELD}.images")
        if message.pairs_per_image < 0:
            raise invalid_argument(f"{FIELD}.pairs_per_image", f"R must be >= 1 (0: 10), got {message.pairs_per_image}")
        r = _count(message.pairs_per_image, 10, MAX_PAIRS_PER_ROUND, f"{FIELD}.pairs_per_image")
        if n * r > MAX_PAIRS_PER_ROUND:
            raise invalid_argument(
                f"{FIELD}.pairs_per_image", f"{n} images x {r} pairs exceed {MAX_PAIRS_PER_ROUND} pairs per round"
            )
        rounds = _count(message.rounds, 1, limits.max_budget, f"{FIELD}.rounds")
        raters = _count(message.raters_per_pair, 1, MAX_RATERS, f"{FIELD}.raters_per_pair")
        levels = message.answer_levels or 5
        if not 2 <= levels <= 101:
            raise invalid_argument(f"{FIELD}.answer_levels", f"must be 0 (5) or 2 to 101, got {levels}")
        lr = message.learning_rate if message.HasField("learning_rate") else hn.LEARNING_RATE
        if not (math.isfinite(lr) and lr > 0):
            raise invalid_argument(f"{FIELD}.learning_rate", f"must be a finite number > 0, got {lr}")
        expiry = message.round_expiry_s
        if not (math.isfinite(expiry) and 0 <= expiry <= limits.round_expiry_s):
            raise invalid_argument(
                f"{FIELD}.round_expiry_s", f"must be 0 (the default) to {limits.round_expiry_s:g} s, got {expiry}"
            )
        register_as = message.register_as or card.name
        if not re.fullmatch(NAME_PATTERN, register_as):
            raise invalid_argument(f"{FIELD}.register_as", f"{register_as[:100]!r} is not a model name")
        reference, features = self._forking(message, context, card)
        return HumanNESJobSpec(
            generator=card.ref,
            z_size=int(card.latent_size or 0),
            num_classes=int(card.num_classes or 0),
            resolution=resolution,
            basis=basis,
            basis_vectors=None if pca is None else pca.components,
            basis_eigenvalues=None if pca is None else pca.eigenvalues,
            basis_mean=None if pca is None else pca.mean,
            basis_scenes=scenes,
            basis_components=q,
            sigma=float(sigma),
            images=n,
            pairs_per_image=r,
            rounds=rounds,
            raters=raters,
            answer_levels=levels,
            learning_rate=float(lr),
            class_id=self._class(message, card),
            register_as=register_as,
            round_expiry_s=expiry,
            seed=message.seed,
            forking_reference=reference,
            feature_extractor=features,
        )

    @staticmethod
    def _forking(message: opt.HumanNESSpec, context: SubmitContext, card: ModelCard) -> tuple[str, str]:
        """The later snapshot of the forking analysis (same latent size, classes and resolution) and its features."""
        if not message.forking_reference.name:
            return "", ""
        field = f"{FIELD}.forking_reference"
        later = context.model(message.forking_reference, field, ("generator",))
        shape = (later.latent_size, later.num_classes, later.resolution, later.channels)
        if shape != (card.latent_size, card.num_classes, card.resolution, card.channels):
            raise invalid_argument(field, f"{later.ref} is not a snapshot of {card.ref}'s architecture")
        ref = message.feature_extractor
        if not ref.name:
            paired = card.extra.get("feature_extractor")
            name = paired if isinstance(paired, str) and paired else context.settings.default_feature_extractor
            ref = common_pb2.ModelRef(name=name)
        features = context.model(ref, f"{FIELD}.feature_extractor", ("feature_extractor", "classifier"))
        return later.ref, features.ref

    @staticmethod
    def _basis(
        message: opt.HumanNESSpec, context: SubmitContext, basis: str, resolution: int, channels: int
    ) -> tuple[hn.PCABasis | None, int, int]:
        """The PCA of the user's basis images (resized to the generator's), or the scenes count; and q, checked
        against the images' rank."""
        field = f"{FIELD}.basis_images"
        count = len(message.basis_images)
        if basis == "even":
            if count or message.basis_components:
                which = "basis_images" if count else "basis_components"
                raise invalid_argument(f"{FIELD}.{which}", "an even basis takes no PCA basis (set basis to uneven)")
            return None, 0, 0
        images: Tensor | None = None
        pca: hn.PCABasis | None = None
        scenes = 0
        if count:
            if not MIN_BASIS_IMAGES <= count <= MAX_BASIS_IMAGES:
                text = f"needs {MIN_BASIS_IMAGES} to {MAX_BASIS_IMAGES} images for a PCA basis, got {count}"
                raise invalid_argument(field, text, "TOO_FEW_BASIS_IMAGES" if count < MIN_BASIS_IMAGES else "")
            decoded = [context.image(image, f"{field}[{i}]", channels) for i, image in enumerate(message.basis_images)]
            images = torch.stack(
                [
                    F.interpolate(x[None], size=(resolution, resolution), mode="bilinear", antialias=True)[0]
                    for x in decoded
                ]
            )
            try:
                pca = hn.pca_basis(images, 0)
            except hn.BasisError as error:
                raise invalid_argument(field, error.message) from None
            rank = pca.q
        else:
            scenes = _count(message.basis_scenes, 512, MAX_BASIS_IMAGES, f"{FIELD}.basis_scenes")
            if scenes < MIN_BASIS_IMAGES:
                raise invalid_argument(f"{FIELD}.basis_scenes", f"needs at least {MIN_BASIS_IMAGES}, got {scenes}")
            rank = min(scenes - 1, channels * resolution * resolution)
        q = message.basis_components
        if not 0 <= q <= min(rank, MAX_COMPONENTS):
            text = f"q must be 0 (100) to {min(rank, MAX_COMPONENTS)}"
            text += f", the rank of the basis images; got {q}" if rank <= MAX_COMPONENTS else f"; got {q}"
            raise invalid_argument(f"{FIELD}.basis_components", text)
        q = q or min(100, rank)
        if pca is not None:
            pca = hn.PCABasis(pca.components[:, :q].contiguous(), pca.eigenvalues[:q].clone(), pca.mean, pca.shape)
        return pca, scenes, q

    @staticmethod
    def _class(message: opt.HumanNESSpec, card: ModelCard) -> int | None:
        field = f"{FIELD}.condition"
        which = message.condition.WhichOneof("condition")
        if which is None:
            return None
        if which == "embeddings":
            raise invalid_argument(f"{field}.embeddings", "give one class id; free class vectors are not supported")
        ids = list(message.condition.class_ids.ids)
        if len(ids) != 1:
            raise invalid_argument(f"{field}.class_ids.ids", f"give exactly one class id, got {len(ids)}")
        return spec_fields.class_id(ids[0], f"{field}.class_ids.ids[0]", int(card.num_classes or 0), card.ref)

    def total_steps(self, spec: HumanNESJobSpec) -> int:
        return spec.rounds

    def start(self, spec: HumanNESJobSpec, backend: ModelBackend, settings: JobSettings) -> HumanNESJobRun:
        base = backend.generator(spec.generator)
        if not isinstance(base, ConditionalGenerator):
            raise RuntimeError("human NES tunes weights: it runs on the local backend")
        module = base.trainable_copy()
        tuned = ConditionalGenerator(module, base.card)
        generator = torch.Generator().manual_seed(spec.seed)
        z = torch.randn(spec.images, spec.z_size, generator=generator)
        condition: Tensor | None = None
        if spec.num_classes:
            if spec.class_id is not None:
                condition = torch.full((spec.images,), spec.class_id, dtype=torch.int64)
            else:
                condition = torch.randint(0, spec.num_classes, (spec.images,), generator=generator)
        config = hn.NESConfig(
            images=spec.images,
            pairs_per_image=spec.pairs_per_image,
            sigma=spec.sigma,
            rounds=spec.rounds,
            raters=spec.raters,
            learning_rate=spec.learning_rate,
            seed=spec.seed,
        )
        run = hn.NESRun(config, module, tuned, z, condition, _basis(spec))
        forking = None
        if spec.forking_reference:
            forking = ForkingReference(
                backend.generator(spec.forking_reference), backend.feature_extractor(spec.feature_extractor)
            )
        return HumanNESJobRun(spec, run, base, ModelRegistry(settings.settings.registry_paths), forking)


@dataclass(frozen=True)
class ForkingReference:
    """The later snapshot G_j and the feature extractor of the iterations-forking analysis."""

    later: GeneratorModel
    extractor: FeatureExtractor

    def analyse(self, before: Tensor, after: Tensor, z: Tensor, condition: Tensor | None) -> dict[str, hn.Forking]:
        with torch.no_grad():
            target = self.later(z, condition).float()

        def penultimate(images: Tensor) -> Tensor:
            return self.extractor.features(images)["penultimate"]

        return {"pixels": hn.forking(before, after, target), "features": hn.forking(before, after, target, penultimate)}


def _basis(spec: HumanNESJobSpec) -> hn.PCABasis | None:
    if spec.basis == "even":
        return None
    if spec.basis_vectors is not None and spec.basis_eigenvalues is not None and spec.basis_mean is not None:
        shape = (int(spec.basis_mean.numel()) // spec.resolution**2, spec.resolution, spec.resolution)
        return hn.PCABasis(spec.basis_vectors, spec.basis_eigenvalues, spec.basis_mean, shape)
    images = hn.scenes_images(spec.basis_scenes, seed=spec.seed, resolution=spec.resolution)
    return hn.pca_basis(images, spec.basis_components, field="basis_components")


class HumanNESJobRun:
    """The runner's view of an NESRun: a step opens a pairwise round, `receive` takes its raters' answers."""

    def __init__(
        self,
        spec: HumanNESJobSpec,
        run: hn.NESRun,
        base: ConditionalGenerator,
        registry: ModelRegistry,
        forking: ForkingReference | None = None,
    ) -> None:
        self.spec, self.run, self.base, self.registry, self.forking = spec, run, base, registry, forking
        self._opened = 0
        self._awaiting = False
        self._answers: list[str] = []  # `round:rater` of every answer taken, for the lineage
        self._scores: list[float] = []  # every score taken, for the result's metrics
        self._left = 0  # answers that favoured the left image (position bias, for the result)

    @property
    def done(self) -> bool:
        return self.run.done and not self._awaiting

    @property
    def steps(self) -> int:
        return self._opened

    def step(self) -> StepProgress:
        if self._awaiting:
            raise RuntimeError("a round is open: its answers come first")
        shown = self.run.open_round()
        self._opened, self._awaiting = self._opened + 1, True
        r = self.spec.pairs_per_image
        items: list[RoundItem] = []
        for k, plus_left in enumerate(shown.plus_left.tolist()):
            n, pair = divmod(k, r)
            for is_plus in (plus_left, not plus_left):
                items.append(
                    RoundItem(
                        item_id=f"z{n}.d{pair}{'+' if is_plus else '-'}",
                        latent=self.run.latents[n],
                        seed=self.spec.seed,
                        class_id=None if self.run.condition is None else int(self.run.condition[n]),
                    )
                )
        images = torch.stack([shown.left, shown.right], dim=1).reshape(-1, *shown.left.shape[1:])
        round_ = Round(
            number=shown.number,
            answer="pairwise",
            items=tuple(items),
            generator=self.spec.generator,
            pairs=tuple((2 * k, 2 * k + 1) for k in range(len(shown.plus_left))),
            answers_required=self.spec.raters,
            expires_in_s=self.spec.round_expiry_s,
            images=images,
            answer_levels=self.spec.answer_levels,
        )
        criterion = {"rounds_answered": float(self.run.answered)}
        return StepProgress(
            step=self._opened, generator_calls=self._opened * self.spec.images, criterion=criterion, round=round_
        )

    def receive(self, answers: list[Answer]) -> None:
        if not self._awaiting:
            raise RuntimeError("answers arrived with no round open")
        scores = torch.tensor([answer.scores for answer in answers], dtype=torch.float32)
        self.run.tell(scores)
        self._answers += [f"{self.run.answered}:{answer.rater}" for answer in answers]
        self._scores += scores.reshape(-1).tolist()
        self._left += int((scores > 0).sum())
        self._awaiting = False

    def preview(self) -> Tensor:
        return self.run.images()

    def state_dict(self) -> dict[str, Any]:
        return {
            "run": self.run.state_dict(),
            "opened": self._opened,
            "awaiting": self._awaiting,
            "answers": list(self._answers),
            "scores": list(self._scores),
            "left": self._left,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run.load_state_dict(state["run"])
        self._opened, self._awaiting = int(state["opened"]), bool(state["awaiting"])
        self._answers, self._scores = list(state["answers"]), list(state["scores"])
        self._left = int(state["left"])

    def result(self) -> opt.JobResult:
        """The N fixed latents' images under the tuned weights, with how far each moved from the base's."""
        images = self.run.images()
        with torch.no_grad():
            before = self.base(self.run.latents, self.run.condition).float()
        result = opt.JobResult()
        result.images.tensor.CopyFrom(float_tensor(images))
        result.latents.CopyFrom(float_tensor(self.run.latents))
        if self.run.condition is not None:
            result.class_ids.extend(int(c) for c in self.run.condition)
        result.generator.name, result.generator.version = self.base.card.name, self.base.card.version
        moved = (images - before).reshape(len(images), -1).norm(dim=1)
        per_item: list[dict[str, float]] = [{"pixel_change": value} for value in moved.tolist()]
        if self.forking is not None:
            for space, analysis in self.forking.analyse(before, images, self.run.latents, self.run.condition).items():
                result.metrics[f"forking_closer_{space}"] = analysis.closer_fraction
                for values, d1, d2 in zip(per_item, analysis.d1.tolist(), analysis.d2.tolist(), strict=True):
                    values |= {f"d1_{space}": d1, f"d2_{space}": d2}
        for values in per_item:
            result.item_metrics.add(values=values)
        scores = torch.tensor(self._scores or [0.0])
        result.metrics["rounds_answered"] = float(self.run.answered)
        result.metrics["answers"] = float(len(self._answers))
        result.metrics["pairs_answered"] = float(len(self._scores))
        result.metrics["mean_abs_score"] = float(scores.abs().mean())
        result.metrics["tie_fraction"] = float((scores == 0).float().mean())
        result.metrics["left_fraction"] = self._left / max(len(self._scores), 1)
        result.metrics["mean_pixel_change"] = float(moved.mean())
        return result

    def publish(self, job_id: str) -> list[common_pb2.ModelRef]:
        """The tuned weights as the next version of the generator (or `register_as`), with the answers in the
        lineage; nothing when no round was answered."""
        if self.run.answered == 0:
            return []
        spec = self.spec
        base = self.registry.card(spec.generator)
        lineage = Lineage(
            base=base.ref,
            job_id=job_id,
            kind=KIND,
            seed=spec.seed,
            spec={
                "basis": spec.basis,
                "basis_components": spec.basis_components,
                "basis_source": "images" if spec.basis_vectors is not None else f"scenes x {spec.basis_scenes}",
                "sigma": spec.sigma,
                "images": spec.images,
                "pairs_per_image": spec.pairs_per_image,
                "rounds_answered": self.run.answered,
                "raters_per_pair": spec.raters,
                "learning_rate": spec.learning_rate,
                "forking_reference": spec.forking_reference,
                "answers": list(self._answers),
                "interaction_log": f"ListInteractions(job_id={job_id!r})",
            },
        )
        entry = register_derived(
            self.registry,
            base,
            self.run.module,
            lineage,
            name=spec.register_as,
            description=(
                f"human NES of {base.ref}: {self.run.answered} rounds, {len(self._answers)} answers (job {job_id})"
            ),
        )
        return [common_pb2.ModelRef(name=entry.card.name, version=entry.card.version)]


register_kind(HumanNESJob())
