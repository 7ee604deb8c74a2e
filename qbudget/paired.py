"""Paired comparisons of a strategy against a baseline across seeds.

Cells of a sweep that share a world and a seed share everything but the strategy (the same
world, probe and evaluation keys), so the fair comparison is *paired*: one difference per
seed, strategy minus baseline. With the handful of seeds a sweep can afford, two
complementary statistics are reported:

* the mean difference with a percentile **bootstrap** interval (seeded
  :class:`numpy.random.Generator`; it says how large the effect is), and
* the **Wilcoxon signed-rank** test (:func:`scipy.stats.wilcoxon`, exact null distribution,
  zero differences dropped as in Wilcoxon's original procedure; it says whether the sign of
  the effect is consistent). Its exact two-sided p-value cannot go below ``2 / 2**m`` with
  ``m`` non-zero differences (0.0625 at five seeds), so a "not distinguishable" verdict at
  few seeds is a statement about the evidence, not about the strategies; the note says so.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from qbudget.errors import QBudgetError

#: Differences are rounded to this many decimals before ranking, so that values that are
#: equal up to float noise (0.3 - 0.25 vs 0.15 - 0.1) count as the ties they are.
ROUND_DECIMALS = 12


@dataclass(frozen=True)
class PairedResult:
    """One paired comparison (strategy − baseline) over ``n`` seeds."""

    n: int
    mean_diff: float
    ci_low: float          # bootstrap percentile interval of the mean difference (NaN if n < 2)
    ci_high: float
    statistic: float       # Wilcoxon: the smaller of the positive- and negative-rank sums
    p_value: float         # exact two-sided Wilcoxon p (NaN when it cannot be computed)
    min_p: float           # the smallest p the test can give with these many non-zero pairs
    verdict: str
    note: str


def bootstrap_mean_ci(diffs, *, rng: np.random.Generator, n_resamples: int = 10_000,
                      confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs``.

    ``n_resamples`` resamples of the same size, drawn with replacement by ``rng``; the
    interval is the (α/2, 1−α/2) quantiles of the resampled means. NaNs when n < 2.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1:
        raise QBudgetError("bootstrap_mean_ci needs a 1-D array of differences")
    if len(d) < 2:
        return math.nan, math.nan
    if not 0 < confidence < 1:
        raise QBudgetError(f"confidence must be in (0, 1), got {confidence}")
    idx = rng.integers(0, len(d), size=(n_resamples, len(d)))
    means = d[idx].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def wilcoxon_signed_rank(diffs) -> tuple[float, float, int]:
    """Two-sided Wilcoxon signed-rank test of ``diffs`` against 0.

    Returns ``(statistic, p_value, m)``: ``statistic`` is min(W+, W−) over midranks of
    ``|d|``, ``p_value`` the exact two-sided p (enumeration of the 2**m sign patterns,
    which scipy does for m ≤ 50 even with tied ranks), ``m`` the number of non-zero
    differences. All-zero differences give p = 1; an empty input gives NaN.
    """
    d = np.round(np.asarray(diffs, dtype=np.float64), ROUND_DECIMALS)
    nz = d[d != 0]
    m = int(len(nz))
    if len(d) == 0:
        return math.nan, math.nan, 0
    if m == 0:
        return 0.0, 1.0, 0
    method = "exact" if m <= 50 else "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.wilcoxon(nz, zero_method="wilcox", alternative="two-sided", method=method)
    return float(res.statistic), float(res.pvalue), m


def min_exact_p(m: int) -> float:
    """Smallest exact two-sided signed-rank p with ``m`` non-zero differences."""
    return 1.0 if m <= 0 else min(1.0, 2.0 / 2.0 ** m)


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def paired_compare(diffs, *, rng: np.random.Generator, alpha: float = 0.05,
                   what: str = "advantage", n_resamples: int = 10_000) -> PairedResult:
    """Compare a strategy to the baseline from per-seed differences (strategy − baseline).

    The verdict is plain words driven by the Wilcoxon p at level ``alpha``: "lower
    <what> than baseline (p=…)", "higher <what> than baseline (p=…)", or "not
    distinguishable from baseline at these seeds". Lower is better for advantage.
    """
    d = np.asarray(diffs, dtype=np.float64)
    d = d[~np.isnan(d)]
    n = int(len(d))
    if n == 0:
        return PairedResult(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan,
                            "no paired seeds", "no seed was run for both strategies")
    mean = float(d.mean())
    lo, hi = bootstrap_mean_ci(d, rng=rng, n_resamples=n_resamples)
    stat, p, m = wilcoxon_signed_rank(d)
    floor = min_exact_p(m)
    notes = []
    if n < 2:
        notes.append("n=1: no interval and no test")
        p = math.nan
    elif floor > alpha:
        notes.append(f"with {m} non-zero paired difference(s) the exact two-sided p cannot go "
                     f"below {floor:.3g}; more seeds are needed to detect a difference at {alpha}")
    if m < n and n >= 2:
        notes.append(f"{n - m} zero difference(s) dropped by the signed-rank test")
    if not math.isnan(p) and p < alpha and mean != 0:
        word = "lower" if mean < 0 else "higher"
        verdict = f"{word} {what} than baseline (p={_fmt_p(p)})"
    else:
        verdict = (f"not distinguishable from baseline at these seeds (p={_fmt_p(p)}, n={n})")
    return PairedResult(n, mean, lo, hi, stat, p, floor, verdict, "; ".join(notes))
