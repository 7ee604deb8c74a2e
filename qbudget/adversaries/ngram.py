"""``ngram``: logistic regression on hashed word/char n-grams of the answer.

The cheapest strong attack on surface style (wording, punctuation, length). Trained
full-batch with Adam (optax) for exactly ``t`` steps inside one jitted ``lax.scan``;
shapes are bucketed so repeated evaluations reuse the compiled function.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qbudget.adversaries.base import AdversaryData, AdversaryResult, pow2_at_least, train_subset
from qbudget.adversaries.features import HashedNgrams


@dataclass(frozen=True)
class NgramConfig:
    q: int | None = None          # sample bound: adversary-train prompts (None = all)
    t: int = 200                  # compute bound: full-batch Adam steps
    lr: float = 0.1
    l2: float = 1e-5
    dim_log2: int = 18            # hashed feature space 2^dim_log2
    use_prompt: bool = False      # add prompt-echo features (answer tokens found in the prompt)


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


def _pad_rows(idx, val, n: int):
    k = idx.shape[1]
    out_i = np.zeros((n, k), np.int32)
    out_v = np.zeros((n, k), np.float32)
    out_i[: len(idx)] = idx
    out_v[: len(val)] = val
    return out_i, out_v


def featurize_units(data: AdversaryData, rows: np.ndarray, feats: HashedNgrams, use_prompt: bool):
    """Features of teacher then student answers for the given prompt rows (labels 1 then 0)."""
    texts = [data.teacher[i] for i in rows] + [data.student[i] for i in rows]
    prompts = [data.prompts[i] for i in rows] * 2 if use_prompt else None
    idx, val = feats.featurize(texts, prompts)
    y = np.concatenate([np.ones(len(rows)), np.zeros(len(rows))]).astype(np.float32)
    return idx, val, y


def run(data: AdversaryData, cfg: NgramConfig, key: jax.Array) -> AdversaryResult:
    train = train_subset(data, cfg.q, key)
    test = np.asarray(data.test_idx)
    feats = HashedNgrams(cfg.dim_log2)
    idx, val, y = featurize_units(data, train, feats, cfg.use_prompt)
    tidx, tval, ty = featurize_units(data, test, feats, cfg.use_prompt)
    k = max(idx.shape[1], tidx.shape[1])
    idx, val = _pad_rows(np.pad(idx, ((0, 0), (0, k - idx.shape[1]))),
                         np.pad(val, ((0, 0), (0, k - val.shape[1]))), pow2_at_least(len(y), 64))
    weight = np.zeros(len(idx), np.float32)
    weight[: len(y)] = 1.0
    y_pad = np.zeros(len(idx), np.float32)
    y_pad[: len(y)] = y
    w, b = fit_logreg(idx, val, y_pad, weight, dim=feats.dim, steps=cfg.t, lr=cfg.lr, l2=cfg.l2)
    n_test = len(ty)
    tidx, tval = _pad_rows(np.pad(tidx, ((0, 0), (0, k - tidx.shape[1]))),
                           np.pad(tval, ((0, 0), (0, k - tval.shape[1]))), pow2_at_least(n_test, 64))
    logits = np.asarray(_score(w, b, tidx, tval))[:n_test]
    correct = (logits > 0) == (ty > 0.5)
    nnz = len(y) * k
    flops = cfg.t * (4.0 * nnz + 12.0 * feats.dim) + 2.0 * n_test * k
    cats = np.asarray(data.categories)[np.concatenate([test, test])]
    return AdversaryResult(correct, cats, q=len(train), t=cfg.t, flops=flops)
