"""`make zoo-eval`: measure the built-in models and write the figures into their cards, `docs/zoo.md`,
`bench/results/zoo.json` and the sample grids in `docs/`.

Class accuracy alone says little about a generator (a collapsed one scores 100%), so beside the judge's accuracy
this measures coverage in `scenes-clf`'s penultimate features: improved precision and recall, Fréchet distance and
per-class diversity, each beside the same figure for real images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gansteer_server.algorithms.set_metrics import (
    FeatureSpace,
    frechet_distance,
    mean_pairwise_distance,
    precision_recall,
)
from gansteer_server.config import BUILTIN_REGISTRY
from gansteer_server.data.scenes import CLASS_NAMES, TIME_NAMES, Scenes, render_scenes
from gansteer_server.models import CARD_FILE, ModelRegistry
from gansteer_server.zoo.train_classifiers import accuracy, images_to_tensor

EVAL_SEED, SECOND_REAL_SEED = 400, 500
SNAPSHOT_PREFIX = "scenes-gen-step"


@torch.no_grad()
def generate(generator: torch.nn.Module, class_id: int, n: int, seed: int, batch_size: int = 500) -> torch.Tensor:
    torch.manual_seed(seed)
    chunks = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        chunks.append(generator(torch.randn(count, 128), torch.full((count,), class_id)))
    return torch.cat(chunks)


def save_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 2) -> None:
    """Images (rows*cols, 3, H, W) in [-1, 1] -> one PNG, one row per class."""
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    cols = len(array) // rows
    grid = np.concatenate([np.concatenate(list(array[r * cols : (r + 1) * cols]), axis=1) for r in range(rows)])
    image = Image.fromarray(grid)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])


def generate_every_class(generator: torch.nn.Module, per_class: int) -> torch.Tensor:
    """The generated samples every generator figure is measured on: `per_class` of each class in class order."""
    return torch.cat([generate(generator, c, per_class, seed=c) for c in range(len(CLASS_NAMES))])


@dataclasses.dataclass(frozen=True)
class Instruments:
    """What every generator is measured with: the four classifiers and two independent real sets."""

    classifier: torch.nn.Module
    judge: torch.nn.Module
    alt: torch.nn.Module
    judge_alt: torch.nn.Module
    held_out: Scenes
    second_real: torch.Tensor

    @classmethod
    def load(cls, registry: ModelRegistry) -> Instruments:
        names = ("scenes-clf", "scenes-judge", "scenes-clf-alt", "scenes-judge-alt")
        classifier, judge, alt, judge_alt = (registry.load(n) for n in names)
        return cls(
            classifier,
            judge,
            alt,
            judge_alt,
            render_scenes(10_000, seed=EVAL_SEED),
            images_to_tensor(render_scenes(10_000, seed=SECOND_REAL_SEED).images),
        )


def measure_generator(
    generator: torch.nn.Module, instruments: Instruments, per_class: int = 1000, set_size: int = 5000
) -> dict[str, Any]:
    """Every generator figure of docs/zoo.md, each beside the same figure for real images."""
    features = FeatureSpace(instruments.classifier)
    judge, alt = instruments.judge, instruments.alt
    real = images_to_tensor(instruments.held_out.images)
    real_labels = torch.from_numpy(instruments.held_out.labels)
    real_times = torch.from_numpy(instruments.held_out.times)
    generated = generate_every_class(generator, per_class)
    generated_labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(per_class)
    real_features, generated_features = features.embed(real), features.embed(generated)
    per_class_figures: dict[str, dict[str, float]] = {}
    for c, name in enumerate(CLASS_NAMES):
        mine, theirs = generated_labels == c, real_labels == c
        pixel_gen = mean_pairwise_distance(generated[mine], seed=c)
        pixel_real = mean_pairwise_distance(real[theirs], seed=c)
        feature_gen = mean_pairwise_distance(generated_features[mine], seed=c)
        feature_real = mean_pairwise_distance(real_features[theirs], seed=c)
        per_class_figures[name] = {
            "judge_accuracy": accuracy(judge, generated[mine], generated_labels[mine]),
            "pixel_diversity": pixel_gen,
            "pixel_diversity_real": pixel_real,
            "feature_diversity": feature_gen,
            "feature_diversity_real": feature_real,
            "diversity_ratio": feature_gen / feature_real,
            "pixel_diversity_ratio": pixel_gen / pixel_real,
        }
    figures: dict[str, Any] = {}
    # The second label set as a coverage probe: do generated scenes keep the data's mix of day, dusk and night?
    generated_times = predict(alt, generated)
    figures["time_of_day_share"] = {
        name: {
            "generated": float((generated_times == t).float().mean()),
            "real": float((real_times == t).float().mean()),
        }
        for t, name in enumerate(TIME_NAMES)
    }
    figures["generated_class_accuracy"] = float(np.mean([f["judge_accuracy"] for f in per_class_figures.values()]))
    figures["diversity_ratio"] = float(np.mean([f["diversity_ratio"] for f in per_class_figures.values()]))
    figures["diversity_ratio_min"] = float(min(f["diversity_ratio"] for f in per_class_figures.values()))

    second_real = instruments.second_real
    figures["fid_builtin"] = frechet_distance(features, real, generated)
    figures["fid_builtin_real"] = frechet_distance(features, real, second_real)
    rng = np.random.default_rng(0)
    pick_gen = torch.from_numpy(rng.choice(len(generated), set_size, replace=False))
    second_features = features.embed(second_real[:set_size])
    figures["precision_builtin"], figures["recall_builtin"] = precision_recall(
        real_features[:set_size], generated_features[pick_gen]
    )
    figures["precision_builtin_real"], figures["recall_builtin_real"] = precision_recall(
        real_features[:set_size], second_features
    )
    figures["samples"] = _samples(per_class, set_size)
    figures["per_class"] = per_class_figures
    return figures


def time_of_day_judges(generator: torch.nn.Module, instruments: Instruments, per_class: int = 1000) -> dict[str, Any]:
    """How independently `scenes-judge-alt` judges what `scenes-clf-alt` is optimised for: its time-of-day shares
    of the samples of `time_of_day_share` beside `scenes-clf-alt`'s, and how often the two agree. Measured on every
    run (seconds), so the generators' cards need not hold it."""
    real = images_to_tensor(instruments.held_out.images)
    generated = generate_every_class(generator, per_class)
    alt_generated, judge_generated = predict(instruments.alt, generated), predict(instruments.judge_alt, generated)
    return {
        "share_generated": {
            name: {
                "scenes-clf-alt": float((alt_generated == t).float().mean()),
                "scenes-judge-alt": float((judge_generated == t).float().mean()),
            }
            for t, name in enumerate(TIME_NAMES)
        },
        "agreement_real": float(
            (predict(instruments.alt, real) == predict(instruments.judge_alt, real)).float().mean()
        ),
        "agreement_generated": float((alt_generated == judge_generated).float().mean()),
    }


