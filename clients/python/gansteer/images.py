"""Saving what a job produced: targets, results and a side-by-side grid a person can judge at a glance.

Shared by `gansteer invert --out`, `gansteer jobs result --out` and `make demo`, so all three write the same files.
The generator's images are small (32x32 for the built-in one), so the grid scales them up with nearest-neighbour
sampling: each pixel stays a visible square instead of being blurred into something the model never produced.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from gansteer.types import JobResult


def image_grid(
    rows: Sequence[Sequence[PILImage.Image]],
    *,
    header: Sequence[str] = (),
    cell: int | None = None,
    pad: int = 4,
) -> PILImage.Image:
    """The images laid out row by row on a white background, each scaled to a `cell`-pixel square (default: the
    largest image's side, at least 128), under an optional line of column titles."""
    if not rows or not any(rows):
        raise ValueError("image_grid needs at least one image")
    largest = max(max(im.size) for row in rows for im in row)
    side = cell or max(largest, 128)
    columns = max(len(row) for row in rows)
    top = 20 if header else 0
    grid = PILImage.new("RGB", (pad + columns * (side + pad), top + pad + len(rows) * (side + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(header):
        draw.text((pad + c * (side + pad) + side // 2, top // 2 + pad // 2), title, fill="black", anchor="mm")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            resample = PILImage.Resampling.NEAREST if max(image.size) < side else PILImage.Resampling.LANCZOS
            position = (pad + c * (side + pad), top + pad + r * (side + pad))
            grid.paste(image.convert("RGB").resize((side, side), resample), position)
    return grid


@dataclass(frozen=True)
class SavedInversion:
    """Paths of the files `save_inversion` wrote."""

    targets: list[Path]
    results: list[Path]
    grid: Path
    latents: Path
    metrics: Path


def save_inversion(
    result: JobResult, targets: Sequence[PILImage.Image], out_dir: str | Path, *, prefix: str = ""
) -> SavedInversion:
    """Writes `{prefix}target_{i}.png`, `{prefix}result_{i}.png`, `{prefix}grid.png` (one row per target: the
    target at the generator's resolution, then the result), `{prefix}latents.npy` and `{prefix}metrics.json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target_paths, result_paths, rows = [], [], []
    for i, image in enumerate(result.images):
        result_path = out / f"{prefix}result_{i}.png"
        image.save(result_path)
        result_paths.append(result_path)
        row = [image]
        if i < len(targets):
            target_path = out / f"{prefix}target_{i}.png"
            targets[i].save(target_path)
            target_paths.append(target_path)
            row.insert(0, targets[i].convert("RGB").resize(image.size, PILImage.Resampling.LANCZOS))
        rows.append(row)
    grid_path = out / f"{prefix}grid.png"
    image_grid(rows, header=("target", "result") if target_paths else ("result",)).save(grid_path)
    latents_path = out / f"{prefix}latents.npy"
    np.save(latents_path, result.latents)
    metrics_path = out / f"{prefix}metrics.json"
    metrics_path.write_text(
        json.dumps(
            {
                "job_id": result.job_id,
                "metrics": dict(result.metrics),
                "items": [dict(m) for m in result.item_metrics],
                "curve": {
                    "steps": result.curve.steps.tolist(),
                    "values": {name: values.tolist() for name, values in result.curve.values.items()},
                },
            },
            indent=2,
        )
    )
    return SavedInversion(target_paths, result_paths, grid_path, latents_path, metrics_path)
