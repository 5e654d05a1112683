"""Latent-search benchmark (seed 002): gradient ascent, CMA-ES and the genetic algorithm on a classifier's logit over
every class of the built-in generator, robustness p10, an independent judge and realism; the batching speedups of
the robustness metric and of the populations; BasinCMA against Adam on bench/inversion.py's photographs.

    python bench/latent_search.py            # full run: about 20 minutes on 2 loaded cores, 1 torch thread
    python bench/latent_search.py --quick    # smoke run: two classes, tiny budgets, in about a minute

Writes `bench/results/latent_search.json` (`--quick`: `latent_search_quick.json`), and with the full run
`docs/latent_search.md` and its grid `docs/latent_search_grid.png`. How each figure is made:

- table: each optimizer runs as the `latent_search` job kind runs it (the kind's `parse` and `start` on the local
  backend, no Celery), over all classes x `restarts` starts (the "3 seeds each"), at the same budget of generator
  calls per search: objective = scenes-clf's pre-softmax logit of the class (seed 002's objective), robustness =
  10th percentile of that objective over 200 latent perturbations with sigma 0.1, judge accuracy = how often
  scenes-judge (a classifier the search never saw) assigns the image to its class, realism = scenes-disc's score for
  the class. `samples` is the generator's own random draws of each class, for reference (the seed's "Samples" row).
- p10_batched_speedup: the 200 perturbations of one result in one forward over one forward per perturbation (the
  values asserted equal).
- population_speedup: whole ask / evaluate / tell steps of one search, the population evaluated in one batch over
  one candidate per generator call.
- basincma: inversion (criterion `l2+features`, class vector searched) of the misspecified targets (photographs) at
  equal generator calls per target: BasinCMA (its preset options) against Adam (the seed's defaults).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gansteer.tensors import from_tensor_proto
from gansteer_server.algorithms.inversion import InversionConfig, InversionRun
from gansteer_server.algorithms.latent_search import perturbation_values
from gansteer_server.algorithms.search import OPTIMIZERS, Latents, optimizer_options
from gansteer_server.config import Settings
from gansteer_server.jobs.backends import LocalBackend
from gansteer_server.jobs.kinds import SubmitContext, get_kind
from gansteer_server.jobs.settings import JobSettings
from gansteer_server.models import ModelRegistry
from gansteer_server.proto import common_pb2
from gansteer_server.proto import optimization_pb2 as opt

try:  # run as a script (python bench/latent_search.py) or imported from the repository root
    from inversion import PHOTOS, case_targets, load_models  # type: ignore[import-not-found]
except ImportError:
    from bench.inversion import PHOTOS, case_targets, load_models

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC, GRID = ROOT / "docs" / "latent_search.md", ROOT / "docs" / "latent_search_grid.png"
GENERATOR, CLASSIFIER, JUDGE, DISCRIMINATOR = "scenes-gen", "scenes-clf", "scenes-judge", "scenes-disc"
LABELS = {"adam": "Gradient ascent (Adam)", "cmaes": "CMA-ES", "ga": "Genetic algorithm"}
# Seed 002's "Average Scores" table (MNIST zeros, its decoder and classifier): objective and perturbation metric.
SOURCE = {
    "MNIST": (13.89, 12.42),
    "Samples": (2.07, 0.63),
    "Gradient Ascent": (18.44, 12.76),
    "CMA-ES": (37.20, 36.12),
    "Genetic Algorithm": (12.78, 9.45),
}
Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    mode: str
    classes: tuple[int, ...] = tuple(range(10))
    restarts: int = 3
    budget: int = 600  # generator calls per search: 40 CMA-ES generations, 37 GA generations, 600 Adam steps
    optimizers: tuple[str, ...] = ("adam", "cmaes", "ga")
    perturbations: int = 200
    speedup_repeats: int = 7  # paired measurements (batched, then one per call); the median ratio is reported
    population_steps: int = 4
    basin_targets: int = 4  # bench/inversion.py's full run inverts the first 4 photographs
    basin_budget: int = 960  # BasinCMA's preset: 8 candidates x 10 Adam steps, 4 steps, then 640 Adam steps
    seed: int = 0


FULL = BenchConfig(mode="full")
QUICK = BenchConfig(
    mode="quick",
    classes=(0, 3),
    restarts=1,
    budget=60,
    perturbations=50,
    speedup_repeats=1,
    population_steps=1,
    basin_targets=2,
    basin_budget=160,
)


def machine() -> dict[str, Any]:
    names = []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
    return {
        "cpu": names[0] if names else platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_1min_start": os.getloadavg()[0],
    }


def search_spec(config: BenchConfig, optimizer: str, budget: int) -> opt.LatentSearchSpec:
    return opt.LatentSearchSpec(
        generator=common_pb2.ModelRef(name=GENERATOR),
        scorer=common_pb2.ModelRef(name=CLASSIFIER),
        judge=common_pb2.ModelRef(name=JUDGE),
        discriminator=common_pb2.ModelRef(name=DISCRIMINATOR),
        classes=list(config.classes),
        restarts=config.restarts,
        optimizer=opt.Optimizer(name=optimizer),
        budget=opt.Budget(unit=opt.BUDGET_UNIT_GENERATOR_CALLS, amount=budget),
        perturbations=config.perturbations,
        seed=config.seed,
    )


def run_search(context: SubmitContext, backend: LocalBackend, spec: opt.LatentSearchSpec) -> tuple[Any, float]:
    """The job kind's own parse, start, steps and result; (JobResult, wall seconds)."""
    kind = get_kind("latent_search")
    parsed = kind.parse(spec, context)
    started = time.perf_counter()
    run = kind.start(parsed, backend, context.settings)
    while not run.done:
        run.step()
    result = run.result()
    return result, time.perf_counter() - started


