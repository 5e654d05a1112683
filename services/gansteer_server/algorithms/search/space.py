"""What a search moves through. A space owns the search variables' layout: M searches side by side, each one row
of D variables (or, for generator parameters, one set of tensors), their starting point, and how a batch of rows
decodes into what the objective needs.

Vector spaces are normalised to one unit scale (z ~ N(0, I); a class vector or an embedding row moves in units of
the embedding table's spread, c = c0 + s * u), so that a step size or a gradient-free optimizer's unit-scale
candidates mean the same in every part of a row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from gansteer_server.algorithms.search.optimizers import Variables


class Latents(NamedTuple):
    """A generator's inputs: latents z (N, Z) and a condition: class ids (N,) int64, class vectors (N, E) or None."""

    z: Tensor
    condition: Tensor | None


class SearchSpace(Protocol):
    @property
    def searches(self) -> int:
        """M, searched side by side in one batch."""
        ...

    @property
    def dimension(self) -> int:
        """D, the width of one search's row (a parameter space: its number of parameters)."""
        ...

    @property
    def gradient_only(self) -> bool:
        """No rows that a gradient-free optimizer could ask candidates in."""
        ...

    def initial(self, seed: int) -> Variables:
        """The starting variables: an (M, D) tensor, fresh, or a parameter space's own tensors."""
        ...

    def decode(self, variables: Variables, search_index: Tensor) -> Any:
        """Variables (N rows, or the parameters) of searches `search_index` (N,) -> what the objective takes."""
        ...


def project(space: SearchSpace, variables: Variables) -> None:
    """Bring a gradient optimizer's variables back into the space after a step, in place, where the space has
    constraints (`project(variables)`, e.g. an embedding row's clamp); others have none."""
    constrain = getattr(space, "project", None)
    if constrain is not None:
        constrain(variables)


def embedding_scale(table: Tensor) -> float:
    """The spread s of an embedding table's rows about their mean: the unit of a searched class vector."""
    spread = float((table - table.mean(dim=0)).std()) if len(table) > 1 else 0.0
    return spread if spread > 0 else 1.0


def on_shell(z: Tensor, shell: bool) -> Tensor:
    """z as searched, or scaled onto the shell |z| = sqrt(Z) where N(0, I) in Z dimensions puts almost all its mass
    (a search that drifts to a small or large norm leaves the latents the generator was trained on)."""
    if not shell:
        return z
    return math.sqrt(z.shape[1]) * z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _normal(searches: int, size: int, seed: int) -> Tensor:
    return torch.randn(searches, size, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True, eq=False)
class LatentSpace:
    """A latent z per search, from the prior N(0, I); an unconditional generator's (or an unconditioned) search."""

    z_size: int
    searches: int
    shell: bool = False
    gradient_only = False

    @property
    def dimension(self) -> int:
        return self.z_size

    def initial(self, seed: int) -> Tensor:
        return _normal(self.searches, self.z_size, seed)

    def decode(self, variables: Tensor, search_index: Tensor) -> Latents:
        return Latents(on_shell(variables, self.shell), None)


@dataclass(frozen=True, eq=False)
class ConditionedLatentSpace:
    """A latent z per search with each search's class held fixed (III-C5 strategy 2)."""

    z_size: int
    class_ids: Tensor  # (M,) int64
    shell: bool = False
    gradient_only = False

    @property
    def searches(self) -> int:
        return len(self.class_ids)

    @property
    def dimension(self) -> int:
        return self.z_size

    def initial(self, seed: int) -> Tensor:
        return _normal(self.searches, self.z_size, seed)

    def decode(self, variables: Tensor, search_index: Tensor) -> Latents:
        return Latents(on_shell(variables, self.shell), self.class_ids[search_index])


@dataclass(frozen=True, eq=False)
class LatentClassSpace:
    """A latent z and a continuous class vector c = c0 + s * u per search, as one row [z, u] (III-C5 strategy 1).

    u starts at 0, so each search starts from its c0: a given class's row or the table's mean.
    """

    z_size: int
    class_start: Tensor  # (M, E): c0 of each search
    class_scale: float  # s
    shell: bool = False
    gradient_only = False

    @classmethod
    def from_table(
        cls, z_size: int, table: Tensor, class_ids: Tensor | None, searches: int, shell: bool = False
    ) -> LatentClassSpace:
        """Start each search at its class's row (`class_ids` (M,)), or all at the table's mean when None."""
        table = table.detach().float()
        start = table.mean(dim=0).expand(searches, -1) if class_ids is None else table[class_ids]
        return cls(z_size, start, embedding_scale(table), shell)

    @property
    def searches(self) -> int:
        return len(self.class_start)

    @property
    def dimension(self) -> int:
        return self.z_size + self.class_start.shape[1]

    def initial(self, seed: int) -> Tensor:
        z = _normal(self.searches, self.z_size, seed)
        return torch.cat([z, z.new_zeros(self.searches, self.class_start.shape[1])], dim=1)

    def decode(self, variables: Tensor, search_index: Tensor) -> Latents:
        z, u = variables[:, : self.z_size], variables[:, self.z_size :]
        return Latents(on_shell(z, self.shell), self.class_start[search_index] + self.class_scale * u)


