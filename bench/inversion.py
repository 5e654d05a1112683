"""Inversion benchmark (seed 003, Table III): each optimizer's criterion and PSNR per case and budget, the job
machinery's overhead per step, and the speedup of evaluating a population in one batch.

    python bench/inversion.py            # full run: about 15 minutes on 2 cores, 1 torch thread (prints its estimate)
    python bench/inversion.py --quick    # smoke run (one case, tiny budgets) in under a minute

Writes `bench/results/inversion.json` (`--quick`: `inversion_quick.json`). How each figure is made, and why:

- table: budgets count generator calls per target (images generated per target, the x-axis of the seed's Figure 7),
  not iterations, so an Adam step, an L-BFGS line-search trial and one population member each cost one; a backward
  pass is not counted, so each entry also stores its wall seconds. Every optimizer starts from the same seed on the
  same targets, with the criterion of Table III's caption (L2 + VGG: preset `l2+features`) and the seed's defaults
  (IV-C: step 1, decays at 1/3 and 2/3, no grid search; nevergrad's defaults with `population` workers).
- overhead: real inversion jobs (gRPC SubmitJob -> Celery on Redis -> worker thread -> `run_segment`, the code a
  worker runs, with its lease checks, progress events, segment checkpoints and result), timed from the job's RUNNING
  to its SUCCEEDED event and divided by its steps, over a bare forward-and-backward of generator plus criterion at
  the same batch, measured between the jobs in the same process at the same thread count. `remote` runs the same
  job through the generation and scoring services' autograd backend.
- population_speedup: the same asked candidates scored one at a time and in one batch (results asserted equal).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import nevergrad as ng
import numpy as np
import redis
import scipy.optimize
import skimage.data
import torch
from PIL import Image
from torch import Tensor

from gansteer.tensors import to_tensor_proto
from gansteer_server.algorithms.inversion import CRITERION_PRESETS, InversionConfig, InversionModels, InversionRun
from gansteer_server.algorithms.inversion.criteria import resize
from gansteer_server.algorithms.search import OPTIMIZERS, is_gradient_optimizer
from gansteer_server.config import Settings
from gansteer_server.data.scenes import render_scenes
from gansteer_server.embedded import Stack, start_stack
from gansteer_server.jobs.backends import LocalBackend
from gansteer_server.jobs.kinds.inversion import DEFAULT_CLASS_VECTOR, DEFAULT_LATENT_SHELL, DEFAULT_OPTIMIZER
from gansteer_server.models import ModelRegistry
from gansteer_server.proto import common_pb2, optimization_pb2_grpc
from gansteer_server.proto import optimization_pb2 as opt

RESULTS = Path(__file__).resolve().parent / "results"
CASES = ("reconstruction", "semi-specified", "misspecified")
# Column labels: the seed's abbreviations (Table III, Figure 6).
LABELS = {
    "adam": "Adam",
    "lbfgs": "LBFGS",
    "nesterov": "Nesterov",
    "random_search": "RS",
    "TwoPointsDE": "2PDE",
    "DE": "DE",
    "DiscreteDE": "DDE",
    "DiscreteOnePlusOne": "DOPO",
    "CMA": "CMA",
}
CRITERION = "l2+features"  # Table III's caption: "defined criterion L2 + VGG loss"
BUDGET_UNIT = "generator_calls"
BUDGET_UNIT_WHY = (
    "generator calls per target (images generated per target; a backward pass is not counted): the seed's Figure 7 "
    "axis; it makes gradient and gradient-free optimizers comparable, since an L-BFGS step costs one call per "
    "line-search trial and a gradient-free step one per population member"
)
DATA_SEED = 900  # render_scenes seeds of training and evaluation: 100 (GAN), 200, 300 (classifiers), 400, 500
TARGET_SEED = 1234  # latents and classes of the reconstruction targets (searches start from InversionConfig.seed)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SEED_ORDER = "LBFGS < Adam < DDE < DOPO < RS in all three cases (criterion, lower is better)"
PHOTO_RESIZE = "centre crop to a square, then torch bilinear with antialias=True (the criterion's resize)"
ORDINARY_SAMPLES, ORDINARY_SEED = 500, 4321  # the generator's own samples that results' realism is ranked among
Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures; FULL and QUICK are the two presets."""

    mode: str
    cases: tuple[str, ...] = CASES
    optimizers: tuple[str, ...] = tuple(LABELS)
    budgets: tuple[int, ...] = (100, 300, 1000)
    targets: int = 4
    population: int = 8  # InversionConfig's default
    seed: int = 0
    local_steps: int = 400  # per timed job: two segments of JobSettings' default 200 steps
    remote_steps: int = 200
    rounds: int = 3  # timed jobs per backend, each followed by a bare block
    bare_steps: int = 100  # bare forward-and-backward passes per block
    segment_steps: int = 0  # 0: JobSettings' default
    speedup_repeats: int = 5


FULL = BenchConfig(mode="full")
QUICK = BenchConfig(
    mode="quick",
    cases=("reconstruction",),
    budgets=(16, 48),
    targets=2,
    local_steps=30,
    remote_steps=15,
    rounds=1,
    bare_steps=20,
    segment_steps=10,
    speedup_repeats=3,
)