def summarise(result: Any, seconds: float) -> dict[str, Any]:
    items = [dict(m.values) for m in result.item_metrics]

    def mean(key: str) -> float:
        return statistics.fmean(item[key] for item in items)

    def std(key: str) -> float:
        return statistics.stdev(item[key] for item in items) if len(items) > 1 else 0.0

    return {
        "objective": mean("objective"),
        "objective_std": std("objective"),
        "p10": mean("robustness"),
        "p10_std": std("robustness"),
        "judge_accuracy": mean("judge_correct"),
        "judge_prob": mean("judge_prob"),
        "classifier_accuracy": mean("classifier_correct"),
        "realism": mean("realism"),
        "generator_calls": float(result.metrics["generator_calls"]),
        "seconds": seconds,
        "items": items,
    }


def run_table(config: BenchConfig, context: SubmitContext, backend: LocalBackend, log: Log) -> dict[str, Any]:
    table: dict[str, Any] = {}
    images: dict[str, np.ndarray] = {}
    # The generator's own samples of each class: one draw from the prior, no search (random search, one candidate).
    samples, seconds = run_search(
        context, backend, replace_optimizer(search_spec(config, "random_search", 1), population=1)
    )
    table["samples"] = summarise(samples, seconds)
    for optimizer in config.optimizers:
        log(f"table: {optimizer}, {len(config.classes)} classes x {config.restarts} starts, {config.budget} calls")
        result, seconds = run_search(context, backend, search_spec(config, optimizer, config.budget))
        table[optimizer] = summarise(result, seconds)
        images[optimizer] = from_tensor_proto(result.images.tensor)
        entry = table[optimizer]
        log(
            f"  objective {entry['objective']:.2f}  p10 {entry['p10']:.2f}  judge {entry['judge_accuracy']:.2f}  "
            f"clf {entry['classifier_accuracy']:.2f}  realism {entry['realism']:.2f}  {seconds:.0f} s"
        )
    table["_images"] = images
    return table


def replace_optimizer(spec: opt.LatentSearchSpec, *, population: int) -> opt.LatentSearchSpec:
    spec.optimizer.population_size = population
    return spec


def p10_batched_speedup(context: SubmitContext, backend: LocalBackend, config: BenchConfig) -> dict[str, float]:
    """One result's perturbations: one batched forward of all of them over a forward per perturbation."""
    kind = get_kind("latent_search")
    parsed = kind.parse(search_spec(replace(config, classes=(0,), restarts=1), "adam", 1), context)
    run = kind.start(parsed, backend, context.settings).run  # type: ignore[attr-defined]
    objective = run.objective
    target = torch.tensor([0])
    z = torch.randn(run.models.z_size, generator=torch.Generator().manual_seed(7))

    @torch.no_grad()
    def value(points: Tensor, held: Tensor | None) -> Tensor:
        return objective.value(Latents(points, held), target.expand(len(points))).values

    noise = torch.randn(200, len(z), generator=torch.Generator().manual_seed(3))
    batched_s, looped_s = [], []
    for _ in range(config.speedup_repeats):
        started = time.perf_counter()
        batched = perturbation_values(value, z, target[0], perturbations=200, sigma=0.1, seed=3)
        batched_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        looped = torch.cat([value((z + 0.1 * noise[i])[None], target) for i in range(200)])
        looped_s.append(time.perf_counter() - started)
        if not torch.allclose(batched, looped, atol=1e-3, rtol=1e-4):
            raise AssertionError("batched and looped perturbation values differ")
    return {"perturbations": 200, **_paired(batched_s, looped_s), "load_average_1min": os.getloadavg()[0]}


