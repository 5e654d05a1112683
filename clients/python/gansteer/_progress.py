"""The progress bar of `Job.wait`: steps done out of the budget, the criterion being minimised, and the rate.

The rate shown is the server's (steps over the job's running time), not tqdm's own: a watcher that attaches late
replays the job's events in a burst, and a client-side rate would then read thousands of steps per second.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

from tqdm.auto import tqdm  # type: ignore[import-untyped]

_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


class ProgressBar:
    """A tqdm bar fed by Progress events; a no-op when disabled, so callers need not branch."""

    def __init__(self, description: str, *, enabled: bool = True) -> None:
        self._bar = tqdm(desc=description, unit="step", dynamic_ncols=True, bar_format=_FORMAT) if enabled else None

    def update(self, step: int, total_steps: int, criterion: Mapping[str, float], elapsed_s: float = 0.0) -> None:
        if self._bar is None:
            return
        if total_steps and self._bar.total != total_steps:
            self._bar.total = total_steps
        self._bar.n = step  # may go back: a job that resumed from a checkpoint repeats steps
        shown = {}
        if "total" in criterion:
            shown["criterion"] = f"{criterion['total']:.4g}"
        if elapsed_s > 0:
            shown["rate"] = f"{step / elapsed_s:.1f} step/s"
        self._bar.set_postfix(shown, refresh=False)
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
