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

For comparisons with the power to decide (:func:`permutation_compare`):

* the paired **sign-flip permutation test** over seeds (:func:`sign_flip_test`: exact
  enumeration of the 2**n sign patterns up to :data:`EXACT_MAX_SEEDS` seeds, Monte Carlo
  with an explicit Generator beyond), which uses the sizes of the differences;
* the **minimum detectable difference** at the run's seeds
  (:func:`min_detectable_difference`, α = 0.05, power 0.8, from the observed paired
  spread), printed with every verdict so that "not distinguishable" says what could
  have been seen;
* a **hierarchical bootstrap** interval over seeds, then probe items within each seed
  (:func:`hierarchical_bootstrap_ci`), for a seed × item table of per-item values, and
  the same from per-seed item counts (:func:`hierarchical_bootstrap_counts`: what a
  results table keeps, so what the sweep summary uses; the item-level pairing of the two
  cells is not stored, so their items are drawn independently, which errs wide).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

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


# ---------------------------------------------------------------------------------------
# Comparisons with power: a sign-flip permutation test over seeds, a hierarchical bootstrap
# over seeds then probe items, and the minimum detectable difference at the run's seeds.

#: Seeds up to which the sign-flip test enumerates all 2**n patterns (65,536 at 16).
EXACT_MAX_SEEDS = 16


@dataclass(frozen=True)
class SignFlipResult:
    """Two-sided paired sign-flip permutation test of "mean difference = 0"."""

    n: int
    statistic: float       # the mean difference
    p_value: float
    exact: bool            # all 2**n sign patterns enumerated (else Monte Carlo)
    n_patterns: int        # patterns used (2**n, or the Monte Carlo draws + the identity)
    min_p: float           # the smallest p this test can give at these seeds


def _sign_patterns(n: int) -> np.ndarray:
    """All 2**n sign vectors as float64 [2**n, n] (the identity first)."""
    bits = (np.arange(2 ** n, dtype=np.int64)[:, None] >> np.arange(n)) & 1
    return 1.0 - 2.0 * bits


def sign_flip_p_values(diffs, *, rng: np.random.Generator | None = None,
                       n_resamples: int = 9_999, exact_max_n: int = EXACT_MAX_SEEDS):
    """Vectorised sign-flip p-values for each row of ``diffs`` ``[tables, n]``.

    Under H0 (a strategy is no better or worse than the baseline) each seed's paired
    difference is symmetric about 0, so flipping its sign leaves the joint distribution
    unchanged; the p-value is the share of sign patterns whose |mean| reaches the
    observed one. With ``n ≤ exact_max_n`` all ``2**n`` patterns are enumerated (exact,
    deterministic, p ≥ 2/2**n); otherwise ``n_resamples`` random patterns drawn by
    ``rng`` plus the identity give ``(1 + hits) / (1 + n_resamples)``, which is valid at
    every level. Returns ``(p_values, exact)``. Flipping signs of the mean is the same
    test as flipping them for Student's t, since Σd² does not change under a flip.
    """
    d = np.asarray(diffs, np.float64)
    if d.ndim == 1:
        d = d[None, :]
    if d.ndim != 2:
        raise QBudgetError("sign_flip_p_values needs [tables, seeds] differences")
    m, n = d.shape
    if n == 0:
        return np.full(m, math.nan), True
    obs = np.abs(d.sum(axis=1))
    tol = 1e-9 * np.maximum(np.abs(d).sum(axis=1), 1e-300)   # ties up to float noise
    if n <= exact_max_n:
        s = _sign_patterns(n)
        hits = np.zeros(m, np.int64)
        for i in range(0, len(s), 8192):
            hits += (np.abs(d @ s[i:i + 8192].T) >= (obs - tol)[:, None]).sum(axis=1)
        return hits / float(len(s)), True
    if rng is None:
        raise QBudgetError(f"with more than {exact_max_n} seeds the sign-flip test draws "
                           "random patterns: pass rng=numpy.random.Generator")
    hits = np.zeros(m, np.int64)
    left = int(n_resamples)
    while left > 0:
        b = min(left, 4096)
        s = rng.choice(np.array([-1.0, 1.0]), size=(b, n))
        hits += (np.abs(d @ s.T) >= (obs - tol)[:, None]).sum(axis=1)
        left -= b
    return (1.0 + hits) / (1.0 + n_resamples), False


