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
from gansteer_server.data.scenes import CLASS_NAMES, TIME_NAMES, render_scenes
from gansteer_server.models import CARD_FILE, ModelRegistry
from gansteer_server.zoo.train_classifiers import accuracy, images_to_tensor

EVAL_SEED, SECOND_REAL_SEED = 400, 500


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


def evaluate(
    registry_root: Path, docs: Path, results: Path, per_class: int = 1000, set_size: int = 5000
) -> dict[str, Any]:
    registry = ModelRegistry([registry_root])
    generator = registry.load("scenes-gen")
    classifier, judge, alt = (registry.load(n) for n in ("scenes-clf", "scenes-judge", "scenes-clf-alt"))
    features = FeatureSpace(classifier)

    held_out = render_scenes(10_000, seed=EVAL_SEED)
    real = images_to_tensor(held_out.images)
    real_labels, real_times = torch.from_numpy(held_out.labels), torch.from_numpy(held_out.times)
    figures: dict[str, Any] = {
        "classifier_accuracy": accuracy(classifier, real, real_labels),
        "judge_accuracy": accuracy(judge, real, real_labels),
        "alt_classifier_accuracy": accuracy(alt, real, real_times),
    }
    print(f"classifiers: {figures}", flush=True)

    generated = torch.cat([generate(generator, c, per_class, seed=c) for c in range(len(CLASS_NAMES))])
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
        print(f"{name}: {per_class_figures[name]}", flush=True)
    # The second label set as a coverage probe: do generated scenes keep the data's mix of day, dusk and night?
    with torch.no_grad():
        generated_times = torch.cat([alt(generated[i : i + 500]).argmax(1) for i in range(0, len(generated), 500)])
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

    second_real = images_to_tensor(render_scenes(10_000, seed=SECOND_REAL_SEED).images)
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
    figures["samples"] = {"fid": [len(real), len(generated)], "precision_recall": [set_size, set_size], "k": 3}
    figures["per_class"] = per_class_figures
    figures["weights_mb"] = sum(f.stat().st_size for f in registry_root.rglob("*") if f.is_file()) / 2**20
    print(json.dumps({k: v for k, v in figures.items() if k != "per_class"}, indent=1), flush=True)

    docs.mkdir(parents=True, exist_ok=True)
    columns = 10
    save_grid(
        torch.cat([generate(generator, c, columns, seed=1000 + c) for c in range(10)]), 10, docs / "zoo_generated.png"
    )
    real_grid = torch.cat([real[real_labels == c][:columns] for c in range(10)])
    save_grid(real_grid, 10, docs / "zoo_real.png")
    _write_cards(registry, figures)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(figures, indent=2) + "\n")
    (docs / "zoo.md").write_text(render_markdown(figures))
    return figures


def _write_cards(registry: ModelRegistry, figures: dict[str, Any]) -> None:
    """Record the figures in each shipped card (the zoo's own folders; registered versions are otherwise immutable)."""
    generator_keys = [
        k for k in figures if k not in ("classifier_accuracy", "judge_accuracy", "alt_classifier_accuracy")
    ]
    updates = {
        "scenes-gen": {k: figures[k] for k in generator_keys},
        "scenes-clf": {"held_out_accuracy": figures["classifier_accuracy"]},
        "scenes-judge": {"held_out_accuracy": figures["judge_accuracy"]},
        "scenes-clf-alt": {"held_out_accuracy": figures["alt_classifier_accuracy"]},
    }
    for name, metrics in updates.items():
        entry = registry.resolve(name)
        card = dataclasses.replace(entry.card, metrics={**entry.card.metrics, **metrics})
        (entry.folder / CARD_FILE).write_text(card.to_json())


def render_markdown(figures: dict[str, Any]) -> str:
    lines = [
        "# The built-in model zoo",
        "",
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
        f"{figures['alt_classifier_accuracy']:.4f}. Shipped weights: {figures['weights_mb']:.1f} MB.",
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
    lines += [
        "",
        "## Time of day",
        "",
        "The second label set, judged by `scenes-clf-alt`, as a coverage probe the generator was not trained on:",
        "",
        "| time of day | share of generated | share of real |",
        "| --- | --- | --- |",
    ]
    for name, share in figures["time_of_day_share"].items():
        lines.append(f"| {name} | {share['generated']:.3f} | {share['real']:.3f} |")
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    evaluate(args.registry, args.docs, args.results)


if __name__ == "__main__":
    main()
