"""Sequential ε-certification: stop evaluating (and buying) as soon as the verdict is made.

An adversary's advantage is ``2·acc − 1`` on balanced held-out data, so a student is
ε-indistinguishable to that adversary when its accuracy ``p`` lies in the band
``[lo, hi] = [(1 − ε)/2, (1 + ε)/2]``: a classifier that is reliably *wrong* distinguishes
as well as one reliably right, so both edges matter.

**Within a checkpoint** the adversary-test items are consumed one at a time (in a random
order the caller draws, so the stream is an i.i.d. sample of the prompt distribution) and
four betting e-processes (Waudby-Smith & Ramdas, "Estimating means of bounded random
variables by betting", JRSS-B 2024) watch the 0/1 correctness stream. Each is the wealth of
a gambler who splits one unit over constant bets ``1 ± λ (X − m)`` — a *mixture of
constant bets*; for 0/1 data the mixture has a closed form (a truncated Beta mixture of
likelihood ratios against the boundary ``m``, :func:`log_e_values`):

* ``below``: bets that ``p < hi``; it is a non-negative supermartingale under every
  ``p ≥ hi``, so by Ville's inequality it ever reaches ``1/level`` with probability
  ≤ ``level`` — crossing rejects H0: acc ≥ (1 + ε)/2;
* ``above``: bets that ``p > lo``; crossing rejects H0: acc ≤ (1 − ε)/2.

*Certified* once both have crossed (intersection–union: "p ∈ [lo, hi]" is the intersection
of the two alternatives, so each test runs at the full level; no Bonferroni). Under any
``p`` outside the band one of the two nulls is true, so false certification has
probability ≤ level however often the stream is looked at and whenever it is stopped.

The opposite verdict, *distinguishable* (the lower confidence bound of ``|2·acc − 1|``
exceeds ε), uses two more bets: that ``p > hi`` and that ``p < lo``, each at ``level/2``.
Under any ``p`` in the band both of their nulls hold, so a false "distinguishable" also has
probability ≤ level. Stopping on it only ends evaluation early; it cannot make a false
certification more likely.

Priors (the split of the unit over bets, i.e. where the gambler expects the truth): the
certifying bets put a Beta(a, a) on the alternative mean with standard deviation ε/2
around 1/2 (``a = (1/ε² − 1)/2``), truncated to their side of the boundary — the truth we
hope to certify sits inside the band; in simulation this needs ~25% fewer items at
advantage 0 than aGRAPA's plug-in bet or a uniform prior. The distinguishing bets use a
uniform prior on their side (large advantages are detected in a few dozen items).

**Across checkpoints** the level is spent: checkpoint ``r = 1, 2, …`` tests at
``α_r = α / (r (r + 1))`` (:func:`checkpoint_level`), and ``Σ_r α_r = α``, so "certified at
the first checkpoint that passed" holds at level α over the whole run, for any number of
checkpoints (a union bound over the checkpoints' false certifications).

What it costs (``benchmarks/perf_certify.py``, ε = 0.1, first checkpoint, level 0.025):
an anytime-valid test pays for being allowed to stop at any item. At advantage 0 it
certifies in 99.8% of runs after a median of ~1,150 items (mean ~1,290); a fixed-size
Clopper–Pearson test at the same level that *knew* the advantage is 0 needs 695 items
for a coin-flip (power 0.5) chance of certifying, 1,055 for power 0.8 and ~2,500 for the
sequential test's own power (Wald's equal-error comparison, where the sequential mean is
~50% of it). The e-process cannot beat the first two (its threshold is log(1/α) in
log-wealth where a fixed test needs z²/2, and KL(0.5 ‖ 0.55) per item is all either can
gain); its saving is that it needs no sizing: one fixed size that reaches a verdict with
power 0.8 at advantages 0, 0.05 and 0.2 needs 3,133 items everywhere, the sequential test
a median of ~1,150 at advantage 0, ~1,080 at 0.2, a few dozen for a clearly distinguishable
student, and only runs long (~3,100 at 0.05) while the evidence is close.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import special
from scipy import stats as _st

from qbudget.errors import QBudgetError

#: Verdict codes of :func:`certify_runs`.
UNDECIDED, CERTIFIED, DISTINGUISHABLE = 0, 1, 2
VERDICTS = {UNDECIDED: "undecided", CERTIFIED: "certified", DISTINGUISHABLE: "distinguishable"}


def _check(epsilon: float, level: float) -> None:
    if not 0.0 < float(epsilon) < 1.0:
        raise QBudgetError(f"epsilon must be in (0, 1), got {epsilon}")
    if not 0.0 < float(level) < 1.0:
        raise QBudgetError(f"alpha must be in (0, 1), got {level}")


def checkpoint_level(alpha: float, checkpoint: int) -> float:
    """Level spent at checkpoint ``r`` (1-based): ``α / (r (r + 1))``; the levels sum to α.

    Spending rather than Bonferroni over a fixed count means the number of checkpoints need
    not be known in advance (a resumed or extended run keeps its guarantee); the first
    checkpoint gets α/2, the fifth α/30.
    """
    r = int(checkpoint)
    if r < 1:
        raise QBudgetError(f"checkpoints are numbered from 1, got {checkpoint}")
    if not 0.0 < float(alpha) < 1.0:
        raise QBudgetError(f"alpha must be in (0, 1), got {alpha}")
    return float(alpha) / (r * (r + 1))


def certify_prior(epsilon: float) -> float:
    """Beta(a, a) parameter of the certifying bets: sd ε/2 around 1/2, ``a = (1/ε² − 1)/2``."""
    return max(1.0, (1.0 / float(epsilon) ** 2 - 1.0) / 2.0)


def _log_mix_below(s, t, m: float, a: float, b: float):
    """log of a Beta(a, b) mixture, truncated to p < m, of the likelihood ratios
    ``(p/m)^s ((1−p)/(1−m))^(t−s)``: the wealth of betting that the mean is below ``m``."""
    s = np.asarray(s, np.float64)
    f = np.asarray(t, np.float64) - s
    with np.errstate(divide="ignore"):
        num = special.betaln(s + a, f + b) + np.log(special.betainc(s + a, f + b, m))
    den = special.betaln(a, b) + math.log(special.betainc(a, b, m))
    return num - den - s * math.log(m) - f * math.log1p(-m)


def log_e_values(successes, n, epsilon: float) -> dict[str, np.ndarray]:
    """The four log e-values after ``n`` items with ``successes`` correct (broadcasting).

    ``below`` / ``above`` are the certifying bets against acc ≥ (1+ε)/2 and acc ≤ (1−ε)/2;
    ``over`` / ``under`` bet that acc > (1+ε)/2 and acc < (1−ε)/2 (the distinguishing
    side). For 0/1 data the mixture wealth depends on the stream only through ``(n, k)``.
    """
    eps = float(epsilon)
    _check(eps, 0.5)
    hi, lo = (1 + eps) / 2, (1 - eps) / 2
    k = np.asarray(successes, np.float64)
    t = np.asarray(n, np.float64)
    a = certify_prior(eps)
    return {
        "below": _log_mix_below(k, t, hi, a, a),
        "above": _log_mix_below(t - k, t, 1 - lo, a, a),       # mirror: 1 − X below 1 − lo
        "over": _log_mix_below(t - k, t, 1 - hi, 1.0, 1.0),    # mirror: 1 − X below 1 − hi
        "under": _log_mix_below(k, t, lo, 1.0, 1.0),
    }


def _bisect(fn, t: np.ndarray, thr: float, decreasing: bool) -> np.ndarray:
    """Per ``t``, the last ``s`` in [0, t] with fn(s, t) ≥ thr when fn decreases in ``s``
    (−1 if none), or the first such ``s`` when it increases (t + 1 if none)."""
    t = t.astype(np.int64)
    # decreasing: fn(lo) ≥ thr or lo = −1, fn(hi) < thr or hi = t + 1 (mirror when increasing)
    lo, hi = np.full_like(t, -1), t + 1
    while True:
        open_ = hi - lo > 1
        if not open_.any():
            break
        mid = np.where(open_, (lo + hi) // 2, 0)
        ok = fn(mid, t) >= thr
        if decreasing:
            lo = np.where(open_ & ok, mid, lo)
            hi = np.where(open_ & ~ok, mid, hi)
        else:
            hi = np.where(open_ & ok, mid, hi)
            lo = np.where(open_ & ~ok, mid, lo)
    return lo if decreasing else hi


@functools.lru_cache(maxsize=64)
def _boundaries_cached(epsilon: float, level: float, n_max: int):
    eps = float(epsilon)
    hi, lo = (1 + eps) / 2, (1 - eps) / 2
    a = certify_prior(eps)
    t = np.arange(1, n_max + 1, dtype=np.int64)
    thr = math.log(1.0 / level)
    thr_d = math.log(2.0 / level)
    below = _bisect(lambda s, t: _log_mix_below(s, t, hi, a, a), t, thr, decreasing=True)
    above = _bisect(lambda s, t: _log_mix_below(t - s, t, 1 - lo, a, a), t, thr,
                    decreasing=False)
    under = _bisect(lambda s, t: _log_mix_below(s, t, lo, 1.0, 1.0), t, thr_d, decreasing=True)
    over = _bisect(lambda s, t: _log_mix_below(t - s, t, 1 - hi, 1.0, 1.0), t, thr_d,
                   decreasing=False)
    out = tuple(np.concatenate([[v0], v]) for v0, v in
                ((-1, below), (1, above), (-1, under), (1, over)))
    for arr in out:
        arr.setflags(write=False)
    return out


def decision_boundaries(epsilon: float, level: float, n_max: int) -> dict[str, np.ndarray]:
    """Successes thresholds after ``t = 0..n_max`` items, each an int array of length n_max+1.

    With ``k_t`` correct out of ``t``: the ``below`` bet has crossed ``1/level`` iff
    ``k_t ≤ below[t]``; ``above`` iff ``k_t ≥ above[t]``; ``under`` (at 2/level) iff
    ``k_t ≤ under[t]``; ``over`` iff ``k_t ≥ over[t]``. The wealths are monotone in ``k``,
    so thresholds are exact (found by bisection) and a run is a comparison of its running
    count against them — which is what makes simulating thousands of runs cheap.
    """
    _check(epsilon, level)
    n_max = int(n_max)
    if n_max < 0:
        raise QBudgetError(f"n_max must be ≥ 0, got {n_max}")
    b, a, u, o = _boundaries_cached(float(epsilon), float(level), n_max)
    return {"below": b, "above": a, "under": u, "over": o}


def _first(hit: np.ndarray) -> np.ndarray:
    """1-based index of the first True per row; a large sentinel when none."""
    n = hit.shape[1]
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, n + 10**9)


def certify_runs(correct, epsilon: float, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`certify_stream` over rows: ``correct`` is bool/0-1 ``[runs, items]``.

    Returns ``(verdict, n_used)``: int8 codes (:data:`UNDECIDED`, :data:`CERTIFIED`,
    :data:`DISTINGUISHABLE`) and the number of items consumed when the verdict was
    reached (all items when undecided). ``level`` is this checkpoint's level (see
    :func:`checkpoint_level`). The stream is monitored after every item.
    """
    x = np.asarray(correct)
    if x.ndim != 2:
        raise QBudgetError("certify_runs needs a 2-D [runs, items] array of 0/1 values")
    if x.size and not np.isin(x, (0, 1)).all():
        raise QBudgetError("correctness values must be 0 or 1")
    runs, n = x.shape
    bd = decision_boundaries(epsilon, level, n)
    k = np.cumsum(x, axis=1, dtype=np.int64)                 # k_t for t = 1..n
    t_cert = np.maximum(_first(k <= bd["below"][1:]), _first(k >= bd["above"][1:]))
    t_dist = np.minimum(_first(k <= bd["under"][1:]), _first(k >= bd["over"][1:]))
    verdict = np.zeros(runs, np.int8)
    cert = (t_cert <= n) & (t_cert <= t_dist)
    dist = (t_dist <= n) & ~cert
    verdict[cert] = CERTIFIED
    verdict[dist] = DISTINGUISHABLE
    used = np.where(cert, t_cert, np.where(dist, t_dist, n)).astype(np.int64)
    return verdict, used