def sign_flip_test(diffs, *, rng: np.random.Generator | None = None, n_resamples: int = 9_999,
                   exact_max_n: int = EXACT_MAX_SEEDS) -> SignFlipResult:
    """Paired sign-flip permutation test of per-seed differences (strategy − baseline).

    Exact enumeration up to ``exact_max_n`` seeds, Monte Carlo with ``rng`` beyond (see
    :func:`sign_flip_p_values`). Unlike the signed-rank test it uses the sizes of the
    differences, not only their ranks, and its smallest p is still ``2 / 2**n``: at
    least 6 seeds are needed before anything can be called different at α = 0.05.
    NaN differences are dropped.
    """
    d = np.asarray(diffs, np.float64).reshape(-1)
    d = d[~np.isnan(d)]
    n = int(len(d))
    if n == 0:
        return SignFlipResult(0, math.nan, math.nan, True, 0, math.nan)
    p, exact = sign_flip_p_values(d, rng=rng, n_resamples=n_resamples, exact_max_n=exact_max_n)
    if exact:
        return SignFlipResult(n, float(d.mean()), float(p[0]), True, 2 ** n, 2.0 ** (1 - n))
    return SignFlipResult(n, float(d.mean()), float(p[0]), False, n_resamples + 1,
                          max(2.0 ** (1 - n), 1.0 / (n_resamples + 1)))


def min_detectable_difference(sd: float, n: int, *, alpha: float = 0.05,
                              power: float = 0.8) -> float:
    """Smallest true mean difference the two-sided paired test detects with ``power``.

    ``sd`` is the spread of the per-seed paired differences (the sample standard deviation
    of strategy − baseline over seeds), ``n`` the number of seeds. The MDE ``δ`` solves
    the exact power equation of the paired t-test under normal differences,

        P(|T'| > t_{1−α/2, n−1}) = power,  T' ~ noncentral t(df = n − 1, nc = δ·√n / sd),

    i.e. ``δ ≈ (t_{1−α/2,n−1} + t_{power,n−1}) · sd / √n`` (the usual formula, which this
    refines by the far tail). The sign-flip test (:func:`sign_flip_test`) is the
    permutation version of the same t statistic, and its power matches this equation
    (``tests/test_compare_power.py`` checks it on simulated seed × item tables) once
    its floor ``2 / 2**n`` is below α. Calibrated to that test: with ``n`` ≤
    :data:`EXACT_MAX_SEEDS` the exact test's p-values are multiples of ``2 / 2**n``, so it
    rejects at the largest attainable level ≤ α (:func:`effective_alpha`: 0.03125 at 6
    seeds, 0.0488 at 10), and ``t_{1−α/2}`` is taken at that level. Below the floor
    (n ≤ 5 at α = 0.05) no difference is detectable and this returns ``inf``; with
    ``sd = 0`` and enough seeds, 0.
    """
    n = int(n)
    sd = float(sd)
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise QBudgetError("alpha and power must be in (0, 1)")
    if n < 2 or math.isnan(sd) or 2.0 ** (1 - n) > alpha:
        return math.inf
    if sd == 0:
        return 0.0
    df = n - 1
    tc = float(stats.t.ppf(1 - effective_alpha(n, alpha) / 2, df))

    def gap(nc: float) -> float:
        lower = float(stats.nct.cdf(-tc, df, nc))   # the wrong-sign tail; scipy can NaN
        return float(stats.nct.sf(tc, df, nc)) + (0.0 if math.isnan(lower) else lower) - power

    nc = optimize.brentq(gap, 0.0, 1.5 * (tc + float(stats.t.ppf(power, df))) + 1.0,
                         xtol=1e-10, rtol=1e-12)
    return float(nc) * sd / math.sqrt(n)


def seeds_for_mde(sd: float, target: float, *, alpha: float = 0.05, power: float = 0.8,
                  max_seeds: int = 1000) -> int | None:
    """Fewest seeds at which :func:`min_detectable_difference` is ≤ ``target``, for paired
    differences spread like ``sd`` (None beyond ``max_seeds`` or when ``sd`` is unknown).

    Why: "not distinguishable at these seeds" needs its other half, how many seeds would
    make a difference of ``target`` detectable at the spread a sweep measured -- the
    number to plan the next sweep with. The MDE is not monotone in n at small n (the exact
    test's attainable level moves in steps), so this scans n upwards.
    """
    if math.isnan(sd) or not target > 0:
        return None
    for n in range(_seeds_needed(alpha), int(max_seeds) + 1):
        if min_detectable_difference(sd, n, alpha=alpha, power=power) <= target:
            return n
    return None


