"""Statistics for comparing conditions across seeds (scipy underneath).

- `summarize`: mean, std and a 95% confidence interval: Student t for 2 <= n < 20, bootstrap
  (scipy's BCa) for n >= 20; for n = 1 an explicit "n too small" note instead of an interval.
- `paired_comparison`: condition A vs B on the same seeds: paired t-test, or an exact/approximate
  permutation test of the mean difference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import numpy as np
from scipy import stats

# BCa needs many values: at 5-10 seeds it under-covers (intervals narrower than t's, and narrower
# than the paired t-test beside them implies), so t is used below 20.
BOOTSTRAP_FROM = 20


@dataclass
class Summary:
    n: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None
    method: Literal["t", "bootstrap"] | None
    note: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self, digits: int = 4) -> str:
        if self.ci_low is None:
            return f"{self.mean:.{digits}f} (n={self.n}; {self.note})"
        return (f"{self.mean:.{digits}f} ± {self.std:.{digits}f} "
                f"[{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}] (n={self.n}, {self.method})")


def summarize(values: Sequence[float], confidence: float = 0.95, seed: int = 0) -> Summary:
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values to summarize")
    mean = float(x.mean())
    if x.size == 1:
        return Summary(1, mean, None, None, None, None, "n too small: one run gives no spread and no interval")
    std = float(x.std(ddof=1))
    if std == 0.0:  # a t or bootstrap interval of a constant is degenerate (scipy returns nan)
        return Summary(int(x.size), mean, std, mean, mean, "t" if x.size < BOOTSTRAP_FROM else "bootstrap", "all values equal")
    if x.size < BOOTSTRAP_FROM:
        low, high = stats.t.interval(confidence, df=x.size - 1, loc=mean, scale=stats.sem(x))
        return Summary(int(x.size), mean, std, float(low), float(high), "t")
    res = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=9999, method="BCa",
                          rng=np.random.default_rng(seed))
    return Summary(int(x.size), mean, std, float(res.confidence_interval.low), float(res.confidence_interval.high), "bootstrap")


@dataclass
class Comparison:
    n: int
    mean_difference: float
    statistic: float | None
    p_value: float | None
    method: Literal["paired_t", "permutation"]
    note: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def paired_comparison(a: Sequence[float], b: Sequence[float], method: Literal["paired_t", "permutation"] = "paired_t",
                      seed: int = 0) -> Comparison:
    """A − B on paired runs (same seeds)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired comparison needs equal lengths, got {x.size} and {y.size}")
    diff = float((x - y).mean()) if x.size else float("nan")
    if x.size < 2:
        return Comparison(int(x.size), diff, None, None, method, "n too small: a paired test needs at least 2 seeds")
    if float(np.ptp(x - y)) == 0.0:  # every seed differs by the same amount: no test statistic exists
        return Comparison(int(x.size), diff, None, None, method, "the differences are identical in every seed; no test")
    if method == "paired_t":
        res = stats.ttest_rel(x, y)
        return Comparison(int(x.size), diff, float(res.statistic), float(res.pvalue), method)
    res = stats.permutation_test((x, y), lambda u, v: np.mean(u - v), permutation_type="samples",
                                 n_resamples=9999, rng=np.random.default_rng(seed))
    return Comparison(int(x.size), diff, float(res.statistic), float(res.pvalue), method)