def _paired(batched: list[float], single: list[float]) -> dict[str, Any]:
    """Medians and the median of the paired ratios: on shared cores the load moves between measurements, and a
    ratio of two measurements taken back to back is steadier than a ratio of two medians."""
    ratios = [b / a for a, b in zip(batched, single, strict=True)]
    return {
        "batched_s": statistics.median(batched),
        "one_per_call_s": statistics.median(single),
        "speedup": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "repeats": len(ratios),
    }


def population_speedup(context: SubmitContext, backend: LocalBackend, config: BenchConfig) -> dict[str, Any]:
    """Whole ask / evaluate / tell steps of one search: the population in one batch over one candidate per call."""
    kind = get_kind("latent_search")
    parsed = kind.parse(search_spec(replace(config, classes=(0,), restarts=1), "adam", 1), context)
    run = kind.start(parsed, backend, context.settings).run  # type: ignore[attr-defined]
    objective, target = run.objective, torch.tensor([0])
    out: dict[str, Any] = {}
    for name in ("cmaes", "ga"):
        population = OPTIMIZERS[name].default_population
        timings: dict[str, list[float]] = {"batched": [], "one_per_call": []}
        for mode in ("batched", "one_per_call") * config.speedup_repeats:
            optimizer = OPTIMIZERS[name](
                searches=1, dimension=run.models.z_size, population=population, budget=10**6, seed=0
            )  # type: ignore[call-arg]
            started = time.perf_counter()
            with torch.no_grad():
                for _ in range(config.population_steps):
                    candidates = optimizer.ask()[0]
                    if mode == "batched":
                        values = objective.value(
                            Latents(candidates, target.expand(population)), target.expand(population)
                        ).values
                    else:
                        values = torch.cat(
                            [objective.value(Latents(c[None], target), target).values for c in candidates]
                        )
                    optimizer.tell(-values[None])
            timings[mode].append((time.perf_counter() - started) / config.population_steps)
        out[name] = {
            "population": population,
            "steps_per_measurement": config.population_steps,
            **_paired(timings["batched"], timings["one_per_call"]),
        }
    return out


def run_basincma(config: BenchConfig, registry: ModelRegistry, log: Log) -> dict[str, Any]:
    models = load_models(registry, GENERATOR, DISCRIMINATOR, CLASSIFIER)
    targets = case_targets("misspecified", models, config.basin_targets)
    out: dict[str, Any] = {
        "targets": list(PHOTOS[: config.basin_targets]),
        "budget_generator_calls": config.basin_budget,
    }
    for optimizer in ("adam", "basincma"):
        log(f"basincma: {optimizer} on {len(targets)} photographs, {config.basin_budget} generator calls per target")
        inversion = InversionConfig(
            optimizer=optimizer,
            criterion="l2+features",
            budget=config.basin_budget,
            budget_unit="generator_calls",
            class_mode=models.class_mode,  # type: ignore[arg-type]
            feature_size=models.feature_size,
            seed=config.seed,
        )
        started = time.perf_counter()
        run = InversionRun(inversion, models.inversion, targets)
        while not run.done:
            run.step()
        results = run.result()
        out[optimizer] = {
            "criterion": [r.criterion for r in results],
            "psnr": [r.psnr for r in results],
            "generator_calls": run.generator_calls,
            "seconds": time.perf_counter() - started,
        }
    wins = [b < a for a, b in zip(out["adam"]["criterion"], out["basincma"]["criterion"], strict=True)]
    out["basincma_wins_fraction"] = sum(wins) / len(wins)
    out["basincma_options"] = {
        "population": 8,
        **optimizer_options("basincma", {}),
        "inversion_adam": "lr 1, /10 at 1/3 and 2/3 with reset (seed 003's defaults); the final phase follows it",
    }
    return out