def evaluate(
    registry_root: Path,
    docs: Path,
    results: Path,
    per_class: int = 1000,
    set_size: int = 5000,
    remeasure: bool = False,
) -> dict[str, Any]:
    registry = ModelRegistry([registry_root])
    instruments = Instruments.load(registry)
    real = images_to_tensor(instruments.held_out.images)
    real_labels = torch.from_numpy(instruments.held_out.labels)
    real_times = torch.from_numpy(instruments.held_out.times)
    figures: dict[str, Any] = {
        "classifier_accuracy": accuracy(instruments.classifier, real, real_labels),
        "judge_accuracy": accuracy(instruments.judge, real, real_labels),
        "alt_classifier_accuracy": accuracy(instruments.alt, real, real_times),
        "judge_alt_accuracy": accuracy(instruments.judge_alt, real, real_times),
    }
    print(f"classifiers: {figures}", flush=True)
    # A registered version's weights never change, so a generator measured once with these sample sizes is read
    # back from its card unless `remeasure` (for a change to the measurements themselves).
    samples = _samples(per_class, set_size)

    def measured(ref: str) -> dict[str, Any]:
        card = registry.card(ref)
        if not remeasure and card.metrics.get("samples") == samples:
            return {k: v for k, v in card.metrics.items() if k not in ("weights_mb", "step")}
        return measure_generator(registry.load(ref), instruments, per_class, set_size)

    generator_ref = registry.resolve("scenes-gen").card.ref
    generator = registry.load(generator_ref)
    figures["generator"] = generator_ref
    figures.update(measured(generator_ref))
    figures["time_of_day_judges"] = time_of_day_judges(generator, instruments, per_class)
    figures["weights_mb"] = sum(f.stat().st_size for f in registry_root.rglob("*") if f.is_file()) / 2**20
    print(json.dumps({k: v for k, v in figures.items() if k != "per_class"}, indent=1), flush=True)
    # The training snapshots: weaker generators for tests and forking analyses, with the same samples.
    figures["snapshots"], snapshot_figures = {}, {}
    for card in sorted(registry.list(), key=lambda c: c.extra.get("step", 0)):
        if card.name.startswith(SNAPSHOT_PREFIX):
            snapshot_figures[card.ref] = measured(card.ref)
            figures["snapshots"][card.name] = {"step": card.extra["step"], **_summary(snapshot_figures[card.ref])}
            print(f"{card.name}: {figures['snapshots'][card.name]}", flush=True)

    docs.mkdir(parents=True, exist_ok=True)
    columns = 10
    save_grid(
        torch.cat([generate(generator, c, columns, seed=1000 + c) for c in range(10)]), 10, docs / "zoo_generated.png"
    )
    real_grid = torch.cat([real[real_labels == c][:columns] for c in range(10)])
    save_grid(real_grid, 10, docs / "zoo_real.png")
    _write_cards(registry, figures, snapshot_figures)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(figures, indent=2) + "\n")
    (docs / "zoo.md").write_text(render_markdown(figures))
    return figures


