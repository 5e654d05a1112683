"""Interactive evolution, HEVOL (seed 003, section III-D2, Algorithm 1, and section V-D): a (mu/mu + lambda)
evolution strategy over the latent space whose selection is a person's picks.

Each round shows 1 + lambda images; the person picks the mu best, the same image possibly more than once (the seed:
"we could get better performance and convenience if we allowed the user to select the same image several times").
The next round shows

- the recombination of the picks (the `mu/mu` of the strategy, Algorithm 1's z_(lambda+1) := z^): their mean, each
  pick weighing as often as it was picked; the mean of mu prior draws has a norm about sqrt(mu) times too small, off
  the shell where a GAN's latents live, so the mean latent is scaled back to the picks' mean norm (the seed does not
  say how it averages);
- the picks themselves, distinct, unchanged (`keep_picks`: the `+` of (mu/mu + lambda), Algorithm 1's unmutated
  copies z_1..z_mu, which compete with their offspring). The seed's study fits this: 1 + lambda = 28 shown with
  mu = 5, its random search shown 23 new images a round (28 - 5), and "about 140 images" in six rounds (28 + 5 x 23);
- offspring filling the other places, offspring i a copy of pick i mod mu (Algorithm 1's `mu divides i - j`), each
  latent coordinate resampled from the prior with probability `mutation_rate`, again until at least one was.

Algorithm 1 states the rate 1/d; the study's HEVOL does not state its rate, only that it updates the mutation rates
automatically. The default, a fixed DEFAULT_MUTATION_RATE (0.2: about 26 of `scenes-gen`'s 128 coordinates an
offspring), was chosen by measurement (bench/interactive_tune.py, on targets apart from the benchmark's): at 1/d an
offspring differs from its pick in one or two coordinates and six rounds barely leave the first round's picks, and
self-adaptation (`adapt_mutation_rate`: each offspring draws its own rate, the current one times 2^u with u uniform
in [-2, 2], and the next rate is the geometric mean of the picks' rates) measured worse than a fixed rate: with the
picks shown again and a noisy person, small-step offspring, near copies of a good pick, get picked and the rate
drifts down. A person may also set the rate (the step size) with an answer.

Besides picking, an answer may say that none is good (the round is drawn again: fresh offspring of the same picks,
or fresh prior draws in the first round) or undo (the previous round is shown again and its picks forgotten).

A class-conditional generator's class is either held fixed (one id for every image) or evolved with z: the genome is
z and a class vector, first rounds start from random classes' embedding rows and recombination averages the picks'
vectors. By default (`class_mutation="none"`) mutation leaves an offspring's vector as its parent's: a vector made
of coordinates of several rows (`"coordinates"`) or swapped for a random row (`"row"`) measured worse, and the seed
found class vectors held at a class's values "more stable and visually more pleasant" (Table IV a).

`fresh` prior draws may replace offspring in each bred round (the foreign individuals of Deep Interactive Evolution,
the seed's reference [3]); 0 by default, as measured.

Pure torch, no I/O: the job kind renders nothing here; items carry latents and seeds from which the images are
regenerated on demand. The state is tensors and plain values, and the generator's RNG state travels with it, so a
run reloaded from its state continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

Action = Literal["pick", "none_good", "undo"]
ClassMutation = Literal["none", "coordinates", "row"]
#: The starting mutation rate when a config gives 0, chosen by measurement (see the module's docstring).
DEFAULT_MUTATION_RATE = 0.2
#: Self-adaptation: offspring rates are the current rate times 2^u, u ~ U[-ADAPT_OCTAVES, ADAPT_OCTAVES].
ADAPT_OCTAVES = 2.0


@dataclass(frozen=True)
class EvolutionConfig:
    """HEVOL's knobs with the seed's defaults (mu 5 of 1 + lambda = 28 shown, the facial-composite setting)."""

    mu: int = 5
    offspring: int = 27  # lambda
    mutation_rate: float = 0.0  # probability of resampling each coordinate; 0: DEFAULT_MUTATION_RATE
    rounds: int = 0  # picks answered before the run is done; 0: never done on its own
    adapt_mutation_rate: bool = False  # self-adaptation (below); measured worse than a fixed rate
    seed: int = 0
    keep_picks: bool = True  # show the picks again, unchanged, in the round they breed (the plus selection)
    fresh: int = 0  # prior draws in each bred round, in place of offspring
    class_mutation: ClassMutation = "none"  # "coordinates": each from a random row; "row": the whole vector

    def __post_init__(self) -> None:
        if self.mu < 1 or self.offspring < 1:
            raise ValueError(f"mu and offspring must be >= 1, got {self.mu} and {self.offspring}")
        if self.mu > 1 + self.offspring:
            raise ValueError(f"mu ({self.mu}) must be at most the images shown per round ({1 + self.offspring})")
        if not (math.isfinite(self.mutation_rate) and 0 <= self.mutation_rate <= 1):
            raise ValueError(f"mutation_rate must lie in [0, 1], got {self.mutation_rate}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if not 0 <= self.fresh <= self.offspring:
            raise ValueError(f"fresh must lie in [0, offspring = {self.offspring}], got {self.fresh}")
        if self.class_mutation not in ("none", "coordinates", "row"):
            raise ValueError(f"class_mutation must be none, coordinates or row, got {self.class_mutation!r}")

    @property
    def shown(self) -> int:
        return 1 + self.offspring


@dataclass(frozen=True)
class Generation:
    """One round's images as latents: item ids, parents (lineage), the seed each prior draw was made with (0 for
    bred items), class vectors when the class is evolved, and the mutation rate each was bred with."""

    number: int  # the round's number, from 1; a round shown again keeps its items but gets a new number
    item_ids: tuple[str, ...]
    z: Tensor  # (n, d)
    class_vectors: Tensor | None  # (n, E)
    seeds: tuple[int, ...]
    parent_ids: tuple[tuple[str, ...], ...]
    rates: Tensor  # (n,)
    picks_before: tuple[int, ...] = ()  # the picks (of the round below it on the stack) that bred it


class EvolutionRun:
    """HEVOL's state between rounds: a stack of the rounds shown (undo pops it) and the RNG.

    `open_round()` returns the round to show now; `tell(...)` takes the person's answer to it.
    """

    def __init__(self, config: EvolutionConfig, z_size: int, class_rows: Tensor | None = None) -> None:
        self.config = config
        self.z_size = z_size
        self.class_rows = class_rows
        self.rate = config.mutation_rate or DEFAULT_MUTATION_RATE
        self.generator = torch.Generator().manual_seed(config.seed)
        self.stack: list[Generation] = []
        self.opened = 0  # rounds numbered so far
        self.answered = 0  # answers that picked
        self.shown_images = 0

    @property
    def done(self) -> bool:
        return self.config.rounds > 0 and self.answered >= self.config.rounds

    # --- rounds ---------------------------------------------------------------------------------------------------

    def open_round(self) -> Generation:
        """The round to show now: the first round on the first call, else the one the last answer produced."""
        if not self.stack:
            self.stack.append(self._prior_round())
        self.shown_images += len(self.stack[-1].item_ids)
        return self.stack[-1]

    def tell(self, action: Action, picks: Sequence[int] = (), step_size: float | None = None) -> None:
        """The answer to the round `open_round` returned last: picks (indices, repeats allowed), none is good, or
        undo; `step_size` sets the mutation rate of the rounds that follow."""
        if step_size is not None:
            if not 0 < step_size <= 1:
                raise ValueError(f"step_size must lie in (0, 1], got {step_size}")
            self.rate = step_size
        top = self.stack[-1]
        if action == "pick":
            if len(picks) != self.config.mu or not all(0 <= i < len(top.item_ids) for i in picks):
                raise ValueError(f"expected {self.config.mu} picks among {len(top.item_ids)} items, got {list(picks)}")
            if step_size is None and self.config.adapt_mutation_rate:
                self.rate = float(torch.exp(torch.log(top.rates[list(picks)]).mean()))
            self.stack.append(self._bred(top, tuple(picks)))
            self.answered += 1
        elif action == "none_good":
            below = self.stack[-2] if len(self.stack) > 1 else None
            self.stack[-1] = self._prior_round() if below is None else self._bred(below, top.picks_before)
        elif action == "undo":
            if len(self.stack) > 1:
                self.stack.pop()
                if self.answered:
                    self.answered -= 1
            self.stack[-1] = self._renumbered(self.stack[-1])
        else:
            raise ValueError(f"unknown action {action!r}")

    def picks(self) -> list[tuple[str, Tensor, Tensor | None]]:
        """The latest picks, distinct, in the order picked (the first is the person's best, Algorithm 1's z_1):
        (item id, z, class vector). Before any pick: the first item of the round shown."""
        if len(self.stack) < 2:
            top = self.stack[-1] if self.stack else self._peek_prior()
            return [(top.item_ids[0], top.z[0], None if top.class_vectors is None else top.class_vectors[0])]
        below, picks = self.stack[-2], self.stack[-1].picks_before
        distinct = list(dict.fromkeys(picks))
        vectors = below.class_vectors
        return [(below.item_ids[i], below.z[i], None if vectors is None else vectors[i]) for i in distinct]

    # --- breeding -------------------------------------------------------------------------------------------------

    def _number(self) -> int:
        self.opened += 1
        return self.opened

    def _draws(self, n: int) -> tuple[tuple[int, ...], Tensor, Tensor | None]:
        """n prior draws, each from its own seed (regenerable from it alone), with random class rows."""
        seeds = tuple(int(s) for s in torch.randint(1, 2**62, (n,), generator=self.generator))
        z = torch.stack([torch.randn(self.z_size, generator=torch.Generator().manual_seed(s)) for s in seeds])
        vectors = None
        if self.class_rows is not None:
            classes = torch.randint(len(self.class_rows), (n,), generator=self.generator)
            vectors = self.class_rows[classes].clone()
        return seeds, z, vectors

    def _prior_round(self) -> Generation:
        """1 + lambda prior draws, each from its own seed (regenerable from it alone); random class rows."""
        number, n = self._number(), self.config.shown
        seeds, z, vectors = self._draws(n)
        return Generation(
            number=number,
            item_ids=tuple(f"r{number}-{i}" for i in range(n)),
            z=z,
            class_vectors=vectors,
            seeds=seeds,
            parent_ids=((),) * n,
            rates=torch.full((n,), self.rate),
        )

    def _peek_prior(self) -> Generation:
        state = self.generator.get_state()
        opened = self.opened
        try:
            return self._prior_round()
        finally:
            self.generator.set_state(state)
            self.opened = opened

    def _bred(self, parents: Generation, picks: tuple[int, ...]) -> Generation:
        """The next round from `picks` of `parents`: their recombination, the distinct picks again (unchanged) when
        `keep_picks`, then mutated copies of the picks, in turn, filling the round's 1 + lambda places."""
        number, lam = self._number(), self.config.offspring
        ids = [f"r{number}-{i}" for i in range(1 + lam)]
        index = torch.tensor(picks)
        picked_z = parents.z[index]
        mean = picked_z.mean(0)  # repeats weigh as often as picked
        target_norm = picked_z.norm(dim=1).mean()
        z_rows = [mean * (target_norm / mean.norm().clamp_min(1e-12))]
        vectors = parents.class_vectors
        v_rows = [] if vectors is None else [vectors[index].mean(0)]
        distinct = list(dict.fromkeys(picks))
        picked_ids = tuple(parents.item_ids[i] for i in distinct)
        lineage: list[tuple[str, ...]] = [picked_ids]
        rates = [self.rate]
        seeds = [0]
        kept = distinct[:lam] if self.config.keep_picks else []
        for source in kept:
            z_rows.append(parents.z[source])
            if vectors is not None:
                v_rows.append(vectors[source])
            lineage.append((parents.item_ids[source],))
            rates.append(float(parents.rates[source]))
            seeds.append(parents.seeds[source])
        fresh = min(self.config.fresh, lam - len(kept))
        for k in range(lam - len(kept) - fresh):
            source = picks[k % len(picks)]
            rate = self._offspring_rate()
            z_rows.append(self._mutate_z(parents.z[source], rate))
            if vectors is not None:
                v_rows.append(self._mutate_vector(vectors[source], rate))
            lineage.append((parents.item_ids[source],))
            rates.append(rate)
            seeds.append(0)
        if fresh:
            draws = self._draws(fresh)
            z_rows.extend(draws[1])
            if vectors is not None and draws[2] is not None:
                v_rows.extend(draws[2])
            lineage.extend([()] * fresh)
            rates.extend([self.rate] * fresh)
            seeds.extend(draws[0])
        return Generation(
            number=number,
            item_ids=tuple(ids),
            z=torch.stack(z_rows),
            class_vectors=torch.stack(v_rows) if v_rows else None,
            seeds=tuple(seeds),
            parent_ids=tuple(lineage),
            rates=torch.tensor(rates),
            picks_before=picks,
        )

    def _offspring_rate(self) -> float:
        if not self.config.adapt_mutation_rate:
            return self.rate
        u = float(torch.rand((), generator=self.generator)) * 2 - 1
        return min(1.0, max(1.0 / self.z_size, self.rate * 2 ** (ADAPT_OCTAVES * u)))

    def _mask(self, size: int, rate: float) -> Tensor:
        """Each coordinate with probability `rate`; drawn again while none is (Algorithm 1's `repeat`)."""
        while True:
            mask = torch.rand(size, generator=self.generator) < rate
            if mask.any():
                return mask

    def _mutate_z(self, z: Tensor, rate: float) -> Tensor:
        mask = self._mask(len(z), rate)
        return torch.where(mask, torch.randn(len(z), generator=self.generator), z)

    def _mutate_vector(self, vector: Tensor, rate: float) -> Tensor:
        assert self.class_rows is not None
        rows = self.class_rows
        if self.config.class_mutation == "none":
            return vector
        if self.config.class_mutation == "row":
            if float(torch.rand((), generator=self.generator)) < rate:
                return rows[int(torch.randint(len(rows), (), generator=self.generator))].clone()
            return vector
        mask = torch.rand(len(vector), generator=self.generator) < rate
        donors = torch.randint(len(rows), (len(vector),), generator=self.generator)
        return torch.where(mask, rows[donors, torch.arange(len(vector))], vector)

    def _renumbered(self, generation: Generation) -> Generation:
        """A round shown again: the same items under a new round number."""
        return Generation(**{**generation.__dict__, "number": self._number()})

    # --- state ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "rng": self.generator.get_state(),
            "opened": self.opened,
            "answered": self.answered,
            "shown_images": self.shown_images,
            "stack": [_generation_state(g) for g in self.stack],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rate = float(state["rate"])
        self.generator.set_state(state["rng"])
        self.opened, self.answered = int(state["opened"]), int(state["answered"])
        self.shown_images = int(state["shown_images"])
        self.stack = [_generation_from_state(g) for g in state["stack"]]


def _generation_state(g: Generation) -> dict[str, Any]:
    return {
        "number": g.number,
        "item_ids": list(g.item_ids),
        "z": g.z,
        "class_vectors": g.class_vectors,
        "seeds": torch.tensor(g.seeds, dtype=torch.int64),
        "parent_ids": [list(p) for p in g.parent_ids],
        "rates": g.rates,
        "picks_before": list(g.picks_before),
    }


def _generation_from_state(state: Mapping[str, Any]) -> Generation:
    return Generation(
        number=int(state["number"]),
        item_ids=tuple(state["item_ids"]),
        z=state["z"],
        class_vectors=state["class_vectors"],
        seeds=tuple(int(s) for s in state["seeds"].tolist()),
        parent_ids=tuple(tuple(p) for p in state["parent_ids"]),
        rates=state["rates"],
        picks_before=tuple(int(p) for p in state["picks_before"]),
    )
