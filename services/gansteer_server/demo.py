"""`make demo`: the main job end to end, as a newcomer would run it on a fresh machine.

Starts the stack on loopback (a Redis from GANSTEER_REDIS_URL, else a `redis-server` on the PATH, else the embedded
in-memory transport), then submits through the SDK, as any user would, two inversion jobs on the built-in
generator (seed 003's cases):

- misspecified: photographs shipped with scikit-image, resized to the generator's 32x32; no latent reproduces
  them, so the criterion stays well above zero and the result is the generator's nearest scene;
- reconstruction: images the generator itself made from random latents, which an inversion can recover closely.

It shows each job's progress, writes the targets, the results and side-by-side grids to `--out`, prints the paths,
the criterion reached and the time taken, and stops everything it started. Under five minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gansteer import Client, InversionResult, Job
from gansteer.images import SavedInversion, image_grid, save_inversion
from gansteer_server.embedded import Transport, start_stack

GENERATOR = "scenes-gen"
DISCRIMINATOR = "scenes-disc"
PHOTOGRAPHS = ("rocket", "astronaut", "coffee")


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    targets: list[Image.Image]


def photographs(names: tuple[str, ...], size: int) -> list[Image.Image]:
    """scikit-image's sample photographs, centre-cropped to a square and resized to the generator's resolution."""
    from skimage import data

    images = []
    for name in names:
        pixels = getattr(data, name)()
        height, width = pixels.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = Image.fromarray(pixels[top : top + side, left : left + side]).convert("RGB")
        images.append(square.resize((size, size), Image.Resampling.LANCZOS))
    return images


def run_case(client: Client, job: Job, case: Case, out: Path) -> tuple[SavedInversion, InversionResult, float]:
    started = time.monotonic()
    print(f"\n{case.name}: {case.description} (job {job.id})", flush=True)
    job.wait(progress=True)
    result = job.result(wait=False)
    assert isinstance(result, InversionResult)
    elapsed = time.monotonic() - started
    saved = save_inversion(result, case.targets, out, prefix=f"{case.name}_")
    return saved, result, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gansteer-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/demo", help="folder for targets, results and grids")
    parser.add_argument("--budget", type=int, default=300, help="optimiser steps per job (default 300)")
    parser.add_argument("--optimizer", help="any of `gansteer optimizers` (default: the inversion job's, L-BFGS)")
    parser.add_argument("--transport", choices=["auto", "redis-server", "memory"], default="auto")
    parser.add_argument("--photos", nargs="+", default=list(PHOTOGRAPHS), help="scikit-image photograph names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    transport: Transport = args.transport
    try:
        stack = start_stack(redis_url=os.environ.get("GANSTEER_REDIS_URL") or None, transport=transport)
    except (OSError, RuntimeError) as error:  # a port in use, a redis-server that would not start
        print(f"gansteer demo: could not start the stack: {error}", file=sys.stderr)
        return 1
    print(f"gansteer demo: stack up in {time.monotonic() - started:.1f} s, {stack.transport}", flush=True)
    try:
        with Client(
            stack.optimization_address,
            generation_target=stack.generation_address,
            scoring_target=stack.scoring_address,
            api_key=stack.api_key,
            timeout=120,
        ) as client:
            resolution = client.model(GENERATOR).resolution
            generated = client.generate(GENERATOR, 3, seed=2024)
            cases = [
                Case(
                    "photo", "misspecified case, scikit-image photographs", photographs(tuple(args.photos), resolution)
                ),
                Case("generated", "reconstruction case, images the generator made", generated.images),
            ]
            # Both jobs are queued at once; the worker takes them in turn.
            jobs = [
                client.invert(
                    case.targets,
                    model=GENERATOR,
                    discriminator=DISCRIMINATOR,
                    **({"optimizer": args.optimizer} if args.optimizer else {}),
                    budget=args.budget,
                    seed=0,
                    labels={"demo": case.name},
                )
                for case in cases
            ]
            outcomes = [run_case(client, job, case, out) for job, case in zip(jobs, cases, strict=True)]
        rows = [
            [target.resize(image.size, Image.Resampling.LANCZOS), image]
            for case, (_, result, _) in zip(cases, outcomes, strict=True)
            for target, image in zip(case.targets, result.images, strict=True)
        ]
        grid = out / "grid.png"
        image_grid(rows, header=("target", "result")).save(grid)
    finally:
        stack.stop()
    print(f"\nwrote {out}/ (left: target at {resolution}x{resolution}, right: inversion result)")
    for case, (saved, result, elapsed) in zip(cases, outcomes, strict=True):
        print(f"  {case.name}: {saved.grid} in {elapsed:.1f} s")
        for i, item in enumerate(result.item_metrics):
            criterion, psnr, ssim = (item.get(key, np.nan) for key in ("criterion", "psnr", "ssim"))
            print(
                f"    target {i}: criterion {criterion:.4g}, PSNR {psnr:.1f} dB, SSIM {ssim:.3f}  ({saved.results[i]})"
            )
    print(f"  both cases: {grid}")
    print(f"total {time.monotonic() - started:.1f} s; everything stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
