from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from cft_adapters.analysis.stats import paired_comparison, summarize


def test_t_interval_matches_scipy() -> None:
    values = [0.61, 0.58, 0.66]
    s = summarize(values)
    low, high = stats.t.interval(0.95, df=2, loc=np.mean(values), scale=stats.sem(values))
    assert s.method == "t" and s.n == 3
    assert (s.ci_low, s.ci_high) == pytest.approx((low, high))
    assert s.std == pytest.approx(np.std(values, ddof=1))
    assert s.ci_low < s.mean < s.ci_high


def test_t_up_to_19_runs_then_bootstrap_matching_scipy() -> None:
    assert summarize([0.61, 0.58, 0.66, 0.63, 0.70, 0.59]).method == "t"  # BCa under-covers at small n
    values = list(np.random.default_rng(0).normal(0.6, 0.05, size=20))
    s = summarize(values, seed=3)
    ref = stats.bootstrap((np.array(values),), np.mean, confidence_level=0.95, n_resamples=9999, method="BCa",
                          rng=np.random.default_rng(3))
    assert s.method == "bootstrap"
    assert (s.ci_low, s.ci_high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))


def test_single_run_says_n_is_too_small() -> None:
    s = summarize([0.5])
    assert s.ci_low is None and s.std is None and "n too small" in s.note
    assert "n too small" in s.describe()


def test_paired_comparisons_match_scipy() -> None:
    a, b = [0.60, 0.62, 0.65, 0.61], [0.55, 0.60, 0.58, 0.57]
    t = paired_comparison(a, b)
    ref = stats.ttest_rel(a, b)
    assert (t.statistic, t.p_value) == pytest.approx((ref.statistic, ref.pvalue))
    assert t.mean_difference == pytest.approx(np.mean(np.subtract(a, b)))
    perm = paired_comparison(a, b, method="permutation")
    assert perm.p_value == pytest.approx(0.125)  # 4 pairs, all positive: 2 of 16 sign flips as extreme
    assert paired_comparison([0.5], [0.4]).note.startswith("n too small")
    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([1, 2], [1])