@dataclass(frozen=True)
class Decision:
    """The verdict of one checkpoint's stream for one adversary."""

    verdict: str          # "certified" | "distinguishable" | "undecided"
    n_used: int           # items consumed when the verdict was reached (all, if undecided)
    n_available: int      # items the stream had
    correct: int          # correct decisions among the n_used items
    epsilon: float
    level: float          # this checkpoint's level α_r
    checkpoint: int

    @property
    def certified(self) -> bool:
        return self.verdict == "certified"

    @property
    def distinguishable(self) -> bool:
        return self.verdict == "distinguishable"

    @property
    def decided(self) -> bool:
        return self.verdict != "undecided"

    @property
    def advantage(self) -> float:
        """Point estimate 2·acc − 1 on the consumed items (NaN with none)."""
        return 2.0 * self.correct / self.n_used - 1.0 if self.n_used else math.nan


def certify_stream(correct, epsilon: float, alpha: float = 0.05, *,
                   checkpoint: int = 1) -> Decision:
    """Consume ``correct`` (0/1, in the order given) until a verdict; return the Decision.

    The test runs at ``checkpoint_level(alpha, checkpoint)``. The caller must pass the
    items in an order independent of their outcomes (shuffle the adversary-test split with
    an explicit Generator, e.g. ``rng_for(seed, "certify", checkpoint)``): sorted by
    category, the stream would not be exchangeable and the guarantee would not hold.
    Items after ``n_used`` were not needed, so their teacher answers need not be bought.
    """
    x = np.asarray(correct).reshape(-1)
    level = checkpoint_level(alpha, checkpoint)
    _check(epsilon, level)
    if len(x) == 0:
        return Decision("undecided", 0, 0, 0, float(epsilon), level, int(checkpoint))
    v, used = certify_runs(x[None, :].astype(np.int64), epsilon, level)
    n_used = int(used[0])
    return Decision(VERDICTS[int(v[0])], n_used, int(len(x)), int(x[:n_used].sum()),
                    float(epsilon), level, int(checkpoint))