@dataclass(frozen=True)
class BenchModels:
    """The models as the local job backend hands them to the algorithm, and their pinned references."""

    inversion: InversionModels
    refs: dict[str, str]
    feature_size: int
    resolution: int
    num_classes: int
    judge: Any = None  # a classifier the inversion never saw: its confidence in its own top class
    ordinary_realism: Tensor | None = None  # the discriminator's scores of ORDINARY random samples of the generator

    @property
    def class_mode(self) -> str:
        return "search" if self.inversion.class_embeddings is not None else "none"


def load_models(
    registry: ModelRegistry, generator: str, discriminator: str, feature_extractor: str, judge: str | None = None
) -> BenchModels:
    backend = LocalBackend(registry)
    gen, disc, features = backend.card(generator), backend.card(discriminator), backend.card(feature_extractor)
    wrapped = backend.generator(gen.ref)
    models = InversionModels(
        generator=wrapped,
        z_size=gen.latent_size or 0,
        class_embeddings=wrapped.class_embeddings(),
        feature_extractor=backend.feature_extractor(features.ref),
        discriminator=backend.discriminator(disc.ref),
    )
    refs = {"generator": gen.ref, "discriminator": disc.ref, "feature_extractor": features.ref}
    judge_model = None
    if judge is not None:
        judge_model, refs["judge"] = backend.scorer(judge), backend.card(judge).ref
    ordinary = None
    if models.discriminator is not None:
        rng = torch.Generator().manual_seed(ORDINARY_SEED)
        z = torch.randn(ORDINARY_SAMPLES, models.z_size, generator=rng)
        ids = torch.randint(0, gen.num_classes, (ORDINARY_SAMPLES,), generator=rng) if gen.num_classes else None
        with torch.no_grad():
            ordinary = models.discriminator(wrapped(z, ids)).flatten()
    return BenchModels(
        models, refs, features.resolution or 32, gen.resolution or 32, gen.num_classes or 0, judge_model, ordinary
    )


def manifold_figures(models: BenchModels, run: InversionRun) -> dict[str, Any]:
    """Where each result lies against the generator's own samples: the discriminator's score as a percentile of
    ORDINARY_SAMPLES ordinary samples' (unconditional: the class vector may be any), the judge's confidence in its
    top class, |z| (the prior's shell is sqrt(Z)), |c| and c's distance to the convex hull of the class rows."""
    items = run.result()
    images = torch.stack([item.image for item in items])
    figures: dict[str, Any] = {"z_norm": [float(item.z.norm()) for item in items]}
    with torch.no_grad():
        if models.ordinary_realism is not None and models.inversion.discriminator is not None:
            scores = models.inversion.discriminator(images).flatten()
            figures["d_percentile"] = [float((models.ordinary_realism < s).double().mean() * 100) for s in scores]
        if models.judge is not None:
            figures["judge_confidence"] = torch.softmax(models.judge(images), dim=1).amax(dim=1).tolist()
    table = models.inversion.class_embeddings
    if table is not None and all(item.class_vector is not None for item in items):
        figures["class_norm"] = [float(item.class_vector.norm()) for item in items]  # type: ignore[union-attr]
        figures["hull_distance"] = [hull_distance(item.class_vector, table) for item in items]  # type: ignore[arg-type]
    optimizer = run.search.optimizer
    if hasattr(optimizer, "stalled_steps") and run.steps:
        figures["stalled_fraction"] = float(optimizer.stalled_steps.sum()) / (run.steps * run.num_searches)
    figures["budget_used"] = run.generator_calls
    return figures


def hull_distance(vector: Tensor, rows: Tensor) -> float:
    """The distance from `vector` to the convex hull of `rows` (K, E): non-negative least squares with the weights'
    sum tied to one by a heavily weighted extra equation (scipy's NNLS; exact to ~1e-6 of |rows|)."""
    tie = 1e4
    system = np.vstack([rows.double().numpy().T, np.full((1, len(rows)), tie)])
    target = np.concatenate([vector.double().numpy(), [tie]])
    weights, _ = scipy.optimize.nnls(system, target, maxiter=50 * len(rows))
    return float(np.linalg.norm(rows.double().numpy().T @ weights - vector.double().numpy()))


def summary(figures: list[float]) -> dict[str, float]:
    return {"median": float(statistics.median(figures)), "mean": float(statistics.fmean(figures))}


def run_config(
    config: BenchConfig, models: BenchModels, optimizer: str, budget: int, unit: str, preset: str = "seed"
) -> InversionConfig:
    """The seed's settings (`seed`: a free class vector, z unconstrained: Table III's method) or the inversion
    job's defaults (`default`: the class vector on the rows' simplex, z on its shell)."""
    default = preset == "default" and models.class_mode == "search"
    return InversionConfig(
        optimizer=optimizer,
        criterion=CRITERION,
        budget=budget,
        budget_unit=unit,  # type: ignore[arg-type]
        population=config.population,
        class_mode=models.class_mode,  # type: ignore[arg-type]
        feature_size=models.feature_size,
        seed=config.seed,
        learning_rate=OPTIMIZERS[optimizer].default_learning_rate if is_gradient_optimizer(optimizer) else 1.0,  # type: ignore[union-attr]
        class_vector=DEFAULT_CLASS_VECTOR if default else "free",
        latent_shell=DEFAULT_LATENT_SHELL if preset == "default" else False,
    )


