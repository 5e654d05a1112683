"""Embedding activation maximisation (seed 001, chapters 2-4): the generator stays frozen and one class-embedding
row is learned, so that samples over random z are recognised as the target class and, with the diversity term,
vary more.

Each of T trials is one search of the search core over an `EmbeddingRowSpace` (rows clamped to the table's range
after every step, as the thesis clips them), stepped together: one generator forward per step over T x L images,
where L latents per trial are redrawn every `resample_every` steps. A trial's latents and start depend only on
(seed, trial id), so trials run one at a time reproduce the batched ones (the benchmark's baseline and a test).

The objective (maximised) is Eq. 2.3: the mean log-probability of the target class (Eq. 2.2) through the
classifier's own preprocessing, plus lambda times the diversity term of Eq. 2.1, the mean over disjoint latent pairs
of |phi(G(c, z_i)) - phi(G(c, z_j))| / |z_i - z_j|, with phi the pixels, the classifier's penultimate features or
its softmax. The result is each trial's last-step row (the thesis evaluates "the embedding from the last step"),
not a best-so-far on a noisy minibatch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gansteer_server.algorithms.metrics import accuracy, lpips_builtin, ms_ssim_3s_k7
from gansteer_server.algorithms.search import Budget, EmbeddingRowSpace, Evaluation, SearchRun, StepSchedule

INITS = ("target", "mean", "top-k", "random")
DIVERSITY_SPACES = ("pixel", "features", "softmax")
#: Seed 001, section 3.3: lr 0.01 near the class's own row (AM-S), 0.1 from the mean (AM-L) and top-5.
DEFAULT_LEARNING_RATES = {"target": 0.01, "mean": 0.1, "top-k": 0.1, "random": 0.1}
#: Torch's Adam defaults, which the thesis used ("the Adam optimizer and its default hyperparameters").
ADAM_OPTIONS = {"beta1": 0.9, "beta2": 0.999}
GRID_SAMPLES = 8  # columns of the before/after grid
EVAL_PAIRS = 200  # seed 001, section 2.4: "randomly sampling 200 image pairs"

Generator = Callable[[Tensor, Tensor], Tensor]  # (z (N, Z), rows (N, E)) -> images in [-1, 1]


@dataclass(frozen=True)
class AMConfig:
    target: int  # the classifier's class whose log-probability is maximised
    row: int | None  # the generator row replaced (init `target` starts from it); None: a new row
    init: str = "target"
    top_k: int = 5
    top_k_samples: int = 10
    init_sigma: float = 0.1
    optimizer: str = "adam"
    options: tuple[tuple[str, float], ...] = tuple(ADAM_OPTIONS.items())
    learning_rate: float = 0.01
    steps: int = 200
    latents: int = 20
    resample_every: int = 20
    bounds: tuple[float, float] = (-1.0, 1.0)
    trial_ids: tuple[int, ...] = (0, 1, 2, 3, 4)
    diversity_weight: float = 0.0
    diversity_space: str = ""
    diversity_pairs: int = 10
    eval_samples: int = 200
    accuracy_tolerance: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.init == "target" and self.row is None:
            raise ValueError("init 'target' needs the generator row of the target")
        if self.diversity_weight < 0:
            raise ValueError(f"diversity_weight must be >= 0, got {self.diversity_weight}")
        if self.diversity_weight > 0 and self.diversity_space not in DIVERSITY_SPACES:
            raise ValueError(f"diversity_space must be one of {DIVERSITY_SPACES}, got {self.diversity_space!r}")
        if not 0 < 2 * self.diversity_pairs <= self.latents:
            raise ValueError(f"{self.diversity_pairs} disjoint pairs need {2 * self.diversity_pairs} latents")
        if not self.trial_ids or self.steps < 1 or self.resample_every < 1 or self.eval_samples < 2:
            raise ValueError("trials, steps, resample_every and eval_samples (>= 2) must be positive")


@dataclass(frozen=True)
class AMModels:
    generator: Generator
    table: Tensor  # (K, E) the generator's class rows as trained
    z_size: int
    classifier: nn.Module  # images in [-1, 1] -> logits (its own resize and normalisation inside)
    judge: nn.Module | None = None
    judge_target: int | None = None  # the judge's id of the target label
    features: Callable[[Tensor], Tensor] | None = None  # images -> (N, F), for lpips_builtin
    model_refs: Mapping[str, str] | None = None  # role -> ref, recorded with every metric


def _stream(*key: int) -> torch.Generator:
    """A torch generator seeded from a tuple of integers, so that every trial and epoch has its own stream."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def diversity_ratio(phi: Tensor, z: Tensor, pairs: int) -> Tensor:
    """Eq. 2.1 per trial: phi (T, L, F) and z (T, L, Z) -> (T,) the mean over the disjoint pairs (0, 1), (2, 3), ...
    of |phi_i - phi_j| / |z_i - z_j|."""
    first, second = torch.arange(0, 2 * pairs, 2), torch.arange(1, 2 * pairs, 2)
    numerator = (phi[:, first] - phi[:, second]).flatten(2).norm(dim=2)
    denominator = (z[:, first] - z[:, second]).norm(dim=2)
    return (numerator / denominator).mean(dim=1)