def _samples(per_class: int, set_size: int) -> dict[str, Any]:
    return {"fid": [10_000, per_class * len(CLASS_NAMES)], "precision_recall": [set_size, set_size], "k": 3}


def _summary(figures: dict[str, Any]) -> dict[str, float]:
    """The headline figures of one generator (a snapshot's card and its row in docs/zoo.md)."""
    return {
        "generated_class_accuracy": figures["generated_class_accuracy"],
        "precision_builtin": figures["precision_builtin"],
        "recall_builtin": figures["recall_builtin"],
        "fid_builtin": figures["fid_builtin"],
        "diversity_ratio_min": figures["diversity_ratio_min"],
        "dusk_share": figures["time_of_day_share"]["dusk"]["generated"],
        "samples": figures["samples"],
    }


def _write_cards(registry: ModelRegistry, figures: dict[str, Any], snapshot_figures: dict[str, dict[str, Any]]) -> None:
    """Record the figures in each shipped card (the zoo's own folders; registered versions are otherwise immutable)."""
    not_the_generators = (
        "classifier_accuracy",
        "judge_accuracy",
        "alt_classifier_accuracy",
        "judge_alt_accuracy",
        "time_of_day_judges",
        "generator",
        "snapshots",
    )
    generator_keys = [k for k in figures if k not in not_the_generators]
    updates = {
        figures["generator"]: {k: figures[k] for k in generator_keys},
        **snapshot_figures,
        "scenes-clf": {"held_out_accuracy": figures["classifier_accuracy"]},
        "scenes-judge": {"held_out_accuracy": figures["judge_accuracy"]},
        "scenes-clf-alt": {"held_out_accuracy": figures["alt_classifier_accuracy"]},
        "scenes-judge-alt": {
            "held_out_accuracy": figures["judge_alt_accuracy"],
            "agreement_with_scenes_clf_alt": figures["time_of_day_judges"]["agreement_real"],
        },
    }
    for name, metrics in updates.items():
        entry = registry.resolve(name)
        card = dataclasses.replace(entry.card, metrics={**entry.card.metrics, **metrics})
        (entry.folder / CARD_FILE).write_text(card.to_json())


