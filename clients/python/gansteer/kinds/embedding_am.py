"""Embedding activation maximisation (seed 001): learn one class embedding row of a frozen class-conditional
generator so that a classifier recognises its samples as the target (optionally more diverse ones), and register the
chosen trial as the generator's next version. Its options, its spec builder and the type its results come back as;
`Client.embedding_am` submits it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, Unpack

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage

from gansteer._convert import array_to_pil, model_ref
from gansteer._specs import ClassSpec, _invalid
from gansteer.kinds._common import Backend, JobOptions, Kind, _struct, backend, job_spec, option_names
from gansteer.types import JobResult
from gansteer.v1 import optimization_pb2

Init: TypeAlias = Literal["target", "mean", "top-k", "random"]
DiversitySpace: TypeAlias = Literal["pixel", "features", "softmax"]

INITS: tuple[Init, ...] = ("target", "mean", "top-k", "random")
_SPACES = {
    "pixel": optimization_pb2.DIVERSITY_SPACE_PIXEL,
    "features": optimization_pb2.DIVERSITY_SPACE_FEATURES,
    "softmax": optimization_pb2.DIVERSITY_SPACE_SOFTMAX,
}
# Count options: 0 (or unset) takes the server's default; the server knows its own upper limits.
_COUNTS = (
    "top_k",
    "top_k_samples",
    "steps",
    "latents_per_step",
    "resample_every",
    "trials",
    "diversity_pairs",
    "eval_samples",
)


class EmbeddingAMOptions(JobOptions, total=False):
    """The settings of an embedding-AM job (optimization.proto, EmbeddingAMSpec) besides its generator.

    Exactly one of `target_class` and `new_label` is required; every other option is optional and an unset one takes
    the server's default (given here in brackets). Only gradient optimizers apply, so there is no `population_size`.
    """

    target_class: ClassSpec  # a class of the generator (id or name): its row is learned anew
    new_label: ClassSpec  # a label of the classifier the generator was not trained on, e.g. `dusk`: a row is added
    classifier: str  # optimised (the generator card's classifier, else its feature extractor)
    init: Init  # AM-S `target` (target_class) / AM-L `mean` (new_label), `top-k`, `random`
    top_k: int  # k of `top-k` (5)
    top_k_samples: int  # samples per row `top-k` scores the rows with (10)
    init_sigma: float  # the starting noise's standard deviation (0.1)
    optimizer: str  # a gradient optimizer of `client.optimizers()` (adam)
    learning_rate: float  # 0.01 for `target`, 0.1 otherwise
    optimizer_options: Mapping[str, Any]  # e.g. {"beta1": 0.5}
    steps: int  # optimizer steps (200)
    latents_per_step: int  # latents per trial per step (20)
    resample_every: int  # every how many steps the latents are redrawn (20)
    clamp_min: float  # each row is clamped to [clamp_min, clamp_max] (the original table's min and max)
    clamp_max: float
    trials: int  # independent trials, stepped together (5)
    diversity_weight: float  # lambda of Eq. 2.1's diversity term (0: none; the thesis: 2 in softmax space)
    diversity_space: DiversitySpace  # required with a diversity weight
    diversity_pairs: int  # pairs of latents in the term per step (10)
    judge: str  # a classifier the job does not optimise (the classifier card's judge, else the generator card's)
    feature_extractor: str  # the feature space of `lpips_builtin` (the generator card's)
    eval_samples: int  # samples per trial for the metrics (200)
    accuracy_tolerance: float  # the chosen trial: most diverse within this accuracy of the start (0.05)
    register_as: str  # the name the chosen embedding is registered under (the generator's name)
    dry_run: bool  # only report: register nothing
    seed: int
    backend: Backend


@dataclass(frozen=True)
class AMTrial:
    """One trial of an embedding-AM job: the row it learned, how it was judged, and its first sample."""

    embedding: npt.NDArray[np.float32]  # [embedding_size]
    metrics: Mapping[str, float]  # classifier_accuracy, classifier_log_prob, judge_accuracy, ms_ssim_3s_k7, ...
    chosen: bool
    image: PILImage.Image


@dataclass(frozen=True)
class EmbeddingAMResult(JobResult):
    """An embedding-AM job's result: every trial (its row, metrics and first sample), the chosen one, the metrics
    before (the starting embedding) and after (the chosen trial), the before/after grid and the registered
    version."""

    @property
    def trials(self) -> list[AMTrial]:
        count = len(self.item_metrics)
        rows = self.class_embeddings if self.class_embeddings is not None else np.zeros((count, 0), np.float32)
        return [
            AMTrial(
                embedding=rows[i],
                metrics={k: v for k, v in item.items() if k not in ("trial", "chosen")},
                chosen=bool(item.get("chosen", 0.0)),
                image=image,
            )
            for i, (item, image) in enumerate(zip(self.item_metrics, self.images, strict=True))
        ]

    @property
    def chosen(self) -> int:
        """The index of the chosen trial (registered unless a dry run)."""
        return int(self.metrics["chosen_trial"])

    @property
    def before(self) -> dict[str, float]:
        """The starting embedding's metrics: the class's own row, or the mean row for a new label."""
        return _prefixed(self.metrics, "before_")

    @property
    def after(self) -> dict[str, float]:
        """The chosen trial's metrics."""
        return _prefixed(self.metrics, "after_")

    @property
    def grid(self) -> list[list[PILImage.Image]]:
        """The before/after grid with the same latents in every row: row 0 the starting embedding, then one row per
        trial (`gansteer.images.image_grid(result.grid)` lays it out). The floats are in `tensors["grid"]`."""
        return [[array_to_pil(image) for image in row] for row in self.tensors["grid"]]

    @property
    def start_embedding(self) -> npt.NDArray[np.float32]:
        return np.asarray(self.tensors["start_embedding"][0], np.float32)

    @property
    def registered(self) -> str | None:
        """The version the chosen embedding was registered as (`name@version`); None for a dry run."""
        return self.models[0] if self.models else None


