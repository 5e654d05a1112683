"""What a search optimises: a batched objective, its direction said once.

An objective scores N decoded points at once (one generator forward for a whole population) and returns one value
per point, plus named unweighted terms that the run reports at each search's best point. Where the search uses a
gradient optimizer the values must be differentiable in the search variables: the run back-propagates through
them, so an objective needs no gradient code of its own.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from torch import Tensor


class Evaluation(NamedTuple):
    values: Tensor  # (N,), in the objective's own sense
    terms: dict[str, Tensor]  # name -> (N,)


class Objective(Protocol):
    @property
    def maximize(self) -> bool:
        """True when higher values are better; the run minimises the negated values and reports in this sense."""
        ...

    @property
    def term_names(self) -> tuple[str, ...]:
        """The names of the terms every evaluation returns."""
        ...

    def __call__(self, point: Any, search_index: Tensor) -> Evaluation:
        """Values (N,) of the points a space decoded for searches `search_index` (N,)."""
        ...
