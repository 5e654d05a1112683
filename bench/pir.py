"""PIR tuning benchmark (seed 000, sections 3-4 and appendix A.3) on the built-in zoo, CPU-sized.

    python bench/pir.py            # full run: about 30-40 minutes on 2 shared cores
    python bench/pir.py --quick    # smoke run: a few minutes, writes pir_quick.json only

Writes `bench/results/pir.json` and, with the full run, `docs/pir.md`, `docs/pir_effect_sizes.png` and
`docs/pir_colours.png`. Every figure comes from the same code the `pir_estimator` and `pir_tuning` jobs run
(`algorithms/pir/`), called in process without Celery. For each of 8 objectives (3 single colours, 2 left/right
colour splits, 1 thirds split, 1 filter and 20 filters of scenes-clf's stage3, standing in for VGG-16's layers):

1. collect: 1,000 images of scenes-gen@1 (seeded latents, uniform classes), each "shown" 1,000 times: interactions ~
   Binomial(1000, true rate) (section 2.2); the table's share of rates below one bin width is `near_zero_share`.
2. estimators: two PIR estimators (scenes-clf-alt's backbone, a 100-bin head, Adam 5e-4, 10 % held out) on the two
   disjoint halves of the table; the first is optimised, the second is the guard's check.
3. tuning: the generator continues its hinge-loss GAN training against scenes-disc on rendered scenes with
   - w_PIR * E[R(G(z))] (temperature 0.01) and the guards: the pixel anchor to the frozen generator and early stopping
   on the check estimator.
4. evaluation on latents no estimator saw: 1,000 images before and 1,000 after (independent seeds) scored by the
   true objective (and the observed, binomially noised one): Welch's one-sided t-test, Cohen's d (pooled sd), the
   99.9 % CI, Holm across the 8 objectives; beside them scenes-judge accuracy on the conditioned class (a network
   neither the objective, the estimator nor the guard uses), fid_builtin against 2,000 rendered scenes,
   lpips_builtin (200 pairs) and colour entropy.
5. guard: the same estimators, tuned without guards for twice the steps; round 2 (A.3): 1,000 new images of the
   tuned generator join the table, both estimators continue training on the union, the tuned generator is tuned
   again; effect sizes against the original generator.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from gansteer_server.algorithms.metrics import FeatureSpace, fid_builtin, lpips_builtin
from gansteer_server.algorithms.metrics.colour import colour_entropy
from gansteer_server.algorithms.metrics.stats import compare, holm
from gansteer_server.algorithms.pir.estimator import EstimatorConfig, EstimatorTraining, expected_rate
from gansteer_server.algorithms.pir.interactions import near_zero_share, simulate_interactions
from gansteer_server.algorithms.pir.tuning import PIRTuning, TuningConfig, TuningModels
from gansteer_server.algorithms.scorers import ScoringModels, compute_output
from gansteer_server.config import Settings
from gansteer_server.data.scenes import render_scenes
from gansteer_server.models import ModelRegistry
from gansteer_server.models.architectures import build_architecture

ROOT = Path(__file__).resolve().parent.parent
GEN, DISC, OBJECTIVE_NET, BACKBONE, JUDGE = (
    "scenes-gen@1",
    "scenes-disc@1",
    "scenes-clf@1",
    "scenes-clf-alt@1",
    "scenes-judge@1",
)
#: name -> (scorer output, params, group); the filters are scenes-clf's stage3 (64 filters), standing in for VGG-16.
OBJECTIVES: dict[str, tuple[str, dict[str, Any], str]] = {
    "red": ("colour_single", {"colour": "red"}, "single colour"),
    "green": ("colour_single", {"colour": "green"}, "single colour"),
    "blue": ("colour_single", {"colour": "blue"}, "single colour"),
    "red|blue": ("colour_two", {"left": "red", "right": "blue"}, "two colours"),
    "green|red": ("colour_two", {"left": "green", "right": "red"}, "two colours"),
    "green|blue|red": ("colour_three", {"left": "green", "middle": "blue", "right": "red"}, "three colours"),
    "scenes-clf stage3 k=1": ("filter_norm_ratio", {"layer": "stage3", "k": 1, "seed": 0}, "filters (VGG stand-in)"),
    "scenes-clf stage3 k=20": ("filter_norm_ratio", {"layer": "stage3", "k": 20, "seed": 0}, "filters (VGG stand-in)"),
}
COLLECT_SEED, PRE_SEED, POST_SEED, ROUND2_SEED = 1, 10_000, 20_000, 30_000
D_REAL_SEED, FID_REAL_SEED = 321, 500


@dataclass(frozen=True)
class Sizes:
    images: int = 1000  # the seed's data set size
    impressions: int = 1000
    epochs: int = 10
    tune_steps: int = 100
    batch_size: int = 16
    learning_rate: float = 5e-5
    pir_weight: float = 10.0
    anchor_weight: float = 20.0
    check_every: int = 25
    patience: int = 2
    eval_images: int = 1000
    real_for_d: int = 4000
    real_for_fid: int = 2000
    round2_epochs: int = 5
    unguarded_factor: int = 2
    round2: tuple[str, ...] = ("red", "scenes-clf stage3 k=1")
    guard: tuple[str, ...] = ("red",)


QUICK = Sizes(
    images=200,
    impressions=1000,
    epochs=2,
    tune_steps=10,
    check_every=5,
    eval_images=200,
    real_for_d=500,
    real_for_fid=500,
    round2_epochs=1,
    round2=("red",),
    guard=("red",),
)


def to_images(uint8: np.ndarray) -> Tensor:
    return torch.from_numpy(uint8).permute(0, 3, 1, 2).float().div(127.5).sub(1)


class Bench:
    def __init__(self, sizes: Sizes) -> None:
        self.sizes = sizes
        self.registry = ModelRegistry(Settings().registry_paths)
        self.generator = self._frozen(GEN)
        self.discriminator = self.registry.load(DISC)
        self.objective_net = self._frozen(OBJECTIVE_NET)
        self.judge = self._frozen(JUDGE)
        self.backbone_card = self.registry.card(BACKBONE)
        self.backbone = self.registry.load(BACKBONE)
        self.features = FeatureSpace.from_registry(self.registry, OBJECTIVE_NET)
        d_real = render_scenes(sizes.real_for_d, seed=D_REAL_SEED)
        self.real_images, self.real_labels = to_images(d_real.images), torch.from_numpy(d_real.labels).long()
        self.fid_real = to_images(render_scenes(sizes.real_for_fid, seed=FID_REAL_SEED).images)

    def _frozen(self, ref: str) -> nn.Module:
        module = self.registry.load(ref).eval()
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        return module

    # ---- pieces ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, generator: nn.Module, seed: int, n: int) -> tuple[Tensor, Tensor]:
        stream = torch.Generator().manual_seed(seed)
        z = torch.randn(n, 128, generator=stream)
        c = torch.randint(10, (n,), generator=stream)
        generator.eval()
        return torch.cat([generator(z[i : i + 250], c[i : i + 250]) for i in range(0, n, 250)]), c

    @torch.no_grad()
    def true_rate(self, name: str, images: Tensor) -> Tensor:
        output, params, _ = OBJECTIVES[name]
        models = ScoringModels(feature_extractor=self.objective_net)
        return torch.cat(
            [compute_output(output, images[i : i + 500], models, params) for i in range(0, len(images), 500)]
        )

    def collect(self, name: str, generator: nn.Module, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        images, _ = self.sample(generator, seed, self.sizes.images)
        true = self.true_rate(name, images)
        observed = simulate_interactions(true, self.sizes.impressions, seed).float() / self.sizes.impressions
        return images, observed, true

    def new_estimator(self) -> nn.Module:
        estimator = build_architecture(
            "pir_estimator",
            backbone="scenes_classifier",
            backbone_kwargs=self.backbone_card.architecture_kwargs,
            bins=100,
        )
        estimator.backbone.load_state_dict(self.backbone.state_dict())
        return estimator

    def train_pair(
        self, images: Tensor, rates: Tensor, epochs: int, start: list[nn.Module] | None = None
    ) -> tuple[list[nn.Module], list[dict[str, float]]]:
        """The main estimator on even rows, the check estimator on odd rows (disjoint halves)."""
        estimators, reports = [], []
        for half in (0, 1):
            rows = torch.arange(half, len(images), 2)
            estimator = self.new_estimator() if start is None else copy.deepcopy(start[half])
            for parameter in estimator.parameters():
                parameter.requires_grad_(True)
            training = EstimatorTraining(
                estimator, images[rows], rates[rows], EstimatorConfig(epochs=epochs, seed=half)
            )
            while not training.done:
                training.step()
            reports.append(
                {"held_out_loss": training.best_loss, "held_out_mae": training.held_out_error(), "images": len(rows)}
            )
            estimators.append(training.finish())
        return estimators, reports

    def tune(
        self, generator: nn.Module, discriminator: nn.Module, estimators: list[nn.Module], guarded: bool, steps: int
    ) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
        tuned, disc = copy.deepcopy(generator), copy.deepcopy(discriminator)
        for module in (tuned, disc):
            for parameter in module.parameters():
                parameter.requires_grad_(True)
        sizes = self.sizes
        config = TuningConfig(
            pir_weight=sizes.pir_weight,
            learning_rate=sizes.learning_rate,
            steps=steps,
            batch_size=sizes.batch_size,
            anchor_weight=sizes.anchor_weight if guarded else 0.0,
            check_every=sizes.check_every if guarded else 0,
            patience=sizes.patience,
        )
        models = TuningModels(
            generator=tuned,
            frozen=self.generator,
            discriminator=disc,
            estimator=estimators[0],
            real_images=self.real_images,
            real_labels=self.real_labels,
            latent_size=128,
            num_classes=10,
            check_estimator=estimators[1],
        )
        run = PIRTuning(models, config)
        run.start()
        while not run.done:
            run.step()
        report = {
            "steps_run": run.step_count,
            "stopped_early": run.stopped_early,
            "kept_step": run.best_step if guarded else run.step_count,
            "checks": run.checks,
            "config": asdict(config),
        }
        for parameter in tuned.parameters():
            parameter.requires_grad_(False)
        return tuned.eval(), disc, report

    @torch.no_grad()
    def describe(self, images: Tensor, classes: Tensor) -> dict[str, float]:
        predicted = torch.cat([self.judge(images[i : i + 500]).argmax(1) for i in range(0, len(images), 500)])
        return {
            "judge_accuracy": float((predicted == classes).double().mean()),
            "fid_builtin": fid_builtin(self.fid_real, images, self.features).value,
            "lpips_builtin": lpips_builtin(images, self.features, pairs=200).value,
            "colour_entropy": colour_entropy(images).value,
        }

    @torch.no_grad()
    def estimate(self, estimators: list[nn.Module], images: Tensor) -> tuple[float, float]:
        return tuple(float(expected_rate(e(images), 0.01).mean()) for e in estimators)  # type: ignore[return-value]

    def evaluate(
        self, name: str, pre: tuple[Tensor, Tensor], post_generator: nn.Module, estimators: list[nn.Module]
    ) -> dict[str, Any]:
        post = self.sample(post_generator, POST_SEED, self.sizes.eval_images)
        true_pre, true_post = self.true_rate(name, pre[0]), self.true_rate(name, post[0])
        true = compare(true_pre.numpy(), true_post.numpy())
        noisy_pre = simulate_interactions(true_pre, self.sizes.impressions, PRE_SEED).numpy() / self.sizes.impressions
        noisy_post = (
            simulate_interactions(true_post, self.sizes.impressions, POST_SEED).numpy() / self.sizes.impressions
        )
        observed = compare(noisy_pre, noisy_post)
        before, after = self.describe(*pre), self.describe(*post)
        est_pre, check_pre = self.estimate(estimators, pre[0])
        est_post, check_post = self.estimate(estimators, post[0])
        return {
            "p_value": true.p_value,
            "cohens_d": true.cohens_d,
            "ci_999": list(true.ci),
            "significant": true.significant,
            "true": true.to_dict(),
            "observed": observed.to_dict(),
            "estimated": {"pre": est_pre, "post": est_post, "change": est_post - est_pre},
            "check_estimated": {"pre": check_pre, "post": check_post, "change": check_post - check_pre},
            "before": before,
            "after": after,
            "judge_accuracy_drop": before["judge_accuracy"] - after["judge_accuracy"],
            "fid_builtin_ratio": after["fid_builtin"] / before["fid_builtin"],
            "lpips_builtin_ratio": after["lpips_builtin"] / before["lpips_builtin"],
            "colour_entropy_change": after["colour_entropy"] - before["colour_entropy"],
        }, post[0]

    # ---- the benchmark -------------------------------------------------------------------------------------------

    def guard_only(self, names: list[str]) -> dict[str, Any]:
        """The guard comparison alone, for objectives the main run did not ablate: collect, train both estimators,
        tune with and without the guards from the same estimators, evaluate both."""
        sizes = self.sizes
        pre = self.sample(self.generator, PRE_SEED, sizes.eval_images)
        guard: dict[str, Any] = {}
        for name in names:
            started = time.perf_counter()
            images, observed, _ = self.collect(name, self.generator, COLLECT_SEED)
            estimators, _ = self.train_pair(images, observed, sizes.epochs)
            runs = {}
            for label, guarded, steps in (
                ("guarded", True, sizes.tune_steps),
                ("unguarded", False, sizes.unguarded_factor * sizes.tune_steps),
            ):
                tuned, _, tuning = self.tune(self.generator, self.discriminator, estimators, guarded, steps)
                result, _ = self.evaluate(name, pre, tuned, estimators)
                runs[label] = _guard_view(result) | {"steps_run": tuning["steps_run"], "kept_step": tuning["kept_step"]}
                print(
                    f"guard {name} {label}: d {result['cohens_d']:.2f} est {result['estimated']['change']:+.4f}"
                    f" fid x{result['fid_builtin_ratio']:.2f}",
                    flush=True,
                )
            guard[name] = runs | {"seconds": time.perf_counter() - started, "separate_run": True}
        return guard

    def run(self) -> dict[str, Any]:
        sizes = self.sizes
        pre = self.sample(self.generator, PRE_SEED, sizes.eval_images)
        objectives: dict[str, Any] = {}
        keep: dict[str, Any] = {}
        grids: dict[str, tuple[Tensor, Tensor]] = {}
        for name in OBJECTIVES:
            started = time.perf_counter()
            images, observed, true = self.collect(name, self.generator, COLLECT_SEED)
            estimators, reports = self.train_pair(images, observed, sizes.epochs)
            trained = time.perf_counter()
            tuned, disc, tuning = self.tune(self.generator, self.discriminator, estimators, True, sizes.tune_steps)
            tuned_at = time.perf_counter()
            result, post_images = self.evaluate(name, pre, tuned, estimators)
            objectives[name] = result | {
                "group": OBJECTIVES[name][2],
                "output": OBJECTIVES[name][0],
                "params": OBJECTIVES[name][1],
                "near_zero_share": near_zero_share(observed, 100),
                "data": {"mean": float(observed.mean()), "std": float(observed.std()), "true_std": float(true.std())},
                "estimators": reports,
                "tuning": tuning,
                "seconds": {
                    "estimators": trained - started,
                    "tuning": tuned_at - trained,
                    "evaluation": time.perf_counter() - tuned_at,
                },
            }
            keep[name] = (images, observed, estimators, tuned, disc)
            grids[name] = (pre[0][:8], post_images[:8])
            print(
                f"{name}: d {result['cohens_d']:.2f} p {result['p_value']:.2g} fid x{result['fid_builtin_ratio']:.2f}"
                f" judge -{result['judge_accuracy_drop']:.3f} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        adjusted = holm({name: value["p_value"] for name, value in objectives.items()})
        for name, value in objectives.items():
            value["holm"] = adjusted[name]

        guard: dict[str, Any] = {}
        for name in sizes.guard:
            images, observed, estimators, _, _ = keep[name]
            started = time.perf_counter()
            steps = sizes.unguarded_factor * sizes.tune_steps
            unguarded, _, tuning = self.tune(self.generator, self.discriminator, estimators, False, steps)
            result, _ = self.evaluate(name, pre, unguarded, estimators)
            guarded = objectives[name]
            guard[name] = {
                "guarded": _guard_view(guarded),
                "unguarded": _guard_view(result) | {"steps_run": tuning["steps_run"]},
                "seconds": time.perf_counter() - started,
            }
            print(
                f"guard {name}: unguarded d {result['cohens_d']:.2f} est +{result['estimated']['change']:.3f}"
                f" fid x{result['fid_builtin_ratio']:.2f}",
                flush=True,
            )

        round_2: dict[str, Any] = {}
        for name in sizes.round2:
            images, observed, estimators, tuned, disc = keep[name]
            started = time.perf_counter()
            new_images, new_observed, _ = self.collect(name, tuned, ROUND2_SEED)
            union_images = torch.cat([images, new_images])
            union_rates = torch.cat([observed, new_observed])
            retrained, reports = self.train_pair(union_images, union_rates, sizes.round2_epochs, start=estimators)
            tuned2, _, tuning = self.tune(tuned, disc, retrained, True, sizes.tune_steps)
            result, _ = self.evaluate(name, pre, tuned2, retrained)
            round_2[name] = {
                "round_1": {"cohens_d": objectives[name]["cohens_d"], "p_value": objectives[name]["p_value"]},
                "round_2": result | {"estimators": reports, "tuning": tuning},
                "seconds": time.perf_counter() - started,
            }
            print(f"round 2 {name}: d {objectives[name]['cohens_d']:.2f} -> {result['cohens_d']:.2f}", flush=True)
        self.grids = grids
        return {"objectives": objectives, "guard": guard, "round_2": round_2}


def _hacked(view: dict[str, Any]) -> str:
    """Why a run counts as hacking its estimator (estimated PIR up while the true PIR did not rise significantly,
    or realism collapsed: fid_builtin more than doubled or judge accuracy down by more than 0.1), or ''."""
    if view["estimated_change"] <= 0:
        return ""
    reasons = []
    if not (view["p_value"] < 0.001 and view["cohens_d"] > 0):
        reasons.append(f"true PIR flat (d {view['cohens_d']:.2f}, p {view['p_value']:.2g})")
    if view["fid_builtin_ratio"] > 2:
        reasons.append(f"fid_builtin x{view['fid_builtin_ratio']:.2f}")
    if view["judge_accuracy_drop"] > 0.1:
        reasons.append(f"judge accuracy -{view['judge_accuracy_drop']:.3f}")
    if not reasons:
        return ""
    size = "" if view["estimated_change"] >= 0.01 else ", under one bin width: weak evidence"
    return f"hacked the estimator (estimated {view['estimated_change']:+.4f}{size}; " + ", ".join(reasons) + ")"


def _guard_view(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("cohens_d", "p_value", "judge_accuracy_drop", "fid_builtin_ratio", "lpips_builtin_ratio")
    return {key: result[key] for key in keys} | {
        "estimated_change": result["estimated"]["change"],
        "check_estimated_change": result["check_estimated"]["change"],
        "true_change": result["true"]["mean_post"] - result["true"]["mean_pre"],
        "colour_entropy_change": result["colour_entropy_change"],
    }


# ---- figures -------------------------------------------------------------------------------------------------------


def _tile(images: Tensor, scale: int = 2) -> Image.Image:
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return Image.fromarray(np.concatenate(list(pixels), axis=1)).resize(
        (pixels.shape[2] * len(pixels) * scale, pixels.shape[1] * scale), Image.NEAREST
    )


def colour_grid(grids: dict[str, tuple[Tensor, Tensor]], path: Path) -> None:
    """One row per colour objective: 8 samples before | 8 after (random draws, not picked)."""
    names = [name for name in grids if OBJECTIVES[name][0].startswith("colour")]
    rows = [(name, _tile(before), _tile(after)) for name, (before, after) in grids.items() if name in names]
    width = 130 + rows[0][1].width * 2 + 10
    height = rows[0][1].height
    canvas = Image.new("RGB", (width, height * len(rows) + 20), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((130, 4), "before", fill="black")
    draw.text((140 + rows[0][1].width, 4), "after", fill="black")
    for i, (name, before, after) in enumerate(rows):
        y = 20 + i * height
        draw.text((4, y + height // 2 - 6), name, fill="black")
        canvas.paste(before, (130, y))
        canvas.paste(after, (140 + before.width, y))
    canvas.save(path)


def effect_plot(objectives: dict[str, Any], path: Path) -> None:
    """Fig. 2 of the seed: Cohen's d per objective, grouped; non-significant points faded."""
    width, height, left, top, bottom = 760, 360, 60, 20, 110
    values = [value["cohens_d"] for value in objectives.values()]
    low, high = min(0.0, *values) - 0.2, max(0.5, *values) + 0.2
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    def y_of(value: float) -> float:
        return top + (high - value) / (high - low) * (height - top - bottom)

    draw.line([(left, y_of(0)), (width - 10, y_of(0))], fill=(150, 150, 150))
    for tick in np.arange(np.ceil(low * 2) / 2, high, 0.5):
        draw.text((5, y_of(tick) - 6), f"{tick:+.1f}", fill="black")
        draw.line([(left - 4, y_of(tick)), (left, y_of(tick))], fill="black")
    draw.text((5, 2), "Cohen's d (true PIR, after - before)", fill="black")
    colours = {"single colour": (200, 40, 40), "two colours": (40, 120, 200), "three colours": (40, 160, 80)}
    step = (width - left - 20) / len(objectives)
    for i, (name, value) in enumerate(objectives.items()):
        x = left + step * (i + 0.5)
        colour = colours.get(value["group"], (120, 60, 160))
        if not value["significant"]:
            colour = tuple(int(255 - (255 - c) * 0.3) for c in colour)
        y = y_of(value["cohens_d"])
        draw.ellipse([(x - 6, y - 6), (x + 6, y + 6)], fill=colour)
        label = Image.new("RGB", (bottom - 5, 14), "white")
        ImageDraw.Draw(label).text((0, 0), name[:22], fill="black")
        canvas.paste(label.rotate(90, expand=True), (int(x - 7), height - bottom + 5))
    canvas.save(path)