def _forward(models: AMModels, rows: Tensor, z: Tensor, chunk: int = 500) -> Tensor:
    """Images of rows (N, E) at latents z (N, Z), in chunks (no gradient)."""
    with torch.no_grad():
        return torch.cat([models.generator(z[i : i + chunk], rows[i : i + chunk]) for i in range(0, len(z), chunk)])


def top_rows(models: AMModels, target: int, samples: int, seed: int) -> Tensor:
    """The generator rows ordered by the classifier's mean probability of `target` over `samples` images each
    (seed 001's top-5 initialisation: "embeddings whose 10 randomly generated samples were given the highest
    average accuracy scores")."""
    table = models.table
    z = torch.randn(samples, models.z_size, generator=_stream(seed, 1, 0)).repeat(len(table), 1)
    rows = table.repeat_interleave(samples, dim=0)
    with torch.no_grad():
        probability = F.softmax(models.classifier(_forward(models, rows, z)), dim=1)[:, target]
    return probability.view(len(table), samples).mean(dim=1).argsort(descending=True)


def initial_rows(config: AMConfig, models: AMModels) -> Tensor:
    """Each trial's starting row (T, E), clamped into the bounds."""
    table = models.table.float()
    mean, spread = table.mean(dim=0), table.std(dim=0) if len(table) > 1 else torch.ones(table.shape[1])
    ranked = top_rows(models, config.target, config.top_k_samples, config.seed) if config.init == "top-k" else None
    starts = []
    for trial in config.trial_ids:
        noise = torch.randn(table.shape[1], generator=_stream(config.seed, 2, trial))
        if config.init == "random":
            starts.append(mean + spread * noise)
            continue
        if config.init == "target":
            centre = table[config.row]
        elif config.init == "mean":
            centre = mean
        else:
            assert ranked is not None
            centre = table[ranked[trial % min(config.top_k, len(table))]]
        starts.append(centre + config.init_sigma * noise)
    return torch.stack(starts).clamp(*config.bounds)


class AMObjective:
    """Eq. 2.3 for T trials in one batch: each trial's row with its own L latents of the current epoch."""

    maximize = True
    term_names = ("log_prob", "diversity")

    def __init__(self, config: AMConfig, models: AMModels) -> None:
        self.config, self.models = config, models
        self.z = torch.empty(0)  # (T, L, Z): set by the run each step
        self.last: dict[str, Tensor] = {}  # the latest evaluation's terms, (T,) each

    def __call__(self, rows: Tensor, search_index: Tensor) -> Evaluation:
        config, models = self.config, self.models
        z = self.z[search_index]  # (N, L, Z)
        count, latents = z.shape[:2]
        conditions = rows[:, None, :].expand(-1, latents, -1).reshape(count * latents, -1)
        images = models.generator(z.reshape(count * latents, -1), conditions)
        logits = models.classifier(images)
        log_prob = F.log_softmax(logits, dim=1)[:, config.target].view(count, latents).mean(dim=1)
        diversity = torch.zeros_like(log_prob)
        if config.diversity_weight > 0:
            diversity = diversity_ratio(self._phi(images, logits).view(count, latents, -1), z, config.diversity_pairs)
        self.last = {"log_prob": log_prob.detach(), "diversity": diversity.detach()}
        return Evaluation(log_prob + config.diversity_weight * diversity, dict(self.last))

    def _phi(self, images: Tensor, logits: Tensor) -> Tensor:
        space = self.config.diversity_space
        if space == "pixel":
            return images.flatten(1)
        if space == "softmax":
            return F.softmax(logits, dim=1)
        return self.models.classifier.features(images)["penultimate"].flatten(1)  # type: ignore[operator]


@dataclass(frozen=True)
class RowMetrics:
    """One embedding judged on the evaluation latents."""

    classifier_accuracy: float
    classifier_log_prob: float
    judge_accuracy: float | None
    ms_ssim: float  # ms_ssim_3s_k7: lower is more diverse
    lpips: float | None  # lpips_builtin: higher is more diverse
    records: tuple[dict[str, Any], ...]  # each metric with its name, N, resize mode and models

    def values(self) -> dict[str, float]:
        values = {
            "classifier_accuracy": self.classifier_accuracy,
            "classifier_log_prob": self.classifier_log_prob,
            "ms_ssim_3s_k7": self.ms_ssim,
        }
        if self.judge_accuracy is not None:
            values["judge_accuracy"] = self.judge_accuracy
        if self.lpips is not None:
            values["lpips_builtin"] = self.lpips
        return values


