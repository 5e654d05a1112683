"""Human NES (seed 004): people compare x + Delta with x - Delta for fixed latents and the job tunes the generator's
weights from their graded answers; the tuned generator comes back as a new model version. Its options, its spec
builder and the type its results come back as; `Client.human_nes` submits it, `Job.rounds()` /
`Job.answer_rounds(...)` answer it (each round's images travel with it: `Round.images()`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Unpack

from gansteer._convert import ImageInput, image_to_proto, model_ref
from gansteer._specs import ClassSpec, _invalid, class_id
from gansteer.kinds._common import JobOptions, Kind, job_spec, option_names
from gansteer.types import JobResult, ModelInfo
from gansteer.v1 import optimization_pb2

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class HumanNESOptions(JobOptions, total=False):
    """The settings of a human NES job (optimization.proto, HumanNESSpec) besides its generator. Unset ones take the
    server's defaults (the seed's: 25 latents x 10 pairs, q = 100 of a PCA basis of scenes renders, Adam 2e-5)."""

    basis: Literal["uneven", "even"]  # PCA basis scaled by its eigenvalues (uneven) or isotropic pixels (even)
    basis_images: Sequence[ImageInput]  # real images of the PCA basis (at least 10)
    basis_folder: str | os.PathLike[str]  # or a folder of them (its image files, sorted by name)
    basis_components: int  # q (0: 100, or the images' rank when lower)
    basis_scenes: int  # scenes renders for the default basis (512)
    sigma: float  # perturbation scale (0.5 uneven, 0.05 even)
    images: int  # N fixed latents (25)
    pairs_per_image: int  # R pairs per latent per round (10)
    rounds: int  # rounds, one optimizer step each (1)
    raters_per_pair: int  # raters who answer each round, averaged (1)
    answer_levels: int  # points of the graded scale (5, with a tie)
    learning_rate: float  # Adam's (2e-5, betas 0.5 / 0.999)
    conditioned_class: ClassSpec  # every latent's class (unset: drawn per latent)
    register_as: str  # the tuned version's name (the generator's)
    round_expiry_s: float
    seed: int
    forking_reference: str  # a later snapshot G_j: the result reports the iterations-forking analysis
    feature_extractor: str  # the features of that analysis (the generator's paired extractor)


@dataclass(frozen=True)
class HumanNESResult(JobResult):
    """A human NES job's result: the fixed latents' images under the tuned weights; `models` names the new version."""

    @property
    def rounds_answered(self) -> int:
        return int(self.metrics.get("rounds_answered", 0))

    @property
    def forking_closer(self) -> float | None:
        """With a `forking_reference`: the fraction of latents whose tuned image is closer to G_j's (pixels)."""
        value = self.metrics.get("forking_closer_pixels")
        return None if value is None else float(value)


HUMAN_NES = Kind("human_nes", method="human_nes", options=option_names(HumanNESOptions), result=HumanNESResult)


def folder_images(folder: str | os.PathLike[str], *, field: str = "basis_folder") -> list[Path]:
    """The image files of a folder, sorted by name; InvalidArgument naming `field` when it is no folder."""
    path = Path(folder)
    if not path.is_dir():
        raise _invalid(field, f"{str(folder)[:200]!r} is not a folder")
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def human_nes_spec(
    *, model: str, card: ModelInfo | None = None, **options: Unpack[HumanNESOptions]
) -> optimization_pb2.JobSpec:
    """The JobSpec of a human NES job; `card` (the generator's) is needed only for a class given by name."""
    HUMAN_NES.check(options)
    spec = optimization_pb2.HumanNESSpec(
        generator=model_ref(model),
        basis=options.get("basis", ""),
        basis_components=options.get("basis_components", 0),
        basis_scenes=options.get("basis_scenes", 0),
        images=options.get("images", 0),
        pairs_per_image=options.get("pairs_per_image", 0),
        rounds=options.get("rounds", 0),
        raters_per_pair=options.get("raters_per_pair", 0),
        answer_levels=options.get("answer_levels", 0),
        register_as=options.get("register_as", ""),
        round_expiry_s=options.get("round_expiry_s", 0.0),
        seed=options.get("seed", 0),
    )
    if "forking_reference" in options:
        spec.forking_reference.CopyFrom(model_ref(options["forking_reference"]))
    if "feature_extractor" in options:
        spec.feature_extractor.CopyFrom(model_ref(options["feature_extractor"]))
    if "sigma" in options:
        spec.sigma = float(options["sigma"])
    if "learning_rate" in options:
        spec.learning_rate = float(options["learning_rate"])
    if "basis_images" in options and "basis_folder" in options:
        raise _invalid("basis_folder", "give basis_images or basis_folder, not both")
    images: list[ImageInput] = list(options.get("basis_images", ()))
    field = "basis_images"
    if "basis_folder" in options:
        images, field = list(folder_images(options["basis_folder"])), "basis_folder"
    for index, image in enumerate(images):
        spec.basis_images.append(image_to_proto(image, field=f"{field}[{index}]"))
    if "conditioned_class" in options:
        chosen = class_id(options["conditioned_class"], card, field="conditioned_class")
        spec.condition.class_ids.ids.append(chosen)
    return job_spec("human_nes", spec, options)
