"""Writes docs/latent_search.md from bench/results/latent_search.json: the page's figures are always the latest
full run's, and every sentence that compares them is decided from them here, never typed by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LABELS = {
    "samples": "Samples (no search)",
    "adam": "Gradient ascent (Adam)",
    "cmaes": "CMA-ES",
    "ga": "Genetic algorithm",
}
P10_BAR, POPULATION_BAR, BASIN_BAR = 10.0, 3.0, 0.6
# A judge accuracy this far below the optimised classifier's is called out as adversarial images.
JUDGE_GAP = 0.1

INTRO = """# Latent search (seed 002)

`latent_search` searches a generator's latent space for the images a scorer rates highest: "show me the most
mountain-like image this generator can make", or "raise this estimator's score". The objective is a weighted sum of
any per-image scorer outputs (`gansteer scorers` lists them), maximised, with an optional latent-prior penalty;
the search runs over z with the class held, or z and a continuous class vector; every optimizer of the search
core can run it (`gansteer optimizers`), among them the source's three and BasinCMA:

- `adam`: gradient ascent on the objective (Adam, betas (0, 0.99), step 0.05, divided by 10 at 1/3 and 2/3 of the
  budget after a reset to the best point).
- `cmaes`: CMA-ES from pycma, one strategy per search, population 15; option `sigma` (0.5; the source: "values
  between .5-1 lead to similar results").
- `ga`: the source's genetic algorithm on DEAP's operators: each latent coordinate a 16-bit binary gene over
  [-4, 4], bits flipped with probability 1%, two-point crossover, tournament selection, the best kept; options
  `mutation` (0.01), `crossover` (0.5), `bits` (16), `bound` (4), `tournament` (3).
- `basincma`: pix2latent's BasinCMA (Huh et al., ECCV 2020): CMA-ES proposes starting points, each is refined by
  Adam, CMA-ES is told the refined losses; the last part of the budget is plain Adam from the best points; options
  `sigma` (0.5), `refine_steps` (10), `refine_lr` (0.1), `final_fraction` (0.7).

Budgets count generator calls per search (an Adam step, a population member and every one of BasinCMA's Adam steps
cost one each), so optimizers compare at equal cost. Each class x restart is one search and one result item, all
searched side by side in one batch.

```python
with gansteer.Client() as client:
    job = client.latent_search(model="scenes-gen", classes=["mountains", "city"], optimizer="cmaes", restarts=3)
    result = job.result()
    print(result.objective, result.robustness, result.judge_accuracy)
```

```
gansteer search --class mountains --class city --optimizer ga --option mutation=0.01 --budget 1000 --out out/search
gansteer invert photo.jpg --optimizer basincma --budget 960 --budget-unit generator_calls
```

Each result carries:

- `objective`: the value maximised (by default `class_logit`, the classifier's pre-softmax logit of the class: the
  source maximises the pre-softmax score because the post-softmax one can be raised by lowering the other classes);
- `robustness`: the source's perturbation metric, the 10th percentile of the objective over 200 latents
  z + 0.1 N(0, I) (the class held), all 200 in one batched forward;
- `judge_prob` and `judge_correct`: the probability and the top-1 verdict of an independent judge, a classifier the
  search never saw (the generator card's `judge`: `scenes-judge`, a ResNet trained on other data); beside them
  `classifier_prob` and `classifier_correct` of the classifier that was optimised;
- `realism`: the discriminator's score for the class (`scenes-disc`, higher is more real);
- the image, its latent (and searched class vector), and the objective's curve.
"""


def _f(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def _table(results: dict[str, Any]) -> list[str]:
    table = results["table"]
    settings = results["settings"]
    lines = [
        "## The table",
        "",
        f"All {len(settings['classes'])} classes of `scenes-gen`, {settings['restarts']} starts each, "
        f"{settings['budget_generator_calls_per_search']} generator calls per search; objective = `scenes-clf`'s "
        "logit of the class; mean (standard deviation) over the searches.",
        "",
        "| optimizer | objective | robustness p10 | judge accuracy | optimised classifier's accuracy | realism "
        "| seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("samples", "adam", "cmaes", "ga"):
        if name not in table:
            continue
        e = table[name]
        lines.append(
            f"| {LABELS[name]} | {_f(e['objective'])} ({_f(e['objective_std'])}) | {_f(e['p10'])} ({_f(e['p10_std'])}) "
            f"| {_f(e['judge_accuracy'])} | {_f(e['classifier_accuracy'])} | {_f(e['realism'])} | {e['seconds']:.0f} |"
        )
    lines += [
        "",
        "The source's table (MNIST zeros, its own decoder and classifier; not comparable in scale):",
        "",
        "| source | objective | perturbation metric |",
        "| --- | --- | --- |",
        *(f"| {name} | {v['objective']} | {v['p10']} |" for name, v in results["source_table"].items()),
        "",
    ]
    ours = results["ranking"]["objective"]
    ours_p10 = results["ranking"]["p10"]
    source = ["cmaes", "adam", "ga"]
    said = " > ".join(LABELS[n] for n in ours)
    said_p10 = " > ".join(LABELS[n] for n in ours_p10)
    if ours == source:
        verdict = "the same ordering as the source (CMA-ES > gradient ascent > GA)"
    else:
        agree = [n for i, n in enumerate(ours) if source[i] == n]
        verdict = "a different ordering from the source's CMA-ES > gradient ascent > GA" + (
            f" (they agree on the place of {', '.join(LABELS[n] for n in agree)})" if agree else ""
        )
    lines.append(
        f"Here, by mean objective: {said}, {verdict}; by robustness p10: {said_p10}. "
        "At equal generator calls the comparison differs from the source's in kind: the source ran CMA-ES for 1000 "
        "generations of 15 (15,000 calls), the GA for 100 generations of about 4,500 and gradient ascent for 1000 "
        "steps, each with its own budget; here every optimizer gets the same number of images generated."
    )
    lines.append("")
    return lines


def _judge(results: dict[str, Any]) -> list[str]:
    table = results["table"]
    lines = ["## Does an independent judge agree?", ""]
    flagged = []
    for name in ("adam", "cmaes", "ga"):
        e = table[name]
        gap = e["classifier_accuracy"] - e["judge_accuracy"]
        if gap > JUDGE_GAP:
            flagged.append((name, e, gap))
    if flagged:
        for name, e, gap in flagged:
            lines.append(
                f"**{LABELS[name]}: adversarial images, not better images.** The classifier it optimised assigns "
                f"{_f(100 * e['classifier_accuracy'], 0)}% of its results to their class, the independent judge only "
                f"{_f(100 * e['judge_accuracy'], 0)}% ({_f(100 * gap, 0)} points lower): a higher objective here "
                "means images that fool `scenes-clf`, not images that look more like the class."
            )
            lines.append("")
    honest = [n for n in ("adam", "cmaes", "ga") if n not in {f[0] for f in flagged}]
    if honest:
        lines.append(
            "For "
            + ", ".join(LABELS[n] for n in honest)
            + f" the judge's accuracy is within {int(100 * JUDGE_GAP)} points of the optimised classifier's ("
            + "; ".join(
                f"{LABELS[n]}: judge {_f(table[n]['judge_accuracy'])}, classifier {_f(table[n]['classifier_accuracy'])}"
                for n in honest
            )
            + "): the found images are assigned to their class by a classifier the search never saw."
        )
        lines.append("")
    samples = table["samples"]
    lines.append(
        f"The generator's own samples of each class score {_f(samples['objective'])} (p10 {_f(samples['p10'])}), "
        f"judge accuracy {_f(samples['judge_accuracy'])}, realism {_f(samples['realism'])}; compare the realism "
        "column: a search that raises the logit by leaving the region the discriminator knows shows up there."
    )
    lines += ["", "Best image per class (columns: the ten classes in order; rows: Adam, CMA-ES, GA):", ""]
    lines += ["![best image per class and optimizer](latent_search_grid.png)", ""]
    return lines


def _speedups(results: dict[str, Any]) -> list[str]:
    p10 = results["p10_batched_speedup"]
    population = results["population_speedup"]
    threads = results["machine"]["torch_threads"]
    lines = ["## Batching", ""]
    holds = p10["speedup"] >= P10_BAR
    lines.append(
        f"- `p10_batched_speedup`: the 200 perturbations of one result in one forward of generator and classifier, "
        f"{_f(1000 * p10['batched_s'], 0)} ms, against one forward per perturbation, "
        f"{_f(1000 * p10['one_per_call_s'], 0)} ms: **{_f(p10['speedup'], 1)}x** at {threads} torch thread(s) "
        f"(median of {p10['repeats']} back-to-back pairs, {_f(p10['speedup_min'], 1)} to {_f(p10['speedup_max'], 1)}; "
        f"bar: {P10_BAR:.0f}x; " + ("holds" if holds else "**not reached**") + ")."
    )
    two = p10.get("at_2_threads")
    if two:
        lines.append(
            f"  At 2 threads the ratio is {_f(two['speedup'], 1)}x ({_f(1000 * two['batched_s'], 0)} ms against "
            f"{_f(1000 * two['looped_s'], 0)} ms). It is not the figure to cite: on these shared cores both sides "
            "are slower than at 1 thread, and the single-image forwards pay most for it (intra-op threads "
            "synchronising on tiny tensors), so that ratio measures contention rather than batching."
        )
    if not holds:
        lines.append(
            "  Why the bar is missed on this machine: the generator is compute-bound on a CPU already at batch 1 "
            "(a 32 x 32 image costs several ms of convolutions), so batching saves only the per-call overhead. On "
            "an accelerator one image and two hundred would cost nearly the same time, but none was available to "
            "measure it, so the bar stays unmet here. The batched path is what the job runs."
        )
    for name, entry in population.items():
        bar = " (bar: 3x; " + ("holds" if entry["speedup"] >= POPULATION_BAR else "**not reached**") + ")"
        lines.append(
            f"- `population_speedup` {LABELS.get(name, name)}: a whole ask / evaluate / tell step of population "
            f"{entry['population']}, {_f(1000 * entry['batched_s'], 0)} ms with the population in one batch, "
            f"{_f(1000 * entry['one_per_call_s'], 0)} ms one candidate per call: **{_f(entry['speedup'], 1)}x** "
            f"({_f(entry['speedup_min'], 1)} to {_f(entry['speedup_max'], 1)})" + (bar if name == "cmaes" else "") + "."
        )
    lines.append("")
    return lines


def _basincma(results: dict[str, Any]) -> list[str]:
    basin = results["basincma"]
    fraction = basin["basincma_wins_fraction"]
    lines = [
        "## BasinCMA for inversion",
        "",
        f"Inversion (criterion `l2+features`, class vector searched) of bench/inversion.py's misspecified targets, "
        f"the photographs, at {basin['budget_generator_calls']} generator calls per target for both: Adam with the "
        f"seed's defaults against the `basincma` preset (population {basin['basincma_options']['population']}, "
        f"{basin['basincma_options']['refine_steps']} Adam steps per candidate at "
        f"{basin['basincma_options']['refine_lr']}, sigma {basin['basincma_options']['sigma']}, the last "
        f"{basin['basincma_options']['final_fraction']:.0%} of the budget plain Adam from the best points). The "
        "preset was chosen on the three photographs this table does not use (hubble_deep_field, "
        "immunohistochemistry, retina) among (refine steps, final fraction) = (20, 0.5), the same with refine_lr "
        "0.5, and (10, 0.7): it beat Adam there on 1, 1 and 2 of 3; the last is the preset.",
        "",
        "| target | Adam criterion | BasinCMA criterion | Adam PSNR | BasinCMA PSNR |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, name in enumerate(basin["targets"]):
        lines.append(
            f"| {name} | {_f(basin['adam']['criterion'][i], 3)} | {_f(basin['basincma']['criterion'][i], 3)} "
            f"| {_f(basin['adam']['psnr'][i])} | {_f(basin['basincma']['psnr'][i])} |"
        )
    verdict = "holds" if fraction >= BASIN_BAR else "is **not reached**"
    lines += [
        "",
        f"BasinCMA reaches a lower criterion than Adam on {_f(100 * fraction, 0)}% of the targets "
        f"(bar: {BASIN_BAR:.0%}; it {verdict}). Seconds: Adam {basin['adam']['seconds']:.0f}, BasinCMA "
        f"{basin['basincma']['seconds']:.0f} (BasinCMA's candidates share one batch per Adam step).",
        *(
            [
                "",
                "The preset before that choice ("
                + ", ".join(f"{k} {v}" for k, v in basin["earlier_preset"]["options"].items())
                + ") scored "
                + ", ".join(_f(c, 3) for c in basin["earlier_preset"]["criterion"])
                + f" on the same targets in the full run: {_wins(basin['adam'], basin['earlier_preset'])} of "
                f"{len(basin['targets'])} below Adam.",
            ]
            if "earlier_preset" in basin
            else []
        ),
        "",
    ]
    return lines


def _wins(adam: dict[str, Any], other: dict[str, Any]) -> int:
    return sum(b < a for a, b in zip(adam["criterion"], other["criterion"], strict=True))


def _machine(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    return [
        "## Where these figures come from",
        "",
        f"`python bench/latent_search.py` ({results['created']}, {results['elapsed_s'] / 60:.0f} minutes) on "
        f"{m['cores']} cores ({m['cpu']}), torch {m['torch']} with {m['torch_threads']} intra-op thread(s), shared "
        f"with other work: load average {m['load_average_1min_start']:.1f} at the start and "
        f"{m['load_average_1min_end']:.1f} at the end (1 minute), so the seconds columns are loose; the objectives, "
        "accuracies and criteria do not depend on load. Raw figures, per-result metrics included: "
        "`bench/results/latent_search.json`."
        + (
            f" The batching figures were measured again with `--speedups-only` ({results['speedups_measured']}, "
            f"load average {results['p10_batched_speedup']['load_average_1min']:.1f})."
            if "speedups_measured" in results
            else ""
        )
        + (
            f" BasinCMA against Adam was run again with `--basincma-only` ({results['basincma']['measured']}) after "
            "its preset was chosen."
            if "measured" in results["basincma"]
            else ""
        ),
        "",
    ]


def write_doc(results: dict[str, Any], path: Path) -> None:
    parts = [INTRO, *_table(results), *_judge(results), *_speedups(results), *_basincma(results), *_machine(results)]
    path.write_text("\n".join(parts).rstrip() + "\n")
