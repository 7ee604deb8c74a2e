"""``finetune``: MiniLM with a linear classification head, fine-tuned for ``t`` steps.

The strongest (and slowest) adversary: it can learn any feature the encoder can
represent of the (prompt, answer) pair. Off by default on CPU. Training is functional
over the ``nnx.split`` state of the shared encoder, so the encoder used for similarity
is never modified.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qbudget.adversaries.base import AdversaryData, AdversaryResult, train_subset
from qbudget.adversaries.configs import FinetuneConfig
from qbudget.errors import QBudgetError
from qbudget.models.encoder import mean_pool
from qbudget.padding import pad_rows


def _logits(graphdef, state, head, ids, mask, types):
    model = nnx.merge(graphdef, state)
    pooled = mean_pool(model(ids, mask, types), mask)
    return pooled @ head["w"] + head["b"]


def _make_step(graphdef, tx):
    @jax.jit
    def step(state, head, opt_state, ids, mask, types, y):
        def loss(params):
            logits = _logits(graphdef, params[0], params[1], ids, mask, types)
            return optax.sigmoid_binary_cross_entropy(logits, y).mean()

        g = jax.grad(loss)((state, head))
        updates, opt_state = tx.update(g, opt_state, (state, head))
        state, head = optax.apply_updates((state, head), updates)
        return state, head, opt_state

    return step


def fit_predictor(data: AdversaryData, cfg: FinetuneConfig, key: jax.Array):
    """Fine-tune on the adversary-train split; returns ``predict(rows) -> AdversaryResult``
    for adversary-test prompt rows (their texts are read from ``data`` when called)."""
    enc = data.encoder
    if enc is None:
        raise QBudgetError("the finetune adversary needs a sentence encoder")
    kq, khead, kdata = jax.random.split(key, 3)
    train = train_subset(data, cfg.q, kq)
    graphdef, state = nnx.split(enc.model)
    head = {"w": jax.random.normal(khead, (enc.dim,)) * 0.02, "b": jnp.zeros(())}
    labels = (jax.tree.map(lambda _: "enc", state), {"w": "head", "b": "head"})
    tx = optax.multi_transform({"enc": optax.adamw(cfg.lr), "head": optax.adam(cfg.head_lr)},
                               labels)
    opt_state = tx.init((state, head))
    step = _make_step(graphdef, tx)

    def texts(rows):
        answers = [data.teacher[i] for i in rows] + [data.student[i] for i in rows]
        prompts = [data.prompts[i] for i in rows] * 2
        return prompts, answers

    tr_p, tr_a = texts(train)
    y_all = np.concatenate([np.ones(len(train)), np.zeros(len(train))]).astype(np.float32)
    pairs_arg = (lambda p, a: (p, a)) if cfg.use_prompt else (lambda p, a: (a, None))
    rng = np.random.default_rng(np.asarray(jax.random.key_data(kdata)).ravel())
    train_tokens = 0
    for _ in range(cfg.t):
        rows = rng.integers(0, len(y_all), cfg.batch)
        a, b = pairs_arg([tr_p[r] for r in rows], [tr_a[r] for r in rows])
        ids, mask, types = enc.tokenize(a, b, length=cfg.max_length)
        train_tokens += ids.size
        state, head, opt_state = step(state, head, opt_state, ids, mask, types, y_all[rows])
    logit_fn = jax.jit(functools.partial(_logits, graphdef))
    n_params = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size"))

    def predict(rows: np.ndarray) -> AdversaryResult:
        test = np.asarray(rows, np.int64)
        te_p, te_a = texts(test)
        eval_tokens = 0
        logits = np.zeros(len(te_a), np.float32)
        for s in range(0, len(te_a), cfg.eval_batch):
            sl = slice(s, s + cfg.eval_batch)
            a, b = pairs_arg(te_p[sl], te_a[sl])
            ids, mask, types = enc.tokenize(a, b, length=cfg.max_length)
            pad = cfg.eval_batch - len(ids)
            if pad:
                ids, mask, types = (pad_rows(x, cfg.eval_batch) for x in (ids, mask, types))
                mask[len(mask) - pad:, 0] = 1
            eval_tokens += ids.size
            logits[sl] = np.asarray(logit_fn(state, head, ids, mask, types))[: len(te_a[sl])]
        yt = np.concatenate([np.ones(len(test)), np.zeros(len(test))]) > 0.5
        flops = n_params * (6.0 * train_tokens + 2.0 * eval_tokens)  # rough: counts embeddings too
        cats = np.asarray(data.categories)[np.concatenate([test, test])]
        return AdversaryResult((logits > 0) == yt, cats, q=len(train), t=cfg.t, flops=flops)

    return predict


def run(data: AdversaryData, cfg: FinetuneConfig, key: jax.Array) -> AdversaryResult:
    return fit_predictor(data, cfg, key)(data.test_idx)
