"""The MMD two-sample test with the Hamming kernel (Model Equality Testing): the estimator
against a plain double loop, the permutations it may use, its size under identical
distributions and its power on different ones."""

from __future__ import annotations

import numpy as np
import pytest

from qbudget.errors import QBudgetError
from qbudget.mmd import PAD, _stratified_labels, hamming_kernel, mmd_test, pad_tokens

L, V, PROMPTS = 12, 16, 40
_TABLE = np.random.default_rng(123).normal(size=(PROMPTS, L, V)) * 1.5


def complete(rng, prompts, shift=0.0):
    """One completion per row: token l of prompt x drawn from softmax(table[x, l] + shift)
    (Gumbel-max), so completions depend on the prompt, as an LM's do."""
    logits = _TABLE[prompts] + shift
    return (logits + rng.gumbel(size=logits.shape)).argmax(-1)


def brute_mmd(a, b, ia=None, ib=None):
    """The paper's estimator by a double loop: mean same-prompt kernel within A (i ≠ j) +
    within B − 2 × across, kernel = share of equal positions (× 1[same prompt])."""
    def k(x, y, px, py):
        return float(np.mean(x == y)) * (1.0 if px == py else 0.0)
    ia = np.zeros(len(a)) if ia is None else ia
    ib = np.zeros(len(b)) if ib is None else ib
    def mean(pairs):
        vals = [k(x, y, px, py) for x, y, px, py in pairs if px == py]
        return sum(vals) / len(vals)
    aa = [(a[i], a[j], ia[i], ia[j]) for i in range(len(a)) for j in range(len(a)) if i != j]
    bb = [(b[i], b[j], ib[i], ib[j]) for i in range(len(b)) for j in range(len(b)) if i != j]
    ab = [(a[i], b[j], ia[i], ib[j]) for i in range(len(a)) for j in range(len(b))]
    return mean(aa) + mean(bb) - 2 * mean(ab)


def test_statistic_matches_the_double_loop():
    rng = np.random.default_rng(0)
    pa, pb = rng.integers(0, 4, 14), rng.integers(0, 4, 11)
    a, b = complete(rng, pa), complete(rng, pb, 0.5)
    s, p = mmd_test(a, b, n_permutations=50, rng=rng)
    assert s == pytest.approx(brute_mmd(a, b))
    s, p = mmd_test(a, b, (pa, pb), n_permutations=50, rng=rng)      # repeats: prompt kernel
    assert s == pytest.approx(brute_mmd(a, b, pa, pb))
    same = rng.integers(0, 9, 10)                                     # one answer per prompt
    a1, b1 = complete(rng, same), complete(rng, same)
    s, _ = mmd_test(a1, b1, np.arange(10), n_permutations=50, rng=rng)
    assert s == pytest.approx(brute_mmd(a1, b1))                      # auto: Hamming alone
    with pytest.raises(QBudgetError):
        mmd_test(a1, b1, np.arange(10), n_permutations=50, rng=rng, kernel="prompt")
    assert 0 < p <= 1


def test_padding_and_kernel():
    toks = pad_tokens([[5, 6, 7], [5, 6], [1, 2, 3, 4, 5, 6]], 4)
    assert toks.tolist() == [[5, 6, 7, PAD], [5, 6, PAD, PAD], [1, 2, 3, 4]]
    k = hamming_kernel(toks)
    assert np.allclose(np.diag(k), 1.0) and k[0, 1] == 0.75 and k[0, 2] == 0.0


def test_within_prompt_permutations_keep_every_prompt_balanced():
    rng = np.random.default_rng(1)
    strata = np.concatenate([np.arange(30), np.arange(30)])           # paired design
    labels = np.concatenate([np.ones(30), np.zeros(30)])
    lab = _stratified_labels(strata, labels, 200, rng)
    assert (lab[:, :30] + lab[:, 30:] == 1).all()                     # each pair: one each
    assert 0.3 < lab[:, :30].mean() < 0.7 and len({tuple(r) for r in lab}) > 190


@pytest.mark.parametrize("design", ["paired", "unpaired", "prompts"])
def test_identical_distributions_reject_at_most_7_percent(design):
    """Both models are the same sampler; 500 trials per design (paired: one completion per
    prompt per model, qbudget's probe; unpaired; repeated prompts, the paper's design).
    At α = 0.05 the rejection rate must be ≤ 0.07 (3 MC sd above 0.05 is 0.079)."""
    rng = np.random.default_rng({"paired": 10, "unpaired": 11, "prompts": 12}[design])
    trials = 500
    rejected = 0
    for _ in range(trials):
        if design == "paired":
            prompts = rng.integers(0, PROMPTS, 40)
            a, b, ids = complete(rng, prompts), complete(rng, prompts), np.arange(40)
        elif design == "unpaired":
            a, b, ids = (complete(rng, rng.integers(0, PROMPTS, 40)),
                         complete(rng, rng.integers(0, PROMPTS, 40)), None)
        else:
            pa, pb = rng.integers(0, 8, 40), rng.integers(0, 8, 40)
            a, b, ids = complete(rng, pa), complete(rng, pb), (pa, pb)
        _, p = mmd_test(a, b, ids, n_permutations=99, rng=rng)
        rejected += p <= 0.05
    rate = rejected / trials
    print(f"{design}: rejection rate {rate:.3f} over {trials} identical-distribution trials")
    assert rate <= 0.07


def test_different_distributions_are_rejected():
    """A student that over-uses one token at every position (logit +1.5) is rejected at
    the smallest p the permutations allow in every design, and a subtler shift (+1.2) in
    at least 30 of 40 trials with 100 paired prompts (measured 37)."""
    rng = np.random.default_rng(4)
    shift = np.zeros(V)
    shift[0] = 1.5
    prompts = rng.integers(0, PROMPTS, 200)
    a, b = complete(rng, prompts), complete(rng, prompts, shift)
    for ids in (np.arange(200), None):
        s, p = mmd_test(a, b, ids, n_permutations=199, rng=rng)
        assert s > 0 and p == pytest.approx(1 / 200)
    pa, pb = rng.integers(0, 8, 200), rng.integers(0, 8, 200)
    s, p = mmd_test(complete(rng, pa), complete(rng, pb, shift), (pa, pb), n_permutations=199,
                    rng=rng)
    assert p == pytest.approx(1 / 200)
    shift[0] = 1.2
    hits = 0
    for _ in range(40):
        prompts = rng.integers(0, PROMPTS, 100)
        _, p = mmd_test(complete(rng, prompts), complete(rng, prompts, shift), np.arange(100),
                        n_permutations=99, rng=rng)
        hits += p <= 0.05
    print(f"shift 1.2, 100 paired prompts: rejected {hits}/40")
    assert hits >= 30


def test_is_seeded_and_checks_shapes():
    rng = np.random.default_rng(0)
    a, b = complete(rng, np.arange(20)), complete(rng, np.arange(20))
    r1 = mmd_test(a, b, np.arange(20), n_permutations=99, rng=np.random.default_rng(3))
    r2 = mmd_test(a, b, np.arange(20), n_permutations=99, rng=np.random.default_rng(3))
    assert r1 == r2
    statistic, p_value = r1
    assert statistic == r1.statistic and p_value == r1.p_value
    with pytest.raises(QBudgetError):
        mmd_test(a, b[:, :5], n_permutations=9, rng=rng)
    with pytest.raises(QBudgetError):
        mmd_test(a, b, np.arange(19), n_permutations=9, rng=rng)
