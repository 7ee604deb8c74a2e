"""``embed``: an MLP on MiniLM embeddings of the prompt and the answer.

Catches semantic differences that n-grams miss (what is said rather than how). Input
per answer: [e_answer, e_answer ⊙ e_prompt] (the product lets a small MLP condition on
the prompt; the prompt embedding alone carries no label information because both
classes share it). Minibatch Adam for exactly ``t`` steps in one jitted scan.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qbudget.adversaries.base import AdversaryData, AdversaryResult, train_subset
from qbudget.adversaries.configs import EmbedConfig
from qbudget.padding import pad_rows, pow2_at_least


def init_mlp(key, din: int, hidden: int):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (din, hidden)) * jnp.sqrt(1.0 / din),
            "b1": jnp.zeros(hidden), "w2": jax.random.normal(k2, (hidden,)) * jnp.sqrt(1.0 / hidden),
            "b2": jnp.zeros(())}


def mlp(p, x):
    return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


@functools.partial(jax.jit, static_argnames=("hidden", "steps", "batch", "lr", "wd"))
def fit_mlp(x, y, n, key, *, hidden, steps, batch, lr, wd):
    """Train a one-hidden-layer MLP classifier on rows [0, n) of x (rest is padding)."""
    kinit, kdata = jax.random.split(key)
    params = init_mlp(kinit, x.shape[1], hidden)
    tx = optax.adamw(lr, weight_decay=wd)

    def loss(p, xb, yb):
        return optax.sigmoid_binary_cross_entropy(mlp(p, xb), yb).mean()

    def step(carry, k):
        p, s = carry
        rows = jax.random.randint(k, (batch,), 0, n)
        g = jax.grad(loss)(p, x[rows], y[rows])
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(kdata, steps))
    return params


_apply = jax.jit(mlp)


def unit_features(data: AdversaryData, rows: np.ndarray, use_prompt: bool) -> np.ndarray:
    """[teacher answers; student answers] embedding features for the prompt rows."""
    ans = np.concatenate([data.embeddings("teacher")[rows], data.embeddings("student")[rows]])
    if not use_prompt:
        return ans
    p = data.embeddings("prompts")[rows]
    return np.concatenate([ans, ans * np.concatenate([p, p])], axis=1)


def fit_predictor(data: AdversaryData, cfg: EmbedConfig, key: jax.Array):
    """Train on the adversary-train split; returns ``predict(rows) -> AdversaryResult`` for
    adversary-test prompt rows (their embeddings are read from ``data`` when called)."""
    kq, kfit = jax.random.split(key)
    train = train_subset(data, cfg.q, kq)
    x = unit_features(data, train, cfg.use_prompt).astype(np.float32)
    y = np.concatenate([np.ones(len(train)), np.zeros(len(train))]).astype(np.float32)
    n = len(y)
    m = pow2_at_least(n, 64)
    params = fit_mlp(pad_rows(x, m), pad_rows(y, m), n, kfit, hidden=cfg.hidden, steps=cfg.t,
                     batch=cfg.batch, lr=cfg.lr, wd=cfg.weight_decay)
    d = x.shape[1]

    def predict(rows: np.ndarray) -> AdversaryResult:
        rows = np.asarray(rows, np.int64)
        xt = unit_features(data, rows, cfg.use_prompt).astype(np.float32)
        logits = np.asarray(_apply(params, pad_rows(xt, pow2_at_least(len(xt), 64))))[: len(xt)]
        yt = np.concatenate([np.ones(len(rows)), np.zeros(len(rows))]) > 0.5
        flops = (cfg.t * 6.0 * cfg.batch * (d * cfg.hidden + cfg.hidden)
                 + 2.0 * len(xt) * d * cfg.hidden)
        cats = np.asarray(data.categories)[np.concatenate([rows, rows])]
        return AdversaryResult((logits > 0) == yt, cats, q=len(train), t=cfg.t, flops=flops)

    return predict


def run(data: AdversaryData, cfg: EmbedConfig, key: jax.Array) -> AdversaryResult:
    return fit_predictor(data, cfg, key)(data.test_idx)
