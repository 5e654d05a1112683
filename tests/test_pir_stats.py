"""The PIR evaluation statistics against values worked out by hand (seed 000, section 4)."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from gansteer_server.algorithms.metrics.stats import cohens_d, compare, holm

PRE = [1.0, 2.0, 3.0, 4.0]
POST = [3.0, 4.0, 5.0, 6.0, 7.0]
# By hand: mean 2.5 and 5; sample variances 5/3 and 5/2; pooled sd sqrt((3 * 5/3 + 4 * 5/2) / 7) = sqrt(15/7).
D = 2.5 / math.sqrt(15 / 7)
SE2 = (5 / 3) / 4 + (5 / 2) / 5  # 11/12
T = 2.5 / math.sqrt(SE2)
DF = SE2**2 / (((5 / 3) / 4) ** 2 / 3 + ((5 / 2) / 5) ** 2 / 4)


def test_cohens_d_uses_the_pooled_sample_standard_deviation() -> None:
    assert cohens_d(PRE, POST) == pytest.approx(D, rel=1e-12)
    assert pytest.approx(1.707825, abs=1e-6) == D
    assert cohens_d(POST, PRE) == pytest.approx(-D, rel=1e-12)


def test_welch_one_sided_matches_the_hand_computed_t_and_degrees_of_freedom() -> None:
    result = compare(PRE, POST, alpha=0.001)
    assert result.t == pytest.approx(T, rel=1e-12)
    assert result.t == pytest.approx(2.611165, abs=1e-6)
    assert result.df == pytest.approx(DF, rel=1e-10)
    assert result.df == pytest.approx(6.980769, abs=1e-6)
    assert result.p_value == pytest.approx(scipy_stats.t.sf(T, DF), rel=1e-10)
    # Student's pooled test would give another t: the test really is Welch's.
    assert result.t != pytest.approx(scipy_stats.ttest_ind(POST, PRE).statistic, rel=1e-3)
    assert not result.significant  # p is about 0.017, far above alpha = 0.001


def test_the_999_interval_is_welch_s_around_the_difference() -> None:
    result = compare(PRE, POST, alpha=0.001)
    half = scipy_stats.t.ppf(1 - 0.0005, DF) * math.sqrt(SE2)
    assert result.ci[0] == pytest.approx(2.5 - half, rel=1e-9)
    assert result.ci[1] == pytest.approx(2.5 + half, rel=1e-9)
    assert result.ci[0] < 0 < result.ci[1]  # consistent with the non-significant two-sided test


def test_a_clear_rise_is_significant_and_a_fall_is_not() -> None:
    pre = [0.10 + 0.001 * (i % 7) for i in range(50)]
    post = [0.20 + 0.001 * (i % 5) for i in range(50)]
    assert compare(pre, post).significant
    assert not compare(post, pre).significant


def test_holm_step_down_by_hand() -> None:
    result = holm({"a": 0.0001, "b": 0.0004, "c": 0.01}, alpha=0.001)
    assert result["a"]["adjusted"] == pytest.approx(0.0003)
    assert result["b"]["adjusted"] == pytest.approx(0.0008)
    assert result["c"]["adjusted"] == pytest.approx(0.01)
    assert [result[k]["rejected"] for k in "abc"] == [True, True, False]
    # A failure stops the rejections that follow even when a later p-value would pass its own threshold alone.
    stopped = holm({"a": 0.0005, "b": 0.00051}, alpha=0.001)
    assert [stopped[k]["rejected"] for k in "ab"] == [False, False]


def test_too_few_values_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        compare([1.0], [1.0, 2.0])