# ---- the page ------------------------------------------------------------------------------------------------------


def write_doc(report: dict[str, Any], path: Path) -> None:
    sizes, objectives = report["sizes"], report["objectives"]
    significant = [name for name, value in objectives.items() if value["significant"]]
    passing = [
        name
        for name in significant
        if objectives[name]["judge_accuracy_drop"] <= 0.1 and objectives[name]["fid_builtin_ratio"] <= 2.0
    ]
    lines = [
        "# PIR tuning on the built-in zoo (seed 000)",
        "",
        "Generated by `bench/pir.py` (figures in `bench/results/pir.json`); method and choices below the tables.",
        f"Machine: {report['machine']}, torch threads {report['torch_threads']}, "
        f"total {report['seconds'] / 60:.1f} min.",
        "",
        f"**{len(significant)} of {len(objectives)} objectives improve significantly** (Welch one-sided "
        f"p < 0.001 on the true PIR, d > 0); {len(passing)} of them also keep judge accuracy within 0.1 and "
        "fid_builtin within x2.",
        "",
        "![effect sizes](pir_effect_sizes.png)",
        "",
        "| objective | d | p (Welch, one-sided) | Holm adj. p | 99.9% CI of the change | observed d | est. change "
        "| judge acc. before -> after | fid_builtin x | lpips_builtin x | colour entropy change | near-zero share "
        "| data sd | stopped at |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in objectives.items():
        lines.append(
            f"| {name} | {v['cohens_d']:.2f} | {v['p_value']:.2g} | {v['holm']['adjusted']:.2g} "
            f"| [{v['ci_999'][0]:+.4f}, {v['ci_999'][1]:+.4f}] | {v['observed']['cohens_d']:.2f} "
            f"| {v['estimated']['change']:+.4f} "
            f"| {v['before']['judge_accuracy']:.3f} -> {v['after']['judge_accuracy']:.3f} "
            f"| {v['fid_builtin_ratio']:.2f} | {v['lpips_builtin_ratio']:.2f} | {v['colour_entropy_change']:+.2f} "
            f"| {v['near_zero_share']:.3f} | {v['data']['std']:.3f} "
            f"| {v['tuning']['kept_step']}/{v['tuning']['steps_run']} |"
        )
    failed = [name for name in objectives if name not in passing]
    if passing and failed:
        most_zero = max(((n, v["near_zero_share"]) for n, v in objectives.items()), key=lambda item: item[1])
        spread = {label: float(np.mean([objectives[n]["data"]["std"] for n in names]))
                  for label, names in (("passing", passing), ("failing", failed))}  # fmt: skip
        mae = {label: float(np.mean([objectives[n]["estimators"][0]["held_out_mae"] / objectives[n]["data"]["std"]
                                     for n in names]))
               for label, names in (("passing", passing), ("failing", failed))}  # fmt: skip
        lines += [
            "",
            f"As the seed found (appendix A.2), the spread of the collected rates predicts success: the data's sd "
            f"averages {spread['passing']:.3f} where tuning succeeded and {spread['failing']:.3f} where it failed. "
            f"The estimator's held-out error is {mae['passing']:.2f} of the data's sd on the first and "
            f"{mae['failing']:.2f} on the second: where tuning failed, the estimator had learned less of the rate. "
            f"The largest near-zero share here is {most_zero[1]:.1%} ({most_zero[0]}), so the seed's other "
            "predictor (many rates under one bin width) does not separate them.",
        ]
    lines += [
        "",
        "Objectives that fail a bar: "
        + (
            ", ".join(
                f"{name} (d {objectives[name]['cohens_d']:.2f}, p {objectives[name]['p_value']:.2g}, near-zero share "
                f"{objectives[name]['near_zero_share']:.3f}, judge drop {objectives[name]['judge_accuracy_drop']:.3f}, "
                f"fid x{objectives[name]['fid_builtin_ratio']:.2f})"
                for name in failed
            )
            or "none"
        )
        + ".",
        "",
        "Sample images, 8 random draws before | 8 after (independent latents on each side, not picked):",
        "",
        "![colour objectives before and after](pir_colours.png)",
        "",
        "## Guards",
        "",
        "The same estimators, tuned without the anchor and without early stopping for "
        f"{sizes['unguarded_factor']}x the steps. `est.` is the optimised estimator's change on the evaluation "
        "images, `check` the disjoint-half estimator's, `true` the objective's.",
        "",
        "| objective | run | d (true) | true change | est. change | check change | judge drop | fid_builtin x "
        "| lpips_builtin x | colour entropy change |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in report["guard"].items():
        for label in ("guarded", "unguarded"):
            g = runs[label]
            shown = f"{name} (separate run)" if runs.get("separate_run") else name
            lines.append(
                f"| {shown} | {label} | {g['cohens_d']:.2f} | {g['true_change']:+.4f} | {g['estimated_change']:+.4f} "
                f"| {g['check_estimated_change']:+.4f} | {g['judge_accuracy_drop']:.3f} | {g['fid_builtin_ratio']:.2f} "
                f"| {g['lpips_builtin_ratio']:.2f} | {g['colour_entropy_change']:+.2f} |"
            )
    for name, runs in report["guard"].items():
        verdicts = {label: _hacked(runs[label]) for label in ("guarded", "unguarded")}
        lines += [
            "",
            f"{name}: unguarded {verdicts['unguarded'] or 'not hacked by this test'}; guarded "
            f"{verdicts['guarded'] or 'not hacked by this test'}. "
            + (
                "The guard demonstrably matters here."
                if verdicts["unguarded"] and not verdicts["guarded"]
                else "This run does not show the guard mattering (see the figures)."
            ),
        ]
    lines += [
        "",
        "## Round 2 (appendix A.3)",
        "",
        "1,000 images of the tuned generator, scored with the same noise, join the table; both estimators continue "
        f"from round 1 for {sizes['round2_epochs']} epochs on the union (halves kept disjoint), and the tuned "
        "generator is tuned again with the same guards. Effect sizes against the original generator's images.",
        "",
        "| objective | d round 1 | d round 2 | p round 2 | judge drop round 2 | fid_builtin x round 2 |",
        "|---|---|---|---|---|---|",
    ]
    for name, value in report["round_2"].items():
        r2 = value["round_2"]
        lines.append(
            f"| {name} | {value['round_1']['cohens_d']:.2f} | {r2['cohens_d']:.2f} | {r2['p_value']:.2g} "
            f"| {r2['judge_accuracy_drop']:.3f} | {r2['fid_builtin_ratio']:.2f} |"
        )
    kept = [name for name, value in report["round_2"].items() if value["round_2"]["tuning"]["kept_step"] == 0]
    if kept:
        lines += [
            "",
            f"In round 2 of {', '.join(kept)} the retrained check estimator rated no tuning step above the round-1 "
            "generator, so the guard kept it: round 2 adds nothing here, like the seed's mixed second iteration.",
        ]
    lines += ["", METHOD.format(**sizes), USAGE]
    path.write_text("\n".join(lines) + "\n")


METHOD = """## Method and the sizes chosen

- **Statistics** (`algorithms/metrics/stats.py`): Welch's t-test is `scipy.stats.ttest_ind(post, pre,
  equal_var=False, alternative="greater")` (one-sided: did tuning raise the rate), alpha = 0.001. Cohen's
  d = (mean(post) - mean(pre)) / s_pooled, s_pooled = sqrt(((n1 - 1) s1^2 + (n2 - 1) s2^2) / (n1 + n2 - 2)) with
  sample standard deviations (ddof 1), i.e. standardised by both sets' spread as the seed says. The 99.9 % interval
  is Welch's two-sided interval of mean(post) - mean(pre). Holm's step-down correction across the 8 objectives is
  reported beside the raw p-values (`holm` in the JSON); "significant" uses the raw p-value as the seed did.
- **Data**: {images} images x {impressions} impressions (the seed's sizes), interactions ~ Binomial. The true rates
  are the scorer outputs `colour_single`, `colour_two`, `colour_three` and `filter_norm_ratio` (scenes-clf's stage3,
  64 filters; filters sampled with seed 0), the scoring service's registered objectives.
- **Estimator** (appendix C.3): scenes-clf-alt (a classifier of the time of day, not the objective's network)
  as the pretrained backbone, its penultimate features into a 100-bin head, cross-entropy on the bin of the
  observed rate, Adam 5e-4, batch 64, {epochs} epochs, 10 % of each half held out (the weights with the lowest held-out
  loss are kept), temperature 0.01 at use. Two estimators on the disjoint halves of the table (even/odd rows).
- **Tuning**: hinge GAN loss against scenes-disc on rendered scenes (the zoo's own loss), minus
  w_PIR * E[R(G(z))] with w_PIR = {pir_weight}, plus the anchor {anchor_weight} * mean squared pixel distance to the
  frozen generator's image of the same latent; Adam (0, 0.999) at {learning_rate} for the generator and 4x for the
  discriminator, batch {batch_size}, {tune_steps} steps; every {check_every} steps the check estimator scores 256 fixed
  probe latents and the best weights are kept, stopping after {patience} checks without a new best.
  The seed's lr 1e-6 x 50,000 steps (and w_PIR = 1000 against log-losses) does not fit a shared 2-core CPU: at
  0.5-1.5 s a step under load, 50,000 steps would take a day per objective. With Adam the weight only sets the
  ratio of the PIR gradient to the GAN gradient, so lr {learning_rate} for {tune_steps} steps with w_PIR = {pir_weight}
  (the PIR term and the hinge loss of comparable size) is the same kind of run in 1/500 of the steps. A first
  run at lr 2e-4 for 150 steps raised red's true PIR (d 0.62) but multiplied fid_builtin by 5.7 and cost 0.17 of
  judge accuracy even with the guards; at 5e-5 for 100 steps red gained d 0.22 (p 6e-7) with fid_builtin x1.19
  and judge accuracy up, so 5e-5 it is. For red|blue, two further runs (separate, same seeds) trained the
  estimators for 30 epochs instead of 10 (held-out error 0.027 and 0.020 against the data's sd 0.042) and tuned
  at 5e-5 and at 1e-4: in both the check estimator rated no step above the untuned generator, the run stopped at
  step 50 and kept step 0 (d 0.02, p 0.35). Longer estimator training does not rescue the split objectives here.
- **Evaluation**: 1,000 images before (seed 10000) and 1,000 after (seed 20000): latents neither estimator saw.
  Judge accuracy: scenes-judge (a ResNet the tuning never touches) on the conditioned class. fid_builtin:
  against 2,000 rendered scenes in scenes-clf's penultimate features (N = 1,000 generated; a ratio after/before).
  lpips_builtin: 200 random pairs. Colour entropy: bits of the pooled 8x8x8 colour histogram.
"""


USAGE = """## Using it: interactions, estimator and tuning jobs

**Interactions.** A product reports, per shown image, the generator version, the image's seed (the latent a
`Generate` with that seed and count 1 draws) or its latent, its class, impressions and interactions, and optionally
its own image id, a rater or cohort id and the time shown:

```python
client.report_impressions(
    "homepage",
    [
        {
            "generator": "scenes-gen@1",
            "seed": 17,
            "class_id": 2,
            "impressions": 1000,
            "interactions": 131,
            "image_id": "hero-17",
            "cohort": "eu",
        },
    ],
)  # -> (recorded, table size, duplicate)
rows = client.impressions("homepage")  # the table, oldest first, with reporter/received_at/source
```

`gansteer impressions report homepage rows.csv` and `gansteer impressions export homepage --out t.csv` do the same
from the shell (RPCs `ReportImpressions`, `ListImpressions`). Tables are append-only Redis lists; the service stamps
each record with the caller (`reporter`), the time of receipt and `source` (`api`, or `job:<id>` for simulated
records); a resend with the same idempotency key records nothing. Refused with the field named:
`records[i].interactions` when interactions exceed impressions or are negative, `records[i].impressions` when
negative, NOT_FOUND `records[i].generator` for an unknown version, `records[i].class_id` outside the classes,
`records[i].latent.shape`.

**Estimator.** `client.pir_estimator(dataset="homepage")` trains on the table as it is at submission;
with `simulate_generator="scenes-gen", simulate_objective={"output": "colour_single", "params": {"colour":
"red"}}` the job first collects 1,000 images x 1,000 impressions of simulated interactions into the table itself
(binomial noise, any scorer output in [0, 1]). Two estimators train on the table's disjoint halves (a stable hash
of each image's key); both are registered when the job succeeds, `pir-<table>` (naming its check on its card)
and `pir-<table>-check`, as models of kind `pir_estimator`, which the scoring service serves at once:
`client.score(images, "pir-homepage", "pir")`. Refused: fewer images per estimator than bins
(`spec.pir_estimator.simulate.images` or `.dataset`), an unknown table (NOT_FOUND `spec.pir_estimator.dataset`).

**Tuning.** `client.pir_tuning(model="scenes-gen", estimator="pir-homepage", objective={...})` tunes with the
guards on and registers the tuned generator as the next version of `scenes-gen` (or `register_as`), its lineage
naming both estimators, the table, the guard settings and the job's metrics; the generation service serves it
without a restart. `no_guards=True` is the ablation. `pir_weight < 0` is refused naming
`spec.pir_tuning.pir_weight`; a check estimator equal to the optimised one, or none with the guards on, naming
`spec.pir_tuning.check_estimator`. All three steps are jobs: segmented, checkpointed, resumed after a lost
worker to the same result (the contract test), with progress events (collected images, losses per epoch, the
tuning's losses and the probes' estimates).

**Round 2.** Collect on the tuned version into the same table (`simulate_generator="scenes-gen@2"`), train with
`init_estimator="pir-homepage"` (the check estimator continues too), tune `scenes-gen@2` again.

**Choices where the issue was silent.** Tables are one namespace per deployment (the reporter is recorded, not
used to separate tables). A record names its image by seed or latent, never by pixels, so the estimator job
renders it again from the pinned generator version. The estimator keeps the epoch with the lowest held-out loss.
The anchor is in pixels; early stopping keeps the weights the check estimator rates highest (step 0 included, so
a tuning that only hurts returns the original weights). The tuning job runs on the local backend only.
"""


def doc_only() -> None:
    """Rewrites docs/pir.md from bench/results/pir.json, merging the guard runs of `--guard-only` (pir_guard.json)
    into its `guard` section first."""
    results = ROOT / "bench" / "results"
    report = json.loads((results / "pir.json").read_text())
    if (results / "pir_guard.json").exists():
        report["guard"] |= json.loads((results / "pir_guard.json").read_text())["guard"]
        (results / "pir.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    write_doc(report, ROOT / "docs" / "pir.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--doc-only", action="store_true", help="rewrite docs/pir.md from bench/results/pir.json")
    parser.add_argument("--guard-only", nargs="+", metavar="OBJECTIVE", help="only the guard comparison, separately")
    args = parser.parse_args()
    if args.doc_only:
        doc_only()
        return
    if args.guard_only:
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        started = time.perf_counter()
        guard = Bench(Sizes()).guard_only(args.guard_only)
        document = {"guard": guard, "seconds": time.perf_counter() - started, "torch_threads": args.threads}
        (ROOT / "bench" / "results" / "pir_guard.json").write_text(json.dumps(document, indent=1, default=float) + "\n")
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = QUICK if args.quick else Sizes()
    started = time.perf_counter()
    bench = Bench(sizes)
    report: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), CPU only",
        "torch_threads": args.threads,
        "sizes": asdict(sizes),
        "models": {
            "generator": GEN,
            "discriminator": DISC,
            "objective_network": OBJECTIVE_NET,
            "estimator_backbone": BACKBONE,
            "judge": JUDGE,
        },
    }
    report |= bench.run()
    report["seconds"] = time.perf_counter() - started
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / ("pir_quick.json" if args.quick else "pir.json")
    out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    docs = ROOT / "docs"
    suffix = "_quick" if args.quick else ""
    effect_plot(report["objectives"], docs / f"pir_effect_sizes{suffix}.png")
    colour_grid(bench.grids, docs / f"pir_colours{suffix}.png")
    if not args.quick:
        write_doc(report, docs / "pir.md")
    print(f"wrote {out} in {report['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
