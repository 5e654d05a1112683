"""What every metric returns: its value with the sample sizes, resize mode and models that produced it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class MetricResult:
    """One figure and how it was measured, so that it is never reported without its N, resize and models.

    `n` is the number of pairs or samples used (for a two-set metric, the generated set's size) and `n_reference`
    the other set's size; `extra` holds secondary figures and settings (KID's std, MS-SSIM's window, k, ...).
    """

    name: str
    value: float
    n: int
    resize: str
    models: tuple[str, ...]
    n_reference: int | None = None
    extra: Mapping[str, float | int | str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": float(self.value),
            "n": int(self.n),
            "n_reference": None if self.n_reference is None else int(self.n_reference),
            "resize": self.resize,
            "models": list(self.models),
            "extra": dict(self.extra),
        }