@dataclass(frozen=True)
class AMEvaluation:
    before: RowMetrics  # the starting point the job compares with: the class's row, or the mean row for a new label
    trials: tuple[RowMetrics, ...]
    chosen: int  # index into the trials
    grid: Tensor  # (1 + T, GRID_SAMPLES, C, H, W): before, then each trial, with the same latents
    grid_latents: Tensor  # (GRID_SAMPLES, Z)


class AMRun:
    """T trials of embedding AM over the search core, a step at a time, resumable from `state_dict`."""

    def __init__(self, config: AMConfig, models: AMModels) -> None:
        self.config, self.models = config, models
        self.objective = AMObjective(config, models)
        self.space = EmbeddingRowSpace(
            initial_rows(config, models), 1.0, searches=len(config.trial_ids), bounds=config.bounds
        )
        self.search = SearchRun(
            self.space,
            self.objective,
            optimizer=config.optimizer,
            budget=Budget(config.steps),
            schedule=StepSchedule(config.learning_rate, milestones=()),
            restarts=len(config.trial_ids),
            seed=config.seed,
            options=dict(config.options),
        )

    @property
    def done(self) -> bool:
        return self.search.done

    @property
    def steps(self) -> int:
        return self.search.steps

    def latents(self, epoch: int) -> Tensor:
        """(T, L, Z): each trial's latents of one epoch of `resample_every` steps."""
        config = self.config
        return torch.stack(
            [
                torch.randn(config.latents, self.models.z_size, generator=_stream(config.seed, 3, trial, epoch))
                for trial in config.trial_ids
            ]
        )

    def step(self) -> dict[str, Tensor]:
        """One optimizer step of every trial; the step's terms per trial."""
        self.objective.z = self.latents(self.search.steps // self.config.resample_every)
        self.search.step()
        return self.objective.last

    def rows(self) -> Tensor:
        """(T, E) each trial's row now (after its last step)."""
        variables = self.search.variables
        assert isinstance(variables, Tensor)
        return self.space.decode(variables.detach(), torch.arange(len(self.config.trial_ids)))

    def start_row(self) -> Tensor:
        """The embedding the result is compared with: the class's own row, or the mean row for a new label."""
        table = self.models.table.float()
        return table[self.config.row] if self.config.row is not None else table.mean(dim=0)

    def evaluation_latents(self) -> Tensor:
        """(eval_samples, Z): the latents every trial and the starting row are judged on."""
        return torch.randn(self.config.eval_samples, self.models.z_size, generator=_stream(self.config.seed, 4, 0))

    def evaluate(self) -> AMEvaluation:
        """Every trial and the starting row, on the same `eval_samples` latents; the chosen trial by the rule: the
        most diverse (lowest ms_ssim_3s_k7) whose accuracy by the optimised classifier is at most
        `accuracy_tolerance` below the starting row's, else the most accurate."""
        config, models = self.config, self.models
        z = self.evaluation_latents()
        candidates = torch.cat([self.start_row()[None], self.rows()])
        metrics, grid = [], []
        for row in candidates:
            images = _forward(models, row.expand(len(z), -1), z)
            metrics.append(self._judge(images))
            grid.append(images[:GRID_SAMPLES])
        before, trials = metrics[0], tuple(metrics[1:])
        floor = before.classifier_accuracy - config.accuracy_tolerance
        eligible = [i for i, m in enumerate(trials) if m.classifier_accuracy >= floor]
        if eligible:
            chosen = min(eligible, key=lambda i: (trials[i].ms_ssim, i))
        else:
            chosen = max(range(len(trials)), key=lambda i: (trials[i].classifier_accuracy, -i))
        return AMEvaluation(before, trials, chosen, torch.stack(grid), z[:GRID_SAMPLES])

    def _judge(self, images: Tensor) -> RowMetrics:
        config, models = self.config, self.models
        refs = dict(models.model_refs or {})
        with torch.no_grad():
            log_probs = F.log_softmax(models.classifier(images), dim=1)
        seed = config.seed
        records = []
        optimised = accuracy(images, models.classifier, config.target, refs.get("classifier", "classifier"))
        records.append(optimised)
        judge = None
        if models.judge is not None and models.judge_target is not None:
            judge = accuracy(images, models.judge, models.judge_target, refs.get("judge", "judge"))
            records.append(judge)
        ms_ssim = ms_ssim_3s_k7(images, pairs=EVAL_PAIRS, seed=seed)
        records.append(ms_ssim)
        lpips = None
        if models.features is not None:
            lpips = lpips_builtin(images, models.features, pairs=EVAL_PAIRS, seed=seed)
            records.append(lpips)
        return RowMetrics(
            classifier_accuracy=optimised.value,
            classifier_log_prob=float(log_probs[:, config.target].mean()),
            judge_accuracy=None if judge is None else judge.value,
            ms_ssim=ms_ssim.value,
            lpips=None if lpips is None else lpips.value,
            records=tuple(record.to_dict() for record in records),
        )

    def state_dict(self) -> dict[str, Any]:
        return self.search.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.search.load_state_dict(dict(state))