def run_to_end(config: InversionConfig, models: BenchModels, targets: Tensor) -> tuple[InversionRun, float]:
    run = InversionRun(config, models.inversion, targets)
    start = time.perf_counter()
    while not run.done:
        run.step()
    return run, time.perf_counter() - start


def manifold_section(config: BenchConfig, models: BenchModels, targets: Tensor, log: Log) -> dict[str, Any]:
    """Misspecified targets: the inversion job's default (its optimizer, simplex class vector, z on its shell)
    against the seed's unconstrained search with Adam, at the largest budget; figures per result and their medians."""
    budget = max(config.budgets)
    optimizers = {"seed": "adam", "default": DEFAULT_OPTIMIZER}
    section: dict[str, Any] = {"budget": budget, "optimizers": optimizers, "targets": list(PHOTOS[: len(targets)])}
    images = {}
    for preset, optimizer in optimizers.items():
        run, seconds = run_to_end(run_config(config, models, optimizer, budget, BUDGET_UNIT, preset), models, targets)
        figures = manifold_figures(models, run)
        figures["criterion"] = [item.criterion for item in run.result()]
        figures["psnr"] = [item.psnr for item in run.result()]
        figures["medians"] = {k: summary(v)["median"] for k, v in figures.items() if isinstance(v, list)}
        figures["seconds"] = round(seconds, 2)
        section[preset] = figures
        images[preset] = torch.stack([item.image for item in run.result()])
        log(f"  manifold {preset:8} d_percentile median {figures['medians'].get('d_percentile', float('nan')):.0f}")
    if models.judge is not None and models.ordinary_realism is not None:
        section["ordinary_judge_confidence_median"] = ordinary_judge_confidence(models)
    section["images"] = images  # for the grid; removed before writing JSON
    return section


def ordinary_judge_confidence(models: BenchModels) -> float:
    rng = torch.Generator().manual_seed(ORDINARY_SEED)
    z = torch.randn(ORDINARY_SAMPLES, models.inversion.z_size, generator=rng)
    ids = torch.randint(0, models.num_classes, (ORDINARY_SAMPLES,), generator=rng) if models.num_classes else None
    with torch.no_grad():
        confidence = torch.softmax(models.judge(models.inversion.generator(z, ids)), dim=1).amax(dim=1)
    return float(confidence.median())


