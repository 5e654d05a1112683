"""The progress bar of `Job.wait`: steps done out of the budget, the criterion being minimised, and the rate.

tqdm computes the rate from the increments it is given, so the bar is advanced by differences between the steps
the server reports, never by setting the count (which would show no rate).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

from tqdm.auto import tqdm  # type: ignore[import-untyped]


class ProgressBar:
    """A tqdm bar fed by Progress events; a no-op when disabled, so callers need not branch."""

    def __init__(self, description: str, *, enabled: bool = True) -> None:
        self._bar = tqdm(desc=description, unit="step", dynamic_ncols=True, leave=True) if enabled else None

    def update(self, step: int, total_steps: int, criterion: Mapping[str, float]) -> None:
        if self._bar is None:
            return
        if total_steps and self._bar.total != total_steps:
            self._bar.total = total_steps
        if step >= self._bar.n:
            self._bar.update(step - self._bar.n)
        else:  # a job that resumed from a checkpoint reports an earlier step again
            self._bar.n = step
        if "total" in criterion:
            self._bar.set_postfix(criterion=f"{criterion['total']:.4g}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
