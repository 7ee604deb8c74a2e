"""k_center_greedy against a brute-force numpy farthest-first traversal."""

import jax
import numpy as np
import pytest

from strategies.diversity import k_center_greedy


def brute_force(x, labeled, k, first=None):
    """Textbook farthest-first in float64: exact squared distances, lowest index on ties."""
    x = np.asarray(x, np.float64)
    centres = list(np.flatnonzero(labeled))
    picks = []
    if not centres:
        picks.append(first)
        centres.append(first)
    d = np.full(len(x), np.inf)
    for c in centres:
        d = np.minimum(d, ((x - x[c]) ** 2).sum(1))
    taken = np.asarray(labeled, bool).copy()
    taken[centres] = True
    while len(picks) < min(k, (~np.asarray(labeled)).sum()):
        dd = np.where(taken, -1.0, d)
        j = int(np.argmax(dd))
        picks.append(j)
        taken[j] = True
        d = np.minimum(d, ((x - x[j]) ** 2).sum(1))
    return np.asarray(picks, np.int64)


def unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("n,d,n_lab,k", [(300, 16, 20, 40), (500, 8, 1, 100), (200, 32, 150, 50)])
def test_matches_brute_force_random(n, d, n_lab, k):
    rng = np.random.default_rng(n + d)
    x = unit(rng, n, d)
    lab = np.zeros(n, bool)
    lab[rng.choice(n, n_lab, replace=False)] = True
    got = k_center_greedy(x, lab, k, key=jax.random.key(0))
    np.testing.assert_array_equal(got, brute_force(x, lab, k))
    assert got.dtype == np.int64


def test_duplicates_and_exact_ties_go_to_lowest_index():
    # integer grid points: many exact ties and duplicates (of labeled and unlabeled points)
    rng = np.random.default_rng(3)
    base = rng.integers(0, 3, size=(40, 4)).astype(np.float32)
    x = np.concatenate([base, base[:25], base[5:15]])
    lab = np.zeros(len(x), bool)
    lab[[0, 7, 41]] = True
    k = int((~lab).sum())          # exhaust everything, including the all-zero tail
    got = k_center_greedy(x, lab, k, key=jax.random.key(0))
    np.testing.assert_array_equal(got, brute_force(x, lab, k))
    assert sorted(got.tolist()) == sorted(np.flatnonzero(~lab).tolist())


def test_empty_labeled_set_starts_from_key_chosen_point():
    rng = np.random.default_rng(5)
    x = unit(rng, 250, 12)
    lab = np.zeros(250, bool)
    firsts = set()
    for seed in range(4):
        got = k_center_greedy(x, lab, 30, key=jax.random.key(seed))
        np.testing.assert_array_equal(got, brute_force(x, lab, 30, first=int(got[0])))
        np.testing.assert_array_equal(got, k_center_greedy(x, lab, 30, key=jax.random.key(seed)))
        firsts.add(int(got[0]))
    assert len(firsts) > 1          # the key really chooses the start


def test_k_larger_than_unlabeled_and_zero():
    x = unit(np.random.default_rng(1), 10, 3)
    lab = np.zeros(10, bool)
    lab[:7] = True
    assert sorted(k_center_greedy(x, lab, 50, key=jax.random.key(0)).tolist()) == [7, 8, 9]
    assert k_center_greedy(x, np.ones(10, bool), 5, key=jax.random.key(0)).size == 0
    with pytest.raises(ValueError):
        k_center_greedy(x, np.zeros(9, bool), 2, key=jax.random.key(0))