def half_budget(config: BenchConfig, models: BenchModels, targets: dict[str, Tensor], log: Log) -> dict[str, Any]:
    """Per case: the inversion job's default preset (its optimizer and manifold) at half the largest budget over Adam
    with the seed's schedule (and settings) at the full budget, criterion means over the targets (< 1: the default
    needs half the calls)."""
    budget = max(config.budgets)
    found: dict[str, Any] = {}
    for case, case_targets_ in targets.items():
        half, _ = run_to_end(
            run_config(config, models, DEFAULT_OPTIMIZER, budget // 2, BUDGET_UNIT, "default"), models, case_targets_
        )
        full, _ = run_to_end(run_config(config, models, "adam", budget, BUDGET_UNIT, "seed"), models, case_targets_)
        default = statistics.fmean(item.criterion for item in half.result())
        seed = statistics.fmean(item.criterion for item in full.result())
        found[case] = {"default_at_half": default, "seed_adam_at_full": seed, "ratio": default / seed}
        log(f"  half_budget {case:15} {default / seed:.2f}")
    return found


# --- targets -------------------------------------------------------------------------------------------------------


def case_targets(case: str, models: BenchModels, count: int) -> Tensor:
    """(count, 3, R, R) in [-1, 1]: generated (reconstruction), rendered scenes (semi-), photographs (misspecified)."""
    if case == "reconstruction":
        rng = torch.Generator().manual_seed(TARGET_SEED)
        z = torch.randn(count, models.inversion.z_size, generator=rng)
        ids = torch.randint(0, models.num_classes, (count,), generator=rng) if models.num_classes else None
        with torch.no_grad():
            return models.inversion.generator(z, ids).clamp(-1, 1)
    if case == "semi-specified":
        pixels = render_scenes(count, seed=DATA_SEED, resolution=models.resolution).images
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    if case == "misspecified":
        if count > len(PHOTOS):
            raise ValueError(f"{count} targets, but only {len(PHOTOS)} photographs: {PHOTOS}")
        return torch.cat([_photo(name, models.resolution) for name in PHOTOS[:count]])
    raise ValueError(f"unknown case {case!r}; expected one of {CASES}")


def _photo(name: str, size: int) -> Tensor:
    pixels = getattr(skimage.data, name)()[..., :3]
    side = min(pixels.shape[:2])
    top, left = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
    square = torch.from_numpy(np.ascontiguousarray(pixels[top : top + side, left : left + side]))
    return resize(square.permute(2, 0, 1)[None].float() / 127.5 - 1, size).clamp(-1, 1)


# --- the table -----------------------------------------------------------------------------------------------------


def _number(value: float) -> float | None:
    """JSON has no inf or NaN: a run whose every evaluation diverged is stored as null."""
    return value if math.isfinite(value) else None


def run_table(config: BenchConfig, models: BenchModels, targets: dict[str, Tensor], log: Log) -> dict[str, Any]:
    """case -> optimizer -> budget -> the means over the targets of the final criterion, PSNR and SSIM."""
    table: dict[str, Any] = {}
    for case, case_targets_ in targets.items():
        for name in config.optimizers:
            started = time.perf_counter()
            for budget in config.budgets:
                run, seconds = run_to_end(run_config(config, models, name, budget, BUDGET_UNIT), models, case_targets_)
                items = run.result()
                figures = manifold_figures(models, run)
                table.setdefault(case, {}).setdefault(name, {})[str(budget)] = {
                    "criterion": _number(statistics.fmean(item.criterion for item in items)),
                    "psnr": _number(statistics.fmean(item.psnr for item in items)),
                    "ssim": _number(statistics.fmean(item.ssim for item in items)),
                    "steps": run.steps,
                    "generator_calls": run.generator_calls,
                    "seconds": round(seconds, 3),
                } | {
                    key: (_number(summary(value)["median"]) if isinstance(value, list) else value)
                    for key, value in figures.items()
                    if key != "budget_used"
                }
            log(f"  {case:15} {LABELS.get(name, name):9} {time.perf_counter() - started:6.1f} s")
    return table


# --- population speedup --------------------------------------------------------------------------------------------


class AskedPopulation:
    """One population asked of a fresh run, scored as InversionRun's own population step scores it."""

    def __init__(self, config: BenchConfig, models: BenchModels, name: str, targets: Tensor) -> None:
        budget = max(config.budgets)
        self.run = InversionRun(run_config(config, models, name, budget, BUDGET_UNIT), models.inversion, targets)
        candidates = self.run.optimizer.ask()  # type: ignore[union-attr]
        searches, population, _ = candidates.shape
        self.candidates = candidates.reshape(searches * population, -1)
        self.index = torch.arange(searches).repeat_interleave(population)

    def __len__(self) -> int:
        return len(self.candidates)

    @torch.no_grad()
    def losses(self, rows: slice) -> Tensor:
        run = self.run
        z, condition = run.decode(self.candidates[rows], self.index[rows])
        fixed = condition if run.config.class_mode == "conditioned" else None
        return run.criterion(run.models.generator(z, condition), z, self.index[rows] // run.restarts, fixed)[0]


def population_speedup(config: BenchConfig, models: BenchModels, targets: Tensor) -> dict[str, dict[str, float]]:
    """Per gradient-free optimizer: one asked population scored one candidate per call and all in one call."""
    found: dict[str, dict[str, float]] = {}
    for name in (n for n in config.optimizers if not is_gradient_optimizer(n)):
        population = AskedPopulation(config, models, name, targets)
        single_s, batched_s, single_cpu, batched_cpu = [], [], [], []
        for _ in range(config.speedup_repeats):
            start, cpu = time.perf_counter(), time.process_time()
            single = torch.cat([population.losses(slice(i, i + 1)) for i in range(len(population))])
            single_s.append(time.perf_counter() - start)
            single_cpu.append(time.process_time() - cpu)
            start, cpu = time.perf_counter(), time.process_time()
            batched = population.losses(slice(None))
            batched_s.append(time.perf_counter() - start)
            batched_cpu.append(time.process_time() - cpu)
        torch.testing.assert_close(single, batched, rtol=1e-4, atol=1e-4)
        found[name] = {
            "candidates": len(population),
            "single_s": min(single_s),  # the least disturbed repeat, as timeit does
            "batched_s": min(batched_s),
            "speedup": min(single_s) / min(batched_s),
            "cpu_speedup": min(single_cpu) / min(batched_cpu),
            "max_abs_difference": float((single - batched).abs().max()),
        }
    return found


# --- job machinery overhead ----------------------------------------------------------------------------------------


def bare_per_step(config: BenchConfig, models: BenchModels, targets: Tensor, steps: int) -> tuple[float, float]:
    """Wall and process CPU seconds per forward-and-backward of generator plus criterion over one Adam run's
    variables, and nothing else (`steps` of them, after one to warm up)."""
    run = InversionRun(run_config(config, models, "adam", 1000, "iterations"), models.inversion, targets)
    variables = run.variables.detach().clone().requires_grad_(True)
    index = torch.arange(run.num_searches)

    def once() -> None:
        z, condition = run.decode(variables, index)
        losses, _ = run.criterion(models.inversion.generator(z, condition), z, index // run.restarts)
        losses.sum().backward()
        variables.grad = None

    once()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        once()
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


@contextmanager
def job_stack(settings: Settings, config: BenchConfig, redis_url: str | None) -> Iterator[Stack]:
    """Services and a worker thread on a private redis-server (or under a fresh key prefix of `redis_url`)."""
    prefix = f"gansteer-bench-{secrets.token_hex(4)}:"
    options = {"segment_steps": config.segment_steps} if config.segment_steps else {}
    stack = start_stack(
        redis_url=redis_url,
        transport="auto" if redis_url else "redis-server",
        settings=settings,
        key_prefix=prefix,
        job_options=options,
        torch_threads=torch.get_num_threads(),
    )
    try:
        yield stack
    finally:
        stack.stop()
        if redis_url:
            client = redis.Redis.from_url(redis_url)
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                client.delete(key)
            client.close()


def job_spec(config: BenchConfig, models: BenchModels, targets: Tensor, steps: int, backend: str) -> opt.JobSpec:
    """An Adam inversion of `targets` for `steps` iterations, as a client submits it."""
    refs = models.refs
    inversion = opt.InversionSpec(
        targets=[common_pb2.Image(tensor=to_tensor_proto(target.numpy())) for target in targets],
        generator=common_pb2.ModelRef(name=refs["generator"]),
        discriminator=common_pb2.ModelRef(name=refs["discriminator"]),
        feature_extractor=common_pb2.ModelRef(name=refs["feature_extractor"]),
        criterion=CRITERION,
        optimizer=opt.Optimizer(name="adam"),
        budget=opt.Budget(unit=opt.BUDGET_UNIT_ITERATIONS, amount=steps),
        seed=config.seed,
        backend=opt.BACKEND_LOCAL if backend == "local" else opt.BACKEND_REMOTE,
    )
    return opt.JobSpec(inversion=inversion)


def timed_job(stub: Any, spec: opt.JobSpec, metadata: tuple[tuple[str, str], ...]) -> dict[str, float]:
    """Submit, watch to the end; wall seconds from the RUNNING to the SUCCEEDED event (worker-side timestamps), and
    this process's CPU seconds from submission to the end (it holds the worker and the services)."""
    cpu = time.process_time()
    job_id = stub.SubmitJob(opt.SubmitJobRequest(spec=spec), metadata=metadata).job_id
    running = finished = loop_s = 0.0
    steps, state, message = 0, opt.JOB_STATE_UNSPECIFIED, ""
    for event in stub.WatchJob(opt.WatchJobRequest(job_id=job_id, skip_previews=True), metadata=metadata):
        if event.HasField("progress"):
            steps, loop_s = int(event.progress.step), event.progress.elapsed_s
        elif event.HasField("state_change"):
            state, message = event.state_change.state, event.state_change.message
            if state == opt.JOB_STATE_RUNNING and not running:
                running = event.time.ToNanoseconds() / 1e9
            finished = event.time.ToNanoseconds() / 1e9
    if state != opt.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"job {job_id} ended {opt.JobState.Name(state)}: {message}")
    return {"steps": steps, "wall_s": finished - running, "loop_s": loop_s, "cpu_s": time.process_time() - cpu}


def measure_overhead(
    config: BenchConfig, models: BenchModels, targets: Tensor, settings: Settings, redis_url: str | None, log: Log
) -> dict[str, Any]:
    """Jobs of each backend alternated with bare blocks. A background load that drifts (this machine shares its
    cores) moves a job and its neighbouring bare blocks together, so each job is divided by the mean of the two
    blocks around it, and a backend's overhead is the median of its jobs' ratios."""
    steps = {"local": config.local_steps, "remote": config.remote_steps}
    jobs: dict[str, list[dict[str, float]]] = {"local": [], "remote": []}
    bare = [bare_per_step(config, models, targets, config.bare_steps)]
    with job_stack(settings, config, redis_url) as stack, grpc.insecure_channel(stack.optimization_address) as channel:
        stub = optimization_pb2_grpc.OptimizationServiceStub(channel)
        metadata = (("authorization", f"Bearer {stack.api_key}"),) if stack.api_key else ()
        for backend in jobs:  # warm-up: the worker and the services load their models once per process
            timed_job(stub, job_spec(config, models, targets, 2, backend), metadata)
        for _ in range(config.rounds):
            for backend, timed in jobs.items():
                job = timed_job(stub, job_spec(config, models, targets, steps[backend], backend), metadata)
                bare.append(bare_per_step(config, models, targets, config.bare_steps))
                job["seconds_per_step"] = job["wall_s"] / job["steps"]
                job["ratio"] = job["seconds_per_step"] / ((bare[-2][0] + bare[-1][0]) / 2)
                job["cpu_ratio"] = job["cpu_s"] / job["steps"] / ((bare[-2][1] + bare[-1][1]) / 2)
                timed.append(job)
                log(f"  {backend} job: {job['seconds_per_step'] * 1e3:.1f} ms per step, {job['ratio']:.2f} x bare")
        job_settings, transport = stack.job_settings, stack.transport
    found: dict[str, Any] = {
        "measured_path": (
            "gRPC SubmitJob -> Celery on Redis -> in-thread solo worker (gansteer_server.embedded.start_stack: "
            "services, worker and this benchmark share one process) -> run_segment -> InversionJobRun.step; per step "
            "= (SUCCEEDED event time - RUNNING event time) / steps, after one warm-up job per backend; ratio = "
            "median over jobs of (job seconds per step / mean of the bare blocks before and after it); cpu_ratio: the "
            "same with this process's CPU seconds (job: submission to end), which a busy neighbour does not inflate"
        ),
        "transport": transport,
        "optimizer": "adam",
        "batch": len(targets),
        "bare_seconds_per_step": statistics.fmean(wall for wall, _ in bare),
        "bare_blocks_seconds_per_step": [{"wall_s": wall, "cpu_s": cpu} for wall, cpu in bare],
        "bare_steps_per_block": config.bare_steps,
        "job_settings": {
            name: getattr(job_settings, name)
            for name in ("segment_steps", "segment_seconds", "progress_interval_s", "lease_s")
        },
        "service_batching": {"max_batch": settings.max_batch, "max_delay_ms": settings.max_delay_ms},
    }
    for backend, timed in jobs.items():
        found[backend] = {
            "jobs": timed,
            "ratio": statistics.median(job["ratio"] for job in timed),
            "cpu_ratio": statistics.median(job["cpu_ratio"] for job in timed),
            "loop_seconds_per_step": sum(job["loop_s"] for job in timed) / sum(job["steps"] for job in timed),
        }
    return found


# --- run -----------------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu or "unknown",
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "nevergrad": ng.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1min_start": os.getloadavg()[0],
    }


def estimate_seconds(config: BenchConfig, models: BenchModels, targets: Tensor) -> float:
    """From passes timed now; job steps as 1.2 (local) and 3 (remote) bare steps, nevergrad's bookkeeping as 0.3 ms
    per evaluation (NOTES: 0.1 to 0.5 ms), 8 s to start the services and the worker and run the warm-up jobs."""
    step = bare_per_step(config, models, targets, 3)[0]
    population = AskedPopulation(config, models, "random_search", targets)
    population.losses(slice(None))  # warm-up
    start = time.perf_counter()
    population.losses(slice(None))
    batched = time.perf_counter() - start
    start = time.perf_counter()
    population.losses(slice(0, 1))
    single = time.perf_counter() - start
    gradient = sum(is_gradient_optimizer(name) for name in config.optimizers)
    free = len(config.optimizers) - gradient
    per_call = gradient * step + free * (batched + 3e-4 * len(population)) / config.population
    table = len(config.cases) * sum(config.budgets) * per_call
    jobs = config.rounds * (config.local_steps * 1.2 + config.remote_steps * 3) * step
    bare = (2 * config.rounds + 1) * config.bare_steps * step
    speedup = free * config.speedup_repeats * (len(population) * single + batched)
    return table + jobs + bare + speedup + 8.0


def run_benchmark(
    config: BenchConfig,
    settings: Settings,
    *,
    generator: str = "scenes-gen",
    discriminator: str = "scenes-disc",
    feature_extractor: str = "scenes-clf",
    judge: str | None = "scenes-judge",
    redis_url: str | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Everything `bench/results/inversion.json` holds."""
    began = time.perf_counter()
    info = machine()
    registry = ModelRegistry(settings.registry_paths)
    models = load_models(registry, generator, discriminator, feature_extractor, judge)
    targets = {case: case_targets(case, models, config.targets) for case in config.cases}
    first = targets[config.cases[0]]
    log(f"estimated total: {estimate_seconds(config, models, first) / 60:.1f} min ({config.mode} run)")
    log("table:")
    table = run_table(config, models, targets, log)
    log("manifold and half budget:")
    photos = targets.get("misspecified")
    manifold = manifold_section(config, models, photos, log) if photos is not None else None
    halves = half_budget(config, models, targets, log)
    log(f"population evaluation: ({time.perf_counter() - began:.0f} s so far)")
    population = population_speedup(config, models, first)
    log(f"job overhead: ({time.perf_counter() - began:.0f} s so far)")
    overhead = measure_overhead(config, models, first, settings, redis_url, log)
    info["load_average_1min_end"] = os.getloadavg()[0]
    top = str(max(config.budgets))
    order = {case: sorted(row, key=lambda name, row=row: _sort_key(row[name][top])) for case, row in table.items()}
    return {
        "benchmark": "inversion",
        "mode": config.mode,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": info,
        "models": models.refs,
        "settings": {
            "criterion": CRITERION,
            "weights": asdict(CRITERION_PRESETS[CRITERION]),
            "budget_unit": BUDGET_UNIT,
            "budget_unit_why": BUDGET_UNIT_WHY,
            "budgets": list(config.budgets),
            "targets_per_case": config.targets,
            "population": config.population,
            "restarts": 1,
            "class_mode": models.class_mode,
            "learning_rate": {
                n: OPTIMIZERS[n].default_learning_rate for n in config.optimizers if is_gradient_optimizer(n)
            },  # type: ignore[union-attr]
            "seed": config.seed,
            "reconstruction": f"G(z, class) with z ~ N(0, I) and uniform classes, torch seed {TARGET_SEED}",
            "semi_specified": f"render_scenes(n, seed={DATA_SEED}) (a seed no model was trained or evaluated on)",
            "misspecified": {"photographs": list(PHOTOS[: config.targets]), "resize": PHOTO_RESIZE},
        },
        "table": table,
        "ranking": {"budget": int(top), "order": order, "seed_table_iii": SEED_ORDER},
        "manifold": manifold,
        "half_budget": halves,
        "ordinary": {"samples": ORDINARY_SAMPLES, "seed": ORDINARY_SEED},
        "overhead_local": overhead["local"]["ratio"],
        "overhead_remote": overhead["remote"]["ratio"],
        "overhead": overhead,
        "population_speedup": {name: row["speedup"] for name, row in population.items()},
        "population": population,
        "elapsed_s": round(time.perf_counter() - began, 1),
    }


def format_report(results: dict[str, Any]) -> str:
    """Table III's layout (cases x optimizers), one block per budget: criterion (PSNR dB), means over the targets."""
    settings = results["settings"]
    table = results["table"]
    optimizers = list(next(iter(table.values())))
    lines = [
        f"Inversion of {results['models']['generator']}: criterion {settings['criterion']} (Table III's L2 + VGG), "
        f"mean over {settings['targets_per_case']} targets per case, lower is better; PSNR in dB in parentheses.",
        f"Budget unit: {settings['budget_unit_why']}.",
    ]
    for budget in (str(b) for b in settings["budgets"]):
        lines += ["", f"budget {budget}".ljust(16) + "".join(f"{LABELS.get(n, n):>16}" for n in optimizers)]
        for case, row in table.items():
            cells = [_cell(row[name][budget]).rjust(16) for name in optimizers]
            lines.append(case.ljust(16) + "".join(cells))
    ranking = results["ranking"]
    lines += ["", f"ranking at budget {ranking['budget']} (seed's Table III: {ranking['seed_table_iii']}):"]
    for case, names in ranking["order"].items():
        lines.append(f"  {case:15} " + " < ".join(LABELS.get(name, name) for name in names))
    manifold = results.get("manifold")
    if manifold:
        used = ", ".join(f"{preset} {name}" for preset, name in manifold["optimizers"].items())
        lines += ["", f"manifold (misspecified targets, {used} at {manifold['budget']} calls; medians over targets):"]
        for preset in ("seed", "default"):
            medians = manifold[preset]["medians"]
            lines.append(
                f"  {preset:8} criterion {medians['criterion']:.2f}  d_percentile {medians.get('d_percentile', 0):.0f}"
                f"  judge confidence {medians.get('judge_confidence', 0):.2f}  |c| {medians.get('class_norm', 0):.1f}"
                f"  hull distance {medians.get('hull_distance', 0):.2f}  |z| {medians['z_norm']:.1f}"
            )
    halves = results.get("half_budget") or {}
    if halves:
        lines.append(
            "half_budget (default preset at half the calls / seed's Adam at all): "
            + ", ".join(f"{case} {row['ratio']:.2f}" for case, row in halves.items())
        )
    stalled = {
        case: row["lbfgs"][str(max(settings["budgets"]))].get("stalled_fraction")
        for case, row in table.items()
        if "lbfgs" in row
    }
    if stalled:
        lines.append(
            "L-BFGS stalled fraction: " + ", ".join(f"{c} {v:.3f}" for c, v in stalled.items() if v is not None)
        )
    overhead, machine_info = results["overhead"], results["machine"]
    population = results["population"]
    lines += [
        "",
        f"job machinery overhead per step, adam on {overhead['batch']} targets (job / bare forward-backward of "
        f"{overhead['bare_seconds_per_step'] * 1e3:.1f} ms): wall local {results['overhead_local']:.2f}, remote "
        f"{results['overhead_remote']:.2f}; CPU local {overhead['local']['cpu_ratio']:.2f}, remote "
        f"{overhead['remote']['cpu_ratio']:.2f}",
        "batched population evaluation speedup (one at a time / one batch), wall: "
        + ", ".join(f"{LABELS.get(n, n)} {r['speedup']:.2f}" for n, r in population.items())
        + "; CPU: "
        + ", ".join(f"{LABELS.get(n, n)} {r['cpu_speedup']:.2f}" for n, r in population.items()),
        f"machine: {machine_info['cpu']}, {machine_info['cores']} cores, torch {machine_info['torch']} with "
        f"{machine_info['torch_threads']} thread(s); load average {machine_info['load_average_1min_start']:.1f} at "
        f"start, {machine_info['load_average_1min_end']:.1f} at end (other work inflates the wall-clock ratios, "
        f"not the CPU ones); {results['elapsed_s']} s",
    ]
    return "\n".join(lines)


def _sort_key(entry: dict[str, Any]) -> float:
    return math.inf if entry["criterion"] is None else float(entry["criterion"])


def _cell(entry: dict[str, Any]) -> str:
    criterion = "diverged" if entry["criterion"] is None else f"{entry['criterion']:.3f}"
    psnr = "inf" if entry["psnr"] is None else f"{entry['psnr']:.1f}"
    return f"{criterion} ({psnr})"


def write_results(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    written = dict(results)
    if written.get("manifold"):
        written["manifold"] = {k: v for k, v in written["manifold"].items() if k != "images"}
    path.write_text(json.dumps(written, indent=2, allow_nan=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Inversion benchmark (seed 003, Table III): optimizers x cases x budgets, overhead, populations."
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: one case, tiny budgets (under a minute)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--targets", type=int, default=0, help="targets per case (default: 4, quick 2)")
    parser.add_argument("--redis-url", default=None, help="Redis of the jobs (default: a private redis-server)")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: bench/results/...)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = QUICK if args.quick else FULL
    if args.targets:
        config = replace(config, targets=args.targets)
    output = args.output or RESULTS / ("inversion_quick.json" if args.quick else "inversion.json")
    results = run_benchmark(config, Settings.from_env(), redis_url=args.redis_url, log=lambda s: print(s, flush=True))
    print()
    report = format_report(results)
    print(report)
    write_results(results, output)
    print(f"wrote {output}")
    if not args.quick and results.get("manifold"):
        write_doc(results, report, Path(__file__).resolve().parents[1] / "docs")


def write_doc(results: dict[str, Any], report: str, docs: Path) -> None:
    """docs/inversion.md: the report and the manifold grid (target | the seed's free search | the default)."""
    manifold = results["manifold"]
    names = manifold["targets"]
    targets = torch.cat([_photo(name, manifold["images"]["seed"].shape[-1]) for name in names])
    columns = [targets, manifold["images"]["seed"], manifold["images"]["default"]]
    tiles = torch.stack(columns, dim=1).add(1).mul(127.5).clamp(0, 255).byte()  # (T, 3, C, H, W)
    rows, count, _, size, _ = tiles.shape
    canvas = np.full((rows * (size + 2), count * (size + 2), 3), 255, dtype=np.uint8)
    for r in range(rows):
        for c in range(count):
            y, x = r * (size + 2), c * (size + 2)
            canvas[y : y + size, x : x + size] = tiles[r, c].permute(1, 2, 0).numpy()
    Image.fromarray(canvas).resize((canvas.shape[1] * 4, canvas.shape[0] * 4), Image.NEAREST).save(
        docs / "inversion_manifold.png"
    )
    seed, default = manifold["seed"], manifold["default"]
    lines = [
        "# Inversion on the generator's manifold",
        "",
        "Written by `python bench/inversion.py` (figures in `bench/results/inversion.json`).",
        "",
        "An inversion job searches the class vector on the simplex of the generator's class rows (a convex "
        "combination of trained embeddings) and holds z on its prior's shell |z| = sqrt(128) by default, with "
        f"per-search L-BFGS (`{DEFAULT_OPTIMIZER}`) as its optimizer. The seed's "
        "own method (and its code) searches a free class vector; on targets the generator cannot make, that vector "
        "leaves the rows' hull and the images turn to speckled colour: close in pixels, but not images the "
        'generator would make (the paper calls the result an *inspiration*). `class_vector="free"` and '
        "`latent_shell=false` bring the seed's search back when pixel fidelity matters more.",
        "",
        f"Misspecified targets (photographs {', '.join(names)}) at {manifold['budget']} generator calls (the seed's "
        f"search with {LABELS[manifold['optimizers']['seed']]}, the default with "
        f"{LABELS[manifold['optimizers']['default']]}), "
        "medians over the targets; the discriminator's score is ranked among "
        f"{results['ordinary']['samples']} ordinary samples of the generator (percentile; an ordinary sample's "
        f"median is 50), the judge (`scenes-judge`) is a classifier the search never saw (its confidence in its "
        f"own top class; ordinary samples: {manifold.get('ordinary_judge_confidence_median', float('nan')):.2f}).",
        "",
        "| search | criterion | d_percentile | judge confidence | |c| | distance of c to the rows' hull | |z| |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, figures in (("seed (Adam, free c, free z)", seed), ("default (L-BFGS, simplex c, z on shell)", default)):
        m = figures["medians"]
        lines.append(
            f"| {label} | {m['criterion']:.2f} | {m.get('d_percentile', float('nan')):.0f} | "
            f"{m.get('judge_confidence', float('nan')):.2f} | {m.get('class_norm', float('nan')):.1f} | "
            f"{m.get('hull_distance', float('nan')):.2f} | {m['z_norm']:.1f} |"
        )
    lines += [
        "",
        "Per target d_percentile: seed "
        + ", ".join(f"{v:.0f}" for v in seed.get("d_percentile", []))
        + "; default "
        + ", ".join(f"{v:.0f}" for v in default.get("d_percentile", []))
        + ".",
        "",
        "![target, seed's search, default](inversion_manifold.png)",
        "",
        "Each row: the target, the seed's free search, the default.",
        "",
        "The trade-off: on targets the generator made itself (reconstruction) the simplex can cost fidelity, since "
        "reaching one row exactly means driving a softmax to a vertex (slow for Adam; quicker for L-BFGS, whose "
        "curvature pairs follow the softmax); the default preset at half the calls over the seed's Adam at all of "
        "them (`half_budget`, < 1 is better): "
        + ", ".join(f"{case} {row['ratio']:.2f}" for case, row in results["half_budget"].items())
        + '. For reconstruction and editing of the generator\'s own images, ask for `class_vector="free"`.',
        "",
        "Gradient-free optimizers run as the seed ran them: nevergrad's default parameters (IV-C), told the budget in "
        "evaluations. With those defaults DiscreteDE starts from a population of 30 random points and then changes "
        "about one of d coordinates per offspring (crossover 1/d), so at 100 and 300 calls it has hardly left its "
        "random start and random search, which draws every call afresh, does as well or better; it pulls ahead at "
        "1,000 calls, the seed's budget.",
        "",
        "What the realism term can and cannot do: it adds lambda_r times minus the discriminator's score (Table I: "
        "0.1 in `l2+features`). It pulls results toward what the discriminator rates real, but a larger weight games "
        "the discriminator (scores above real images' without better images) rather than bringing the search back "
        "to the generator's manifold; constraining where the search may go does that.",
        "",
        "## The whole benchmark",
        "",
        "```",
        report,
        "```",
        "",
    ]
    (docs / "inversion.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