def effective_alpha(n: int, alpha: float = 0.05) -> float:
    """The size the exact sign-flip test really has at nominal ``alpha`` with ``n`` seeds.

    Its two-sided p-values are multiples of ``2 / 2**n`` (patterns come in ± pairs), so
    "p ≤ α" rejects exactly when p ≤ the largest such multiple ≤ α. Beyond
    :data:`EXACT_MAX_SEEDS` (Monte Carlo) the grid is fine enough to take α itself.
    """
    n = int(n)
    if n > EXACT_MAX_SEEDS:
        return float(alpha)
    step = 2.0 ** (1 - n)
    return math.floor(alpha / step + 1e-9) * step


def hierarchical_bootstrap_ci(table, baseline=None, *, rng: np.random.Generator,
                              n_resamples: int = 2_000, confidence: float = 0.95,
                              scale: float = 1.0) -> tuple[float, float, float]:
    """(estimate, low, high) of the mean over seeds of the per-seed item mean.

    ``table`` is ``[seeds, items]`` of 0/1 correctness (or any real per-item value);
    with ``baseline`` (same shape, the same probe items in the same seeds) the quantity
    is the paired difference ``table − baseline``. Each resample draws seeds with
    replacement, then, within each drawn seed, items with replacement (the same items
    for both tables, keeping the pairing); the interval is the percentile interval of
    ``scale ×`` the resampled means (``scale=2`` turns accuracy into advantage).

    Resampling both levels carries the evaluation noise of the finite probe *and* the
    seed-to-seed variation into the interval; because the seed-level spread already
    contains the item noise once, the interval is slightly conservative (wider), never
    anti-conservative, which is the side to err on when calling a strategy better.
    """
    x = np.asarray(table, np.float64)
    if baseline is not None:
        b = np.asarray(baseline, np.float64)
        if b.shape != x.shape:
            raise QBudgetError(f"table {x.shape} and baseline {b.shape} differ in shape")
        x = x - b
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise QBudgetError("hierarchical_bootstrap_ci needs a [seeds, items] table")
    if not np.isfinite(x).all():
        raise QBudgetError("hierarchical_bootstrap_ci needs finite values")
    if not 0 < confidence < 1:
        raise QBudgetError(f"confidence must be in (0, 1), got {confidence}")
    s, n_items = x.shape
    est = float(scale * x.mean())
    if s < 2:
        return est, math.nan, math.nan
    means = np.empty(int(n_resamples))
    chunk = max(1, 4_000_000 // (s * n_items))
    for i in range(0, int(n_resamples), chunk):
        b = min(chunk, int(n_resamples) - i)
        seeds = rng.integers(0, s, size=(b, s))
        items = rng.integers(0, n_items, size=(b, s, n_items))
        means[i:i + b] = x[seeds[:, :, None], items].mean(axis=(1, 2))
    a = 1.0 - confidence
    lo, hi = np.quantile(scale * means, [a / 2, 1 - a / 2])
    return est, float(lo), float(hi)


def hierarchical_bootstrap_counts(rate, n, base_rate, base_n, *, rng: np.random.Generator,
                                  n_resamples: int = 2_000, confidence: float = 0.95,
                                  scale: float = 1.0) -> tuple[float, float, float]:
    """(estimate, low, high) of the mean over seeds of ``scale × (rate − base_rate)``, by
    a hierarchical bootstrap over seeds, then items, from per-seed item *counts*.

    ``rate[s]`` is the share of its ``n[s]`` items a strategy's adversary got right in
    seed ``s`` (``base_rate``/``base_n``: the baseline's, same seeds, same order). This is
    what a results table keeps of a seed × item 0/1 table (``value`` and ``n`` of an
    advantage row: rate = (advantage + 1) / 2), and it is enough for the item level:
    drawing ``n`` items with replacement from a 0/1 column whose share of ones is ``p``
    gives Binomial(n, p) ones, whatever the order of the items. Each resample draws seeds
    with replacement, then, within each drawn seed, the strategy's and the baseline's
    items — as :func:`hierarchical_bootstrap_ci` does on the tables themselves — except
    that the two cells' items are drawn *independently*: which item of the strategy's
    table sits beside which of the baseline's is not stored, so the item-level pairing is
    not kept. Item outcomes of two cells on the same probe prompts correlate positively
    if at all (shared prompts, shared teacher answers), and then the independent draw
    overstates the item noise of the difference: like :func:`hierarchical_bootstrap_ci`
    the interval errs wide. ``scale=2`` turns accuracies into advantages.
    """
    arrays = [np.asarray(v, np.float64).reshape(-1) for v in (rate, n, base_rate, base_n)]
    if len({len(v) for v in arrays}) != 1:
        raise QBudgetError("hierarchical_bootstrap_counts needs one rate and one item count "
                           "per seed for both cells")
    p, m, pb, mb = arrays
    if not all(np.isfinite(v).all() for v in arrays):
        raise QBudgetError("hierarchical_bootstrap_counts needs finite rates and item counts")
    if ((m < 1) | (mb < 1) | (m != np.round(m)) | (mb != np.round(mb))).any():
        raise QBudgetError("item counts must be whole numbers ≥ 1")
    if ((p < -1e-9) | (p > 1 + 1e-9) | (pb < -1e-9) | (pb > 1 + 1e-9)).any():
        raise QBudgetError("rates must lie in [0, 1]")
    if not 0 < confidence < 1:
        raise QBudgetError(f"confidence must be in (0, 1), got {confidence}")
    p, pb = np.clip(p, 0.0, 1.0), np.clip(pb, 0.0, 1.0)
    m, mb = m.astype(np.int64), mb.astype(np.int64)
    s = len(p)
    if s == 0:
        return math.nan, math.nan, math.nan
    est = float(scale * (p - pb).mean())
    if s < 2:
        return est, math.nan, math.nan
    seeds = rng.integers(0, s, size=(int(n_resamples), s))
    ones = rng.binomial(m[seeds], p[seeds]) / m[seeds]
    base_ones = rng.binomial(mb[seeds], pb[seeds]) / mb[seeds]
    means = (ones - base_ones).mean(axis=1)
    a = 1.0 - confidence
    lo, hi = np.quantile(scale * means, [a / 2, 1 - a / 2])
    return est, float(lo), float(hi)


@dataclass(frozen=True)
class PowerComparison:
    """A strategy against the baseline over seeds, with the power to say so."""

    n: int
    mean_diff: float
    ci_low: float          # bootstrap interval of the mean difference (NaN if n < 2)
    ci_high: float
    p_value: float         # two-sided sign-flip permutation p
    exact: bool
    mde: float             # minimum detectable difference at these seeds (α, power 0.8)
    verdict: str
    note: str
    sd: float = math.nan   # sample sd of the per-seed differences (what the MDE scales)


def permutation_compare(diffs, *, rng: np.random.Generator, alpha: float = 0.05,
                        what: str = "advantage", n_resamples: int = 10_000,
                        power: float = 0.8) -> PowerComparison:
    """Compare a strategy to the baseline from per-seed differences, with its MDE.

    The verdict is driven by the sign-flip p at ``alpha`` and always carries the minimum
    detectable difference from the observed paired spread, so "not distinguishable"
    reads as "no difference of at least MDE": "lower <what> than baseline (p=…, MDE …)",
    "higher …", or "not distinguishable from baseline at these seeds (…)". Lower is better
    for advantage. ``rng`` draws the bootstrap (and the permutations beyond
    :data:`EXACT_MAX_SEEDS` seeds).
    """
    d = np.asarray(diffs, np.float64).reshape(-1)
    d = d[~np.isnan(d)]
    n = int(len(d))
    if n == 0:
        return PowerComparison(0, math.nan, math.nan, math.nan, math.nan, True, math.inf,
                               "no paired seeds", "no seed was run for both strategies")
    mean = float(d.mean())
    lo, hi = bootstrap_mean_ci(d, rng=rng, n_resamples=n_resamples)
    r = sign_flip_test(d, rng=rng, n_resamples=n_resamples)
    sd = float(d.std(ddof=1)) if n >= 2 else math.nan
    mde = min_detectable_difference(sd, n, alpha=alpha, power=power)
    notes = []
    if r.min_p > alpha:
        notes.append(f"with {n} seed(s) the sign-flip p cannot go below {r.min_p:.3g}; "
                     f"at least {_seeds_needed(alpha)} seeds are needed to detect anything "
                     f"at {alpha}")
    mde_txt = "MDE n/a" if math.isinf(mde) else f"MDE {mde:.3g}"
    if not math.isnan(r.p_value) and r.p_value < alpha and mean != 0:
        word = "lower" if mean < 0 else "higher"
        verdict = f"{word} {what} than baseline (p={_fmt_p(r.p_value)}, {mde_txt})"
    else:
        verdict = (f"not distinguishable from baseline at these seeds "
                   f"(p={_fmt_p(r.p_value)}, n={n}, {mde_txt})")
    return PowerComparison(n, mean, lo, hi, r.p_value, r.exact, mde, verdict, "; ".join(notes),
                           sd)


def _seeds_needed(alpha: float) -> int:
    """Fewest seeds whose sign-flip floor 2/2**n is ≤ alpha."""
    n = 1
    while 2.0 ** (1 - n) > alpha:
        n += 1
    return n
