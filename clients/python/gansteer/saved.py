"""A job's result saved with everything that regenerates its images: `result.json` beside the images.

`JobResult.save(folder, spec=job.spec())` writes it (so do the CLI's `--out` options), `load_result` reads it back
and `Client.regenerate` renders it again. `result.json` (format `gansteer.result/1`):

    {
      "format": "gansteer.result/1",
      "job_id": "3f2a...",
      "kind": "inversion",                      # the JobSpec kind ("" when neither result nor spec says)
      "generator": "scenes-gen@3",              # the version that rendered the images, pinned
      "seed": 0,                                # the spec's seed; null without a spec
      "items": [                                # one per image, in order
        {
          "image": "result_0.png",              # beside result.json
          "latent": [0.12, ...],                # z, latent_size floats
          "class_id": 4,                        # the class held fixed, or:
          "class_embedding": [0.3, ...],        #   the free class vector that was the condition, or neither
          "metrics": {"criterion": 1.7, ...}
        }
      ],
      "metrics": {"psnr": 21.3, ...},
      "spec": {"inversion": {...}}              # the JobSpec as submitted (protobuf JSON); null without one
    }

Latents and class vectors are float32; each is written as the float64 it equals exactly, in the shortest decimal
that reads back as that float64, so they load bit for bit and the generator gets exactly what the job gave it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
from google.protobuf import json_format  # type: ignore[import-untyped]
from PIL import Image as PILImage

from gansteer._specs import _invalid
from gansteer.types import FloatArray
from gansteer.v1 import optimization_pb2

if TYPE_CHECKING:
    from gansteer.types import JobResult

FORMAT = "gansteer.result/1"
RESULT_FILE = "result.json"

SavedInput: TypeAlias = "SavedResult | str | os.PathLike[str]"
"""A saved result: loaded, or the path of its folder or of its `result.json`."""


@dataclass(frozen=True)
class SavedResult:
    """A result as `load_result` reads it back: the pinned generator, each image's latent and condition (class ids
    where a class was held, else free class vectors, else none), and the saved images' paths. `spec` is the
    JobSpec as submitted (None when it was not saved)."""

    path: Path  # the result.json
    job_id: str
    kind: str
    generator: str
    seed: int | None
    latents: FloatArray  # [N, latent_size]; [0, 0] when the server returned none
    class_ids: tuple[int, ...]  # one per item where a class was held; empty otherwise
    class_embeddings: FloatArray | None  # [N, embedding_size] where free class vectors were the condition
    images: tuple[Path, ...]
    item_metrics: tuple[Mapping[str, float], ...]
    metrics: Mapping[str, float]
    spec: optimization_pb2.JobSpec | None = field(repr=False)

    def load_images(self) -> list[PILImage.Image]:
        """The saved images, in item order."""
        images = []
        for path in self.images:
            with PILImage.open(path) as image:
                images.append(image.copy())
        return images


def save_result(
    result: JobResult, folder: str | os.PathLike[str], *, spec: optimization_pb2.JobSpec | None = None
) -> SavedResult:
    """Writes `result_{i}.png` and `result.json` (module docstring) into `folder` and returns what was saved.
    `spec` (a JobSpec, e.g. `job.spec()`) adds the spec, the seed and the kind."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"result_{i}.png" for i in range(len(result.images))]
    for image, name in zip(result.images, names, strict=True):
        image.save(out / name)
    kind = str(spec.WhichOneof("kind") or "") if spec is not None else ""
    items: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        item: dict[str, Any] = {"image": name}
        if len(result.latents) == len(names):  # a server of before this format may have returned none
            item["latent"] = _floats(result.latents[i])
        if result.class_ids:
            item["class_id"] = int(result.class_ids[i])
        elif result.class_embeddings is not None:
            item["class_embedding"] = _floats(result.class_embeddings[i])
        if i < len(result.item_metrics):
            item["metrics"] = dict(result.item_metrics[i])
        items.append(item)
    document = {
        "format": FORMAT,
        "job_id": result.job_id,
        "kind": kind or result.kind,
        "generator": result.generator,
        "seed": _seed(spec, kind),
        "items": items,
        "metrics": dict(result.metrics),
        "spec": json_format.MessageToDict(spec, preserving_proto_field_name=True) if spec is not None else None,
    }
    path = out / RESULT_FILE
    path.write_text(json.dumps(document, indent=2))
    return load_result(path)


def load_result(path: SavedInput) -> SavedResult:
    """A saved result from its folder or its `result.json`; InvalidArgument naming the field when the file is not
    one, FileNotFoundError when there is none."""
    if isinstance(path, SavedResult):
        return path
    file = Path(path)
    if file.is_dir():
        file = file / RESULT_FILE
    try:
        document = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise _invalid(str(file), f"not JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise _invalid(f"{file}: format", f"expected {FORMAT!r}: not a saved gansteer result")
    items = document.get("items")
    if not isinstance(items, list) or not items:
        raise _invalid(f"{file}: items", "a saved result needs at least one item")
    latents = _array(items, "latent", file)
    ids = [item.get("class_id") for item in items]
    if any(i is not None for i in ids) and not all(isinstance(i, int) for i in ids):
        raise _invalid(f"{file}: items", "class_id must be an integer on every item or on none")
    spec = document.get("spec")
    return SavedResult(
        path=file,
        job_id=str(document.get("job_id", "")),
        kind=str(document.get("kind", "")),
        generator=str(document.get("generator", "")),
        seed=document.get("seed"),
        latents=latents if latents is not None else np.zeros((0, 0), np.float32),
        class_ids=tuple(int(i) for i in ids if i is not None),
        class_embeddings=_array(items, "class_embedding", file),
        images=tuple(file.parent / str(item.get("image", "")) for item in items),
        item_metrics=tuple(dict(item.get("metrics", {})) for item in items),
        metrics=dict(document.get("metrics", {})),
        spec=json_format.ParseDict(spec, optimization_pb2.JobSpec()) if spec is not None else None,
    )


def _floats(values: FloatArray) -> list[float]:
    return np.asarray(values, np.float32).astype(np.float64).tolist()  # type: ignore[no-any-return]


def _array(items: Sequence[Mapping[str, Any]], key: str, file: Path) -> FloatArray | None:
    """The items' `key` lists as float32 [N, size]; None when no item has one."""
    rows = [item.get(key) for item in items]
    if all(row is None for row in rows):
        return None
    if any(not isinstance(row, list) for row in rows) or len({len(row) for row in rows}) != 1:  # type: ignore[arg-type]
        raise _invalid(f"{file}: items[].{key}", "every item needs one, all of the same length")
    return np.asarray(rows, np.float64).astype(np.float32)


def _seed(spec: optimization_pb2.JobSpec | None, kind: str) -> int | None:
    if spec is None or not kind:
        return None
    message = getattr(spec, kind)
    return int(message.seed) if "seed" in message.DESCRIPTOR.fields_by_name else None
