"""Exact intervals and tests used by the evaluation, checked against scipy's own."""

import math

import numpy as np
import pytest
from scipy import stats as st

from qbudget.evaluate import verdict
from qbudget.stats import (advantage_interval, bonferroni_alpha, bonferroni_p, c2st_p_value,
                           clopper_pearson, mean_interval)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (57, 100), (500, 1000)])
def test_clopper_pearson_matches_scipy_exact(k, n):
    ref = st.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    lo, hi = clopper_pearson(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-9) and hi == pytest.approx(ref.high, abs=1e-9)


def test_clopper_pearson_coverage_is_conservative():
    rng = np.random.default_rng(0)
    p, n = 0.3, 40
    ks = rng.binomial(n, p, 2000)
    cover = np.mean([clopper_pearson(int(k), n)[0] <= p <= clopper_pearson(int(k), n)[1]
                     for k in ks])
    assert cover >= 0.95


def test_advantage_interval_is_affine_image_of_accuracy_interval():
    adv, lo, hi = advantage_interval(75, 100)
    alo, ahi = clopper_pearson(75, 100)
    assert adv == pytest.approx(0.5)
    assert (lo, hi) == pytest.approx((2 * alo - 1, 2 * ahi - 1))
    assert advantage_interval(50, 100, alpha=0.01)[1] < advantage_interval(50, 100)[1]


@pytest.mark.parametrize("k,n", [(0, 20), (10, 20), (15, 20), (20, 20), (560, 1000)])
def test_c2st_p_value_is_one_sided_binomial(k, n):
    ref = st.binomtest(k, n, 0.5, alternative="greater").pvalue
    assert c2st_p_value(k, n) == pytest.approx(ref, rel=1e-9)


def test_bonferroni():
    assert bonferroni_alpha(0.05, 4) == pytest.approx(0.0125)
    assert bonferroni_p(0.02, 3) == pytest.approx(0.06)
    assert bonferroni_p(0.5, 3) == 1.0


def test_mean_interval_matches_t_interval():
    x = np.array([0.8, 0.9, 0.85, 0.7, 0.95])
    m, lo, hi = mean_interval(x)
    ref = st.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=st.sem(x))
    assert m == pytest.approx(x.mean()) and (lo, hi) == pytest.approx(ref)
    assert all(math.isnan(v) for v in mean_interval([]))


def _adv_row(adversary, hi, category="all"):
    return {"metric": "advantage", "adversary": adversary, "category": category,
            "value": hi - 0.1, "ci_low": hi - 0.2, "ci_high": hi, "n": 100}


def test_verdict_uses_every_adversary_overall_upper_bound():
    rows = [_adv_row("ngram", 0.04), _adv_row("embed", 0.08), _adv_row("max", 0.5),
            _adv_row("embed", 0.9, category="math")]
    assert verdict(rows, 0.1).indistinguishable
    v = verdict(rows, 0.05)
    assert not v and v.worst_adversary == "embed" and v.worst_upper == pytest.approx(0.08)
    assert "distinguishable at epsilon=0.05" in v.message()