def save_grid(images: dict[str, np.ndarray], config: BenchConfig, table: dict[str, Any], path: Path) -> None:
    """Rows: optimizers; columns: classes; each cell the best of the class's starts by the objective."""
    rows = []
    for optimizer, batch in images.items():
        items = table[optimizer]["items"]
        row = []
        for c, class_id in enumerate(config.classes):
            starts = range(c * config.restarts, (c + 1) * config.restarts)
            best = max(starts, key=lambda i: items[i]["objective"])
            assert int(items[best]["class_id"]) == class_id
            pixels = ((batch[best].transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
            row.append(Image.fromarray(pixels).resize((64, 64), Image.Resampling.NEAREST))
        rows.append(row)
    grid = Image.new("RGB", (4 + len(config.classes) * 68, 4 + len(rows) * 68), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (4 + c * 68, 4 + r * 68))
    grid.save(path)


def run_benchmark(config: BenchConfig, log: Log) -> dict[str, Any]:
    started = time.perf_counter()
    settings = JobSettings.create(Settings.from_env())
    registry = ModelRegistry(settings.settings.registry_paths)
    context, backend = SubmitContext(settings, registry), LocalBackend(registry)
    results: dict[str, Any] = {
        "benchmark": "latent_search",
        "mode": config.mode,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "models": {
            "generator": GENERATOR,
            "objective": f"{CLASSIFIER} class_logit",
            "judge": JUDGE,
            "realism": DISCRIMINATOR,
        },
        "settings": {
            "classes": list(config.classes),
            "restarts": config.restarts,
            "budget_generator_calls_per_search": config.budget,
            "perturbations": config.perturbations,
            "perturbation_sigma": 0.1,
            "percentile": 10,
            "optimizer_defaults": {
                "adam": "lr 0.05, betas (0, 0.99), /10 at 1/3 and 2/3 with reset",
                "cmaes": "population 15, sigma 0.5",
                "ga": "population 16, 16 bits in [-4, 4], mutation 0.01, crossover 0.5, tournament 3, elitism 1",
            },
        },
    }
    log("p10_batched_speedup")
    results["p10_batched_speedup"] = p10_batched_speedup(context, backend, config)
    log(f"  {results['p10_batched_speedup']['speedup']:.1f}x")
    log("population_speedup")
    results["population_speedup"] = population_speedup(context, backend, config)
    log("  " + ", ".join(f"{k} {v['speedup']:.1f}x" for k, v in results["population_speedup"].items()))
    table = run_table(config, context, backend, log)
    images = table.pop("_images")
    results["table"] = table
    results["source_table"] = {name: {"objective": o, "p10": p} for name, (o, p) in SOURCE.items()}
    ranked = sorted(config.optimizers, key=lambda name: -table[name]["objective"])
    results["ranking"] = {"objective": ranked, "p10": sorted(config.optimizers, key=lambda name: -table[name]["p10"])}
    if config.mode == "full":
        save_grid(images, config, table, GRID)
    results["basincma"] = run_basincma(config, registry, log)
    results["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    results["elapsed_s"] = time.perf_counter() - started
    return results


def _number(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def write_results(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Latent-search benchmark (seed 002).")
    parser.add_argument("--quick", action="store_true", help="smoke run: two classes, tiny budgets")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: bench/results/...)")
    parser.add_argument("--doc-only", action="store_true", help="rewrite docs/latent_search.md from the JSON")
    parser.add_argument("--speedups-only", action="store_true", help="measure the batching speedups again")
    parser.add_argument("--basincma-only", action="store_true", help="run BasinCMA against Adam again")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = QUICK if args.quick else FULL
    output = args.output or RESULTS / ("latent_search_quick.json" if args.quick else "latent_search.json")
    if args.doc_only or args.speedups_only or args.basincma_only:
        results = json.loads(output.read_text())
        if args.basincma_only:  # BasinCMA against Adam again (e.g. after its preset changed) into the same JSON
            registry = ModelRegistry(Settings.from_env().registry_paths)
            results["basincma"] = run_basincma(config, registry, log=lambda s: print(s, flush=True))
            results["basincma"]["measured"] = datetime.now(UTC).isoformat(timespec="seconds")
            write_results(results, output)
            print(f"wrote {output}")
        if args.speedups_only:  # measure the batching figures again (e.g. at a quieter time) into the same JSON
            context = SubmitContext(
                JobSettings.create(Settings.from_env()), ModelRegistry(Settings.from_env().registry_paths)
            )
            backend = LocalBackend(context.catalog)  # type: ignore[arg-type]
            results["p10_batched_speedup"] = p10_batched_speedup(context, backend, config)
            results["population_speedup"] = population_speedup(context, backend, config)
            results["speedups_measured"] = datetime.now(UTC).isoformat(timespec="seconds")
            write_results(results, output)
            print(f"wrote {output}")
    else:
        results = run_benchmark(config, log=lambda s: print(s, flush=True))
        write_results(results, output)
        print(f"wrote {output}")
    if results["mode"] == "full":
        from latent_search_doc import write_doc  # type: ignore[import-not-found]

        write_doc(results, DOC)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
