"""A distribution-level distinguisher that needs no training: the MMD two-sample test.

This is the test of *Model Equality Testing: Which Model Is This API Serving?* (Gao,
Liang, Guestrin, ICLR 2025, arXiv 2410.20247): a kernel two-sample test on completions,
with the **Hamming kernel** and a permutation p-value. Completions are token-id sequences
truncated or padded to one length ``L`` with a pad id (:func:`pad_tokens`); padding is
compared like any token, so completions of different lengths differ at the padded
positions, as in the paper.

Kernel. ``h(y, y') = (1/L) Σ_l 1[y_l = y'_l]`` — the share of positions where two
completions agree. It is the paper's ``Σ_l 1[y_l = y'_l]`` normalised so that
``h(y, y) = 1`` (the paper's code divides by ``sqrt(k(y,y) k(y',y'))``, which is ``L`` for
padded sequences), so the statistic is the same up to that factor. Over prompt–completion
pairs the paper's kernel is ``k((x,y),(x',y')) = 1[x = x'] · h(y, y')``: only completions
of the same prompt are compared.

Estimator (the paper's): with ``K`` the kernel over the pooled sample and self-pairs left
out, ``MMD² = mean K(a, a') + mean K(b, b') − 2 mean K(a, b)``, each mean over the pairs
the kernel can see (same-prompt pairs under the prompt kernel; every pair otherwise, where
it is exactly Gretton et al.'s unbiased U-statistic ``MMD²_u``).

Which kernel a call uses (``kernel="auto"``):

* ``prompt_ids=None`` — two independent samples, no prompt structure: ``h`` alone, pooled
  label permutations (the paper's procedure).
* ``prompt_ids=(ids_a, ids_b)`` where some prompt has two or more completions in each
  sample (the paper's design, several samples per prompt): the prompt kernel
  ``1[x = x'] · h``; labels are permuted *within* each prompt, which keeps every prompt's
  counts and is exact for a fixed prompt set.
* ``prompt_ids`` where every prompt has one completion per model (qbudget's probe: one
  teacher and one student answer per prompt): within a sample no two completions share a
  prompt, so the prompt kernel would see only the (teacher, student) pairs, whose sum no
  relabelling changes — it would have no power. The test then uses ``h`` over all pairs,
  still permuting within prompts (each permutation swaps some teacher/student pairs).
  That keeps the test exact, since under H0 the two answers to a prompt are exchangeable
  whatever the prompts are, and detects any difference in the prompt-averaged completion
  distribution; pooled permutations would instead break the pairs and be conservative.

The p-value is ``(1 + #{permuted ≥ observed}) / (1 + n_permutations)``, valid at every
level for any number of permutations. Everything is numpy (BLAS matmuls over a block of
permutations at a time): the kernel is computed once, ``O(N² L)``, and each permutation
costs ``O(N²)``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from qbudget.errors import QBudgetError

#: Default pad id for :func:`pad_tokens` (token ids are ≥ 0).
PAD = -1


class MMDTest(NamedTuple):
    """``statistic, p_value = mmd_test(...)``."""

    statistic: float       # MMD² estimate with the kernel described in the module doc
    p_value: float


def pad_tokens(sequences: Sequence[Sequence[int]], length: int, pad_id: int = PAD) -> np.ndarray:
    """Token-id lists → int64 ``[n, length]``: truncated to ``length``, padded with ``pad_id``."""
    length = int(length)
    if length < 1:
        raise QBudgetError(f"completion length must be ≥ 1, got {length}")
    out = np.full((len(sequences), length), pad_id, np.int64)
    for i, s in enumerate(sequences):
        s = list(s)[:length]
        out[i, :len(s)] = s
    return out


def hamming_kernel(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """``K[i, j] = share of positions where x[i] and y[j] hold the same token`` (float64)."""
    x = np.asarray(x)
    y = x if y is None else np.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise QBudgetError("token arrays must be [n, L] with the same L")
    length = x.shape[1]
    counts = np.zeros((x.shape[0], y.shape[0]), np.int32)
    for pos in range(length):           # L passes of an N×N comparison; no N×N×L temporary
        counts += x[:, pos, None] == y[None, :, pos]
    return counts / float(length)


def _stratified_labels(strata: np.ndarray, labels: np.ndarray, n_perm: int,
                       rng: np.random.Generator) -> np.ndarray:
    """``n_perm`` relabellings ``[n_perm, N]`` that shuffle ``labels`` within each stratum."""
    order = np.argsort(strata, kind="stable")
    grouped = labels[order]                       # labels laid out stratum by stratum
    key = strata[order][None, :] + rng.random((n_perm, len(strata)))   # strata are 0..S-1
    pos = np.argsort(key, axis=1)                 # within-stratum random order
    out = np.empty((n_perm, len(strata)), labels.dtype)
    rows = np.arange(n_perm)[:, None]
    out[rows, order[pos]] = grouped[None, :]
    return out


def mmd_test(tokens_a, tokens_b, prompt_ids=None, *, n_permutations: int = 1000,
             rng: np.random.Generator, kernel: str = "auto") -> MMDTest:
    """MMD² two-sample test of two models' completions; returns ``(statistic, p_value)``.

    ``tokens_a`` / ``tokens_b``: int ``[n_a, L]`` / ``[n_b, L]`` token ids padded to one
    length (:func:`pad_tokens`). ``prompt_ids``: ``None`` (independent samples) or
    ``(ids_a, ids_b)``, the prompt of each row; a single array means both samples answer
    the prompts in the same row order. ``kernel``: ``"auto"`` (see the module doc),
    ``"hamming"`` (``h`` over all pairs) or ``"prompt"`` (the paper's ``1[x=x'] · h``).
    ``rng`` draws the permutations. Large statistics mean different distributions.
    """
    a = np.asarray(tokens_a)
    b = np.asarray(tokens_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise QBudgetError("tokens_a and tokens_b must be [n, L] arrays with the same L "
                           "(pad them with qbudget.mmd.pad_tokens)")
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        raise QBudgetError("the MMD test needs at least 2 completions from each model")
    if kernel not in ("auto", "hamming", "prompt"):
        raise QBudgetError(f"kernel must be 'auto', 'hamming' or 'prompt', got {kernel!r}")
    if n_permutations < 1:
        raise QBudgetError("n_permutations must be ≥ 1")
    labels = np.concatenate([np.ones(na, np.float64), np.zeros(nb, np.float64)])
    z = np.concatenate([a, b])
    k = hamming_kernel(z)

    if prompt_ids is None:
        if kernel == "prompt":
            raise QBudgetError("kernel='prompt' needs prompt_ids")
        strata = np.zeros(na + nb, np.int64)
        use_prompt = False
    else:
        if isinstance(prompt_ids, tuple) and len(prompt_ids) == 2:
            ia, ib = (np.asarray(v).reshape(-1) for v in prompt_ids)
        else:
            ia = ib = np.asarray(prompt_ids).reshape(-1)
        if len(ia) != na or len(ib) != nb:
            raise QBudgetError(f"prompt_ids give {len(ia)} and {len(ib)} prompts for "
                               f"{na} and {nb} completions")
        _, strata = np.unique(np.concatenate([ia, ib]), return_inverse=True)
        strata = strata.astype(np.int64)
        ca = np.bincount(strata[:na], minlength=strata.max() + 1)
        cb = np.bincount(strata[na:], minlength=strata.max() + 1)
        repeats = bool((ca * (ca - 1)).sum() > 0 and (cb * (cb - 1)).sum() > 0)
        if kernel == "prompt" and not repeats:
            raise QBudgetError("the prompt kernel needs some prompt answered at least twice "
                               "by each model; use kernel='hamming' (or 'auto')")
        use_prompt = kernel == "prompt" or (kernel == "auto" and repeats)
    if use_prompt:
        k = k * (strata[:, None] == strata[None, :])
        n_aa, n_bb = float((ca * (ca - 1)).sum()), float((cb * (cb - 1)).sum())
        n_ab = float((ca * cb).sum())
    else:
        n_aa, n_bb, n_ab = float(na * (na - 1)), float(nb * (nb - 1)), float(na * nb)
    np.fill_diagonal(k, 0.0)
    total = float(k.sum())

    def stat(lab: np.ndarray) -> np.ndarray:      # lab: [P, N] 1 for sample a
        ka = lab @ k
        s_aa = np.einsum("pn,pn->p", ka, lab)
        s_ab = ka.sum(axis=1) - s_aa
        s_bb = total - 2.0 * s_ab - s_aa
        return s_aa / n_aa + s_bb / n_bb - 2.0 * s_ab / n_ab

    observed = float(stat(labels[None, :])[0])
    hits = 0
    tol = 1e-9 * max(1.0, abs(observed))
    done = 0
    while done < n_permutations:
        p = min(256, n_permutations - done)
        lab = _stratified_labels(strata, labels, p, rng)
        hits += int((stat(lab) >= observed - tol).sum())
        done += p
    return MMDTest(observed, (1.0 + hits) / (1.0 + n_permutations))
