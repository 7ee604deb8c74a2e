"""``ngram``: logistic regression on hashed word/char n-grams of the answer.

The cheapest strong attack on surface style (wording, punctuation, length). Trained
full-batch with Adam (optax) for exactly ``t`` steps inside one jitted ``lax.scan``;
shapes are bucketed so repeated evaluations reuse the compiled function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qbudget.adversaries.base import AdversaryData, AdversaryResult, train_subset
from qbudget.adversaries.configs import NgramConfig
from qbudget.adversaries.features import HashedNgrams
from qbudget.padding import fine_bucket, pad_cols, pad_rows, pow2_at_least


def sparse_logits(w, b, idx, val):
    return (w[idx] * val).sum(-1) + b


@functools.partial(jax.jit, static_argnames=("dim", "steps", "lr", "l2"))
def fit_logreg(rows, cols, vals, y, weight, *, dim: int, steps: int, lr: float, l2: float):
    """Weighted logistic regression on sparse entries (row, column, value); returns
    (w [dim], b).

    Why entries, not the padded [N, K] rows the featuriser returns: rows are padded to a
    power of two at least as wide as the widest, ~4x the mean on the worlds' answers, and
    the gather and scatter-add over every slot are the whole cost of a step.
    """
    tx = optax.adam(lr)
    params = (jnp.zeros(dim, jnp.float32), jnp.zeros((), jnp.float32))
    denom = jnp.maximum(weight.sum(), 1.0)

    def loss(p):
        logit = jax.ops.segment_sum(p[0][cols] * vals, rows, num_segments=len(y),
                                    indices_are_sorted=True) + p[1]
        ce = optax.sigmoid_binary_cross_entropy(logit, y)
        return (ce * weight).sum() / denom + l2 * jnp.sum(p[0] ** 2)

    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params


_score = jax.jit(sparse_logits)


class CompactFeatures:
    """The hashed features that occur in a training set, renumbered 0..U-1.

    A feature absent from every training row gets no gradient and keeps weight 0 (Adam
    and the L2 term alike leave an untouched zero at zero), so fitting over these U
    columns instead of the whole 2^k hashed space gives the same weights at a fraction
    of the per-step cost; unseen features score through one extra, always-zero column.
    """

    def __init__(self, idx: np.ndarray, val: np.ndarray):
        self.vocab = np.unique(idx[val != 0])
        self.dim = fine_bucket(len(self.vocab) + 1)
        self.unseen = len(self.vocab)

    def columns(self, idx: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(self.vocab, idx), max(0, len(self.vocab) - 1))
        hit = self.vocab[pos] == idx if len(self.vocab) else np.zeros(idx.shape, bool)
        return np.where(hit, pos, self.unseen).astype(np.int32)

    def entries(self, idx: np.ndarray, val: np.ndarray, n_rows: int):
        """(rows, cols, vals) of the nonzero slots, row-sorted, padded to a fine bucket
        with zero values on the last row (padding changes no logit and no gradient)."""
        r, k = np.nonzero(val)
        e = fine_bucket(len(r))
        rows = np.full(e, n_rows - 1, np.int32)
        cols = np.zeros(e, np.int32)
        vals = np.zeros(e, np.float32)
        rows[: len(r)], cols[: len(r)], vals[: len(r)] = r, self.columns(idx[r, k]), val[r, k]
        return rows, cols, vals


def featurize_units(data: AdversaryData, rows: np.ndarray, feats: HashedNgrams, use_prompt: bool):
    """Features of teacher then student answers for the given prompt rows (labels 1 then 0)."""
    texts = [data.teacher[i] for i in rows] + [data.student[i] for i in rows]
    prompts = [data.prompts[i] for i in rows] * 2 if use_prompt else None
    idx, val = feats.featurize(texts, prompts)
    y = np.concatenate([np.ones(len(rows)), np.zeros(len(rows))]).astype(np.float32)
    return idx, val, y


def fit_predictor(data: AdversaryData, cfg: NgramConfig, key: jax.Array):
    """Train on the adversary-train split; returns ``predict(rows) -> AdversaryResult`` for
    adversary-test prompt rows (read from ``data`` when called, so a lazily buying
    evaluation can fill in teacher answers between calls)."""
    train = train_subset(data, cfg.q, key)
    feats = data.ngram_features(cfg.dim_log2)
    idx, val, y = featurize_units(data, train, feats, cfg.use_prompt)
    k_train = idx.shape[1]
    m = pow2_at_least(len(y), 64)
    compact = CompactFeatures(idx, val)
    rows, cols, vals = compact.entries(idx, val, m)
    y_pad, weight = pad_rows(y, m), pad_rows(np.ones(len(y), np.float32), m)
    w, b = fit_logreg(rows, cols, vals, y_pad, weight, dim=compact.dim, steps=cfg.t,
                      lr=cfg.lr, l2=cfg.l2)
    train_flops = cfg.t * (6.0 * int((val != 0).sum()) + 12.0 * len(compact.vocab))

    def predict(rows: np.ndarray) -> AdversaryResult:
        rows = np.asarray(rows, np.int64)
        tidx, tval, ty = featurize_units(data, rows, feats, cfg.use_prompt)
        k = max(k_train, tidx.shape[1])
        n_test = len(ty)
        m_test = pow2_at_least(n_test, 64)
        tidx, tval = pad_rows(pad_cols(tidx, k), m_test), pad_rows(pad_cols(tval, k), m_test)
        tidx = compact.columns(tidx)
        logits = np.asarray(_score(w, b, tidx, tval))[:n_test]
        correct = (logits > 0) == (ty > 0.5)
        cats = np.asarray(data.categories)[np.concatenate([rows, rows])]
        return AdversaryResult(correct, cats, q=len(train), t=cfg.t,
                               flops=train_flops + 2.0 * n_test * k)

    return predict


def run(data: AdversaryData, cfg: NgramConfig, key: jax.Array) -> AdversaryResult:
    return fit_predictor(data, cfg, key)(data.test_idx)
