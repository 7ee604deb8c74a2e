"""Small exact statistics for the evaluation: intervals and tests on test-split accuracy.

An adversary's advantage is estimated as 2·acc − 1 on held-out balanced data; its
interval is the Clopper–Pearson (exact binomial) interval of the accuracy mapped through
the same affine transform, so coverage is exact-conservative rather than asymptotic —
this matters for the small per-category counts. The C2ST p-value is the one-sided
binomial test of "accuracy > 1/2" (classifier two-sample test).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided (1 − alpha) interval for a binomial proportion with k of n successes."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside [0, n={n}]")
    lo = 0.0 if k == 0 else float(_st.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(_st.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def advantage_interval(k: int, n: int, alpha: float = 0.05) -> tuple[float, float, float]:
    """(2·acc − 1, lower, upper) from k correct decisions out of n, Clopper–Pearson based."""
    if n <= 0:
        return (float("nan"), -1.0, 1.0)
    lo, hi = clopper_pearson(k, n, alpha)
    return 2 * k / n - 1, 2 * lo - 1, 2 * hi - 1


def c2st_p_value(k: int, n: int) -> float:
    """One-sided binomial p-value P[X ≥ k], X ~ Bin(n, 1/2): is accuracy above chance?"""
    if n <= 0:
        return 1.0
    return float(_st.binom.sf(k - 1, n, 0.5))


def bonferroni_alpha(alpha: float, m: int) -> float:
    """Per-comparison level so that m simultaneous intervals hold jointly at 1 − alpha."""
    return alpha / max(1, m)


def bonferroni_p(p: float, m: int) -> float:
    """Bonferroni-adjusted p-value of the smallest of m p-values."""
    return min(1.0, p * max(1, m))


def mean_interval(x, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, lower, upper): Student-t interval of a mean (per-prompt similarities)."""
    x = np.asarray(x, np.float64)
    n = x.size
    if n == 0:
        return (float("nan"), float("nan"), float("nan"))
    m = float(x.mean())
    if n == 1:
        return (m, m, m)
    half = float(_st.t.ppf(1 - alpha / 2, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return m, m - half, m + half
