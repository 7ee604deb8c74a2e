"""``pairwise``: teacher identification — given a prompt and its two answers, which one
is the teacher's?

Antisymmetric by construction: the model learns a per-answer score s(prompt, answer)
(a sparse linear term on hashed n-grams plus an MLP on MiniLM embedding features) and
says P(first is the teacher's) = σ(s(first) − s(second)). Swapping the two answers
therefore maps p to 1 − p and flips every non-tied decision, so no A/B
swap-consistency filtering is needed (``filtered`` is always 0). Exact ties (e.g.
identical answers) are broken by a seeded coin.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qbudget.adversaries.base import AdversaryData, AdversaryResult, train_subset
from qbudget.adversaries.configs import PairwiseConfig
from qbudget.adversaries.embed import init_mlp, mlp
from qbudget.adversaries.features import HashedNgrams
from qbudget.adversaries.ngram import sparse_logits
from qbudget.padding import pad_cols, pad_rows, pow2_at_least


def _score(p, idx, val, emb):
    s = sparse_logits(p["w"], 0.0, idx, val)
    if emb is not None:
        s = s + mlp(p["mlp"], emb)
    return s


@functools.partial(jax.jit, static_argnames=("dim", "hidden", "steps", "batch", "lr_s", "lr_d"))
def fit_pairwise(ti, tv, te, si, sv, se, n, key, *, dim, hidden, steps, batch, lr_s, lr_d):
    """Train s(·) so that s(teacher) − s(student) is large on rows [0, n)."""
    kinit, kdata = jax.random.split(key)
    params = {"w": jnp.zeros(dim, jnp.float32)}
    if te is not None:
        params["mlp"] = init_mlp(kinit, te.shape[1], hidden)
    labels = {k: ("sparse" if k == "w" else "dense") for k in params}
    tx = optax.multi_transform({"sparse": optax.adam(lr_s), "dense": optax.adam(lr_d)}, labels)

    def loss(p, r):
        pick = (lambda a: None) if te is None else (lambda a: a[r])
        margin = _score(p, ti[r], tv[r], pick(te)) - _score(p, si[r], sv[r], pick(se))
        return jax.nn.softplus(-margin).mean()

    def step(carry, k):
        p, s = carry
        r = jax.random.randint(k, (batch,), 0, n)
        g = jax.grad(loss)(p, r)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(kdata, steps))
    return params


_score_jit = jax.jit(_score)


def decide(score_first: np.ndarray, score_second: np.ndarray, coin: np.ndarray):
    """(P(first is teacher), decision: 0 = first, 1 = second); ties go to ``coin``."""
    p = 1.0 / (1.0 + np.exp(-(np.asarray(score_first) - np.asarray(score_second))))
    d = np.where(score_first > score_second, 0, np.where(score_first < score_second, 1, coin))
    return p, d.astype(np.int64)


class PairwiseScorer:
    """A trained pairwise adversary; score answers, or decide between two answers."""

    def __init__(self, params, feats: HashedNgrams, encoder, use_embeddings: bool):
        self.params, self.feats, self.encoder = params, feats, encoder
        self.use_embeddings = use_embeddings

    def score(self, prompts: Sequence[str], answers: Sequence[str], emb_prompts=None,
              emb_answers=None) -> np.ndarray:
        idx, val = self.feats.featurize(answers)
        n = len(answers)
        m = pow2_at_least(n, 64)
        emb = None
        if self.use_embeddings:
            if emb_prompts is None:
                emb_prompts = self.encoder.encode(list(prompts))
            if emb_answers is None:
                emb_answers = self.encoder.encode(list(answers))
            emb = pad_rows(_emb_features(emb_prompts, emb_answers), m)
        return np.asarray(_score_jit(self.params, pad_rows(idx, m), pad_rows(val, m), emb))[:n]

    def decide(self, prompts, first, second, coin=None):
        """(P(first is the teacher's), 0/1 decision) for each prompt's answer pair."""
        coin = np.zeros(len(prompts), np.int64) if coin is None else np.asarray(coin)
        return decide(self.score(prompts, first), self.score(prompts, second), coin)


def _emb_features(ep, ea):
    return np.concatenate([ea, ea * ep], axis=1).astype(np.float32)


def _features(data, rows, feats, k=None):
    t_idx, t_val = feats.featurize([data.teacher[i] for i in rows])
    s_idx, s_val = feats.featurize([data.student[i] for i in rows])
    k = max(t_idx.shape[1], s_idx.shape[1], k or 0)
    return pad_cols(t_idx, k), pad_cols(t_val, k), pad_cols(s_idx, k), pad_cols(s_val, k)


def fit(data: AdversaryData, cfg: PairwiseConfig, key: jax.Array):
    """Train on the adversary-train split; returns (scorer, training prompt rows)."""
    kq, kfit = jax.random.split(key)
    train = train_subset(data, cfg.q, kq)
    feats = data.ngram_features(cfg.dim_log2)
    ti, tv, si, sv = _features(data, train, feats)
    m = pow2_at_least(len(train), 64)
    te = se = None
    if cfg.use_embeddings:
        ep = data.embeddings("prompts")[train]
        te = pad_rows(_emb_features(ep, data.embeddings("teacher")[train]), m)
        se = pad_rows(_emb_features(ep, data.embeddings("student")[train]), m)
    params = fit_pairwise(pad_rows(ti, m), pad_rows(tv, m), te, pad_rows(si, m),
                          pad_rows(sv, m), se, len(train), kfit, dim=feats.dim,
                          hidden=cfg.hidden, steps=cfg.t, batch=cfg.batch, lr_s=cfg.lr_sparse,
                          lr_d=cfg.lr_dense)
    return PairwiseScorer(params, feats, data.encoder, cfg.use_embeddings), train, ti.shape[1]


def fit_predictor(data: AdversaryData, cfg: PairwiseConfig, key: jax.Array):
    """Train on the adversary-train split; returns ``predict(rows) -> AdversaryResult`` for
    adversary-test prompt rows (a subset of ``data.test_idx``, read when called). Each test
    prompt's presentation order and tie coin are drawn for the whole test split and looked
    up by position, so a prompt's outcome does not depend on which others are scored."""
    kfit, korder, kcoin = jax.random.split(key, 3)
    scorer, train, k = fit(data, cfg, kfit)
    test_all = np.asarray(data.test_idx)
    position = {int(r): i for i, r in enumerate(test_all)}
    # Present each pair in a seeded random order: teacher first where swap is False.
    swap_all = np.asarray(jax.random.bernoulli(korder, 0.5, (len(test_all),)))
    coin_all = np.asarray(jax.random.bernoulli(kcoin, 0.5, (len(test_all),))).astype(np.int64)
    d_emb = 2 * 384 if cfg.use_embeddings else 0
    per_score = 2.0 * k + 2.0 * d_emb * cfg.hidden

    def predict(rows: np.ndarray) -> AdversaryResult:
        test = np.asarray(rows, np.int64)
        at = np.asarray([position[int(r)] for r in test], np.int64)
        prompts = [data.prompts[i] for i in test]
        if cfg.use_embeddings:
            ep = data.embeddings("prompts")[test]
            s_t = scorer.score(prompts, [data.teacher[i] for i in test], ep,
                               data.embeddings("teacher")[test])
            s_s = scorer.score(prompts, [data.student[i] for i in test], ep,
                               data.embeddings("student")[test])
        else:
            s_t = scorer.score(prompts, [data.teacher[i] for i in test])
            s_s = scorer.score(prompts, [data.student[i] for i in test])
        swap, coin = swap_all[at], coin_all[at]
        first = np.where(swap, s_s, s_t)
        second = np.where(swap, s_t, s_s)
        _, decision = decide(first, second, coin)
        correct = decision == swap.astype(np.int64)
        flops = cfg.t * 3.0 * 2 * cfg.batch * per_score + 2.0 * len(test) * per_score
        return AdversaryResult(correct, np.asarray(data.categories)[test], q=len(train),
                               t=cfg.t, flops=flops, extra={"filtered": 0})

    return predict


def run(data: AdversaryData, cfg: PairwiseConfig, key: jax.Array) -> AdversaryResult:
    return fit_predictor(data, cfg, key)(data.test_idx)
