"""Paired statistics against hand-computed values, exhaustive enumeration, and scipy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from qbudget.errors import QBudgetError
from qbudget.paired import bootstrap_mean_ci, min_exact_p, paired_compare, wilcoxon_signed_rank

DIFFS = [0.1, -0.05, 0.2, 0.15, 0.05]


def enumerate_signed_rank_p(diffs) -> tuple[float, float]:
    """Independent reference: midranks of |d| and the exact two-sided p by flipping every
    sign (2**n patterns), P(|W+ - E W+| >= observed)."""
    d = np.asarray([x for x in diffs if x != 0], dtype=float)
    ranks = stats.rankdata(np.abs(d))
    w_plus = ranks[d > 0].sum()
    center = ranks.sum() / 2
    observed = abs(w_plus - center)
    hits = 0
    for signs in itertools.product((0, 1), repeat=len(d)):
        w = sum(r for r, s in zip(ranks, signs) if s)
        hits += abs(w - center) >= observed - 1e-12
    return float(min(w_plus, ranks.sum() - w_plus)), hits / 2 ** len(d)


def test_signed_rank_on_the_hand_table():
    # |d| ranks: 0.05, 0.05 -> 1.5 each; 0.1 -> 3; 0.15 -> 4; 0.2 -> 5.
    # W- = 1.5 (the -0.05), W+ = 13.5, statistic = min = 1.5.
    # Sign patterns with W+ <= 1.5: {}, {0.05}, {-0.05 flipped}: 3; by symmetry 3 with W+ >= 13.5.
    stat, p, m = wilcoxon_signed_rank(DIFFS)
    assert (stat, m) == (1.5, 5)
    assert p == pytest.approx(6 / 32)  # 0.1875
    assert (stat, p) == pytest.approx(enumerate_signed_rank_p(DIFFS))


def test_paired_compare_on_the_hand_table():
    r = paired_compare(DIFFS, rng=np.random.default_rng(0))
    assert r.n == 5
    assert r.mean_diff == pytest.approx(0.09)  # 0.45 / 5
    assert r.statistic == 1.5 and r.p_value == pytest.approx(0.1875)
    assert r.min_p == pytest.approx(0.0625)
    assert r.verdict == "not distinguishable from baseline at these seeds (p=0.19, n=5)"
    assert "cannot go below 0.0625" in r.note
    assert -0.05 <= r.ci_low < 0.09 < r.ci_high <= 0.2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_signed_rank_matches_scipy_and_enumeration_without_ties(seed):
    d = np.random.default_rng(seed).normal(0.05, 0.1, size=9)
    stat, p, m = wilcoxon_signed_rank(d)
    ref = stats.wilcoxon(d, method="exact")
    assert m == 9
    assert stat == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert (stat, p) == pytest.approx(enumerate_signed_rank_p(d))


def test_float_noise_ties_are_ties_and_zeros_are_dropped():
    noisy = [0.3 - 0.25, -(0.15 - 0.1), 0.2, 0.15, 0.1, 0.0]   # 0.05 vs 0.04999999999999999
    assert wilcoxon_signed_rank(noisy) == wilcoxon_signed_rank(DIFFS)
    r = paired_compare(noisy, rng=np.random.default_rng(0))
    assert r.n == 6 and "1 zero difference(s) dropped" in r.note
    assert wilcoxon_signed_rank([0.0, 0.0, 0.0]) == (0.0, 1.0, 0)


def test_min_exact_p_is_two_over_two_to_the_m():
    assert [min_exact_p(m) for m in (1, 3, 5, 6)] == [1.0, 0.25, 0.0625, 0.03125]
    for m in (4, 5, 6, 7):
        assert wilcoxon_signed_rank(np.arange(1, m + 1) / 10)[1] == pytest.approx(min_exact_p(m))


def test_bootstrap_on_hand_cases():
    rng = np.random.default_rng(0)
    # constant differences: every resampled mean is the constant
    assert bootstrap_mean_ci([0.2, 0.2, 0.2], rng=rng) == pytest.approx((0.2, 0.2))
    # two values 0 and 1: resampled means are 0, .5, 1 with probability 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% percentiles are 0 and 1
    assert bootstrap_mean_ci([0.0, 1.0], rng=rng) == (0.0, 1.0)
    lo, hi = bootstrap_mean_ci([0.5], rng=rng)
    assert math.isnan(lo) and math.isnan(hi)


def test_bootstrap_is_seeded_and_agrees_with_scipy_percentile_bootstrap():
    d = np.array([0.12, -0.03, 0.2, 0.15, 0.05, 0.08, -0.01, 0.11])
    a = bootstrap_mean_ci(d, rng=np.random.default_rng(7), n_resamples=20_000)
    b = bootstrap_mean_ci(d, rng=np.random.default_rng(7), n_resamples=20_000)
    assert a == b
    ref = stats.bootstrap((d,), np.mean, method="percentile", n_resamples=20_000,
                          rng=np.random.default_rng(1)).confidence_interval
    assert a[0] == pytest.approx(ref.low, abs=0.01) and a[1] == pytest.approx(ref.high, abs=0.01)


def test_verdicts_in_plain_words():
    rng = np.random.default_rng(0)
    lower = paired_compare([-0.1, -0.2, -0.15, -0.12, -0.3, -0.05, -0.08], rng=rng)
    assert lower.p_value == pytest.approx(2 / 2 ** 7)
    assert lower.verdict == "lower advantage than baseline (p=0.016)"
    assert lower.note == "" and lower.ci_high < 0
    higher = paired_compare([0.1, 0.2, 0.15, 0.12, 0.3, 0.05, 0.08], rng=rng, what="AUC")
    assert higher.verdict.startswith("higher AUC than baseline")
    # the same signs with only five seeds cannot reach 0.05
    few = paired_compare([-0.1, -0.2, -0.15, -0.12, -0.3], rng=rng)
    assert few.p_value == pytest.approx(0.0625)
    assert few.verdict.startswith("not distinguishable from baseline at these seeds")
    one = paired_compare([0.4], rng=rng)
    assert one.n == 1 and math.isnan(one.p_value) and "n=1" in one.note
    none = paired_compare([], rng=rng)
    assert none.n == 0 and none.verdict == "no paired seeds"


def test_bad_input():
    with pytest.raises(QBudgetError):
        bootstrap_mean_ci(np.zeros((2, 2)), rng=np.random.default_rng(0))
    with pytest.raises(QBudgetError):
        bootstrap_mean_ci([0.1, 0.2], rng=np.random.default_rng(0), confidence=1.5)
