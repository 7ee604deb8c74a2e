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
from qbudget.padding import pad_cols, pad_rows, pow2_at_least


def sparse_logits(w, b, idx, val):
    return (w[idx] * val).sum(-1) + b


@functools.partial(jax.jit, static_argnames=("dim", "steps", "lr", "l2"))
def fit_logreg(idx, val, y, weight, *, dim: int, steps: int, lr: float, l2: float):
    """Weighted logistic regression on padded sparse rows; returns (w [dim], b)."""
    tx = optax.adam(lr)
    params = (jnp.zeros(dim, jnp.float32), jnp.zeros((), jnp.float32))
    denom = jnp.maximum(weight.sum(), 1.0)

    def loss(p):
        logit = sparse_logits(p[0], p[1], idx, val)
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
    idx, val = pad_rows(idx, m), pad_rows(val, m)
    y_pad, weight = pad_rows(y, m), pad_rows(np.ones(len(y), np.float32), m)
    w, b = fit_logreg(idx, val, y_pad, weight, dim=feats.dim, steps=cfg.t, lr=cfg.lr, l2=cfg.l2)
    train_flops = cfg.t * (4.0 * len(y) * k_train + 12.0 * feats.dim)

    def predict(rows: np.ndarray) -> AdversaryResult:
        rows = np.asarray(rows, np.int64)
        tidx, tval, ty = featurize_units(data, rows, feats, cfg.use_prompt)
        k = max(k_train, tidx.shape[1])
        n_test = len(ty)
        m_test = pow2_at_least(n_test, 64)
        tidx, tval = pad_rows(pad_cols(tidx, k), m_test), pad_rows(pad_cols(tval, k), m_test)
        logits = np.asarray(_score(w, b, tidx, tval))[:n_test]
        correct = (logits > 0) == (ty > 0.5)
        cats = np.asarray(data.categories)[np.concatenate([rows, rows])]
        return AdversaryResult(correct, cats, q=len(train), t=cfg.t,
                               flops=train_flops + 2.0 * n_test * k)

    return predict


def run(data: AdversaryData, cfg: NgramConfig, key: jax.Array) -> AdversaryResult:
    return fit_predictor(data, cfg, key)(data.test_idx)