EMBEDDING_AM = Kind(
    "embedding_am", method="embedding_am", options=option_names(EmbeddingAMOptions), result=EmbeddingAMResult
)


def _prefixed(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    return {name[len(prefix) :]: value for name, value in metrics.items() if name.startswith(prefix)}


def _label(value: Any, field: str) -> str:
    """A class or label as the spec sends it: its name, or its id as decimal text (the server resolves both)."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
        return str(int(value))
    raise _invalid(field, f"expected a class name or an id >= 0, got {value!r}")


def _number(options: Mapping[str, Any], name: str) -> float | None:
    """A float option as given, or None when unset; INVALID_ARGUMENT naming it when it is not a finite number."""
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _invalid(name, f"expected a number, got {value!r}")
    if not math.isfinite(value):
        raise _invalid(name, f"must be a finite number, got {value}")
    return float(value)


def _check(options: EmbeddingAMOptions) -> None:
    """The ranges that hold whatever the server's limits: a misplaced sign fails here, naming the argument."""
    given: Mapping[str, Any] = options
    for name in _COUNTS:
        count = given.get(name)
        if count is not None and (isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0):
            raise _invalid(name, f"must be a whole number >= 0 (0: the server's default), got {count!r}")
    for name in ("init_sigma", "learning_rate", "diversity_weight"):
        value = _number(given, name)
        if value is not None and value < 0:
            raise _invalid(name, f"must be >= 0, got {value}")
    tolerance = _number(given, "accuracy_tolerance")
    if tolerance is not None and not 0 <= tolerance <= 1:
        raise _invalid("accuracy_tolerance", f"must be in [0, 1], got {tolerance}")
    low, high = _number(given, "clamp_min"), _number(given, "clamp_max")
    if low is not None and high is not None and not low < high:
        raise _invalid("clamp_max", f"must be above clamp_min ({low}), got {high}")
    if given.get("init", "target") not in INITS:
        raise _invalid("init", f"expected one of {', '.join(INITS)}, got {given.get('init')!r}")
    space = given.get("diversity_space")
    if space is not None and space not in _SPACES:
        raise _invalid("diversity_space", f"expected one of {', '.join(_SPACES)}, got {space!r}")
    if (_number(given, "diversity_weight") or 0.0) > 0 and space is None:
        raise _invalid("diversity_space", "a diversity term needs its space: pixel, features or softmax")


def embedding_am_spec(*, model: str, **options: Unpack[EmbeddingAMOptions]) -> optimization_pb2.JobSpec:
    """The JobSpec of an embedding-AM job on generator `model`; class names are resolved by the server."""
    EMBEDDING_AM.check(options)
    targets = [name for name in ("target_class", "new_label") if name in options]
    if len(targets) != 1:
        which = "not both" if targets else "one is required"
        raise _invalid(targets[-1] if targets else "target_class", f"give target_class or new_label, {which}")
    _check(options)
    spec = optimization_pb2.EmbeddingAMSpec(
        generator=model_ref(model),
        init=options.get("init", ""),
        register_as=options.get("register_as", ""),
        dry_run=options.get("dry_run", False),
        seed=options.get("seed", 0),
        diversity_weight=options.get("diversity_weight", 0.0),
        **{name: options.get(name, 0) for name in _COUNTS},  # type: ignore[arg-type]
    )
    setattr(spec, targets[0], _label(options[targets[0]], targets[0]))
    for name in ("init_sigma", "clamp_min", "clamp_max", "accuracy_tolerance"):
        if name in options:
            setattr(spec, name, _number(options, name))
    if any(name in options for name in ("optimizer", "learning_rate", "optimizer_options")):
        spec.optimizer.CopyFrom(
            optimization_pb2.Optimizer(
                name=options.get("optimizer", ""),
                learning_rate=options.get("learning_rate", 0.0),
                options=_struct(options.get("optimizer_options", {})),
            )
        )
    if "diversity_space" in options:
        spec.diversity_space = _SPACES[options["diversity_space"]]
    for name in ("classifier", "judge", "feature_extractor"):
        if options.get(name):
            getattr(spec, name).CopyFrom(model_ref(options[name]))  # type: ignore[literal-required]
    if "backend" in options:
        spec.backend = backend(options["backend"])
    return job_spec("embedding_am", spec, options)