@dataclass(frozen=True)
class CheckpointDecision:
    """The verdict over every adversary of one checkpoint, on one shared item order."""

    verdict: str                    # "certified" | "distinguishable" | "undecided"
    n_used: int                     # items whose teacher answers the verdict needed
    n_available: int
    per_adversary: dict[str, Decision]

    @property
    def certified(self) -> bool:
        return self.verdict == "certified"


def certify_checkpoint(correct: dict[str, np.ndarray], epsilon: float, alpha: float = 0.05, *,
                       checkpoint: int = 1) -> CheckpointDecision:
    """All adversaries of a checkpoint, each a 0/1 stream over the *same* item order.

    Certified when every adversary certified (intersection–union: each at the
    checkpoint's level, no Bonferroni for "all ≤ ε"), at the last of their certification
    times; distinguishable as soon as any adversary is, at the first such time (from
    then on the checkpoint cannot certify); otherwise undecided with every item used.
    ``n_used`` is how many items' teacher answers the verdict needed.
    """
    if not correct:
        raise QBudgetError("certify_checkpoint needs at least one adversary")
    lengths = {len(np.asarray(v).reshape(-1)) for v in correct.values()}
    if len(lengths) != 1:
        raise QBudgetError("every adversary's stream must cover the same items")
    n = lengths.pop()
    per = {name: certify_stream(v, epsilon, alpha, checkpoint=checkpoint)
           for name, v in correct.items()}
    dist = [d.n_used for d in per.values() if d.distinguishable]
    if dist:
        return CheckpointDecision("distinguishable", min(dist), n, per)
    if all(d.certified for d in per.values()):
        return CheckpointDecision("certified", max(d.n_used for d in per.values()), n, per)
    return CheckpointDecision("undecided", n, n, per)