@dataclass(frozen=True, eq=False)
class LatentSimplexSpace:
    """A latent z and a class vector on the simplex of the embedding rows per search, as one row [z, w]: the class
    vector is c = softmax(w) @ table, a convex combination of trained rows, so it cannot leave their hull (issue
    20: a free class vector grew to 3-4 times any row's norm, outside their span, and the images turned to speckle).
    With `shell`, z is read as sqrt(Z) * z / |z|, on the shell where the prior N(0, I) puts almost all its mass.

    w starts at 0 (the rows' mean) or, for a search given a class, at `START_WEIGHT` on that class's logit, which
    puts 90% of the weight on its row whatever the number of rows.
    """

    z_size: int
    table: Tensor  # (K, E) the generator's class rows
    start_class: Tensor | None  # (M,) int64 each search's class, or None: start at the mean
    searches: int
    shell: bool = False

    gradient_only = False
    START_SHARE = 0.9

    @property
    def dimension(self) -> int:
        return self.z_size + len(self.table)

    def initial(self, seed: int) -> Tensor:
        z = _normal(self.searches, self.z_size, seed)
        w = z.new_zeros(self.searches, len(self.table))
        if self.start_class is not None and len(self.table) > 1:
            share = self.START_SHARE
            w[torch.arange(self.searches), self.start_class] = math.log(share * (len(self.table) - 1) / (1 - share))
        return torch.cat([z, w], dim=1)

    def decode(self, variables: Tensor, search_index: Tensor) -> Latents:
        z, w = variables[:, : self.z_size], variables[:, self.z_size :]
        return Latents(on_shell(z, self.shell), torch.softmax(w, dim=1) @ self.table.to(w.dtype))


@dataclass(frozen=True, eq=False)
class EmbeddingRowSpace:
    """One class-embedding row e = e0 + s * u per search (embedding activation maximisation); decodes to the
    rows (N, E). e0 is one row for every search (E,) or each search's own (M, E). Restarts start at e0 plus
    `jitter` times N(0, I) in units of s, so they differ. With `bounds`, every row is clamped into [low, high]
    after each step (seed 001: "we kept the embeddings within [-0.59, 0.61] by clipping")."""

    start: Tensor  # (E,) or (M, E): e0
    scale: float  # s
    searches: int = 1
    jitter: float = 0.0
    bounds: tuple[float, float] | None = None

    gradient_only = False

    def __post_init__(self) -> None:
        if self.start.dim() == 2 and len(self.start) != self.searches:
            raise ValueError(f"{len(self.start)} starting rows for {self.searches} searches")
        if self.bounds is not None and not self.bounds[0] < self.bounds[1]:
            raise ValueError(f"bounds must be (low, high) with low < high, got {self.bounds}")

    @classmethod
    def from_table(cls, table: Tensor, row: int | None, searches: int = 1, jitter: float = 0.0) -> EmbeddingRowSpace:
        """Start at the table's row `row`, or at its mean when None."""
        table = table.detach().float()
        start = table.mean(dim=0) if row is None else table[row]
        return cls(start, embedding_scale(table), searches, jitter)

    @property
    def dimension(self) -> int:
        return int(self.start.shape[-1])

    def initial(self, seed: int) -> Tensor:
        variables = self.jitter * _normal(self.searches, self.dimension, seed)
        self.project(variables)
        return variables

    def _start_of(self, search_index: Tensor) -> Tensor:
        return self.start if self.start.dim() == 1 else self.start[search_index]

    def decode(self, variables: Tensor, search_index: Tensor) -> Tensor:
        return self._start_of(search_index) + self.scale * variables

    @torch.no_grad()
    def project(self, variables: Tensor) -> None:
        """Clamp every search's row into `bounds`, in place (u's bounds follow from e = e0 + s * u)."""
        if self.bounds is None:
            return
        start = self._start_of(torch.arange(self.searches))
        low, high = ((bound - start) / self.scale for bound in self.bounds)
        variables.copy_(torch.maximum(torch.minimum(variables, high), low))


@dataclass(frozen=True, eq=False)
class ParameterSpace:
    """A set of a model's parameters, searched in place as one search (tuning); gradient optimizers only, since a
    population of whole models would not fit one batch. The objective runs the model whose tensors these are."""

    parameters: Sequence[Tensor]
    searches: int = field(default=1, init=False)
    gradient_only = True

    @property
    def dimension(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters)

    def initial(self, seed: int) -> list[Tensor]:
        return list(self.parameters)  # the seed plays no part: tuning starts from the model as it is

    def decode(self, variables: list[Tensor], search_index: Tensor) -> list[Tensor]:
        return variables


ClassSpace = LatentSpace | ConditionedLatentSpace | LatentClassSpace | LatentSimplexSpace
#: How a searched class vector moves: anywhere (`free`, c = c0 + s * u) or among the rows (`simplex`).
CLASS_VECTORS = ("free", "simplex")


def class_space(
    mode: str,
    z_size: int,
    searches: int,
    table: Tensor | None,
    class_ids: Tensor | None,
    *,
    class_vector: str = "free",
    shell: bool = False,
) -> ClassSpace:
    """The space of a class mode: z alone (`none`), z with each search's fixed class (`conditioned`), or z and a
    searched class vector starting from each search's class row or the table's mean (`search`), free or on the
    rows' simplex (`class_vector`). `class_ids` (M,) holds each search's class; `shell` holds z on its shell."""
    if class_vector not in CLASS_VECTORS:
        raise ValueError(f"class_vector must be one of {CLASS_VECTORS}, got {class_vector!r}")
    if mode == "none":
        return LatentSpace(z_size, searches, shell)
    if table is not None and class_ids is not None and int(class_ids.max()) >= len(table):
        raise ValueError(f"class_ids {sorted(set(class_ids.tolist()))} out of range for {len(table)} classes")
    if mode == "conditioned":
        if class_ids is None:
            raise ValueError("class_mode 'conditioned' needs class_ids")
        return ConditionedLatentSpace(z_size, class_ids, shell)
    if table is None:
        raise ValueError("class_mode 'search' needs the generator's class_embeddings")
    if class_vector == "simplex":
        return LatentSimplexSpace(z_size, table.detach().float(), class_ids, searches, shell)
    return LatentClassSpace.from_table(z_size, table, class_ids, searches, shell)