def render_markdown(figures: dict[str, Any]) -> str:
    lines = [
        "# The built-in model zoo",
        "",
        f"Generator measured: `{figures['generator']}` (what `scenes-gen` resolves to). "
        "Written by `make zoo-eval` (`gansteer_server.zoo.evaluate`); the same figures are in "
        "`bench/results/zoo.json` and in each model's card. `*_builtin` metrics use `scenes-clf`'s penultimate "
        f"features, not Inception. Fréchet distance: {figures['samples']['fid'][0]} real vs "
        f"{figures['samples']['fid'][1]} generated; precision/recall (Kynkäänniemi et al. 2019, k=3): "
        f"{figures['samples']['precision_recall'][0]} vs {figures['samples']['precision_recall'][1]}.",
        "",
        "| figure | generated | real vs real |",
        "| --- | --- | --- |",
        f"| recall_builtin | {figures['recall_builtin']:.3f} | {figures['recall_builtin_real']:.3f} |",
        f"| precision_builtin | {figures['precision_builtin']:.3f} | {figures['precision_builtin_real']:.3f} |",
        f"| fid_builtin | {figures['fid_builtin']:.3f} | {figures['fid_builtin_real']:.3f} |",
        f"| judge accuracy (mean over classes) | {figures['generated_class_accuracy']:.3f} | "
        f"{figures['judge_accuracy']:.3f} |",
        f"| diversity ratio (mean / min over classes) | {figures['diversity_ratio']:.3f} / "
        f"{figures['diversity_ratio_min']:.3f} | 1 |",
        "",
        f"Classifiers on held-out real scenes: scenes-clf {figures['classifier_accuracy']:.4f}, "
        f"scenes-judge {figures['judge_accuracy']:.4f}, scenes-clf-alt (time of day) "
        f"{figures['alt_classifier_accuracy']:.4f}, scenes-judge-alt (time of day) "
        f"{figures['judge_alt_accuracy']:.4f}. Shipped weights: {figures['weights_mb']:.1f} MB.",
        "",
        "## Per class",
        "",
        "Diversity is the mean distance of 200 random pairs of one class, in `scenes-clf` features and in pixels; "
        "the ratio is generated over real. Classes with a low ratio are where the generator is less diverse than "
        "the data (embedding AM works on them). A ratio above 1 does not mean more variety than the data: "
        "samples off the data's manifold (artefacts) spread out in the classifier's features, so read it beside "
        "precision.",
        "",
        "| class | judge accuracy | diversity ratio (features) | diversity ratio (pixels) |",
        "| --- | --- | --- | --- |",
    ]
    for name, f in figures["per_class"].items():
        lines.append(
            f"| {name} | {f['judge_accuracy']:.3f} | {f['diversity_ratio']:.3f} | {f['pixel_diversity_ratio']:.3f} |"
        )
    judges = figures["time_of_day_judges"]
    lines += [
        "",
        "## Time of day",
        "",
        "The second label set, judged by `scenes-clf-alt`, as a coverage probe the generator was not trained on; "
        "beside it the same samples judged by `scenes-judge-alt` (another architecture and seed, the judge of jobs "
        "that optimise against `scenes-clf-alt`). The two agree on "
        f"{judges['agreement_real']:.4f} of the held-out real scenes and {judges['agreement_generated']:.4f} of the "
        "generated ones:",
        "",
        "| time of day | share of generated (scenes-clf-alt) | share of generated (scenes-judge-alt) | share of real |",
        "| --- | --- | --- | --- |",
    ]
    for name, share in figures["time_of_day_share"].items():
        judged = judges["share_generated"][name]["scenes-judge-alt"]
        lines.append(f"| {name} | {share['generated']:.3f} | {judged:.3f} | {share['real']:.3f} |")
    if figures["snapshots"]:
        lines += [
            "",
            "## Training snapshots",
            "",
            "Weaker generators from early in training (see docs/zoo_training.md), for tests and analyses that need "
            "one; same samples and sizes as above.",
            "",
            "| model | step | judge accuracy | precision_builtin | recall_builtin | fid_builtin | "
            "diversity ratio min | dusk share |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, f in figures["snapshots"].items():
            lines.append(
                f"| {name} | {f['step']:,} | {f['generated_class_accuracy']:.3f} | {f['precision_builtin']:.3f} | "
                f"{f['recall_builtin']:.3f} | {f['fid_builtin']:.3f} | {f['diversity_ratio_min']:.3f} | "
                f"{f['dusk_share']:.3f} |"
            )
    lines += [
        "",
        "## Samples",
        "",
        "Generated (one row per class, in the order of the table):",
        "",
        "![generated](zoo_generated.png)",
        "",
        "Real:",
        "",
        "![real](zoo_real.png)",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--registry", type=Path, default=BUILTIN_REGISTRY)
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--results", type=Path, default=Path("bench/results/zoo.json"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="only print the headline figures of a GAN training checkpoint"
    )
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--set-size", type=int, default=5000)
    parser.add_argument("--remeasure", action="store_true", help="measure generators whose cards hold figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint is None:
        evaluate(args.registry, args.docs, args.results, args.per_class, args.set_size, args.remeasure)
        return
    from gansteer_server.zoo.build import export_gan
    from gansteer_server.zoo.train_gan import GanTrainingConfig

    generator, _ = export_gan(args.checkpoint, GanTrainingConfig())
    figures = measure_generator(
        generator, Instruments.load(ModelRegistry([args.registry])), args.per_class, args.set_size
    )
    print(json.dumps(_summary(figures)), flush=True)


if __name__ == "__main__":
    main()