def min_certifiable_epsilon(n_items: int, alpha: float = 0.05, *, checkpoint: int = 1,
                            tol: float = 1e-4) -> float:
    """Smallest ε that ``n_items`` evaluation items can certify at this checkpoint at all.

    Found on the most favourable stream (alternating wrong/right, accuracy exactly 1/2 at
    every even length), so a smaller ε cannot be certified with that many items whatever
    the student; real streams need more (see the module doc). Use it to choose an ε a
    probe size can reach: e.g. 50 items cannot certify ε = 0.1 at any checkpoint.
    """
    n = int(n_items)
    level = checkpoint_level(alpha, checkpoint)
    stream = np.arange(n) % 2
    lo, hi = 0.0, 1.0
    if n == 0 or not certify_stream(stream, 1 - tol, alpha, checkpoint=checkpoint).certified:
        return math.nan
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        v, _ = certify_runs(stream[None, :], mid, level)
        lo, hi = (lo, mid) if v[0] == CERTIFIED else (mid, hi)
    return hi


# ---------------------------------------------------------------------------------------
# The fixed-size reference


def clopper_pearson_verdict(k, n, epsilon: float, level: float):
    """Fixed-size verdicts after exactly ``n`` items with ``k`` correct (broadcasting).

    ``certified``: the one-sided Clopper–Pearson upper bound at level ``level`` is below
    (1+ε)/2 and the lower bound above (1−ε)/2 — the same intersection–union test as the
    sequential one, each side at the full level (the two-sided 1 − 2·level interval inside
    the band). ``distinguishable``: the two-sided 1 − level interval lies outside the band.
    Uses the binomial–beta duality (``U < hi ⇔ P_hi(X ≤ k) < level``), so it is exact.
    """
    eps = float(epsilon)
    _check(eps, level)
    hi, lo = (1 + eps) / 2, (1 - eps) / 2
    k = np.asarray(k)
    n = np.asarray(n)
    cert = (_st.binom.cdf(k, n, hi) < level) & (_st.binom.sf(k - 1, n, lo) < level)
    dist = (_st.binom.sf(k - 1, n, hi) < level / 2) | (_st.binom.cdf(k, n, lo) < level / 2)
    return cert, dist


