"""Inversion (seed 003): find latents whose images resemble target images. Its options, its spec builder and the
type its results come back as; `Client.invert` submits it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Unpack

import numpy as np
import numpy.typing as npt

from gansteer import tensors
from gansteer._convert import ImageInput, as_image_list, image_to_proto, model_ref
from gansteer._specs import ClassSpec, _invalid, class_id
from gansteer.kinds._common import (
    Backend,
    BudgetOptions,
    JobOptions,
    Kind,
    OptimizerOptions,
    backend,
    budget,
    job_spec,
    optimizer,
    option_names,
)
from gansteer.types import JobResult, ModelInfo
from gansteer.v1 import optimization_pb2

# The server requires a budget; this one finishes in seconds on the built-in 32x32 generator on a laptop CPU.
DEFAULT_BUDGET = 300


class InversionOptions(JobOptions, OptimizerOptions, BudgetOptions, total=False):
    """The settings of an inversion job (optimization.proto, InversionSpec) besides its targets and generator.

    Every one is optional; an unset one takes the server's default, except `budget` (the server requires one: the
    SDK sends 300 iterations). The optimizer, budget and job settings are the groups every searching kind shares.
    """

    criterion: str  # a preset of seed 003's Table I: `l2`, `l2+features` (server default), `features`
    lambda_s: float  # weights overriding the preset's: feature statistics, pixel L2, latent norm, realism
    lambda_l: float
    lambda_nu: float
    lambda_r: float
    discriminator: str  # of the realism term; default: the generator card's pair
    feature_extractor: str  # of the feature-statistics term; default: the server's
    restarts: int  # random starts per target; the best is kept
    conditioned_class: ClassSpec  # hold this class (id or name) fixed; unset: search the class vector too
    class_vector: Literal["simplex", "free"]  # a searched class vector among the rows (server default) or anywhere
    latent_shell: bool  # hold z on its prior's shell (server default True)
    seed: int
    backend: Backend  # where the worker runs the models: "local" or "remote"; default: the deployment's
    initial_latents: npt.ArrayLike  # float32 [targets * restarts, latent_size]; the server refuses it for now


@dataclass(frozen=True)
class InversionResult(JobResult):
    """An inversion job's result: per target, the best image found, its latent, and how close it came."""

    @property
    def criterion(self) -> list[float]:
        """The final criterion per target (lower is closer)."""
        return [m.get("criterion", float("nan")) for m in self.item_metrics]

    @property
    def psnr(self) -> list[float]:
        """PSNR in dB of each best image against its (resized) target."""
        return [m.get("psnr", float("nan")) for m in self.item_metrics]


INVERSION = Kind("inversion", method="invert", options=option_names(InversionOptions), result=InversionResult)


def inversion_spec(
    targets: ImageInput | Sequence[ImageInput],
    *,
    model: str,
    card: ModelInfo | None = None,
    **options: Unpack[InversionOptions],
) -> optimization_pb2.JobSpec:
    """The JobSpec of an inversion job; `card` (the generator's) is needed only for a class given by name."""
    INVERSION.check(options)
    images = as_image_list(targets)
    if not images:
        raise _invalid("targets", "give at least one target image")
    spec = optimization_pb2.InversionSpec(
        targets=[image_to_proto(im, field=f"targets[{i}]") for i, im in enumerate(images)],
        generator=model_ref(model),
        criterion=options.get("criterion", ""),
        seed=options.get("seed", 0),
        restarts=options.get("restarts", 0),
        budget=budget(options, default=DEFAULT_BUDGET),
        optimizer=optimizer(options),
    )
    for name in ("lambda_s", "lambda_l", "lambda_nu", "lambda_r"):
        if name in options:
            setattr(spec, name, options[name])
    if "conditioned_class" in options:
        spec.conditioned_class = class_id(options["conditioned_class"], card, field="conditioned_class")
    if "class_vector" in options:
        if options["class_vector"] not in ("simplex", "free"):
            raise _invalid("class_vector", f"must be 'simplex' or 'free', got {options['class_vector']!r}")
        spec.class_vector = options["class_vector"]
    if "latent_shell" in options:
        spec.latent_shell = bool(options["latent_shell"])
    for name in ("discriminator", "feature_extractor"):
        if options.get(name):
            getattr(spec, name).CopyFrom(model_ref(options[name]))  # type: ignore[literal-required]
    if "backend" in options:
        spec.backend = backend(options["backend"])
    if "initial_latents" in options:
        latents = np.asarray(options["initial_latents"], np.float32)
        spec.initial_latents.CopyFrom(tensors.to_tensor_proto(latents, field="initial_latents"))
    return job_spec("inversion", spec, options)
