"""Before-against-after statistics of seed 000 (section 4): Welch's t-test, Cohen's d, a confidence interval, Holm.

The seed judges a tuned generator by 1,000 images before and 1,000 after, scored by the objective: Welch's t-test at
alpha = 0.001 and Cohen's d, "the change in mean PIR standardized by the standard deviation of the PIRs in the pre-
and post-tuning image sets". Here:

- Welch's test is `scipy.stats.ttest_ind(post, pre, equal_var=False)`, one-sided (`alternative="greater"`: the
  question is whether tuning raised the rate), so `p_value` is P(t >= observed | no change).
- Cohen's d = (mean(post) - mean(pre)) / s_pooled with s_pooled = sqrt(((n1 - 1) s1^2 + (n2 - 1) s2^2) /
  (n1 + n2 - 2)) and s_i the sample standard deviations (ddof = 1): the standard deviation of both sets together.
- The confidence interval is Welch's, for mean(post) - mean(pre), two-sided at 1 - alpha (99.9 %), with the
  Welch-Satterthwaite degrees of freedom (scipy's `confidence_interval` of the two-sided test).
- Holm's step-down correction across objectives (`holm`), controlling the family-wise error rate at alpha.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

#: The seed's significance threshold (section 4).
ALPHA = 0.001


@dataclass(frozen=True)
class Comparison:
    """Post against pre on one objective; `ci` is the (1 - alpha) interval of mean(post) - mean(pre)."""

    n_pre: int
    n_post: int
    mean_pre: float
    mean_post: float
    std_pre: float
    std_post: float
    t: float
    df: float
    p_value: float
    cohens_d: float
    ci: tuple[float, float]
    alpha: float
    significant: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ci": list(self.ci)}


def cohens_d(pre: Sequence[float] | np.ndarray, post: Sequence[float] | np.ndarray) -> float:
    """(mean(post) - mean(pre)) / pooled sample standard deviation (ddof = 1); 0 when both sets are constant."""
    a, b = np.asarray(pre, dtype=np.float64), np.asarray(post, dtype=np.float64)
    n1, n2 = len(a), len(b)
    pooled = math.sqrt(((n1 - 1) * a.var(ddof=1) + (n2 - 1) * b.var(ddof=1)) / (n1 + n2 - 2))
    difference = float(b.mean() - a.mean())
    if pooled == 0.0:
        return 0.0 if difference == 0.0 else math.copysign(math.inf, difference)
    return difference / pooled


def compare(
    pre: Sequence[float] | np.ndarray, post: Sequence[float] | np.ndarray, *, alpha: float = ALPHA
) -> Comparison:
    """Welch's one-sided test that post's mean exceeds pre's, Cohen's d and the two-sided (1 - alpha) interval."""
    a, b = np.asarray(pre, dtype=np.float64), np.asarray(post, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"each set needs at least 2 values, got {len(a)} and {len(b)}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    one_sided = stats.ttest_ind(b, a, equal_var=False, alternative="greater")
    two_sided = stats.ttest_ind(b, a, equal_var=False)
    interval = two_sided.confidence_interval(confidence_level=1.0 - alpha)
    p_value = float(one_sided.pvalue)
    d = cohens_d(a, b)
    return Comparison(
        n_pre=len(a),
        n_post=len(b),
        mean_pre=float(a.mean()),
        mean_post=float(b.mean()),
        std_pre=float(a.std(ddof=1)),
        std_post=float(b.std(ddof=1)),
        t=float(one_sided.statistic),
        df=float(one_sided.df),
        p_value=p_value,
        cohens_d=d,
        ci=(float(interval.low), float(interval.high)),
        alpha=alpha,
        significant=bool(p_value < alpha and d > 0),
    )


def holm(p_values: Mapping[str, float], *, alpha: float = ALPHA) -> dict[str, dict[str, float | bool]]:
    """Holm's step-down correction: adjusted p-values (monotone, capped at 1) and which hypotheses are rejected.

    Sorted ascending, p_(i) is compared with alpha / (m - i) (i from 0); the first that fails stops the rejections.
    The adjusted value is max_{j <= i} min(1, (m - j) p_(j)), so `adjusted < alpha` is the same decision.
    """
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    m = len(ordered)
    result: dict[str, dict[str, float | bool]] = {}
    running, rejecting = 0.0, True
    for i, (name, p) in enumerate(ordered):
        running = max(running, min(1.0, (m - i) * p))
        rejecting = rejecting and p < alpha / (m - i)
        result[name] = {"p_value": p, "adjusted": running, "rejected": rejecting}
    return result