def fixed_size_power(n, epsilon: float, level: float, accuracy: float,
                     verdict: str = "certified") -> np.ndarray:
    """Probability that the fixed-size test on ``n`` items reaches ``verdict`` when the
    true accuracy is ``accuracy`` (exact binomial sum; vectorised over ``n``)."""
    eps = float(epsilon)
    _check(eps, level)
    hi, lo = (1 + eps) / 2, (1 - eps) / 2
    n = np.atleast_1d(np.asarray(n, np.int64))
    p = float(accuracy)
    if verdict == "certified":
        # k ≤ k_hi: P_hi(X ≤ k) < level;  k ≥ k_lo: P_lo(X ≥ k) < level
        k_hi = _st.binom.ppf(level, n, hi) - 1          # last k with cdf(k) < level
        k_lo = _st.binom.isf(level, n, lo) + 1          # first k with sf(k-1) < level
        ok = k_hi >= k_lo
        return np.where(ok, _st.binom.cdf(k_hi, n, p) - _st.binom.cdf(k_lo - 1, n, p), 0.0)
    if verdict == "distinguishable":
        k_up = _st.binom.isf(level / 2, n, hi) + 1      # first k with P_hi(X ≥ k) < level/2
        k_dn = _st.binom.ppf(level / 2, n, lo) - 1      # last k with P_lo(X ≤ k) < level/2
        return _st.binom.sf(k_up - 1, n, p) + np.where(k_dn >= 0, _st.binom.cdf(k_dn, n, p),
                                                         0.0)
    raise QBudgetError(f"verdict must be 'certified' or 'distinguishable', got {verdict!r}")


def fixed_size_items(epsilon: float, level: float, advantage: float = 0.0,
                     power: float = 0.5, *, n_max: int = 200_000) -> int:
    """Smallest ``n`` at which the fixed-size Clopper–Pearson test reaches the right verdict
    with probability ≥ ``power`` at true accuracy (1 + advantage)/2.

    The right verdict is "certified" when |advantage| ≤ ε and "distinguishable" otherwise.
    ``power = 0.5`` is the median-matched comparison with a sequential test's median
    stopping time (and flatters the fixed test, which must be sized before seeing data
    and, sized so, fails half the time); ``power = 0.8``/``0.95`` are the usual planning
    targets. Returns ``-1`` if not reached by ``n_max``.
    """
    eps = float(epsilon)
    _check(eps, level)
    if not 0 < power < 1:
        raise QBudgetError(f"power must be in (0, 1), got {power}")
    verdict = "certified" if abs(advantage) <= eps else "distinguishable"
    acc = (1 + float(advantage)) / 2
    start = 1
    while start <= n_max:
        n = np.arange(start, min(n_max, start * 4 + 4096) + 1)
        pw = fixed_size_power(n, eps, level, acc, verdict)
        hit = np.flatnonzero(pw >= power)
        if len(hit):
            return int(n[hit[0]])
        start = int(n[-1]) + 1
    return -1
